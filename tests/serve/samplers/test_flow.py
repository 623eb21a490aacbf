"""The flow samplers: Euler against diffusers' FlowMatchEulerDiscreteScheduler driving the shipped mnist-flow
denoiser, Adams-Bashforth 2 against a float64 loop written from its formula, and both against the exact solution
of a flow whose data distribution is Gaussian (so their order of convergence is what the method promises)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from serve.runtime import Runtime
from serve.samplers import SAMPLERS
from serve.samplers.schedule import FlowSchedule, NoiseSchedule

REPO = Path(__file__).resolve().parents[3] / "exported"
MODEL = "mnist-flow"
SHAPE = (1, 32, 32)
LABELS = [3, 7]
GUIDANCE = 1.5


@pytest.fixture(scope="module")
def denoiser():
    return ort.InferenceSession(str(REPO / MODEL / "1" / "denoiser.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def runtime():
    with Runtime(REPO, device="cpu") as rt:
        yield rt


def velocity(session, x: np.ndarray, t: float) -> np.ndarray:
    """The guided velocity at (x, t): one doubled batch, as the server runs it."""
    labels = np.array(LABELS, np.int64)
    tt = np.full(2 * len(x), t, np.float32)
    out = session.run(None, {"x_t": np.concatenate([x, x]).astype(np.float32), "t": tt,
                             "label": np.concatenate([labels, np.full_like(labels, 10)])})[0].astype(np.float64)
    return out[len(x):] + GUIDANCE * (out[:len(x)] - out[len(x):])


def x_T(seed: int) -> np.ndarray:
    rngs = [np.random.default_rng(np.random.SeedSequence([seed, i])) for i in range(len(LABELS))]
    return np.stack([r.standard_normal(SHAPE, dtype=np.float32) for r in rngs])


def served(runtime, sampler: str, steps: int, seed: int) -> np.ndarray:
    events = list(runtime.sync.generate(MODEL, len(LABELS), seed=seed, labels=LABELS, guidance=GUIDANCE,
                                        sampler=sampler, steps=steps))
    return events[-1].result.images


@pytest.mark.parametrize("steps", [10, 20])
def test_euler_matches_diffusers_flow_match_euler(steps, denoiser, runtime):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(sigmas=[(steps - i) / steps for i in range(steps)])  # our trailing grid, then 0
    sample = torch.from_numpy(x_T(5))
    for t in sched.timesteps:  # diffusers' timestep is 1000 sigma; the exported denoiser takes t = sigma
        v = velocity(denoiser, sample.numpy(), float(t) / 1000)
        sample = sched.step(torch.from_numpy(v).float(), t, sample).prev_sample
    expected = np.clip(sample.numpy(), -1, 1)
    got = served(runtime, "euler", steps, 5)
    assert np.abs(got - expected).max() <= 1e-4, np.abs(got - expected).max()
    assert np.abs(got).max() > 0.5, "not a blank image"


@pytest.mark.parametrize("steps", [10, 20])
def test_ab2_matches_its_formula_in_float64(steps, denoiser, runtime):
    ts = [(steps - i) / steps for i in range(steps)] + [0.0]
    x, v_prev = x_T(6).astype(np.float64), None
    for i in range(steps):
        v = velocity(denoiser, x, ts[i])
        h = ts[i + 1] - ts[i]
        if v_prev is None:
            x = x + h * v
        else:
            h_p = ts[i] - ts[i - 1]
            x = x + h * ((1 + h / (2 * h_p)) * v - (h / (2 * h_p)) * v_prev)
        v_prev = v
    got = served(runtime, "ab2", steps, 6)
    assert np.abs(got - np.clip(x, -1, 1)).max() <= 1e-4


def gaussian_flow_end(sampler: str, steps: int, schedule: NoiseSchedule, x_start: float, m=0.3, c=0.5) -> float:
    """A sampler's plan on scalar data ~ N(m, c^2), whose x0 estimate E[x0 | x_t] is known in closed form."""
    s = SAMPLERS[sampler]
    pairs = schedule.pairs(steps)
    plan = s.plan(schedule, pairs, 0.0)
    state = [x_start] + [0.0] * (len(s.state) - 1)
    for i, (t, _) in enumerate(pairs):
        a, sg = schedule.alpha(t), schedule.sigma(t)
        x0 = m + a * c * c * (state[0] - a * m) / (a * a * c * c + sg * sg)
        terms = [*state, x0, 0.0]
        state = [sum(plan[i, j, k] * terms[k] for k in range(len(terms))) for j in range(len(s.state))]
    return state[0]


@pytest.mark.parametrize("sampler,order", [("euler", 1), ("ab2", 2)])
def test_flow_samplers_converge_at_their_order(sampler, order):
    """The probability-flow ODE of Gaussian data keeps z = (x_t - alpha m) / sqrt(alpha^2 c^2 + sigma^2): from
    x_1 = 1.2 at t = 1 the exact end is m + 1.2 c."""
    exact = 0.3 + 1.2 * 0.5
    errors = [abs(gaussian_flow_end(sampler, n, FlowSchedule(1000), 1.2) - exact) for n in (10, 20, 40)]
    ratios = [errors[k] / errors[k + 1] for k in range(2)]
    assert all(r > 2 ** order * 0.75 for r in ratios), (errors, ratios)
    assert errors[-1] < (0.03 if order == 1 else 1e-3)


def test_the_flow_grid_is_trailing_and_ends_clean():
    schedule = FlowSchedule(1000)
    assert schedule.pairs(4) == [(1.0, 0.75), (0.75, 0.5), (0.5, 0.25), (0.25, -1.0)]
    assert schedule.alpha(1.0) == 0.0 and schedule.sigma(1.0) == 1.0  # the first step starts at pure noise
    assert (schedule.alpha(-1.0), schedule.sigma(-1.0)) == (1.0, 0.0)
    assert schedule.to_x0(0.25) == (1.0, -0.25)  # x0 = x_t - t v
    assert schedule.model_time([1.0, 0.25]).dtype == np.float32
    with pytest.raises(ValueError, match="steps"):
        schedule.pairs(0)


def test_a_manifest_naming_an_unknown_schedule_or_prediction_is_refused():
    import json

    from serve.manifest import ManifestError, parse_manifest

    raw = json.loads((REPO / MODEL / "1" / "manifest.json").read_text())
    for field, value in (("schedule", "karras"), ("prediction", "score")):
        bad = json.loads(json.dumps(raw))
        bad["diffusion"][field] = value
        with pytest.raises(ManifestError, match=f"diffusion.{field}"):
            parse_manifest(bad)


def test_euler_is_ddim_on_a_ddpm_schedule():
    schedule = NoiseSchedule.of("linear", 1000)
    pairs = schedule.pairs(10)
    euler, ddim = SAMPLERS["euler"].plan(schedule, pairs, 0.0), SAMPLERS["ddim"].plan(schedule, pairs, 0.0)
    assert np.allclose(euler, ddim, atol=1e-12)


def test_every_sampler_starts_from_pure_noise_on_a_flow():
    """A flow's first step is at alpha = 0: every registered sampler's plan stays finite there."""
    for name, s in SAMPLERS.items():
        for steps in (1, 2, 5, 20):
            plan = s.plan(FlowSchedule(1000), FlowSchedule(1000).pairs(steps), 1.0)
            assert np.isfinite(plan).all(), (name, steps)
