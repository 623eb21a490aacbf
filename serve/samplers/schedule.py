"""The noise schedule a denoising model was trained with, as the samplers see it (numpy, float64).

Every schedule is a path x_t = alpha_t x0 + sigma_t eps and a grid of times the samplers step along; t = -1 is
"t = 0 reached" (alpha 1, sigma 0), the target of every final step. Two kinds, named by the manifest's
`diffusion.schedule`:
  * variance-preserving and discrete (DDPM): "linear", "scaled_linear", "cosine" (diffusers' beta_schedule linear,
    scaled_linear, squaredcos_cap_v2). alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) for integer timesteps
    t = 0..T-1, and the model's time input is that integer. The sampling grid is spaced as diffusers'
    timestep_spacing says ("trailing", gen's own models; "leading" with steps_offset; "linspace");
  * the straight path of rectified flow: "rectified_flow". alpha_t = 1 - t, sigma_t = t for continuous t in [0, 1],
    and the model's time input is t itself (float32).
The model's output becomes x0 = c_x x_t + c_out out by the manifest's `diffusion.prediction` (`to_x0`).
The trainer reads `alpha_bar` from here too: one copy of the rule. `NoiseSchedule.from_manifest` reads every key of
the manifest's `diffusion` section that shapes the schedule; a key left out has gen's own training's value.
"""
from __future__ import annotations

import math

import numpy as np

DISCRETE_SCHEDULES = ("linear", "scaled_linear", "cosine")
FLOW_SCHEDULES = ("rectified_flow",)
SCHEDULES = DISCRETE_SCHEDULES + FLOW_SCHEDULES
# what the network predicts: eps (the noise), v (Salimans & Ho: alpha eps - sigma x0), velocity (a flow's
# d x_t / dt = eps - x0), sample (x0 itself)
PREDICTIONS = ("eps", "v", "velocity", "sample")
SPACINGS = ("trailing", "leading", "linspace")  # diffusers' timestep_spacing
BETAS = (1e-4, 0.02)  # DDPM's beta_start, beta_end (gen's own diffusion models train with these)
# lambda = log(alpha / sigma) is -inf where a path starts at pure noise (a flow's t = 1); the solvers take
# differences of lambda, so it is floored at a level whose error no float32 image can show
ALPHA_FLOOR = 1e-8


def alpha_bar(schedule: str, num_train_timesteps: int, beta_start: float = BETAS[0],
              beta_end: float = BETAS[1]) -> np.ndarray:
    """abar_t = prod_{s <= t} (1 - beta_s) for t = 0..T-1, float64."""
    T = num_train_timesteps
    if schedule == "linear":  # DDPM: betas 1e-4..0.02
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif schedule == "scaled_linear":  # linear in sqrt(beta) (latent diffusion)
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    elif schedule == "cosine":  # Nichol & Dhariwal (2021), betas clipped at 0.999 as in diffusers
        u = np.arange(T + 1, dtype=np.float64) / T
        f = np.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
    else:
        raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(DISCRETE_SCHEDULES)}")
    return np.cumprod(1 - betas)


