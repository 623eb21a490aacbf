"""The model repository contract: exported/<name>/<version>/manifest.json, and how to check it.

Standard library only: the exporter (training side) validates what it writes with the same code the
server uses to read it, and neither side needs the other's dependencies.

Layout:
    exported/<name>/<version>/manifest.json
    exported/<name>/<version>/<graph>.onnx        one self-contained file per graph
    exported/<name>/<version>/<graph>.fp16.onnx   optional half-precision variant (CUDA)
    exported/<name>/<version>/<graph>.int8.onnx   optional int8 variant (CPU; gen serve --precision int8)
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from serve.families import DENOISE, FAMILIES
from serve.samplers.schedule import FLOW_SCHEDULES, PREDICTIONS, SCHEDULES, SPACINGS

FORMAT = "gen.manifest/1"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
DTYPES = ("float32", "float16", "int64")
# the section a denoising model's manifest carries (schedule, prediction, null class, a student's sampling), named
# for the first family that had one: every family of task DENOISE writes it, and exports already shipped use it
DENOISING = "diffusion"
TASKS = {name: spec.task for name, spec in FAMILIES.items()}


class ManifestError(ValueError):
    """The manifest is malformed; the message names the field."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]  # -1 for a dynamic dimension


@dataclass(frozen=True)
class GraphInfo:
    name: str
    file: str
    sha256: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    fp16_file: str | None = None
    fp16_sha256: str | None = None
    parity: dict = field(default_factory=dict)
    int8_file: str | None = None
    int8_sha256: str | None = None


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    family: str
    task: str
    opset: int
    graphs: dict[str, GraphInfo]
    image: dict  # channels, height, width, range [lo, hi], to_uint8; empty for a family without images
    classes: tuple[str, ...]
    serving: dict  # max_batch_size, max_queue_delay_ms
    provenance: dict
    diffusion: dict | None = None  # num_train_timesteps, schedule, prediction, timestep_spacing, null_label
    parity: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def batched(self) -> bool:
        """The graphs' first axis is a batch axis the server may merge requests along (Triton's max_batch_size > 0);
        False only for an imported graph that declares none: its shapes are whole tensors, one request per run."""
        return int(self.serving["max_batch_size"]) > 0

    @functools.cached_property  # read on every OIP request (resolve_graph)
    def served_graphs(self) -> dict[str, GraphInfo]:
        """The graphs the server opens and offers over OIP: all but those its family keeps only for older exports
        (FamilySpec.legacy_graphs; their files are still verified)."""
        legacy = FAMILIES[self.family].legacy_graphs
        return {name: g for name, g in self.graphs.items() if name not in legacy}

    @property
    def student(self) -> dict | None:
        """A distilled student's sampling contract (samplers per step count, steps, default_steps, guidance_range);
        None for a teacher."""
        return (self.diffusion or {}).get("student")

    def student_sampler(self, steps: int) -> str | None:
        """The sampler a student runs `steps` steps with; None for a teacher or a count it was not trained for."""
        return (self.student or {}).get("samplers", {}).get(str(steps))

    @property
    def null_class(self) -> bool:
        """A conditional denoising model that knows the null class K = len(classes) (diffusion.null_label): it can
        be guided (classifier-free guidance) and asked for label -1. gen's own models always do; a model from
        elsewhere only when its export named one."""
        return bool(self.classes) and (self.diffusion or {}).get("null_label", self.num_classes) is not None

    @property
    def default_guidance(self) -> float:
        """The guidance scale a Generate request without one gets: the training-time value (1 when unconditional
        or without a null class)."""
        return float(self.raw.get("config", {}).get("guidance", 3.0)) if self.null_class else 1.0


