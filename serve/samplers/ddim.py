"""DDIM (Song et al. 2021, eq. 12), as diffusers' DDIMScheduler with clip_sample=True and
use_clipped_model_output=True: eps is re-derived from the clipped x0, so x_t, x0 and eps stay consistent.
eta = 0 is deterministic; eta = 1 has DDPM's variance.
"""
from __future__ import annotations

import math

import numpy as np

from serve.samplers.base import Pairs, Sampler, matrix, terms
from serve.samplers.schedule import NoiseSchedule


class DDIM(Sampler):
    name = "ddim"
    summary = "DDIM (Song et al. 2021): deterministic at eta 0"

    @classmethod
    def uses_noise(cls, eta: float) -> bool:
        return eta > 0

    @classmethod
    def plan(cls, schedule: NoiseSchedule, pairs: Pairs, eta: float) -> np.ndarray:
        x, x0, noise = terms(cls)
        out = []
        for t, tp in pairs:
            a_t, s_t, a_p, s_p = schedule.alpha(t), schedule.sigma(t), schedule.alpha(tp), schedule.sigma(tp)
            var = (s_p / s_t) ** 2 * max(1.0 - (a_t / a_p) ** 2, 0.0)
            std = eta * math.sqrt(var)
            eps = (x - a_t * x0) / s_t
            out.append(matrix(a_p * x0 + math.sqrt(max(s_p**2 - std**2, 0.0)) * eps + std * noise))
        return np.stack(out)
