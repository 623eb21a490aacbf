"""The noise schedule a denoising model was trained with, as the samplers see it (numpy, float64).

Every schedule is a path x_t = alpha_t x0 + sigma_t eps and a grid of times the samplers step along; t = -1 is
"t = 0 reached" (alpha 1, sigma 0), the target of every final step. Two kinds, named by the manifest's
`diffusion.schedule`:
  * variance-preserving and discrete (DDPM): "linear", "cosine". alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)
    for integer timesteps t = 0..T-1, and the model's time input is that integer;
  * the straight path of rectified flow: "rectified_flow". alpha_t = 1 - t, sigma_t = t for continuous t in [0, 1],
    and the model's time input is t itself (float32).
The model's output becomes x0 = c_x x_t + c_out out by the manifest's `diffusion.prediction` (`to_x0`).
The trainer reads `alpha_bar` from here too: one copy of the rule.
"""
from __future__ import annotations

import math

import numpy as np

DISCRETE_SCHEDULES = ("linear", "cosine")
FLOW_SCHEDULES = ("rectified_flow",)
SCHEDULES = DISCRETE_SCHEDULES + FLOW_SCHEDULES
# what the network predicts: eps (the noise), v (Salimans & Ho: alpha eps - sigma x0), velocity (a flow's
# d x_t / dt = eps - x0), sample (x0 itself)
PREDICTIONS = ("eps", "v", "velocity", "sample")
# lambda = log(alpha / sigma) is -inf where a path starts at pure noise (a flow's t = 1); the solvers take
# differences of lambda, so it is floored at a level whose error no float32 image can show
ALPHA_FLOOR = 1e-8


def alpha_bar(schedule: str, num_train_timesteps: int) -> np.ndarray:
    """abar_t = prod_{s <= t} (1 - beta_s) for t = 0..T-1, float64."""
    T = num_train_timesteps
    if schedule == "linear":  # DDPM: betas 1e-4..0.02
        betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
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


def timestep_pairs(steps: int, num_train_timesteps: int) -> list[tuple[int, int]]:
    """Trailing spacing: t_i = round(T (S - i) / S) - 1 for i = 0..S-1 (round half to even), then -1."""
    T = num_train_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    ts = [round(T * (steps - i) / steps) - 1 for i in range(steps)]
    return list(zip(ts, ts[1:] + [-1]))


class NoiseSchedule:
    """A discrete variance-preserving schedule: alpha, sigma and lambda = log(alpha / sigma) per integer timestep;
    t = -1 is the clean end (alpha 1, sigma 0). `of` builds any kind by its manifest name."""

    time_dtype = "int64"  # the denoiser's `t` input

    def __init__(self, abar: np.ndarray, prediction: str = "eps"):
        self.abar = np.asarray(abar, np.float64)
        self.T = len(self.abar)
        self.prediction = _checked(prediction)

    @classmethod
    def of(cls, schedule: str, num_train_timesteps: int, prediction: str = "eps") -> NoiseSchedule:
        if schedule in FLOW_SCHEDULES:
            return FlowSchedule(num_train_timesteps, prediction)
        return cls(alpha_bar(schedule, num_train_timesteps), prediction)

    def pairs(self, steps: int) -> list[tuple]:
        """(t, t_prev) per sampling step, the last going to -1: trailing spacing, t_i = round(T (S - i) / S) - 1
        for i = 0..S-1 (round half to even), as diffusers' timestep_spacing="trailing"."""
        return timestep_pairs(steps, self.T)

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

    def pairs(self, steps: int) -> list[tuple]:
        if not 1 <= steps <= self.T:
            raise ValueError(f"steps must be in 1..{self.T}, got {steps}")
        ts = [(steps - i) / steps for i in range(steps)]
        return list(zip(ts, ts[1:] + [-1.0]))

    def alpha(self, t) -> float:
        return 1.0 if t < 0 else 1.0 - t

    def sigma(self, t) -> float:
        return 0.0 if t < 0 else float(t)
