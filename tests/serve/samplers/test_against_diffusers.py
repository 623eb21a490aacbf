"""Every registered sampler against the diffusers scheduler of the same name, configured to match, driving the
shipped mnist-diffusion denoiser: the served images equal diffusers' loop within 1e-4 at 10 and 50 steps.

Where this project's choice is a diffusers option, the option is set (x0 clipped to [-1, 1]: clip_sample for
DDPM/DDIM, thresholding with sample_max_value=1 for DPM-Solver++ and UniPC, which is the same clip; trailing
timesteps; a final step to sigma 0). Euler ancestral has no clipping in diffusers and none here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from serve.runtime import Runtime  # noqa: E402
from serve.samplers import SAMPLERS  # noqa: E402

REPO = Path(__file__).resolve().parents[3] / "exported"
MODEL = "mnist-diffusion"
SHAPE = (1, 32, 32)
LABELS = [3, 7]
GUIDANCE = 1.25
COMMON = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
              prediction_type="epsilon", timestep_spacing="trailing")


def make_scheduler(name: str):
    s = diffusers.schedulers
    if name == "ddpm":
        return s.DDPMScheduler(**COMMON, clip_sample=True, clip_sample_range=1.0, variance_type="fixed_small")
    if name == "ddim":
        return s.DDIMScheduler(**COMMON, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True)
    if name == "dpm++":
        return s.DPMSolverMultistepScheduler(**COMMON, algorithm_type="dpmsolver++", solver_order=2,
                                             solver_type="midpoint", lower_order_final=True,
                                             final_sigmas_type="zero", thresholding=True, sample_max_value=1.0)
    if name == "unipc":
        return s.UniPCMultistepScheduler(**COMMON, solver_order=2, solver_type="bh2", predict_x0=True,
                                         lower_order_final=True, final_sigmas_type="zero", thresholding=True,
                                         sample_max_value=1.0, disable_corrector=[])
    if name == "euler_a":
        return s.EulerAncestralDiscreteScheduler(**COMMON)
    raise AssertionError(f"no diffusers counterpart configured for {name!r}: add one here")


@pytest.fixture(scope="module")
def denoiser():
    return ort.InferenceSession(str(REPO / MODEL / "1" / "denoiser.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def runtime():
    with Runtime(REPO, device="cpu") as rt:
        yield rt


def diffusers_loop(session, name: str, steps: int, seed: int, eta: float, monkeypatch) -> np.ndarray:
    """diffusers' scheduler loop over the same denoiser, with our documented draws as its noise."""
    sched = make_scheduler(name)
    sched.set_timesteps(steps)
    rngs = [np.random.default_rng(np.random.SeedSequence([seed, i])) for i in range(len(LABELS))]
    x_T = np.stack([r.standard_normal(SHAPE, dtype=np.float32) for r in rngs])
    stochastic = SAMPLERS[name].uses_noise(eta)

    def draw(*args, **kwargs):
        return torch.from_numpy(np.stack([r.standard_normal(SHAPE, dtype=np.float32) for r in rngs]))

    module = type(sched).__module__
    monkeypatch.setattr(f"{module}.randn_tensor", draw, raising=False)
    labels = np.array(LABELS, np.int64)
    sample = torch.from_numpy(x_T) * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.scale_model_input(sample, t).numpy().astype(np.float32)
        tt = np.full(len(labels), int(round(float(t))), np.int64)
        cond = session.run(None, {"x_t": x, "t": tt, "label": labels})[0]
        uncond = session.run(None, {"x_t": x, "t": tt, "label": np.full_like(labels, 10)})[0]
        eps = torch.from_numpy(uncond + GUIDANCE * (cond - uncond))
        if name == "ddim":
            noise = draw() if stochastic else None
            sample = sched.step(eps, t, sample, eta=eta, use_clipped_model_output=True, variance_noise=noise).prev_sample
        else:
            sample = sched.step(eps, t, sample).prev_sample
    return np.clip(sample.numpy(), -1, 1)


CASES = [(name, steps, eta) for name in sorted(SAMPLERS) for steps in (10, 50)
         for eta in ((0.0, 1.0) if name == "ddim" else (0.0,))]


@pytest.mark.parametrize("name,steps,eta", CASES)
def test_sampler_matches_diffusers(name, steps, eta, denoiser, runtime, monkeypatch):
    seed = 11
    expected = diffusers_loop(denoiser, name, steps, seed, eta, monkeypatch)
    events = list(runtime.sync.generate(MODEL, len(LABELS), seed=seed, labels=LABELS, guidance=GUIDANCE,
                                        sampler=name, steps=steps, eta=eta))
    got = events[-1].result.images
    assert np.abs(got - expected).max() <= 1e-4, f"{name} {steps} steps: max diff {np.abs(got - expected).max()}"
    assert np.abs(got).max() > 0.5, "not a blank image"
