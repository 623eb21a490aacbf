"""Adams-Bashforth 2, the two-step linear multistep method, on the probability-flow ODE in a flow's coordinates:
second order at one model run per step, by reusing the previous step's velocity (Hairer, Norsett & Wanner,
"Solving ODEs I", III.1; the order-2 case of k-diffusion's and diffusers' LMS, there in sigma).

Any schedule is rescaled to a straight path, y = x / (alpha + sigma) and tau = sigma / (alpha + sigma), where the
velocity is d = (y - x0) / tau = (x - (alpha + sigma) x0) / sigma (a flow's v = eps - x0). With h = tau' - tau and
the previous step's h_p and d_p:

    y' = y + h ((1 + h / (2 h_p)) d - (h / (2 h_p)) d_p),        x' = (alpha' + sigma') y'

and the first step is Euler (serve/samplers/euler.py). Deterministic; x0 is not clipped. State: the previous
step's velocity.
"""
from __future__ import annotations

import numpy as np

from serve.samplers.base import Pairs, Sampler, matrix, terms
from serve.samplers.schedule import NoiseSchedule


class AdamsBashforth2(Sampler):
    name = "ab2"
    state = ("x", "d_prev")
    clip_x0 = False
    summary = "Adams-Bashforth 2 on the flow ODE: deterministic, second order, one model run per step"

    @classmethod
    def plan(cls, schedule: NoiseSchedule, pairs: Pairs, eta: float) -> np.ndarray:
        x, d_prev, x0, _ = terms(cls)

        def scale(t) -> float:
            return schedule.alpha(t) + schedule.sigma(t)

        def tau(t) -> float:
            return schedule.sigma(t) / scale(t)

        out, h_prev = [], None
        for t, tp in pairs:
            d = (x - scale(t) * x0) / schedule.sigma(t)
            h = tau(tp) - tau(t)
            slope = d if h_prev is None else (1 + h / (2 * h_prev)) * d - (h / (2 * h_prev)) * d_prev
            out.append(matrix(scale(tp) * (x / scale(t) + h * slope), d))
            h_prev = h
        return np.stack(out)
