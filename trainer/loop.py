"""fit(): the training loop every family shares.

A run directory holds everything about one run:
  config.json        the resolved options (loop + family), written before the first step
  metrics.jsonl      one JSON line of losses every --log-every steps
  samples/step_N.png a sample grid every --sample-every steps (translators: input | output | target)
  checkpoint.pt      nets, optimisers, schedulers, EMA, RNG state and step, replaced atomically

Resume is exact: data order is a pure function of (seed, step) (see data.BatchOrder) and the RNG
state of every rank is in the checkpoint, so N steps + resume + N steps equals 2N steps.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from serve.images import grid
from trainer.data import Batches, Dataset, load_dataset, to_float
from trainer.models import ConfigError, Family, get_family

CHECKPOINT = "checkpoint.pt"


@dataclass(kw_only=True)
class TrainConfig:
    family: str
    data: str | None = None  # embedded dataset name or folder; None = the family's default
    image_size: int = 32
    channels: int | None = None  # None: from the data (1 if every image is greyscale)
    direction: str = "AtoB"  # paired/unpaired data: which side is the input
    steps: int = 1000
    epochs: int | None = None  # when set, steps = epochs * ceil(train size / (batch size * processes))
    batch_size: int = 64
    lr: float | None = None  # None: the family's own default (each family tunes its own)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    run_dir: str = "runs/run"
    flip: bool = True  # random horizontal flips for translators (pix2pix/CycleGAN practice)
    sample_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 10
    family_options: dict = field(default_factory=dict)  # fields of the family's Config


@dataclass
class FitResult:
    run_dir: Path
    steps: int
    losses: dict[str, float]  # the last step's
    seconds: float
    family: Family  # the trained family, in memory


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must see (e.g. a non-finite loss)."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ConfigError(f"--device {name}: use auto, cpu or cuda")
    return torch.device("cpu")


def build_family(config: TrainConfig, dataset: Dataset, device: torch.device) -> Family:
    cls = get_family(config.family)
    if cls.spec().data_kind != dataset.info.kind:
        raise ConfigError(f"{config.family} trains on {cls.spec().data_kind} data, not {dataset.info.kind}")
    known = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(config.family_options) - known)
    if unknown:
        raise ConfigError(f"--set {unknown[0]}: not an option of {config.family}; "
                          f"options: {', '.join(sorted(known))}")
    options = dict(config.family_options)
    if config.lr is not None:
        options.setdefault("lr", config.lr)
    options.setdefault("batch_size", config.batch_size)
    if "steps" in known:
        options.setdefault("steps", config.steps)
    try:
        family_config = cls.Config(**options)
    except TypeError as e:
        raise ConfigError(f"--set: {e}") from None
    cls.check(family_config, dataset.info)
    return cls(family_config, dataset.info, device)


def family_config_dict(family: Family) -> dict:
    return dataclasses.asdict(family.config)


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    """[N, C, H, W] in [-1, 1] -> one PNG grid with a 2-pixel white gutter, written atomically."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    out = grid(x, nrow, pad_value=255).transpose(1, 2, 0)
    img = Image.fromarray(out[..., 0] if out.shape[-1] == 1 else out)
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphaned_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_orphaned_temporaries(path: Path) -> None:
    """Delete temporary files of `path` left by writers that were killed mid-write (their PID is gone)."""
    prefix = f".{path.name}.tmp"
    for tmp in path.parent.glob(prefix + "*"):
        pid = tmp.name[len(prefix):]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, someone else's


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _sample_batch(dataset: Dataset, family: Family) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch for the progress grids: held-out pairs for translators, cycling labels for generators."""
    if dataset.info.kind == "images":
        k = max(dataset.info.num_classes, 1)
        n = k * max(1, 64 // k)
        x = to_float(dataset.train[0][:n])
        return x.to(family.device), (torch.arange(n) % k).to(family.device)
    a, b = (dataset.test if len(dataset.test[0]) and len(dataset.test[1]) else dataset.train)
    n = min(8, len(a), len(b))
    return to_float(a[:n]).to(family.device), to_float(b[:n]).to(family.device)


def _grid_columns(dataset: Dataset) -> int:
    return 6 if dataset.info.kind != "images" else (dataset.info.num_classes or 8)


class Progress:
    """A tqdm bar with the losses when attached to a terminal or asked for; otherwise a line every 10%."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled, self.total, self.start = enabled, total, start
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                            mininterval=0.5)

    def update(self, step: int, losses: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _distributed() -> tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun's environment; initialises the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("GEN_DEVICE", "auto") != "cpu" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=10))
    return dist.get_rank(), world, local_rank


def fit(config: TrainConfig, resume: bool = False, progress: bool | None = None,
        stop_at: int | None = None) -> FitResult:
    """Train (or continue training) a run. `stop_at` checkpoints and returns early at that step, as if
    the job had been pre-empted there (schedules still follow `config.steps`)."""
    os.environ.setdefault("GEN_DEVICE", config.device)
    rank, world, local_rank = _distributed()
    device = resolve_device(config.device, local_rank)
    run_dir = Path(config.run_dir)
    ckpt_path = run_dir / CHECKPOINT

    if resume:
        if not ckpt_path.exists():
            raise ConfigError(f"--resume: no {CHECKPOINT} in {run_dir}; start without --resume")
        saved = json.loads((run_dir / "config.json").read_text())
        # keep the saved run's options; only the number of steps may grow on resume
        steps = config.steps
        config = TrainConfig(**{**saved["train"], "run_dir": str(run_dir)})
        config.steps = max(steps, config.steps)
    elif ckpt_path.exists():
        raise ConfigError(f"--run-dir {run_dir}: holds a checkpoint already; add --resume to continue it "
                          "or choose another --run-dir")

    dataset = load_dataset(config.data, get_family(config.family).spec().data_kind, config.image_size,
                           config.channels, config.direction)
    if config.epochs is not None and not resume:
        config.steps = config.epochs * math.ceil(len(dataset.train[0]) / (config.batch_size * world))
    torch.manual_seed(config.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    family = build_family(config, dataset, device)
    torch.manual_seed(config.seed * 1000 + rank)  # then each rank draws its own noise
    np.random.seed((config.seed * 1000 + rank) % 2**32)

    start = 0
    if resume:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        family.load_state_dict(ckpt["family"])
        _set_rng_state(ckpt["rng"][rank], device)
        start = ckpt["step"]

    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        family.train_nets = {k: DDP(v, device_ids=ids) if any(p.requires_grad for p in v.parameters()) else v
                             for k, v in family.nets.items()}

    is_main = rank == 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {"train": dataclasses.asdict(config), "family": family_config_dict(family),
                  "data": {"source": dataset.source, **dataclasses.asdict(dataset.info)},
                  "world_size": world, "git_commit": git_commit(), "torch": torch.__version__}
        atomic_write(run_dir / "config.json", lambda f: f.write(json.dumps(record, indent=2).encode()))

    batches = Batches(dataset, config.batch_size, config.seed, device, rank, world,
                      flip=config.flip and dataset.info.kind != "images")
    sample_batch = _sample_batch(dataset, family)
    metrics_path = run_dir / "metrics.jsonl"
    if is_main:
        _truncate_metrics(metrics_path, start)
    show = is_main and (sys.stderr.isatty() if progress is None else progress)
    bar = Progress(config.steps, start, show)
    last: dict[str, float] = {}
    t0 = time.time()
    family.train(True)
    end = min(config.steps, stop_at) if stop_at is not None else config.steps
    try:
        for step in range(start, end):
            losses = family.train_step(batches(step), step)
            last = {k: float(v) for k, v in losses.items()}
            bad = next((k for k, v in last.items() if not math.isfinite(v)), None)
            if bad is not None:
                kept = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written"
                raise TrainingError(f"step {step + 1}: loss {bad} is {last[bad]}; stopped ({kept}). "
                                    "Lower --lr or check the data")
            family.on_step_end(step)
            done = step + 1
            bar.update(done, last)
            if is_main and (done % config.log_every == 0 or done in (config.steps, end)):
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"step": done, "time": round(time.time() - t0, 3), **last}) + "\n")
            if is_main and (done % config.sample_every == 0 or done == config.steps):
                save_grid(family.sample(sample_batch, seed=config.seed), run_dir / "samples" / f"step_{done:06d}.png",
                          _grid_columns(dataset))
            if done % config.checkpoint_every == 0 or done in (config.steps, end):
                _save_checkpoint(family, done, ckpt_path, device, world, is_main)
    finally:
        bar.close()
    return FitResult(run_dir, end, last, round(time.time() - t0, 2), family)


