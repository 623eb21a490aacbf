"""DDPM, DDIM and DPM-Solver++ served from the denoiser reproduce the images of the step graph they replace.

The shipped mnist-diffusion was exported before samplers became serving code, so its version folder still holds
that `step.onnx` (all three samplers baked in, picked per row) beside `denoiser.onnx` (same weights). Its loop,
as the old scheduler fed it, is the reference.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from serve.diffusion import timestep_pairs
from serve.runtime import Runtime

VERSION = Path(__file__).resolve().parents[3] / "exported" / "mnist-diffusion" / "1"
LEGACY = {"ddpm": 0, "ddim": 1, "dpm++": 2}  # the old graph's `sampler` input
SHAPE, LABELS, SEED = (1, 32, 32), [0, 4, 9], 5


@pytest.fixture(scope="module")
def step_graph():
    if not (VERSION / "step.onnx").is_file():
        pytest.skip("the shipped model no longer carries the legacy step graph")
    return ort.InferenceSession(str(VERSION / "step.onnx"), providers=["CPUExecutionProvider"])


def legacy_loop(session, sampler: str, steps: int, eta: float, guidance: float) -> np.ndarray:
    n = len(LABELS)
    rngs = [np.random.default_rng(np.random.SeedSequence([SEED, i])) for i in range(n)]
    x = np.stack([r.standard_normal(SHAPE, dtype=np.float32) for r in rngs])
    x0 = np.zeros_like(x)
    full = lambda v, dtype: np.full(n, v, dtype)  # noqa: E731
    t_last = -1
    for t, t_prev in timestep_pairs(steps, 1000):
        noise = np.stack([r.standard_normal(SHAPE, dtype=np.float32) for r in rngs])  # drawn every step, as then
        x, x0 = session.run(["x_prev", "x0"], {
            "x_t": x, "t": full(t, np.int64), "t_prev": full(t_prev, np.int64), "label": np.array(LABELS),
            "guidance": full(guidance, np.float32), "eta": full(eta, np.float32), "noise": noise,
            "sampler": full(LEGACY[sampler], np.int64), "x0_prev": x0, "t_last": full(t_last, np.int64)})
        t_last = t
    return np.clip(x, -1, 1)


@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", 10, 0.0), ("ddim", 10, 0.0), ("ddim", 50, 0.0),
                                               ("ddim", 10, 1.0), ("dpm++", 10, 0.0), ("dpm++", 50, 0.0)])
def test_the_served_loop_reproduces_the_step_graph(step_graph, sampler, steps, eta):
    with Runtime(VERSION.parents[1], device="cpu") as rt:
        got = list(rt.sync.generate("mnist-diffusion", len(LABELS), seed=SEED, labels=LABELS, guidance=1.25,
                                    sampler=sampler, steps=steps, eta=eta))[-1].result.images
    diff = float(np.abs(got - legacy_loop(step_graph, sampler, steps, eta, 1.25)).max())
    assert diff <= 1e-4, f"{sampler} {steps} steps eta {eta}: {diff}"
