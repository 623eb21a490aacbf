"""`gen eval`: quality of an exported model, measured on what is served and with nothing downloaded.

The model runs through the serving runtime (serve.runtime.Runtime, onnxruntime), its images are
quantised to 8 bits as a client receives them, and they are scored against the held-out split of the
dataset it was trained on:

- generators (vae, gan, diffusion): Frechet distance between samples and held-out images in the
  feature space of a classifier trained here on the training split (an FID with a local network), next
  to the real-vs-real baseline (training images vs held-out images, the same count); for conditional
  models, the classifier's accuracy on samples of each requested class. VAE: also the classifier's
  accuracy on reconstructions of held-out images.
- pix2pix: L1 and PSNR of translated held-out sources against their targets, images in [0, 1]; on the
  embedded `shapes`, also the colour error against the target (below).
- cyclegan: a domain classifier's accuracy on translated held-out images (A->B must look like B, and
  B->A like A), and the cycle L1 |F(G(a)) - a| and |G(F(b)) - b|. On the embedded `stripes`, whose
  renderer says where each shape is and what colour it has, also whether a translation keeps them:
  colour error (the median over images of the L2 distance, in 0-255 RGB, between the shape's colour and
  the output's mean colour inside the shape's mask, stripe-white pixels left out) and shape IoU (the mean
  over images of the IoU between the shape's mask and the output's foreground).

Classifiers are cached under $GEN_CACHE (default ~/.cache/gen), keyed by their training data.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from serve.families import DENOISE, FAMILIES, SAMPLE, FamilySpec
from trainer.data import EMBEDDED_TRAIN, load_dataset, stripes_scenes
from trainer.loop import atomic_write
from trainer.models import get_family

CLASSIFIER_VERSION = 1  # bump when the classifier's architecture or training changes: invalidates caches
# a family's own bars (class accuracy, Frechet / baseline) and sampling setting are its trainer file's
# (Family.class_accuracy_bar, frechet_bar, eval_sampling)
# a distilled student's bars per step count: (class accuracy, Frechet / baseline); other counts are reported only
STUDENT_BARS = {4: (0.97, 2.0), 2: (0.98, 2.0), 1: (0.95, 3.0)}
EDIT_STRENGTHS = (0.5, 0.7, 0.9)  # image-to-image towards another class; the family's bar at one of them
INPAINT_BAR = 0.95  # class accuracy of held-out digits whose lower half was regenerated with their own label


class EvalError(ValueError):
    """The model cannot be evaluated as asked; the message says why."""


@dataclass
class EvalConfig:
    n: int = 1000  # samples per generator (also capped by the held-out split's size for Frechet distance)
    seed: int = 0
    sampler: str | None = None  # diffusion; None: ddim for a teacher, its own for a student
    steps: int | None = None  # None: 50 for a teacher, its most for a student (`sampling_settings` lists all)
    guidance: float | None = None  # None: the model's own default
    request_size: int = 100  # rows per request: concurrent requests share batches as a server's would
    edit_n: int = 500  # held-out images edited (image-to-image, inpainting) by a class-conditional denoising model,
    # at most n
    cache: Path | None = None  # classifier cache; None: $GEN_CACHE or ~/.cache/gen
    precision: str = "fp32"  # "int8": the graphs' int8 variants where the model has them (gen serve --precision)


@dataclass
class Metric:
    name: str
    value: float
    unit: str = ""
    bar: str = ""  # the project's quality bar for shipped models, e.g. ">= 0.9"; empty: reported only
    passed: bool | None = None

    def line(self) -> str:
        verdict = "" if self.passed is None else ("  ok" if self.passed else "  BELOW BAR")
        bar = f"  (bar {self.bar})" if self.bar else ""
        return f"{self.name:<36} {_shown(self.value, self.unit)}{bar}{verdict}"


def _shown(value: float, unit: str) -> str:
    return f"{value:.4g}{unit}" if unit != "%" else f"{100 * value:.1f}%"


@dataclass
class Report:
    model: str
    version: int
    family: str
    dataset: str
    metrics: list[Metric] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # per-class accuracies and the like
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(m.passed is not False for m in self.metrics)

    def add(self, name: str, value: float, unit: str = "", at_least: float | None = None,
            at_most: float | None = None) -> None:
        bar, passed = "", None
        if at_least is not None:
            bar, passed = (f">= {100 * at_least:g}%" if unit == "%" else f">= {at_least:g}"), value >= at_least
        elif at_most is not None:
            bar, passed = f"<= {at_most:g}", value <= at_most
        self.metrics.append(Metric(name, float(value), unit, bar, None if passed is None else bool(passed)))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- the classifier -------------------------------------------------------------------------------

class Classifier(nn.Module):
    """A small CNN (three conv stages, global pooling): 128 features, then logits. Takes [-1, 1] images."""

    FEATURES = 128

    def __init__(self, channels: int, classes: int):
        super().__init__()

        def stage(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.body = nn.Sequential(stage(channels, 32), nn.MaxPool2d(2), stage(32, 64), nn.MaxPool2d(2),
                                  stage(64, self.FEATURES), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(self.FEATURES, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return features, self.head(features)

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """(features [N, 128] float64, predicted class [N]) for float images in [-1, 1]."""
        self.eval()
        feats, preds = [], []
        for i in range(0, len(images), batch):
            f, logits = self(torch.from_numpy(np.ascontiguousarray(images[i:i + batch], np.float32)))
            feats.append(f.double().numpy())
            preds.append(logits.argmax(1).numpy())
        return np.concatenate(feats), np.concatenate(preds)


def _to_float(x_uint8: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(x_uint8, np.float32) / 127.5 - 1.0


def classifier_for(x: torch.Tensor, y: torch.Tensor, classes: int, cache: Path, epochs: int = 8,
                   seed: int = 0, log=print) -> Classifier:
    """Train (or load from the cache) a classifier on uint8 images x [N, C, H, W] with labels y."""
    digest = hashlib.sha256()
    digest.update(f"v{CLASSIFIER_VERSION} {tuple(x.shape)} {classes} {epochs} {seed}".encode())
    digest.update(x.numpy().tobytes())
    digest.update(y.numpy().tobytes())
    path = cache / f"classifier-{digest.hexdigest()[:16]}.pt"
    net = Classifier(x.shape[1], classes)
    if path.exists():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.eval()
    log(f"training a {classes}-way classifier on {len(x)} training images (cached in {path})")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    xf = torch.from_numpy(_to_float(x))
    steps_per_epoch = max(1, len(x) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * steps_per_epoch)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * 128:(i + 1) * 128]
            batch = xf[idx]
            # shifts of up to 2 pixels: a classifier that has seen only centred digits is easy to fool
            dy, dx = torch.randint(-2, 3, (2,), generator=gen).tolist()
            batch = torch.roll(batch, (dy, dx), dims=(2, 3))
            _, logits = net(batch)
            loss = nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return net


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two feature sets [N, D]."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # fewer samples than features makes S singular: expected, handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as the FID reference code does
        eps = np.eye(len(s_a)) * 1e-6
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


# --- running the served model ----------------------------------------------------------------------

def quantise(images: np.ndarray) -> np.ndarray:
    """What a client gets: the manifest's mapping to 8 bits, back to [-1, 1]."""
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.float32) / 127.5 - 1.0