def _checked(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction: {prediction!r} is not one of {', '.join(PREDICTIONS)}")
    return prediction


def timestep_pairs(steps: int, num_train_timesteps: int, spacing: str = "trailing",
                   steps_offset: int = 0) -> list[tuple[int, int]]:
    """(t_i, t_{i+1}) for i = 0..S-1, the last going to -1, with diffusers' timestep_spacing:
    trailing t_i = round(T (S - i) / S) - 1 (round half to even); leading t_i = (S - 1 - i) (T // S) + steps_offset;
    linspace t_i = round(i-th of S points from T - 1 down to 0)."""
    T, S = num_train_timesteps, steps
    if not 1 <= S <= T:
        raise ValueError(f"steps must be in 1..{T}, got {S}")
    if spacing == "trailing":
        ts = [round(T * (S - i) / S) - 1 for i in range(S)]
    elif spacing == "leading":
        ts = [(S - 1 - i) * (T // S) + steps_offset for i in range(S)]
    elif spacing == "linspace":
        ts = [int(v) for v in np.linspace(0, T - 1, S).round()[::-1]]
    else:
        raise ValueError(f"timestep_spacing: {spacing!r} is not one of {', '.join(SPACINGS)}")
    if ts[0] > T - 1:
        raise ValueError(f"steps_offset {steps_offset}: {S} leading steps would start at t = {ts[0]} > {T - 1}")
    return list(zip(ts, ts[1:] + [-1]))


class NoiseSchedule:
    """A discrete variance-preserving schedule: alpha, sigma and lambda = log(alpha / sigma) per integer timestep;
    t = -1 is the clean end (alpha 1, sigma 0). `of` builds any kind by its manifest name."""

    time_dtype = "int64"  # the denoiser's `t` input

    def __init__(self, abar: np.ndarray, prediction: str = "eps", spacing: str = "trailing", steps_offset: int = 0,
                 clip_range: float = 1.0):
        self.abar = np.asarray(abar, np.float64)
        self.T = len(self.abar)
        self.prediction = _checked(prediction)
        if spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing: {spacing!r} is not one of {', '.join(SPACINGS)}")
        self.spacing, self.steps_offset = spacing, steps_offset
        self.clip_range = clip_range  # x0 is clipped to [-r, r] by the samplers that clip (clip_x0); 0: never

    @classmethod
    def of(cls, schedule: str, num_train_timesteps: int, prediction: str = "eps", *, beta_start: float = BETAS[0],
           beta_end: float = BETAS[1], spacing: str = "trailing", steps_offset: int = 0,
           clip_range: float = 1.0) -> NoiseSchedule:
        if schedule in FLOW_SCHEDULES:
            return FlowSchedule(num_train_timesteps, prediction)
        return cls(alpha_bar(schedule, num_train_timesteps, beta_start, beta_end), prediction, spacing, steps_offset,
                   clip_range)

    @classmethod
    def from_manifest(cls, d: dict) -> NoiseSchedule:
        """The schedule of a manifest's `diffusion` section (serve.manifest checks its keys)."""
        clip = float(d.get("clip_sample_range", 1.0)) if d.get("clip_sample", True) else 0.0
        return cls.of(d["schedule"], int(d["num_train_timesteps"]), d["prediction"],
                      beta_start=float(d.get("beta_start", BETAS[0])), beta_end=float(d.get("beta_end", BETAS[1])),
                      spacing=d.get("timestep_spacing", "trailing"), steps_offset=int(d.get("steps_offset", 0)),
                      clip_range=clip)

    def pairs(self, steps: int) -> list[tuple]:
        """(t, t_prev) per sampling step, the last going to -1, spaced as diffusers' timestep_spacing (gen's own
        models: "trailing", t_i = round(T (S - i) / S) - 1, so the first step is always t = T - 1)."""
        return timestep_pairs(steps, self.T, self.spacing, self.steps_offset)

    def model_time(self, ts) -> np.ndarray:
        """The denoiser's `t` input for schedule times `ts`."""
        return np.asarray(ts, self.time_dtype)

    def alpha(self, t) -> float:
        return 1.0 if t < 0 else math.sqrt(self.abar[t])

    def sigma(self, t) -> float:
        return 0.0 if t < 0 else math.sqrt(1.0 - self.abar[t])

    def lam(self, t) -> float:
        """log(alpha_t / sigma_t); +inf at t = -1."""
        return math.inf if t < 0 else math.log(max(self.alpha(t), ALPHA_FLOOR)) - math.log(self.sigma(t))

    def to_x0(self, t) -> tuple[float, float]:
        """(c_x, c_out) with x0 = c_x x_t + c_out out, from x_t = alpha x0 + sigma eps and the prediction."""
        a, s = self.alpha(t), self.sigma(t)
        if self.prediction == "eps":  # (x - s eps) / a
            return 1.0 / a, -s / a
        if self.prediction == "v":  # a x - s v, where a^2 + s^2 = 1
            return a, -s
        if self.prediction == "velocity":  # v = eps - x0, so x = (a + s) x0 + s v
            return 1.0 / (a + s), -s / (a + s)
        return 0.0, 1.0  # sample


class FlowSchedule(NoiseSchedule):
    """Rectified flow's straight path: alpha_t = 1 - t, sigma_t = t, continuous t in [0, 1]; t = -1 is the clean
    end. Steps run on the trailing grid t_i = (S - i) / S, so the first step starts at pure noise (t = 1)."""

    time_dtype = "float32"

    def __init__(self, num_train_timesteps: int = 1000, prediction: str = "velocity"):
        self.T = num_train_timesteps  # the most steps a request may take; t itself is continuous
        self.prediction = _checked(prediction)
        self.spacing, self.steps_offset, self.clip_range = "trailing", 0, 1.0

    def pairs(self, steps: int) -> list[tuple]:
        if not 1 <= steps <= self.T:
            raise ValueError(f"steps must be in 1..{self.T}, got {steps}")
        ts = [(steps - i) / steps for i in range(steps)]
        return list(zip(ts, ts[1:] + [-1.0]))

    def alpha(self, t) -> float:
        return 1.0 if t < 0 else 1.0 - t

    def sigma(self, t) -> float:
        return 0.0 if t < 0 else float(t)
