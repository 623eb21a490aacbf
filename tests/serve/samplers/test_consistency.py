"""The consistency sampler against Algorithm 1 of Song et al. (2023), "Consistency Models", written out in float64
for a variance-preserving schedule, on a distilled student (guidance as its input) and on an ordinary model.

    x = f(x_T, T);  for each later timestep t_n:  x_{t_n} = alpha_{t_n} x + sigma_{t_n} z;  x = f(x_{t_n}, t_n)

where f is the model's clipped x0 prediction (the teacher predicts eps, its student v). Noise: the row's documented
draws, x_T first, then one per step. A student may be served with another sampler per step count (the shipped one:
DDIM at 2 and 4): that against its paper.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from serve.runtime import Runtime

SHAPE = (1, 32, 32)
LABELS = [3, 7, 0]


@pytest.fixture(scope="module")
def repo(tiny_repo):
    return tiny_repo / "exported"


@pytest.fixture(scope="module")
def runtime(repo):
    with Runtime(repo, device="cpu") as rt:
        yield rt


def x0_of(out: np.ndarray, x: np.ndarray, abar_t: float, student: bool) -> np.ndarray:
    """The clipped x0: a student's output is v (x0 = alpha x - sigma v), a teacher's eps."""
    a, s = np.sqrt(abar_t), np.sqrt(1 - abar_t)
    return np.clip(a * x - s * out if student else (x - s * out) / a, -1, 1)


def paper_loop(onnx_path, steps: int, seed: int, guidance: float, student: bool) -> np.ndarray:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    ts = [round(1000 * (steps - i) / steps) - 1 for i in range(steps)]  # trailing timesteps
    rngs = [np.random.default_rng(np.random.SeedSequence([seed, i])) for i in range(len(LABELS))]
    labels = np.array(LABELS, np.int64)

    def f(x: np.ndarray, t: int) -> np.ndarray:
        xt, tt = x.astype(np.float32), np.full(len(x), t, np.int64)
        if student:
            out = session.run(None, {"x_t": xt, "t": tt, "label": labels,
                                     "guidance": np.full(len(x), guidance, np.float32)})[0].astype(np.float64)
        else:
            both = session.run(None, {"x_t": np.concatenate([xt, xt]), "t": np.concatenate([tt, tt]),
                                      "label": np.concatenate([labels, np.full_like(labels, 10)])})[0]
            cond, uncond = both[:len(x)].astype(np.float64), both[len(x):].astype(np.float64)
            out = uncond + guidance * (cond - uncond)
        return x0_of(out, x, abar[t], student)

    x = f(np.stack([r.standard_normal(SHAPE, dtype=np.float32) for r in rngs]).astype(np.float64), ts[0])
    for t in ts[1:]:
        z = np.stack([r.standard_normal(SHAPE, dtype=np.float32) for r in rngs])
        x = f(np.sqrt(abar[t]) * x + np.sqrt(1 - abar[t]) * z, t)
    return x


@pytest.mark.parametrize("model,steps", [("tiny-diffusion-student", 1), ("tiny-diffusion-student", 2),
                                         ("tiny-diffusion", 4)])  # the student's sampler at 1 and 2 steps
def test_served_consistency_sampling_follows_the_paper(model, steps, repo, runtime):
    seed, guidance = 5, 1.75
    events = list(runtime.sync.generate(model, len(LABELS), seed=seed, labels=LABELS, guidance=guidance,
                                        sampler="consistency", steps=steps))
    got = events[-1].result.images
    expected = paper_loop(repo / model / "1" / "denoiser.onnx", steps, seed, guidance, "student" in model)
    assert np.abs(got - expected).max() <= 1e-4
    assert [e.step for e in events[:-1]] == list(range(1, steps + 1))


def test_the_students_ddim_steps_follow_ddims_paper(repo, runtime):
    """The student's sampler at 4 steps (the shipped student's at 2 and 4): eq. 12 of Song et al. (2021) at eta 0,
    x_{t'} = alpha_{t'} x0 + sigma_{t'} eps with eps from the clipped x0, in float64."""
    session = ort.InferenceSession(str(repo / "tiny-diffusion-student" / "1" / "denoiser.onnx"),
                                   providers=["CPUExecutionProvider"])
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    labels, seed, guidance, steps = np.array(LABELS, np.int64), 8, 2.0, 4
    ts = [round(1000 * (steps - i) / steps) - 1 for i in range(steps)] + [-1]
    rngs = [np.random.default_rng(np.random.SeedSequence([seed, i])) for i in range(len(LABELS))]
    x = np.stack([r.standard_normal(SHAPE, dtype=np.float32) for r in rngs]).astype(np.float64)
    for t, t_next in zip(ts, ts[1:]):
        v = session.run(None, {"x_t": x.astype(np.float32), "t": np.full(len(x), t, np.int64), "label": labels,
                               "guidance": np.full(len(x), guidance, np.float32)})[0].astype(np.float64)
        x0 = x0_of(v, x, abar[t], student=True)
        eps = (x - np.sqrt(abar[t]) * x0) / np.sqrt(1 - abar[t])
        a_next = 1.0 if t_next < 0 else np.sqrt(abar[t_next])
        x = a_next * x0 + np.sqrt(1 - a_next**2) * eps
    got = list(runtime.sync.generate("tiny-diffusion-student", len(LABELS), seed=seed, labels=LABELS,
                                     guidance=guidance, steps=steps))[-1].result.images
    assert np.abs(got - np.clip(x, -1, 1)).max() <= 1e-4
