"""Euler ancestral (Karras et al. 2022's Euler step with ancestral noise, k-diffusion's sample_euler_ancestral),
as diffusers' EulerAncestralDiscreteScheduler with timestep_spacing="trailing". It works on the variance-exploding
sample S = x / alpha_t with sigma = sigma_t / alpha_t; written here on the server's x = alpha_t S:

    sigma_up = sqrt(sigma_to^2 (sigma^2 - sigma_to^2) / sigma^2),  sigma_down = sqrt(sigma_to^2 - sigma_up^2)
    S' = S + (S - x0) / sigma * (sigma_down - sigma) + sigma_up * noise,       x' = alpha_to S'

Always ancestral (eta is DDIM's and is ignored here, as diffusers has none); x0 is not clipped (diffusers has
no clip for this scheduler either).
"""
from __future__ import annotations

import math

import numpy as np

from serve.samplers.base import Pairs, Sampler, matrix, terms
from serve.samplers.schedule import NoiseSchedule


class EulerAncestral(Sampler):
    name = "euler_a"
    clip_x0 = False
    summary = "Euler ancestral (Karras et al. 2022): stochastic, popular at 20-30 steps"

    @classmethod
    def uses_noise(cls, eta: float) -> bool:
        return True

    @classmethod
    def plan(cls, schedule: NoiseSchedule, pairs: Pairs, eta: float) -> np.ndarray:
        x, x0, noise = terms(cls)
        out = []
        for t, tp in pairs:
            a_t, a_p = schedule.alpha(t), schedule.alpha(tp)
            sigma, sigma_to = schedule.sigma(t) / a_t, schedule.sigma(tp) / a_p
            sigma_up = math.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2)
            sigma_down = math.sqrt(max(sigma_to**2 - sigma_up**2, 0.0))
            scaled = x / a_t
            out.append(matrix(a_p * (scaled + (scaled - x0) * ((sigma_down - sigma) / sigma) + sigma_up * noise)))
        return np.stack(out)
