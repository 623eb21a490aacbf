"""DDPM ancestral sampling (Ho et al. 2020) on a strided schedule, as diffusers' DDPMScheduler
(variance_type "fixed_small", clip_sample=True): the posterior q(x_prev | x_t, x0) for the step t -> t_prev,
with beta = 1 - abar_t / abar_prev, the strided step's beta. No noise on the final step (its variance is 0).
"""
from __future__ import annotations

import math

import numpy as np

from serve.samplers.base import Pairs, Sampler, matrix, terms
from serve.samplers.schedule import NoiseSchedule


class DDPM(Sampler):
    name = "ddpm"
    summary = "DDPM ancestral (Ho et al. 2020): stochastic, needs many steps"

    @classmethod
    def uses_noise(cls, eta: float) -> bool:
        return True

    @classmethod
    def plan(cls, schedule: NoiseSchedule, pairs: Pairs, eta: float) -> np.ndarray:
        x, x0, noise = terms(cls)
        out = []
        for t, tp in pairs:
            a_t, s_t, a_p, s_p = schedule.alpha(t), schedule.sigma(t), schedule.alpha(tp), schedule.sigma(tp)
            beta = max(1.0 - (a_t / a_p) ** 2, 0.0)
            var = (s_p / s_t) ** 2 * beta
            mean = (a_p * beta / s_t**2) * x0 + ((a_t / a_p) * s_p**2 / s_t**2) * x
            out.append(matrix(mean + math.sqrt(var) * noise))
        return np.stack(out)
