"""Case 3: 32 concurrent generate requests of 50 DDIM steps, four ways, on the same U-Net.

  * step-level batching: serve.runtime.Runtime (the server's core, in process), 32 concurrent
    `generate(n=1)` calls; the DiffusionScheduler runs the iteration graph (serve/denoising.py: the
    exported denoiser on a doubled batch for guidance, x0, the sampler update) once per step for all of them;
  * one loop per request: the same with max_batch_size=1, i.e. 32 x 50 iteration-graph runs at batch 1;
  * offline batch: the 32 as one batch through the same iteration graph (serve.session.DenoisingSession,
    state on the device, DDIM's plan from serve/samplers), 50 runs, no scheduler: the floor for
    step-level batching;
  * diffusers: DDIMScheduler (configured like the model: linear betas, trailing spacing, clipped x0)
    driving the same U-Net in PyTorch eager, classifier-free guidance as one doubled batch.
Each side runs `repeats` times in turn; the table has the medians. The diffusers loop and the offline
batch start from the same x_T, and their final images are compared as a check that the work is the same.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

MODEL = "mnist-diffusion"
REQUESTS = 32
STEPS = 50


def _serve(repo: Path, max_batch_size: int | None, steps: int) -> float:
    """Seconds for REQUESTS concurrent generate calls through a fresh Runtime."""
    from serve.runtime import Final, Runtime

    async def one(rt, seed):
        async for event in rt.generate(MODEL, 1, seed=seed, steps=steps):
            if isinstance(event, Final):
                return event.result.images

    async def all_of(rt):
        return await asyncio.gather(*(one(rt, seed) for seed in range(REQUESTS)))

    with Runtime(repo, device="cpu", max_batch_size=max_batch_size) as rt:
        asyncio.run(_first(rt))  # sessions warm, scheduler thread started
        t0 = time.perf_counter()
        images = asyncio.run(all_of(rt))
        seconds = time.perf_counter() - t0
    assert len(images) == REQUESTS and all(i.shape[0] == 1 for i in images)
    return seconds


async def _first(rt) -> None:
    async for _ in rt.generate(MODEL, 2, seed=0, steps=2):
        pass


def _offline(session, schedule, x_T: np.ndarray, labels: np.ndarray, guidance: float, steps: int) -> np.ndarray:
    """DDIM at eta 0 through the iteration graph at batch len(x_T): the rows the scheduler would feed, minus it."""
    from serve.diffusion import timestep_pairs
    from serve.samplers import SAMPLERS, padded_plan

    n = len(x_T)
    ddim = SAMPLERS["ddim"]
    pairs = timestep_pairs(steps, schedule.T)
    plan = padded_plan(ddim, schedule, pairs, 0.0, session.state_size)  # [steps, S, S + 2]
    conv = np.array([(*schedule.to_x0(t), 1.0 if ddim.clip_x0 else 0.0) for t, _ in pairs], np.float32)
    slots = np.arange(n)
    session.admit(slots, x_T)
    for k, (t, _) in enumerate(pairs):
        out = session.step(slots=slots, t=np.full(n, t, np.int64), label=labels,
                           guidance=np.full(n, guidance, np.float32), conv=np.tile(conv[k], (n, 1)),
                           coef=np.repeat(plan[k][None], n, axis=0), noise=None)
    return np.clip(out.x(), -1, 1)


def _diffusers(unet, manifest: dict, x_T: np.ndarray, labels: np.ndarray, guidance: float, steps: int) -> np.ndarray:
    """diffusers' DDIMScheduler loop around the PyTorch U-Net, configured as the model was trained."""
    import torch
    from diffusers import DDIMScheduler

    d = manifest["diffusion"]
    if d["schedule"] != "linear" or d["prediction"] != "eps":
        raise ValueError("the diffusers comparison is written for the linear schedule and eps prediction")
    scheduler = DDIMScheduler(num_train_timesteps=d["num_train_timesteps"], beta_start=1e-4, beta_end=0.02,
                              beta_schedule="linear", clip_sample=True, clip_sample_range=1.0,
                              set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
                              timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(x_T)
    y = torch.from_numpy(labels)
    null = torch.full_like(y, d["null_label"])
    with torch.inference_mode():
        for t in scheduler.timesteps:
            tt = torch.full((2 * len(x),), int(t), dtype=torch.int64)
            out = unet(torch.cat([x, x]), tt, torch.cat([y, null]))
            cond, uncond = out[: len(x)], out[len(x):]
            eps = uncond + guidance * (cond - uncond)
            x = scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    return x.clamp(-1, 1).numpy()


def run(base: Path, families: dict, repeats: int, steps: int = STEPS, log=print) -> dict:
    import torch

    from serve.manifest import parse_manifest
    from serve.samplers import NoiseSchedule, state_size
    from serve.session import DenoisingSession, available_threads

    torch.set_num_threads(available_threads())
    src = base / "exported" / MODEL / "1"
    manifest = json.loads((src / "manifest.json").read_text())
    tmp = Path(tempfile.mkdtemp(prefix="gen-bench-diffusion-"))
    repo = tmp / "exported"
    shutil.copytree(src, repo / MODEL / "1")
    k = len(manifest["classes"])
    guidance = float(manifest["config"].get("guidance", 3.0)) if k else 1.0
    shape = (manifest["image"]["channels"], manifest["image"]["height"], manifest["image"]["width"])
    x_T = np.random.default_rng(0).standard_normal((REQUESTS, *shape), dtype=np.float32)
    labels = (np.arange(REQUESTS) % max(k, 1)).astype(np.int64)
    d = manifest["diffusion"]
    schedule = NoiseSchedule.from_manifest(d)
    # the server's state layout (every sampler's state size), so the offline batch does the server's work
    session = DenoisingSession(src, parse_manifest(manifest), state_size(), capacity=REQUESTS, device="cpu")
    unet = families[MODEL].ema.eval()

    sides = {
        "step-level batching": lambda: _serve(repo, None, steps),
        "one loop per request": lambda: _serve(repo, 1, steps),
        "offline batch": lambda: _timed(lambda: _offline(session, schedule, x_T, labels, guidance, steps)),
        "diffusers DDIMScheduler + PyTorch": lambda: _timed(lambda: _diffusers(unet, manifest, x_T, labels, guidance,
                                                                                steps)),
    }
    _offline(session, schedule, x_T, labels, guidance, 2)  # warm-up of the direct sides (the session's 32-row buffers)
    _diffusers(unet, manifest, x_T[:2], labels[:2], guidance, 2)
    samples: dict[str, list[float]] = {name: [] for name in sides}
    try:
        for rep in range(repeats):
            for name, fn in sides.items():
                seconds = fn()
                samples[name].append(seconds)
                log(f"  [{rep + 1}/{repeats}] {name}: {seconds:.2f} s for {REQUESTS} x {steps} steps "
                    f"({REQUESTS / seconds:.1f} images/s)")
        ours = _offline(session, schedule, x_T, labels, guidance, steps)
        theirs = _diffusers(unet, manifest, x_T, labels, guidance, steps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [{"side": name, "seconds": statistics.median(v), "images_per_s": REQUESTS / statistics.median(v),
             "repeats": len(v)} for name, v in samples.items()]
    return {"model": MODEL, "requests": REQUESTS, "steps": steps, "guidance": guidance, "rows": rows,
            "max_abs_diff_vs_diffusers": float(np.abs(ours - theirs).max())}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