async def _chunks(make, n: int, size: int) -> np.ndarray:
    """Run make(start, count) for every chunk of n rows concurrently; the images in order."""
    parts = await asyncio.gather(*(make(i, min(size, n - i)) for i in range(0, n, size)))
    return np.concatenate(parts)


def _sample(rt, model: str, spec: FamilySpec, n: int, labels: np.ndarray | None, cfg: EvalConfig,
            init: np.ndarray | None = None, strength: float | None = None,
            mask: np.ndarray | None = None) -> np.ndarray:
    """n images, row i from seed cfg.seed + i // request_size so that chunks are independent requests; a denoiser
    from `init` (image-to-image, with `mask` inpainting) when given."""

    async def one(start: int, count: int) -> np.ndarray:
        lab = None if labels is None else labels[start:start + count].tolist()
        seed = cfg.seed + start
        if spec.task == DENOISE:
            known = None if init is None else init[start:start + count]
            async for event in rt.generate(model, count, seed=seed, labels=lab, sampler=cfg.sampler,
                                           steps=cfg.steps, guidance=cfg.guidance, init=known, strength=strength,
                                           mask=mask):
                result = getattr(event, "result", None)
            return result.images
        return (await rt.sample(model, count, seed=seed, labels=lab)).images

    return quantise(asyncio.run(_chunks(one, n, cfg.request_size)))


