"""Case 6: a real-size model from diffusers, served by `gen serve`, against diffusers' own DDIMPipeline.

The network is the DDPM CIFAR-10 U-Net: a diffusers UNet2DModel built from google/ddpm-cifar10-32's published
config (below; 35.7M parameters) with random weights (torch.manual_seed(0); nothing is downloaded, and speed does
not depend on the weights). It is saved with `save_pretrained` as a pipeline folder (unet/, scheduler/) and
exported with `gen export --from-diffusers` into bench/.cache/large-model-<key>/, once: the key hashes the config,
the scheduler, the torch and diffusers versions and the exporter's sources.

The scheduler is the published DDPMScheduler (linear betas 1e-4..0.02 over 1000 steps, clipped x0) turned into a
DDIMScheduler with `DDIMScheduler.from_config(ddpm.config, timestep_spacing="trailing")`; that is the scheduler
saved beside the U-Net, so the exported manifest and diffusers' pipeline sample the same timestep grid.

  * gen: a real `gen serve --no-http --device cpu` over that repository; `requests` concurrent gRPC Generate
    streams (n=1 each, seeds 0..requests-1, sampler ddim, eta 0) after a warm-up of the same requests at 2 steps;
    images/s = requests / wall seconds. The server process's CPU seconds (/proc/PID/stat) are recorded too.
  * diffusers: DDIMPipeline(unet, DDIMScheduler) in this process, torch threads = the cores, eta 0,
    output_type "np", at batch 1 (images one after another) and at batch `requests` (one call).
Sides run in turn, each repeat; medians. Then the cost per image-step of the bare denoiser in onnxruntime (the
server's session options) at batch 1, 8, 32 and 64, for this U-Net and for the shipped MNIST U-Net
(exported/mnist-diffusion), models in turn at each batch, plus PyTorch eager for the CIFAR U-Net.

    python -m bench.large_model [--mode quick|full|smoke]   # this case alone: updates bench/results.json and
                                                            # BENCHMARKS.md (smoke: prints only)
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: its threads must not spin (bench/__main__)

import argparse  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"
NAME = "ddpm-cifar10-32"
MNIST = ROOT / "exported" / "mnist-diffusion" / "1"  # the shipped MNIST model, for the cost-vs-batch table
EXPORTER_SOURCES = ("trainer/from_diffusers.py", "trainer/export.py", "trainer/denoising.py")

# google/ddpm-cifar10-32's unet/config.json as published (UNet2DModel; every key that differs from a default is
# given, the rest are diffusers' defaults), 35.7M parameters
CIFAR10_UNET = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": None, "act_fn": "silu", "center_input_sample": False, "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
    "time_embedding_type": "positional",
}
# smoke mode only: the same block layout shrunk to seconds of work (its numbers mean nothing)
TINY_UNET = {**CIFAR10_UNET, "layers_per_block": 1, "block_out_channels": [32, 32], "norm_num_groups": 8,
             "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}
UNETS = {"cifar10": CIFAR10_UNET, "tiny": TINY_UNET}
# google/ddpm-cifar10-32's scheduler_config.json (DDPMScheduler)
DDPM_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                  "clip_sample": True, "variance_type": "fixed_large"}
PARAMETERS = {"cifar10": 35.7e6}  # about; asserted within 1%

REQUESTS = 32
STEPS = (10, 50)
COST_BATCHES = (1, 8, 32, 64)


def _ddim_scheduler():
    from diffusers import DDIMScheduler, DDPMScheduler

    return DDIMScheduler.from_config(DDPMScheduler(**DDPM_SCHEDULER).config, timestep_spacing="trailing")


def _key(unet_config: dict) -> str:
    import diffusers
    import torch

    h = hashlib.sha256(json.dumps([unet_config, DDPM_SCHEDULER, "trailing", torch.__version__,
                                   diffusers.__version__], sort_keys=True).encode())
    for source in EXPORTER_SOURCES:
        h.update((ROOT / source).read_bytes())
    return h.hexdigest()[:12]


def build(config: str = "cifar10", cache: Path = CACHE, log=print) -> Path:
    """cache/large-model-<key>/: pipeline/ (save_pretrained: unet/, scheduler/) and exported/NAME/1 (gen export
    --from-diffusers), built once; returns that folder."""
    import torch
    from diffusers import UNet2DModel

    unet_config = UNETS[config]
    base = cache / f"large-model-{_key(unet_config)}"
    if (base / "done").exists():
        return base
    shutil.rmtree(base, ignore_errors=True)
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config).eval()
    params = sum(p.numel() for p in unet.parameters())
    log(f"  {config} UNet2DModel: {params / 1e6:.2f}M parameters (random weights, seed 0)")
    if config in PARAMETERS:
        assert abs(params / PARAMETERS[config] - 1) < 0.01, f"{params} parameters, expected about {PARAMETERS[config]}"
    unet.save_pretrained(base / "pipeline" / "unet")
    _ddim_scheduler().save_pretrained(base / "pipeline" / "scheduler")
    (base / "pipeline" / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDIMPipeline", "unet": ["diffusers", "UNet2DModel"],
         "scheduler": ["diffusers", "DDIMScheduler"]}, indent=1) + "\n")
    log(f"  gen export --from-diffusers {base / 'pipeline'} (verifies a 50-step DDIM served loop against PyTorch)")
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "gen", "export", "--from-diffusers", str(base / "pipeline"),
                          "--name", NAME, "--repo", str(base / "exported"), "--version", "1"],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"gen export --from-diffusers failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    (base / "export_seconds").write_text(f"{time.time() - t0:.1f}\n")
    (base / "config").write_text(config + "\n")
    (base / "done").write_text("ok\n")
    for stale in cache.glob("large-model-*"):  # earlier builds of this config (about 300 MB each for cifar10)
        marker = stale / "config"
        same = not marker.exists() or marker.read_text().strip() == config
        if stale != base and (stale / "done").exists() and same:
            shutil.rmtree(stale, ignore_errors=True)
    return base


def _cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process so far (/proc/PID/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _generate_all(client, requests: int, steps: int) -> float:
    """Seconds for `requests` concurrent Generate streams (n=1, DDIM, `steps` steps), one thread each."""
    errors: list[BaseException] = []
    images: list = []

    def one(seed: int) -> None:
        try:
            for event in client.generate(NAME, n=1, seed=seed, sampler="ddim", steps=steps, eta=0.0):
                if hasattr(event, "pixels"):
                    images.append(event)
        except BaseException as e:  # noqa: BLE001 - reported below, after every thread ended
            errors.append(e)

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(requests)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors or len(images) != requests:
        raise RuntimeError(f"{len(errors)} of {requests} Generate calls failed: {errors[:1]}")
    return seconds


def _pipeline(base: Path):
    from diffusers import DDIMPipeline, UNet2DModel

    unet = UNet2DModel.from_pretrained(str(base / "pipeline" / "unet"), low_cpu_mem_usage=False).eval()
    pipe = DDIMPipeline(unet=unet, scheduler=_ddim_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers(pipe, batch: int, images: int, steps: int) -> float:
    """Seconds for `images` images through DDIMPipeline at `batch` per call."""
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        for k in range(images // batch):
            out = pipe(batch_size=batch, generator=torch.Generator().manual_seed(k), eta=0.0,
                       num_inference_steps=steps, output_type="np").images
            assert out.shape[0] == batch
    return time.perf_counter() - t0


def _feeds(graph: dict, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in graph["inputs"]:
        if spec["name"] == "x_t":
            feeds["x_t"] = rng.standard_normal((batch, *spec["shape"][1:]), dtype=np.float32)
        elif spec["name"] == "t":
            feeds["t"] = np.full(batch, 500, np.int64)
        elif spec["name"] == "label":
            feeds["label"] = (np.arange(batch) % 10).astype(np.int64)
        else:
            raise ValueError(f"denoiser input {spec['name']} is not known to the bench")
    return feeds


def _parameters(onnx_path: Path) -> int:
    import onnx

    model = onnx.load(str(onnx_path))
    return int(sum(np.prod(init.dims) for init in model.graph.initializer))


def cost_vs_batch(models: dict[str, Path], repeats: int, batches=COST_BATCHES, torch_unet=None, log=print) -> dict:
    """ms per image-step of each model's bare denoiser in onnxruntime (the server's session options) at each batch,
    models timed in turn at each batch; PyTorch eager for `torch_unet` (the first model's network) alongside."""
    import torch

    from bench.timing import interleaved_ms
    from serve.session import open_session

    runs, params = {}, {}
    for label, version_dir in models.items():
        graph = json.loads((version_dir / "manifest.json").read_text())["graphs"]["denoiser"]
        path = version_dir / graph["file"]
        session, _, _ = open_session(str(path), device="cpu", name=label)
        runs[label] = (session, graph)
        params[label] = _parameters(path)
    rows = []
    for b in batches:
        fns = {}
        for label, (session, graph) in runs.items():
            feeds = _feeds(graph, b)
            fns[label] = lambda s=session, f=feeds: s.run(None, f)
        if torch_unet is not None:
            c = torch_unet.config
            x = torch.randn(b, c.in_channels, c.sample_size, c.sample_size)
            t = torch.full((b,), 500, dtype=torch.int64)

            def eager(x=x, t=t):
                with torch.inference_mode():
                    torch_unet(x, t)
            fns["pytorch"] = eager
        ms = interleaved_ms(fns, repeats, warmup=1)
        for label in runs:
            row = {"model": label, "batch": b, "ms": ms[label], "ms_per_image": ms[label] / b}
            if label == next(iter(runs)) and "pytorch" in ms:
                row.update(torch_ms=ms["pytorch"], torch_ms_per_image=ms["pytorch"] / b)
            rows.append(row)
            log(f"  {label} denoiser, batch {b}: {ms[label]:.1f} ms ({ms[label] / b:.2f} ms per image-step)"
                + (f"; PyTorch eager {row['torch_ms']:.1f} ms" if "torch_ms" in row else ""))
    return {"rows": rows, "parameters": params}


def float_ceiling(version_dir: Path, batch: int, repeats: int, log=print) -> dict:
    """What bounds gen / diffusers at `batch`: the denoiser's FLOPs per image-step (counted from the exported graph as
    case 4 counts them) and this CPU's float32 matrix-multiply peak (bench.roofline.matmul_peak)."""
    import onnx

    from bench.roofline import count_flops, matmul_peak

    graph = json.loads((version_dir / "manifest.json").read_text())["graphs"]["denoiser"]
    flops = count_flops(onnx.load(str(version_dir / graph["file"])), batch)
    peak = matmul_peak(max(3, repeats))
    out = {"batch": batch, "gflop_per_image_step": sum(flops.values()) / batch / 1e9,
           "matmul_peak_gflops": peak["onnxruntime_gflops"], "numpy_matmul_gflops": peak["numpy_gflops"],
           "matmul_n": peak["n"]}
    log(f"  {out['gflop_per_image_step']:.2f} GFLOP per image-step; float32 {peak['n']}x{peak['n']} MatMul: "
        f"onnxruntime {out['matmul_peak_gflops']:.1f} GFLOP/s, numpy {out['numpy_matmul_gflops']:.1f}")
    return out


def run(mode: dict, log=print, cache: Path = CACHE) -> dict:
    """Build (once), then the gen-vs-diffusers rows and the cost-vs-batch table; `mode` is bench.__main__.MODES[...]."""
    import torch

    from serve.client import GenClient
    from serve.launch import start_server, stop_server
    from serve.session import available_threads

    threads = available_threads()
    torch.set_num_threads(threads)
    config, repeats, requests = mode["large_config"], mode["large_repeats"], mode["large_requests"]
    steps_list, b1_images = mode["large_steps"], mode["large_batch1_images"]
    base = build(config, cache, log)
    repo = base / "exported"
    manifest = json.loads((repo / NAME / "1" / "manifest.json").read_text())
    pipe = _pipeline(base)
    for batch in (1, requests):  # warm-up: the pipeline at both batch sizes it is timed at
        _diffusers(pipe, batch, batch, 2)
    samples: dict[tuple[str, int, int], list[float]] = {}  # (side, batch, steps): s/image
    cpu: dict[int, list[float]] = {s: [] for s in steps_list}
    idle_cpu: list[float] = []
    idle_wall: list[float] = []
    server = start_server(repo, "--no-http", "--device", "cpu", timeout=600)
    try:
        with GenClient(server.target, timeout=3600) as client:
            client.list_models()
            _generate_all(client, requests, 2)  # warm-up: the same concurrent requests, 2 steps each
            for rep in range(repeats):
                for steps in steps_list:  # the three sides in turn, each repeat
                    c0 = _cpu_seconds(server.proc.pid)
                    timed = {("gen", requests): (_generate_all(client, requests, steps), requests)}
                    c1 = _cpu_seconds(server.proc.pid)
                    cpu[steps].append(c1 - c0)
                    timed["diffusers", requests] = (_diffusers(pipe, requests, requests, steps), requests)
                    timed["diffusers", 1] = (_diffusers(pipe, 1, b1_images, steps), b1_images)
                    idle_cpu.append(_cpu_seconds(server.proc.pid) - c1)  # the server, idle while diffusers ran
                    idle_wall.append(sum(sec for (side, _), (sec, _) in timed.items() if side == "diffusers"))
                    for (side, batch), (sec, n) in timed.items():
                        samples.setdefault((side, batch, steps), []).append(sec / n)
                        log(f"  [{rep + 1}/{repeats}] {steps} steps, {side} "
                            + (f"({requests} concurrent requests)" if side == "gen" else f"batch {batch}")
                            + f": {n} images in {sec:.1f} s ({n / sec:.2f} images/s)")
    finally:
        stop_server(server)
    rows = []
    for (side, batch, steps), per_image in samples.items():
        s = statistics.median(per_image)
        rows.append({"side": side, "batch": batch, "steps": steps, "images_per_s": 1 / s, "seconds_per_image": s,
                     "images": b1_images if side == "diffusers" and batch == 1 else requests,
                     "repeats": len(per_image), "samples_images_per_s": [1 / x for x in per_image]})
        if side == "gen":
            rows[-1]["server_cpu_seconds"] = statistics.median(cpu[steps])
    log("  cost per image-step of the bare denoiser, onnxruntime (and PyTorch eager for the CIFAR U-Net)")
    cost = cost_vs_batch({NAME: repo / NAME / "1", "mnist-diffusion": MNIST}, mode["large_cost_repeats"],
                         torch_unet=pipe.unet, log=log)
    ceiling = float_ceiling(repo / NAME / "1", requests, mode["large_cost_repeats"], log)
    return {"model": NAME, "config": config, "unet": UNETS[config], "scheduler": "DDIMScheduler",
            "timestep_spacing": "trailing", "requests": requests, "steps": list(steps_list),
            "batch1_images": b1_images, "repeats": repeats, "threads": threads, "rows": rows, "cost": cost,
            "ceiling": ceiling,
            "server_idle_cpu_seconds": sum(idle_cpu), "server_idle_wall_seconds": sum(idle_wall),
            "parameters": sum(p.numel() for p in pipe.unet.parameters()),
            "export_parity": manifest.get("parity", {}),
            "export_seconds": float((base / "export_seconds").read_text()) if (base / "export_seconds").exists()
            else None}


def main() -> None:
    from bench import report
    from bench.__main__ import MODES
    from bench.timing import machine

    ap = argparse.ArgumentParser(prog="python -m bench.large_model", description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=sorted(MODES), default="quick")
    args = ap.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    t0 = time.time()
    result = run(MODES[args.mode], print)
    m = machine()
    result.update(command=f"python -m bench.large_model --mode {args.mode}", mode=args.mode, started=started,
                  seconds=time.time() - t0, load=[*load, *os.getloadavg()], cpu=m["cpu"], cores=m["cores"],
                  commit=m["commit"])
    if args.mode == "smoke":
        print(json.dumps(result, indent=1, default=float))
        print("smoke mode: bench/results.json and BENCHMARKS.md left as they were")
        return
    report.update_case("large_model", result)


if __name__ == "__main__":
    main()
