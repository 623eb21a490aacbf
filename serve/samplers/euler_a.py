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
            a_t, s_t, a_p, s_p = schedule.alpha(t), schedule.sigma(t), schedule.alpha(tp), schedule.sigma(tp)
            # the update above with r = sigma_to / sigma (sigma_down = sigma_to r, sigma_up = sigma_to sqrt(1 - r^2)),
            # multiplied out so that a path starting at pure noise (alpha_t = 0, sigma = inf: a flow) stays finite
            r = s_p * a_t / (a_p * s_t)
            keep = math.sqrt(max(1.0 - r * r, 0.0))
            out.append(matrix((s_p * r / s_t) * x + (a_p * (1.0 - r * r)) * x0 + (s_p * keep) * noise))
        return np.stack(out)
