"""Every registered sampler against the diffusers scheduler of the same name, configured to match, driving the
shipped mnist-diffusion denoiser: the served images equal diffusers' loop within 1e-4 at 10 and 50 steps.
Euler is DDIM at eta 0 without clipping here; Adams-Bashforth 2, which diffusers lacks, is held to a float64 loop
written from its formula (tests/serve/samplers/test_flow.py has both on a flow model).

The consistency sampler is LCMScheduler's multistep loop (tests/serve/samplers/test_consistency.py has the paper's).

Where this project's choice is a diffusers option, the option is set (x0 clipped to [-1, 1]: clip_sample for
DDPM/DDIM, thresholding with sample_max_value=1 for DPM-Solver++ and UniPC, which is the same clip; trailing
timesteps; a final step to sigma 0). Euler ancestral has no clipping in diffusers and none here; diffusers runs it
on the variance-exploding sample S = x / alpha in float32, whose unclipped x0 at t = 999 amplifies rounding by
1 / alpha ~ 160: its loop lands 1.2e-4 from ours at 10 steps. So Euler ancestral is held to 1e-4 against a float64
loop written from the paper (k-diffusion's form, below) and to 2e-4 against diffusers.
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
    if name == "euler":  # the flow ODE's Euler step is DDIM at eta 0 on this schedule (no clipping, as for flows)
        return s.DDIMScheduler(**COMMON, clip_sample=False, set_alpha_to_one=True)
    if name == "ab2":  # no diffusers counterpart (its LMS works in sigma): a float64 loop from the formula instead
        return None
    if name == "consistency":  # LCM's multistep sampling; a huge timestep_scaling makes its boundary terms vanish
        return s.LCMScheduler(**COMMON, clip_sample=True, clip_sample_range=1.0, timestep_scaling=1e6)
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
    if name == "consistency":  # LCM picks its own timesteps unless given: ours, trailing
        sched.set_timesteps(timesteps=[round(1000 * (steps - i) / steps) - 1 for i in range(steps)])
    else:
        sched.set_timesteps(steps)
    rngs = [np.random.default_rng(np.random.SeedSequence([seed, i])) for i in range(len(LABELS))]
    x_T = np.stack([r.standard_normal(SHAPE, dtype=np.float32) for r in rngs])
    stochastic = SAMPLERS[name].uses_noise(eta)

    def draw(*args, **kwargs):
        return torch.from_numpy(np.stack([r.standard_normal(SHAPE, dtype=np.float32) for r in rngs])).double()

    module = type(sched).__module__
    monkeypatch.setattr(f"{module}.randn_tensor", draw, raising=False)
    labels = np.array(LABELS, np.int64)
    sample = torch.from_numpy(x_T).double() * sched.init_noise_sigma  # float64 samples (its own tables stay float32)
    for t in sched.timesteps:
        x = sched.scale_model_input(sample, t).numpy().astype(np.float32)
        tt = np.full(len(labels), int(round(float(t))), np.int64)
        # one doubled batch, as the server runs it (float32 kernels can differ in the last bits by batch size)
        out = session.run(None, {"x_t": np.concatenate([x, x]), "t": np.concatenate([tt, tt]),
                                 "label": np.concatenate([labels, np.full_like(labels, 10)])})[0]
        cond, uncond = out[:len(x)], out[len(x):]
        eps = torch.from_numpy(uncond + GUIDANCE * (cond - uncond)).double()
        if name == "ddim":
            noise = draw() if stochastic else None
            sample = sched.step(eps, t, sample, eta=eta, use_clipped_model_output=True,
                                variance_noise=noise).prev_sample
        else:
            sample = sched.step(eps, t, sample).prev_sample
    return np.clip(sample.numpy(), -1, 1)


def paper_ab2(session, steps: int, seed: int) -> np.ndarray:
    """Adams-Bashforth 2 on the flow ODE of this schedule rescaled to a straight path (y = x / (alpha + sigma),
    tau = sigma / (alpha + sigma)), in float64; the first step is Euler."""
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    ts = [round(1000 * (steps - i) / steps) - 1 for i in range(steps)]
    alpha = lambda t: 1.0 if t < 0 else np.sqrt(abar[t])  # noqa: E731
    sigma = lambda t: 0.0 if t < 0 else np.sqrt(1 - abar[t])  # noqa: E731
    tau = lambda t: sigma(t) / (alpha(t) + sigma(t))  # noqa: E731
    rngs = [np.random.default_rng(np.random.SeedSequence([seed, i])) for i in range(len(LABELS))]
    x = np.stack([r.standard_normal(SHAPE, dtype=np.float32) for r in rngs]).astype(np.float64)
    labels = np.array(LABELS, np.int64)
    d_prev = None
    for i, t in enumerate(ts):
        tp = ts[i + 1] if i + 1 < steps else -1
        tt = np.full(len(labels), t, np.int64)
        xf = x.astype(np.float32)
        out = session.run(None, {"x_t": np.concatenate([xf, xf]), "t": np.concatenate([tt, tt]),
                                 "label": np.concatenate([labels, np.full_like(labels, 10)])})[0].astype(np.float64)
        eps = out[len(x):] + GUIDANCE * (out[:len(x)] - out[len(x):])
        x0 = (x - sigma(t) * eps) / alpha(t)
        y = x / (alpha(t) + sigma(t))
        d = (y - x0) / tau(t)
        h = tau(tp) - tau(t)
        if d_prev is None:
            y = y + h * d
        else:
            h_p = tau(t) - tau(ts[i - 1])
            y = y + h * ((1 + h / (2 * h_p)) * d - (h / (2 * h_p)) * d_prev)
        d_prev = d
        x = y * (alpha(tp) + sigma(tp))
    return np.clip(x, -1, 1)


def paper_euler_ancestral(session, steps: int, seed: int) -> np.ndarray:
    """Karras et al. (2022) Euler step plus ancestral noise on S = x / alpha, in float64 (k-diffusion's loop)."""
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    sigmas = np.sqrt((1 - abar) / abar)
    ts = [round(1000 * (steps - i) / steps) - 1 for i in range(steps)]
    rngs = [np.random.default_rng(np.random.SeedSequence([seed, i])) for i in range(len(LABELS))]
    S = np.stack([r.standard_normal(SHAPE, dtype=np.float32) for r in rngs]).astype(np.float64)
    S *= np.sqrt(1 + sigmas[ts[0]] ** 2)
    labels = np.array(LABELS, np.int64)
    for i, t in enumerate(ts):
        sigma, sigma_to = sigmas[t], (sigmas[ts[i + 1]] if i + 1 < steps else 0.0)
        x = (S / np.sqrt(1 + sigma**2)).astype(np.float32)
        tt = np.full(len(labels), t, np.int64)
        out = session.run(None, {"x_t": np.concatenate([x, x]), "t": np.concatenate([tt, tt]),
                                 "label": np.concatenate([labels, np.full_like(labels, 10)])})[0].astype(np.float64)
        eps = out[len(x):] + GUIDANCE * (out[:len(x)] - out[len(x):])
        x0 = S - sigma * eps
        sigma_up = np.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2)
        sigma_down = np.sqrt(sigma_to**2 - sigma_up**2)
        noise = np.stack([r.standard_normal(SHAPE, dtype=np.float32) for r in rngs])
        S = S + (S - x0) / sigma * (sigma_down - sigma) + sigma_up * noise
    return np.clip(S, -1, 1)


