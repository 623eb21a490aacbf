"""The noise schedule a diffusion model was trained with, as the samplers see it (numpy, float64).

alpha_t = sqrt(abar_t) and sigma_t = sqrt(1 - abar_t) for t = 0..T-1, and t = -1 for "t = 0 reached" (alpha 1,
sigma 0), the target of every final step. The trainer reads `alpha_bar` from here too: one copy of the rule.
"""
from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("linear", "cosine")


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
        raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    return np.cumprod(1 - betas)


class NoiseSchedule:
    """alpha, sigma and lambda = log(alpha / sigma) per timestep; t = -1 is the clean end (alpha 1, sigma 0)."""

    def __init__(self, abar: np.ndarray, prediction: str = "eps"):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction: {prediction!r} is not 'eps' or 'v'")
        self.abar = np.asarray(abar, np.float64)
        self.T = len(self.abar)
        self.prediction = prediction

    @classmethod
    def of(cls, schedule: str, num_train_timesteps: int, prediction: str = "eps") -> NoiseSchedule:
        return cls(alpha_bar(schedule, num_train_timesteps), prediction)

    def alpha(self, t: int) -> float:
        return 1.0 if t < 0 else math.sqrt(self.abar[t])

    def sigma(self, t: int) -> float:
        return 0.0 if t < 0 else math.sqrt(1.0 - self.abar[t])

    def lam(self, t: int) -> float:
        """log(alpha_t / sigma_t); +inf at t = -1."""
        return math.inf if t < 0 else math.log(self.alpha(t)) - math.log(self.sigma(t))

    def to_x0(self, t: int) -> tuple[float, float]:
        """(c_x, c_out) with x0 = c_x x_t + c_out out: eps gives (x - s eps) / a, v gives a x - s v."""
        a, s = self.alpha(t), self.sigma(t)
        return (1.0 / a, -s / a) if self.prediction == "eps" else (a, -s)
