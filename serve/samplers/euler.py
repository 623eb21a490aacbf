"""Euler on the probability-flow ODE: the flow-matching sampler (Liu et al. 2022; Lipman et al. 2023), as diffusers'
FlowMatchEulerDiscreteScheduler (shift 1, no stochastic sampling) on the same grid of times.

On a flow's straight path x_t = (1 - t) x0 + t eps the model's velocity is v = (x_t - x0) / t and the step is

    x_{t'} = x_t + (t' - t) v = (t' / t) x_t + (1 - t' / t) x0.

Written on any schedule (alpha_t, sigma_t), by rescaling it to a straight path (y = x / (alpha + sigma),
tau = sigma / (alpha + sigma)), the same step is x' = (sigma' / sigma) x + (alpha' - sigma' alpha / sigma) x0:
on a DDPM schedule it is DDIM at eta 0. Deterministic; x0 is not clipped (diffusers does not clip a flow's step).
"""
from __future__ import annotations

import numpy as np

from serve.samplers.base import Pairs, Sampler, matrix, terms
from serve.samplers.schedule import NoiseSchedule


class Euler(Sampler):
    name = "euler"
    clip_x0 = False
    summary = "Euler on the flow ODE (rectified flow's own sampler): deterministic, first order"

    @classmethod
    def plan(cls, schedule: NoiseSchedule, pairs: Pairs, eta: float) -> np.ndarray:
        x, x0, _ = terms(cls)
        out = []
        for t, tp in pairs:
            a_t, s_t, a_p, s_p = schedule.alpha(t), schedule.sigma(t), schedule.alpha(tp), schedule.sigma(tp)
            out.append(matrix((s_p / s_t) * x + (a_p - s_p * a_t / s_t) * x0))
        return np.stack(out)