def _save_checkpoint(family: Family, step: int, path: Path, device: torch.device, world: int,
                     is_main: bool) -> None:
    rng = [_rng_state(device)]
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, rng[0])
        rng = gathered
    if is_main:
        state = {"step": step, "family": family.state_dict(), "rng": rng}
        atomic_write(path, lambda f: torch.save(state, f))
    if world > 1:
        dist.barrier()


def _truncate_metrics(path: Path, start: int) -> None:
    """On resume, drop lines logged after the checkpoint so the log reads as one run."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start]
    atomic_write(path, lambda f: f.write("".join(line + "\n" for line in keep).encode()))


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[Family, Dataset, dict]:
    """Rebuild a trained family from its run directory (for export and evaluation)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists() or not (run_dir / CHECKPOINT).exists():
        raise ConfigError(f"{run_dir}: not a finished run (needs config.json and {CHECKPOINT}); "
                          "train one with `gen train`")
    record = json.loads((run_dir / "config.json").read_text())
    config = TrainConfig(**{**record["train"], "run_dir": str(run_dir)})
    config.family_options = {k: v for k, v in record["family"].items()}
    dev = resolve_device(device)
    dataset = load_dataset(config.data, get_family(config.family).spec().data_kind, config.image_size,
                           config.channels, config.direction)
    family = build_family(config, dataset, dev)
    ckpt = torch.load(run_dir / CHECKPOINT, map_location=dev, weights_only=False)
    family.load_state_dict(ckpt["family"])
    family.train(False)
    record["step"] = ckpt["step"]
    return family, dataset, record