def _get(d: dict, key: str, kind, where: str):
    if key not in d:
        raise ManifestError(f"{where}.{key}: missing")
    value = d[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ManifestError(f"{where}.{key}: expected {names}, got {type(value).__name__}")
    return value


def _tensor(d: dict, where: str, batched: bool = True) -> TensorInfo:
    """One input or output; `batched`: its first axis is the batch axis (dynamic), else the shape is the whole
    tensor's (an unbatched imported graph, serving.max_batch_size 0)."""
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected an object")
    name = _get(d, "name", str, where)
    dtype = _get(d, "dtype", str, where)
    if dtype not in DTYPES:
        raise ManifestError(f"{where}.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    shape = _get(d, "shape", list, where)
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and (s == -1 or s > 0) for s in shape):
        raise ManifestError(f"{where}.shape: expected a non-empty list of positive ints or -1")
    if batched and shape[0] != -1:
        raise ManifestError(f"{where}.shape: the batch axis (first) must be dynamic (-1)")
    return TensorInfo(name, dtype, tuple(shape))


def parse_manifest(d: dict) -> Manifest:
    """Validate a manifest dict; raises ManifestError naming the first bad field."""
    if not isinstance(d, dict):
        raise ManifestError("manifest: expected a JSON object")
    if d.get("format") != FORMAT:
        raise ManifestError(f"format: expected {FORMAT!r}, got {d.get('format')!r}")
    name = _get(d, "name", str, "manifest")
    if not NAME_RE.fullmatch(name):
        raise ManifestError(f"name: {name!r} must match {NAME_RE.pattern}")
    version = _get(d, "version", int, "manifest")
    if version < 1:
        raise ManifestError("version: must be >= 1")
    family = _get(d, "family", str, "manifest")
    if family not in TASKS:
        raise ManifestError(f"family: {family!r} is not one of {', '.join(TASKS)}")
    task = _get(d, "task", str, "manifest")
    if task != TASKS[family]:
        raise ManifestError(f"task: {family} models have task {TASKS[family]!r}, not {task!r}")
    opset = _get(d, "opset", int, "manifest")
    graphs_raw = _get(d, "graphs", dict, "manifest")
    spec = FAMILIES[family]
    if not spec.graphs <= set(graphs_raw) <= spec.graphs | spec.legacy_graphs:
        raise ManifestError(f"graphs: {family} needs exactly {sorted(spec.graphs)}, got {sorted(graphs_raw)}")
    serving = _get(d, "serving", dict, "manifest")
    mbs = _get(serving, "max_batch_size", int, "serving")
    if spec.imported and mbs < 0:  # 0, as in Triton: no batch axis, the shapes are the whole tensors'
        raise ManifestError("serving.max_batch_size: must be >= 0 (0: the graph is not batched)")
    if not spec.imported and mbs < 1:
        raise ManifestError("serving.max_batch_size: must be >= 1")
    batched = mbs > 0
    graphs = {}
    for gname, g in graphs_raw.items():
        where = f"graphs.{gname}"
        if not isinstance(g, dict):
            raise ManifestError(f"{where}: expected an object")
        file = _get(g, "file", str, where)
        if "/" in file or "\\" in file or file.startswith("."):
            raise ManifestError(f"{where}.file: {file!r} must be a plain file name in the version folder")
        sha = _get(g, "sha256", str, where)
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ManifestError(f"{where}.sha256: not a hex SHA-256")
        inputs = tuple(_tensor(t, f"{where}.inputs[{i}]", batched)
                       for i, t in enumerate(_get(g, "inputs", list, where)))
        outputs = tuple(_tensor(t, f"{where}.outputs[{i}]", batched)
                        for i, t in enumerate(_get(g, "outputs", list, where)))
        if not inputs or not outputs:
            raise ManifestError(f"{where}: needs at least one input and one output")
        fp16, int8 = g.get("fp16"), g.get("int8")
        for variant, key in ((fp16, "fp16"), (int8, "int8")):
            if variant is not None:
                _get(variant, "file", str, f"{where}.{key}")
                _get(variant, "sha256", str, f"{where}.{key}")
        graphs[gname] = GraphInfo(gname, file, sha, inputs, outputs,
                                  fp16["file"] if fp16 else None, fp16["sha256"] if fp16 else None,
                                  g.get("parity", {}), int8["file"] if int8 else None,
                                  int8["sha256"] if int8 else None)
    image = {}  # none for a family whose task has no images (an imported graph)
    if spec.images:
        image = _get(d, "image", dict, "manifest")
        for key in ("channels", "height", "width"):
            _get(image, key, int, "image")
        if image["channels"] not in (1, 3):
            raise ManifestError("image.channels: must be 1 or 3")
        rng = _get(image, "range", list, "image")
        if len(rng) != 2 or not all(isinstance(v, (int, float)) for v in rng) or rng[0] >= rng[1]:
            raise ManifestError("image.range: expected [low, high] with low < high")
    classes = _get(d, "classes", list, "manifest")
    if not all(isinstance(c, str) for c in classes):
        raise ManifestError("classes: expected a list of strings")
    provenance = _get(d, "provenance", dict, "manifest")
    diffusion = d.get(DENOISING)
    if FAMILIES[family].task == DENOISE:
        diffusion = _get(d, DENOISING, dict, "manifest")
        _get(diffusion, "num_train_timesteps", int, "diffusion")
        if _get(diffusion, "prediction", str, "diffusion") not in PREDICTIONS:
            raise ManifestError(f"diffusion.prediction: {diffusion['prediction']!r} is not one of "
                                f"{', '.join(PREDICTIONS)}")
        if _get(diffusion, "schedule", str, "diffusion") not in SCHEDULES:
            raise ManifestError(f"diffusion.schedule: {diffusion['schedule']!r} is not one of {', '.join(SCHEDULES)}")
        if _get(diffusion, "timestep_spacing", str, "diffusion") not in SPACINGS:
            raise ManifestError(f"diffusion.timestep_spacing: {diffusion['timestep_spacing']!r} is not one of "
                                f"{', '.join(SPACINGS)}")
        _check_schedule_options(diffusion)
        if diffusion.get("null_label", len(classes)) not in (None, len(classes)):
            raise ManifestError(f"diffusion.null_label: the null class is the last label, {len(classes)} "
                                f"(len(classes)), or null for none; got {diffusion['null_label']!r}")
        if "student" in diffusion:
            student = _get(diffusion, "student", dict, "diffusion")
            steps = _get(student, "steps", list, "diffusion.student")
            if not steps or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in steps):
                raise ManifestError("diffusion.student.steps: expected a non-empty list of positive ints")
            samplers = _get(student, "samplers", dict, "diffusion.student")
            if set(samplers) != {str(k) for k in steps} or not all(isinstance(v, str) for v in samplers.values()):
                raise ManifestError("diffusion.student.samplers: expected a sampler name for each of its steps")
            if _get(student, "default_steps", int, "diffusion.student") not in steps:
                raise ManifestError("diffusion.student.default_steps: must be one of diffusion.student.steps")
    return Manifest(name, version, family, task, opset, graphs, image, tuple(classes), serving, provenance,
                    diffusion, d.get("parity", {}), raw=d)