def _map(rt_call, images: np.ndarray, size: int) -> np.ndarray:
    async def one(start: int, count: int) -> np.ndarray:
        return await rt_call(images[start:start + count])

    return quantise(asyncio.run(_chunks(one, len(images), size)))


def sampling_settings(manifest, cfg: EvalConfig) -> list[EvalConfig]:
    """The (sampler, steps) settings `gen eval` scores a diffusion model at: a student at each of its step counts
    unless --steps picks one, other models at cfg's setting (by default their family's `eval_sampling`)."""
    student = manifest.student
    if student is None:
        sampler, steps = get_family(manifest.family).eval_sampling or (None, None)
        return [dataclasses.replace(cfg, sampler=cfg.sampler or sampler, steps=cfg.steps or steps)]
    if cfg.steps is not None and cfg.steps not in student["steps"]:
        raise EvalError(f"--steps {cfg.steps}: {manifest.name} samples in "
                        f"{', '.join(map(str, student['steps']))} steps")
    steps = [cfg.steps] if cfg.steps is not None else sorted(student["steps"])
    if cfg.sampler is not None and any(cfg.sampler != manifest.student_sampler(k) for k in steps):
        raise EvalError(f"--sampler {cfg.sampler}: {manifest.name} is a distilled student with its own sampler "
                        f"per step count ({', '.join(f'{k}: {v}' for k, v in student['samplers'].items())}); "
                        "leave --sampler out")
    return [dataclasses.replace(cfg, sampler=manifest.student_sampler(k), steps=k) for k in steps]


# --- per family ------------------------------------------------------------------------------------

def evaluate(repo: str | Path, model: str, version: int | None = None, config: EvalConfig | None = None,
             log=print) -> Report:
    """Score one model of the repository; see the module docstring."""
    from serve.errors import ServeError
    from serve.runtime import Runtime

    cfg = config or EvalConfig()
    if cfg.n < 10:
        raise EvalError(f"--n {cfg.n}: use at least 10 samples")
    cache = Path(cfg.cache or os.environ.get("GEN_CACHE") or Path.home() / ".cache" / "gen").expanduser()
    t0 = time.perf_counter()
    with Runtime(repo, device="cpu", max_n=max(cfg.request_size, 256), int8=cfg.precision == "int8") as rt:
        try:
            m = rt.manifest(model, version)
        except ServeError as e:
            raise EvalError(e.message) from None
        spec = FAMILIES[m.family]
        if cfg.precision == "int8" and not any(g.int8_file for g in m.graphs.values()):
            raise EvalError(f"--precision int8: {m.name} v{m.version} has no int8 variant; export it with "
                            "`gen export RUN_DIR --quantize int8`")
        if spec.imported:
            raise EvalError(f"{m.name}: an imported graph ({m.family}) has no dataset or images to score; gen eval "
                            "scores the models gen trains")
        kind = spec.data_kind
        source = m.provenance.get("dataset")
        direction = m.provenance.get("trained_with", {}).get("direction", "AtoB")
        try:
            data = load_dataset(source, kind, m.image["height"], m.image["channels"], direction)
        except Exception as e:  # noqa: BLE001 - DataError, or a folder that moved since training
            raise EvalError(f"{m.name}: cannot load its dataset {source!r} ({e})") from None
        if len(data.test[0]) == 0:
            raise EvalError(f"{m.name}: its dataset {source!r} has no held-out split to score against")
        if spec.task == DENOISE:
            cfg = sampling_settings(m, cfg)[-1]
        report = Report(m.name, m.version, m.family, str(source))
        # generators are scored on samples; translators on held-out pairs (paired) or both directions (unpaired)
        scorer = _generator if spec.task in (SAMPLE, DENOISE) else {"paired": _pix2pix, "unpaired": _cyclegan}[kind]
        scorer(rt, m, data, cfg, cache, report, log)
        if cfg.precision != "fp32":
            report.details["precision"] = cfg.precision
        report.details["seed"] = cfg.seed
    report.seconds = round(time.perf_counter() - t0, 1)
    return report


