"""What distilling a few-step student needs from its teacher: the exported teacher, its weights in PyTorch, and
its probability-flow trajectories.

The teacher is an exported diffusion model (a version folder of a model repository, e.g. exported/mnist-diffusion/1):
the manifest is the contract, so a student can be distilled from any exported model, including the shipped one,
whose PyTorch checkpoint is not in the repository. Its weights are read back from the ONNX file (`unet_from_onnx`)
and checked against onnxruntime on the same inputs before anything trains on them.

The student learns the consistency function of the teacher's probability-flow ODE (Song et al. 2023): from a point
x_t of a trajectory, the trajectory's end. Consistency distillation bootstraps that end one ODE step at a time from
an EMA target network, which needs hundreds of thousands of steps; here the teacher's ODE is solved to the end
once per trajectory instead (a serving solver, DPM-Solver++ by default, with classifier-free guidance, in
`teacher_steps` steps), and the points at the
student's timesteps are kept, so every training step is a plain regression on precomputed pairs. Each trajectory
draws its own guidance scale: the student takes the scale as an input (Meng et al. 2023), one row per image
instead of guidance's two.
"""
from __future__ import annotations

import ast
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve.diffusion import timestep_pairs
from serve.families import FAMILIES
from serve.manifest import DENOISING
from serve.samplers import SAMPLERS, NoiseSchedule
from trainer.models import FAMILY_NAMES, get_family


class TeacherError(ValueError):
    """The teacher cannot be distilled from; the message names what is wrong."""


@dataclass
class Teacher:
    path: Path  # the version folder
    manifest: dict
    onnx_path: Path

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def schedule(self) -> NoiseSchedule:
        d = self.manifest[DENOISING]
        return NoiseSchedule.from_manifest(d)

    def session(self):
        import onnxruntime as ort

        from serve.session import session_options

        return ort.InferenceSession(str(self.onnx_path), session_options(), providers=["CPUExecutionProvider"])


def load_teacher(path: str | Path) -> Teacher:
    """The exported diffusion model at `path`: a version folder, or a model folder (its newest version)."""
    path = Path(path)
    if path.is_dir() and not (path / "manifest.json").exists():
        versions = sorted((int(p.name), p) for p in path.iterdir() if p.name.isdigit() and (p / "manifest.json")
                          .exists())
        if versions:
            path = versions[-1][1]
    if not (path / "manifest.json").exists():
        raise TeacherError(f"--set distill_from={path}: no exported model there; give a version folder such as "
                           "exported/mnist-diffusion/1")
    manifest = json.loads((path / "manifest.json").read_text())
    if manifest.get("family") not in FAMILY_NAMES or get_family(manifest["family"]).student_family is None:
        can = [f for f in FAMILY_NAMES if get_family(f).student_family]
        raise TeacherError(f"--set distill_from={path}: a {manifest.get('family')} model, which cannot be distilled; "
                           f"the teacher must be a model of {', '.join(can)}")
    if manifest.get(DENOISING, {}).get("student"):
        raise TeacherError(f"--set distill_from={path}: that is a distilled student; distil from its teacher "
                           f"{manifest[DENOISING]['student'].get('teacher', {}).get('name', '')!r} instead")
    graph = manifest["graphs"][FAMILIES[manifest["family"]].denoiser]
    return Teacher(path, manifest, path / graph["file"])


def unet_from_onnx(onnx_path: Path, unet, prefix: str = "unet.") -> list[str]:
    """Copy the teacher's weights from its ONNX file into `unet` (same architecture); returns the names of
    `unet`'s parameters the file does not have (the student's own additions), which keep their initial values.

    Most weights are ONNX initializers under their PyTorch names. The exporter folds each GroupNorm's affine
    weight and bias into [C, 1, 1] constants, and stores equal tensors once under one name; the nodes that use
    a weight carry its module's name scope, which is how those are found. `check_same_outputs` then proves it.
    """
    import onnx
    import torch
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    inits = {i.name: i for i in model.graph.initializer}
    found = {name[len(prefix):]: numpy_helper.to_array(t) for name, t in inits.items() if name.startswith(prefix)}
    by_module: dict[str, list] = {}
    for node in model.graph.node:
        scopes = next((ast.literal_eval(p.value) for p in node.metadata_props
                       if p.key == "pkg.torch.onnx.name_scopes"), None)
        if scopes and len(scopes) >= 2:
            inner = scopes[-2]  # the module; the last scope names the op
            module = inner[len(prefix):] if inner.startswith(prefix) else inner
            by_module.setdefault(module, []).append(node)

    def from_nodes(name: str):
        """A weight the file has under another name: the input of its module's node that holds it."""
        module, _, attr = name.rpartition(".")
        for node in by_module.get(module, []):
            slot = {("Conv", "weight"): 1, ("Conv", "bias"): 2, ("Gemm", "weight"): 1, ("Gemm", "bias"): 2,
                    ("Gather", "weight"): 0, ("Mul", "weight"): 1, ("Add", "bias"): 1}.get((node.op_type, attr))
            if slot is not None and slot < len(node.input) and node.input[slot] in inits:
                return numpy_helper.to_array(inits[node.input[slot]])
        return None

    state = unet.state_dict()
    loaded, missing = {}, []
    for name, tensor in state.items():
        value = found.get(name)
        if value is None:
            value = from_nodes(name)
        if value is None:
            missing.append(name)
            continue
        if value.size == tensor.numel() and value.ndim != tensor.dim():
            value = value.reshape(tuple(tensor.shape))  # GroupNorm's [C, 1, 1]
        if tuple(value.shape) != tuple(tensor.shape):
            raise TeacherError(f"{onnx_path}: {name} has shape {tuple(value.shape)}, the student "
                               f"{tuple(tensor.shape)}: the architecture options differ from the teacher's")
        loaded[name] = torch.from_numpy(np.array(value, np.float32))
    unet.load_state_dict(loaded, strict=False)
    return missing