CASES = [(name, steps, eta) for name in sorted(SAMPLERS) for steps in (10, 50)
         for eta in ((0.0, 1.0) if name == "ddim" else (0.0,))]


@pytest.mark.parametrize("name,steps,eta", CASES)
def test_sampler_matches_diffusers(name, steps, eta, denoiser, runtime, monkeypatch):
    seed = 11
    if name == "ab2":
        expected = paper_ab2(denoiser, steps, seed)
    else:
        expected = diffusers_loop(denoiser, name, steps, seed, eta, monkeypatch)
    events = list(runtime.sync.generate(MODEL, len(LABELS), seed=seed, labels=LABELS, guidance=GUIDANCE,
                                        sampler=name, steps=steps, eta=eta))
    got = events[-1].result.images
    tolerance = 1e-4
    if name == "euler_a":  # see the module docstring
        paper = paper_euler_ancestral(denoiser, steps, seed)
        assert np.abs(got - paper).max() <= 1e-4, f"euler_a vs the paper's loop: {np.abs(got - paper).max()}"
        tolerance = 2e-4
    diff = np.abs(got - expected).max()
    assert diff <= tolerance, f"{name} {steps} steps: max diff {diff} from diffusers"
    assert np.abs(got).max() > 0.5, "not a blank image"