def evaluate_all(repo: str | Path, model: str, config: EvalConfig | None = None, log=print) -> list[Report]:
    """`evaluate` at every setting `sampling_settings` names (a student: each of its step counts); one report
    for other models."""
    from serve.manifest import scan_repository

    cfg = config or EvalConfig()
    newest = [e for e in scan_repository(Path(repo)) if e.name == model and e.healthy][-1:]
    if newest and newest[0].manifest.student is not None:
        return [evaluate(repo, model, config=c, log=log) for c in sampling_settings(newest[0].manifest, cfg)]
    return [evaluate(repo, model, config=cfg, log=log)]


def parse_seeds(spec: str) -> list[int]:
    """`gen eval --seeds`: "0-9", "0,4,7" or both ("0-2,7"); each seed once, in the order given."""
    seeds: list[int] = []
    try:
        for part in spec.split(","):
            first, _, last = part.strip().partition("-")
            if last and int(last) < int(first):
                raise ValueError(part)
            seeds += range(int(first), int(last) + 1) if last else [int(first)]
    except ValueError:
        raise EvalError(f"--seeds {spec}: use seeds and ranges of them separated by commas, e.g. 0-9 or 0,4,7") \
            from None
    return list(dict.fromkeys(seeds))


def across_seeds(reports: list[Report]) -> list[str]:
    """Lines that summarise the reports of each model and setting over the seeds they were scored at: per metric
    the mean, the standard deviation and the range, and at how many seeds it met its bar."""
    groups: dict[tuple, list[Report]] = {}
    for r in reports:
        groups.setdefault((r.model, r.version, json.dumps(r.details.get("sampling"), sort_keys=True)), []).append(r)
    lines = []
    for group in groups.values():
        first = group[0]
        sampling = first.details.get("sampling")
        at = f", {sampling['sampler']} {sampling['steps']} steps" if sampling else ""
        seeds = [r.details.get("seed") for r in group]
        lines.append(f"{first.model} v{first.version}{at}: {len(group)} seeds ({', '.join(map(str, seeds))})")
        for metric in first.metrics:
            found = [m for r in group for m in r.metrics if m.name == metric.name]
            values = [m.value for m in found]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            mean, spread, low, high = (_shown(v, metric.unit) for v in
                                       (statistics.fmean(values), sd, min(values), max(values)))
            line = f"  {metric.name:<36} mean {mean}  sd {spread}  {low} to {high}"
            judged = [m.passed for m in found if m.passed is not None]
            if judged:
                line += f"  bar met at {sum(judged)} of {len(judged)}"
            lines.append(line)
    return lines


def merge_reports(rows: list[dict], reports: list[Report]) -> list[dict]:
    """`gen eval --json` into a file that holds reports already: a report replaces the row of the same model and
    setting (sampler and steps, precision, seed) where that row was, and the other rows stay."""
    def key(row: dict) -> str:
        d = row.get("details", {})
        # rows written before reports carried their seed were made at the default seed, 0
        return json.dumps([row.get("model"), d.get("sampling"), d.get("precision"), d.get("seed", 0)], sort_keys=True)

    fresh = {key(r.as_dict()): r.as_dict() for r in reports}
    merged = [fresh.pop(key(row), row) for row in rows]
    return merged + list(fresh.values())


def _conditional(m) -> bool:
    spec = FAMILIES[m.family]
    graph = spec.generator or spec.denoiser
    return bool(m.classes) and any(t.name == "label" for t in m.graphs[graph].inputs)


