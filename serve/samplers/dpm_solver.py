"""DPM-Solver++(2M) (Lu et al. 2022), data prediction, midpoint form, as diffusers'
DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
final_sigmas_type="zero", thresholding=True, sample_max_value=1.0, which clips x0 to [-1, 1]).
The first step and the final step are first order (the final one is lower_order_final: it returns x0).
State: the previous step's x0.
"""
from __future__ import annotations

import numpy as np

from serve.samplers.base import Pairs, Sampler, matrix, terms
from serve.samplers.schedule import NoiseSchedule


class DPMSolver(Sampler):
    name = "dpm++"
    state = ("x", "x0_prev")
    summary = "DPM-Solver++(2M) (Lu et al. 2022): deterministic, good at 10-20 steps"

    @classmethod
    def plan(cls, schedule: NoiseSchedule, pairs: Pairs, eta: float) -> np.ndarray:
        x, x0_prev, x0, _ = terms(cls)
        out = []
        for i, (t, tp) in enumerate(pairs):
            a_t, s_t, a_p, s_p = schedule.alpha(t), schedule.sigma(t), schedule.alpha(tp), schedule.sigma(tp)
            phi = a_p - s_p * a_t / s_t  # alpha_p (1 - e^-h), finite on the final step (sigma_p = 0)
            first = (s_p / s_t) * x + phi * x0
            if i > 0 and tp >= 0:  # second order: D1 = (x0 - x0_prev) / r0, r0 = h_last / h
                t_last = pairs[i - 1][0]
                r = (schedule.lam(tp) - schedule.lam(t)) / (schedule.lam(t) - schedule.lam(t_last))
                first = first + 0.5 * phi * r * (x0 - x0_prev)
            out.append(matrix(first, x0))
        return np.stack(out)