def check_same_outputs(teacher: Teacher, unet, num_classes: int, tolerance: float = 1e-3) -> float:
    """Max abs difference between `unet` (the teacher's weights, guidance input unused) and onnxruntime."""
    import torch

    C = teacher.manifest["image"]["channels"]
    H, W = teacher.manifest["image"]["height"], teacher.manifest["image"]["width"]
    rng = np.random.default_rng(0)
    feeds = {"x_t": rng.standard_normal((4, C, H, W)).astype(np.float32),
             "t": np.array([teacher.schedule.T - 1, teacher.schedule.T // 2, teacher.schedule.T // 10, 0], np.int64)}
    if num_classes:
        feeds["label"] = np.array([0, 1, num_classes - 1, num_classes], np.int64) % (num_classes + 1)
    expected = teacher.session().run(None, feeds)[0]
    args = [torch.from_numpy(v) for v in feeds.values()]
    if getattr(unet, "guidance_emb", None) is not None:  # a fresh student's guidance input adds zero
        args.append(torch.ones(len(args[0])))
    with torch.no_grad():
        got = unet(*args).numpy()
    err = float(np.abs(got - expected).max())
    if not err <= tolerance:
        raise TeacherError(f"{teacher.onnx_path}: the weights read back from ONNX differ from onnxruntime's "
                           f"output by {err:.2e} (> {tolerance}); the file was not exported by this version of gen")
    return err


def student_grid(steps: int, num_train_timesteps: int) -> list[int]:
    """The timesteps a student with `steps` steps runs at (trailing spacing); fewer-step grids are subsets when
    their step counts divide `steps`."""
    return [t for t, _ in timestep_pairs(steps, num_train_timesteps)]


def trajectories(teacher: Teacher, n: int, grid: list[int], teacher_steps: int, guidance_range: tuple[float, float],
                 p_uncond: float, seed: int, chunk: int = 250, sampler: str = "dpm++",
                 log=None) -> dict[str, np.ndarray]:
    """n probability-flow trajectories of the teacher (a deterministic serving sampler, `teacher_steps` steps,
    guidance per row; DPM-Solver++ by default: at 10 steps it scored better than 50 DDIM steps, README).

    Returns x [n, len(grid), C, H, W] (the trajectory at each grid timestep, grid[0] being x_T), x0 [n, C, H, W]
    (its end), label [n] (the null class for a fraction p_uncond) and guidance [n]. Chunk k draws from
    SeedSequence([seed, k]), so the set is a pure function of its arguments.
    """
    m = teacher.manifest
    schedule = teacher.schedule
    pairs = timestep_pairs(teacher_steps, schedule.T)
    at = {t: i for i, (t, _) in enumerate(pairs)}
    missing = [t for t in grid if t not in at]
    if missing:
        raise TeacherError(f"--set teacher_steps={teacher_steps}: its timesteps miss the student's {missing}; "
                           "use a multiple of the student's largest step count")
    solver = SAMPLERS[sampler]
    if solver.uses_noise(0.0):
        raise TeacherError(f"--set teacher_sampler={sampler}: trajectories need a deterministic sampler")
    plan = solver.plan(schedule, pairs, 0.0)  # [steps, S, S + 2]: new state = A (*state, x0, noise)
    K = len(m.get("classes", []))
    shape = (m["image"]["channels"], m["image"]["height"], m["image"]["width"])
    session = teacher.session()
    out = {"x": np.empty((n, len(grid), *shape), np.float32), "x0": np.empty((n, *shape), np.float32),
           "label": np.zeros(n, np.int64), "guidance": np.ones(n, np.float32)}
    for k, start in enumerate(range(0, n, chunk)):
        b = min(chunk, n - start)
        rng = np.random.default_rng(np.random.SeedSequence([seed, k]))
        x = rng.standard_normal((b, *shape), dtype=np.float32)
        state = [x] + [np.zeros_like(x) for _ in solver.state[1:]]
        label = rng.integers(0, max(K, 1), b)
        w = rng.uniform(*guidance_range, b).astype(np.float32)
        if K:
            label = np.where(rng.random(b) < p_uncond, K, label)
        for i, (t, _) in enumerate(pairs):
            if t in grid:
                out["x"][start:start + b, grid.index(t)] = x
            if K:  # classifier-free guidance: the conditional and unconditional rows in one run
                both = session.run(None, {"x_t": np.concatenate([x, x]), "t": np.full(2 * b, t, np.int64),
                                          "label": np.concatenate([label, np.full(b, K)])})[0]
                cond, uncond = both[:b], both[b:]
                eps = uncond + w[:, None, None, None] * (cond - uncond)
            else:
                eps = session.run(None, {"x_t": x, "t": np.full(b, t, np.int64)})[0]
            cx, co = schedule.to_x0(t)
            x0 = cx * x + co * eps
            if solver.clip_x0:
                x0 = np.clip(x0, -1.0, 1.0)
            terms = [*state, x0]  # the noise term's coefficient is 0: deterministic
            state = [sum(plan[i, j, c] * term for c, term in enumerate(terms)).astype(np.float32)
                     for j in range(len(state))]
            x = state[0]
        out["x0"][start:start + b] = x
        out["label"][start:start + b] = label
        out["guidance"][start:start + b] = w if K else 1.0
        if log:
            log(f"teacher trajectories: {start + b}/{n}")
    return out


def default_huber_c(dims: int) -> float:
    """The Pseudo-Huber constant of Song & Dhariwal (2023, "Improved techniques"): 0.00054 sqrt(d)."""
    return 0.00054 * math.sqrt(dims)


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