def _generator(rt, m, data, cfg: EvalConfig, cache: Path, report: Report, log) -> None:
    (x_train, y_train), (x_test, y_test) = data.train, data.test
    spec = FAMILIES[m.family]
    denoise = spec.task == DENOISE
    if len(m.classes) < 2:
        raise EvalError(f"{m.name}: its dataset {report.dataset!r} has no class labels, and gen eval's feature "
                        "network is a classifier trained on them; use a class-per-folder dataset")
    net = classifier_for(x_train, y_train, len(m.classes), cache, log=log)
    test_images = _to_float(x_test)
    test_feats, test_pred = net.predict(test_images)
    report.add("classifier held-out accuracy", (test_pred == y_test.numpy()).mean(), "%")
    n_fd = min(cfg.n, len(x_test), len(x_train))
    # random subsets, never the first n: splits are often sorted by class
    rng = np.random.default_rng(cfg.seed)
    train_feats, _ = net.predict(_to_float(x_train[rng.choice(len(x_train), n_fd, replace=False)]))
    test_feats = test_feats[rng.choice(len(test_feats), n_fd, replace=False)]
    baseline = frechet_distance(train_feats, test_feats)

    conditional = _conditional(m)
    labels = (np.arange(cfg.n) % len(m.classes)).astype(np.int64) if conditional else None
    log(f"{m.name}: drawing {cfg.n} samples through the runtime"
        + (f" ({cfg.sampler}, {cfg.steps} steps)" if denoise else ""))
    t_sample = time.perf_counter()
    samples = _sample(rt, m.name, spec, cfg.n, labels, cfg)
    report.details["seconds_per_sample"] = round((time.perf_counter() - t_sample) / cfg.n, 5)
    feats, pred = net.predict(samples)
    fd = frechet_distance(feats[rng.choice(len(feats), n_fd, replace=False)], test_feats)
    family = get_family(m.family)
    accuracy_bar, frechet_bar = family.class_accuracy_bar, family.frechet_bar
    if denoise and m.student:
        accuracy_bar, frechet_bar = STUDENT_BARS.get(cfg.steps, (None, None))
    report.add("frechet distance", fd, at_most=frechet_bar * baseline if frechet_bar else None)
    report.add("frechet real-vs-real", baseline)
    report.add("frechet / baseline", fd / baseline if baseline > 0 else float("inf"))
    report.details["frechet_samples"] = n_fd
    if denoise:  # what drew the samples, so a table can say how its number was produced
        report.details["sampling"] = {"sampler": cfg.sampler, "steps": cfg.steps,
                                      "guidance": m.default_guidance if cfg.guidance is None else cfg.guidance}
    if conditional:
        report.add("class accuracy", (pred == labels).mean(), "%", at_least=accuracy_bar)
        report.details["class_accuracy"] = {m.classes[k]: round(float((pred[labels == k] == k).mean()), 4)
                                            for k in range(len(m.classes))}
    if denoise and conditional and m.null_class and not m.student:  # edits of held-out images
        _edits(rt, m, net, test_images, y_test.numpy(), cfg, report, log)
    if spec.encoder:  # a family that encodes: reconstructions of held-out images too
        log(f"{m.name}: reconstructing {len(x_test)} held-out images")
        enc_labels = y_test.numpy() if _conditional(m) else None

        async def recon(start: int, count: int) -> np.ndarray:
            lab = None if enc_labels is None else enc_labels[start:start + count].tolist()
            posterior = await rt.encode(m.name, test_images[start:start + count], labels=lab)
            return (await rt.decode(m.name, posterior.mean, labels=lab)).images

        recons = quantise(asyncio.run(_chunks(recon, len(test_images), cfg.request_size)))
        _, rpred = net.predict(recons)
        report.add("reconstruction accuracy", (rpred == y_test.numpy()).mean(), "%", at_least=0.90)
        report.add("reconstruction L1", np.abs((recons - test_images) / 2).mean())


