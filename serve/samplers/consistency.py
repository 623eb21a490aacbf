"""Multistep consistency sampling (Song et al. 2023, "Consistency Models", Algorithm 1).

A consistency model maps any point of a probability-flow trajectory to the trajectory's end, so every step is
"predict the clean image, then noise it again to the next, lower noise level with fresh noise":

    x0 = f(x_t, t);    x_{t'} = alpha_{t'} x0 + sigma_{t'} z,  z ~ N(0, I);    the last step returns x0.

A distilled student (`gen distill`, which learns exactly that map) can be served with it (--set
student_sampler=consistency); on an ordinary diffusion model it works too (each step starts from the model's
denoised guess), but those do better with the solvers. eta is not used.
"""
from __future__ import annotations

import numpy as np

from serve.samplers.base import Pairs, Sampler, matrix, terms
from serve.samplers.schedule import NoiseSchedule


class Consistency(Sampler):
    name = "consistency"
    summary = "multistep consistency sampling (Song et al. 2023): the distilled students' sampler"

    @classmethod
    def uses_noise(cls, eta: float) -> bool:
        return True

    @classmethod
    def plan(cls, schedule: NoiseSchedule, pairs: Pairs, eta: float) -> np.ndarray:
        x, x0, noise = terms(cls)
        return np.stack([matrix(schedule.alpha(tp) * x0 + schedule.sigma(tp) * noise) for _, tp in pairs])