def _number(d: dict, key: str, default: float) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ManifestError(f"diffusion.{key}: expected a finite number, got {value!r}")
    return float(value)


def _check_schedule_options(d: dict) -> None:
    """The optional keys a model from elsewhere carries (`gen export --from-diffusers`); gen's own training's
    values when left out: betas 1e-4..0.02, steps_offset 0, clip_sample true in [-1, 1], null_label K."""
    start, end = _number(d, "beta_start", 1e-4), _number(d, "beta_end", 0.02)
    if not 0 < start <= end < 1:
        raise ManifestError(f"diffusion.beta_start, beta_end: need 0 < beta_start <= beta_end < 1, got {start}, {end}")
    offset = d.get("steps_offset", 0)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ManifestError(f"diffusion.steps_offset: expected an int >= 0, got {offset!r}")
    if not isinstance(d.get("clip_sample", True), bool):
        raise ManifestError("diffusion.clip_sample: expected true or false")
    if _number(d, "clip_sample_range", 1.0) <= 0:
        raise ManifestError("diffusion.clip_sample_range: must be > 0")
    null = d.get("null_label")
    if null is not None and (isinstance(null, bool) or not isinstance(null, int) or null < 0):
        raise ManifestError(f"diffusion.null_label: expected a class index or null, got {null!r}")
    if d["schedule"] in FLOW_SCHEDULES and d["prediction"] in ("eps", "v"):
        # x0 = (x - sigma eps) / alpha, and a flow starts at alpha = 0
        raise ManifestError(f"diffusion.prediction: {d['prediction']!r} cannot be sampled on a flow schedule "
                            "(alpha is 0 at its start); use velocity or sample")


def next_version(model_dir: Path) -> int:
    """The version a new export or import of a model gets: one past the highest version folder (1 for none)."""
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] \
        if model_dir.is_dir() else []
    return max(versions, default=0) + 1


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(version_dir: Path) -> Manifest:
    path = Path(version_dir) / "manifest.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    m = parse_manifest(raw)
    if m.name != Path(version_dir).parent.name or str(m.version) != Path(version_dir).name:
        raise ManifestError(f"{path}: says {m.name}/{m.version} but lies in "
                            f"{Path(version_dir).parent.name}/{Path(version_dir).name}")
    return m


def verify_files(version_dir: Path, manifest: Manifest) -> list[str]:
    """Problems with the graph files (missing, hash mismatch), one line each; empty when healthy."""
    problems = []
    for g in manifest.graphs.values():
        for file, sha in ((g.file, g.sha256), (g.fp16_file, g.fp16_sha256), (g.int8_file, g.int8_sha256)):
            if file is None:
                continue
            path = Path(version_dir) / file
            if not path.is_file():
                problems.append(f"{file}: missing")
                continue
            actual = file_sha256(path)
            if actual != sha:
                problems.append(f"{file}: sha256 mismatch (manifest {sha[:12]}..., file {actual[:12]}...)")
    return problems


@dataclass
class VersionEntry:
    name: str
    version: int
    path: Path
    manifest: Manifest | None
    problems: list[str]

    @property
    def healthy(self) -> bool:
        return self.manifest is not None and not self.problems


def scan_repository(root: Path, verify: bool = False) -> list[VersionEntry]:
    """Every <name>/<version>/ folder under root, sorted; `verify` re-hashes the graph files.

    Folders whose names start with '.' are exports in progress and are skipped.
    """
    root = Path(root)
    entries = []
    if not root.is_dir():
        return entries
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for vdir in sorted((p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                           key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)):
            if not vdir.name.isdigit():
                entries.append(VersionEntry(model_dir.name, -1, vdir, None,
                                            [f"{vdir.name}: a version folder must be a positive integer"]))
                continue
            try:
                manifest = read_manifest(vdir)
            except ManifestError as e:
                entries.append(VersionEntry(model_dir.name, int(vdir.name), vdir, None, [str(e)]))
                continue
            problems = verify_files(vdir, manifest) if verify else \
                [f"{g.file}: missing" for g in manifest.graphs.values() if not (vdir / g.file).is_file()]
            entries.append(VersionEntry(model_dir.name, int(vdir.name), vdir, manifest, problems))
    return entries