def _edits(rt, m, net, images: np.ndarray, labels: np.ndarray, cfg: EvalConfig, report: Report, log) -> None:
    """Image-to-image and inpainting of `cfg.edit_n` random held-out images, at the eval's sampling setting.

    Image-to-image: each image towards another class (drawn uniformly), at each of EDIT_STRENGTHS: the target-class
    accuracy of the results (the family's image_to_image_bar at its strength), and how much of the input survives
    as the mean Pearson correlation of input and output pixels (1: unchanged; the "baseline" is the same between
    each input and a random held-out image of its target class: what an unrelated digit of that class shares with
    it). Inpainting: the lower half regenerated with the image's own label: class accuracy of the completed digit,
    and the largest 8-bit difference from the input in the kept upper half (0: kept exactly)."""
    K, n = len(m.classes), min(cfg.edit_n, cfg.n, len(images))
    spec = FAMILIES[m.family]
    rng = np.random.default_rng(cfg.seed + 1)
    pick = rng.choice(len(images), n, replace=False)
    x, y = images[pick], labels[pick]
    target = (y + rng.integers(1, K, n)) % K  # another class
    others = np.array([rng.choice(np.flatnonzero(labels == k)) for k in target])
    report.add("image-to-image correlation baseline", _correlation(images[others], x))
    bar_strength, bar = get_family(m.family).image_to_image_bar or (None, None)
    for strength in EDIT_STRENGTHS:
        log(f"{m.name}: image-to-image of {n} held-out images at strength {strength} towards another class")
        out = _sample(rt, m.name, spec, n, target, cfg, init=x, strength=strength)
        _, pred = net.predict(out)
        report.add(f"image-to-image {strength} target accuracy", (pred == target).mean(), "%",
                   at_least=bar if strength == bar_strength else None)
        report.add(f"image-to-image {strength} input correlation", _correlation(out, x))
    H = x.shape[2]
    mask = np.zeros((1, 1, *x.shape[2:]), np.float32)
    mask[:, :, H // 2:] = 1.0
    log(f"{m.name}: inpainting the lower half of {n} held-out images with their own labels")
    out = _sample(rt, m.name, spec, n, y, cfg, init=x, mask=mask)
    _, pred = net.predict(out)
    report.add("inpainting class accuracy", (pred == y).mean(), "%", at_least=INPAINT_BAR)
    levels = lambda v: np.round((v[:, :, :H // 2] + 1.0) * 127.5)  # noqa: E731 - the kept half, 8-bit levels
    report.add("inpainting kept-half error", np.abs(levels(out) - levels(x)).max(), " levels", at_most=0.0)
    report.details["edits"] = {"images": n, "sampling": {"sampler": cfg.sampler, "steps": cfg.steps}}


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the Pearson correlation of their pixels."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    return float(((a * b).sum(1) / np.maximum(np.sqrt((a * a).sum(1) * (b * b).sum(1)), 1e-12)).mean())


def _pix2pix(rt, m, data, cfg: EvalConfig, cache: Path, report: Report, log) -> None:
    sources, targets = _to_float(data.test[0]), _to_float(data.test[1])
    log(f"{m.name}: translating {len(sources)} held-out sources")
    out = _map(lambda x: _translated(rt.translate(m.name, x, "AtoB")), sources, cfg.request_size)
    err = (out - targets) / 2  # in [0, 1] units
    mse = np.maximum((err ** 2).reshape(len(err), -1).mean(1), 1e-10)
    report.add("L1", np.abs(err).mean())
    report.add("PSNR", (10 * np.log10(1.0 / mse)).mean(), " dB", at_least=24.0)
    report.details["pairs"] = len(sources)
    if report.dataset == "shapes" and sources.shape[1] == 3 and m.provenance.get("trained_with", {}).get(
            "direction", "AtoB") == "AtoB":  # the source is the label map: its colours say where each shape is
        errors = region_colour_errors(out, targets, label_regions(data.test[0].numpy()))
        report.add("colour error vs target", float(np.median(errors)), at_most=COLOUR_ERROR_BAR)


def _cyclegan(rt, m, data, cfg: EvalConfig, cache: Path, report: Report, log) -> None:
    (train_a, train_b), (test_a, test_b) = data.train, data.test
    x = torch.cat([train_a, train_b])
    y = torch.cat([torch.zeros(len(train_a), dtype=torch.int64), torch.ones(len(train_b), dtype=torch.int64)])
    net = classifier_for(x, y, 2, cache, log=log)
    a, b = _to_float(test_a), _to_float(test_b)
    _, real_a = net.predict(a)
    _, real_b = net.predict(b)
    report.add("domain classifier held-out", np.concatenate([real_a == 0, real_b == 1]).mean(), "%")
    log(f"{m.name}: translating {len(a)} + {len(b)} held-out images both ways and back")
    ab = _map(lambda x: _translated(rt.translate(m.name, x, "AtoB")), a, cfg.request_size)
    ba = _map(lambda x: _translated(rt.translate(m.name, x, "BtoA")), b, cfg.request_size)
    aba = _map(lambda x: _translated(rt.translate(m.name, x, "BtoA")), ab, cfg.request_size)
    bab = _map(lambda x: _translated(rt.translate(m.name, x, "AtoB")), ba, cfg.request_size)
    _, pred_ab = net.predict(ab)
    _, pred_ba = net.predict(ba)
    report.add("A->B looks like B", (pred_ab == 1).mean(), "%", at_least=0.95)
    report.add("B->A looks like A", (pred_ba == 0).mean(), "%", at_least=0.95)
    report.add("cycle L1 A->B->A", np.abs((aba - a) / 2).mean(), at_most=0.05)
    report.add("cycle L1 B->A->B", np.abs((bab - b) / 2).mean(), at_most=0.05)
    if report.dataset == "stripes" and a.shape[1] == 3:  # the renderer knows each shape's mask and colour
        held_a, held_b = (scenes.select(slice(EMBEDDED_TRAIN, None)) for scenes in stripes_scenes(a.shape[-1]))
        for name, out, truth in (("A->B", ab, held_a), ("B->A", ba, held_b)):
            report.add(f"colour error {name}", float(np.median(colour_errors(out, truth.masks, truth.colours))),
                       at_most=COLOUR_ERROR_BAR)
            report.add(f"shape IoU {name}", float(shape_ious(out, truth.masks).mean()), at_least=SHAPE_IOU_BAR)


# --- does a translation keep the shape and its colour? ---------------------------------------------

COLOUR_ERROR_BAR = 25.0  # 0-255 RGB L2; a perfect translator's outputs, rounded to 8 bits, score about 0.5
SHAPE_IOU_BAR = 0.75
STRIPE_MIN = 225.0  # every channel at least this: a stripe (250), never a shape colour (each channel <= 200)
FOREGROUND_DISTANCE = 20.0  # 0-255 RGB L2 from the background colour beyond which a pixel is foreground


def to_rgb255(images: np.ndarray) -> np.ndarray:
    """[N, 3, H, W] images in [-1, 1] -> [N, H, W, 3] float64 in 0-255."""
    return (np.asarray(images, np.float64).transpose(0, 2, 3, 1) + 1.0) * 127.5


def colour_errors(images: np.ndarray, masks: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Per image, the L2 distance (0-255 RGB) between `colours[i]` and the mean colour of images[i]
    inside masks[i], stripe-white pixels left out (all of them when the shape is nothing but white)."""
    rgb, truth = to_rgb255(images), np.asarray(colours, np.float64)
    errors = np.empty(len(rgb))
    for i, (im, mask) in enumerate(zip(rgb, masks)):
        inside = im[mask]
        kept = inside[~(inside >= STRIPE_MIN).all(1)]
        mean = (kept if len(kept) else inside).mean(0)
        errors[i] = np.linalg.norm(mean - truth[i])
    return errors


def foreground(images: np.ndarray) -> np.ndarray:
    """bool [N, H, W]: pixels farther than FOREGROUND_DISTANCE from the background colour, which is taken
    as the per-channel median of the image's border (a shape covers less than half of it)."""
    rgb = to_rgb255(images)
    border = np.concatenate([rgb[:, 0], rgb[:, -1], rgb[:, 1:-1, 0], rgb[:, 1:-1, -1]], 1)
    background = np.median(border, 1)[:, None, None, :]
    return np.linalg.norm(rgb - background, axis=-1) > FOREGROUND_DISTANCE


def shape_ious(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image, the IoU between masks[i] and the foreground of images[i]."""
    fg, masks = foreground(images), np.asarray(masks, bool)
    union = (fg | masks).sum((1, 2))
    return np.where(union > 0, (fg & masks).sum((1, 2)) / np.maximum(union, 1), 1.0)


def label_regions(label_maps: np.ndarray) -> np.ndarray:
    """int [N, H, W] region ids from uint8 [N, 3, H, W] label maps: -1 where black (background), else the
    index of the pixel's colour among the image's distinct colours."""
    maps = np.asarray(label_maps).transpose(0, 2, 3, 1)
    regions = np.full(maps.shape[:3], -1, np.int64)
    for i, m in enumerate(maps):
        colours, ids = np.unique(m.reshape(-1, m.shape[-1]), axis=0, return_inverse=True)
        ids = ids.reshape(m.shape[:2])
        for k, c in enumerate(colours):
            if c.any():
                regions[i][ids == k] = k
    return regions


def region_colour_errors(images: np.ndarray, targets: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Per image, the mean over its regions of the L2 distance (0-255 RGB) between the output's and the
    target's mean colours inside the region; 0 for an image without regions."""
    out, tgt = to_rgb255(images), to_rgb255(targets)
    errors = np.zeros(len(out))
    for i, r in enumerate(regions):
        ids = [k for k in np.unique(r) if k >= 0]
        if ids:
            errors[i] = np.mean([np.linalg.norm(out[i][r == k].mean(0) - tgt[i][r == k].mean(0)) for k in ids])
    return errors


async def _translated(call) -> np.ndarray:
    return (await call).images
