"""UniPC (Zhao et al. 2023), B(h) = e^h - 1 ("bh2"), order 2, data prediction: a UniP predictor and a UniC
corrector that reuses each step's model output to correct the previous step's prediction, so second order
costs no extra network evaluation. As diffusers' UniPCMultistepScheduler(solver_order=2, solver_type="bh2",
predict_x0=True, lower_order_final=True, final_sigmas_type="zero", timestep_spacing="trailing",
thresholding=True, sample_max_value=1.0, which clips x0 to [-1, 1]).

Per step i (timestep t_i, target t_{i+1}; m_i the x0 predicted at t_i):
  * corrector (i > 0): x_i <- UniC(x_{i-1}, m_{i-1}, m_{i-2}, m_i) at the previous step's order;
  * predictor: x_{i+1} = UniP(x_i, m_i, m_{i-1}), order 1 on the first step and on the last (lower_order_final),
    2 otherwise.
State: the sample, the previous step's (corrected) sample and the two previous x0 predictions.
"""
from __future__ import annotations

import math

import numpy as np

from serve.samplers.base import Lin, Pairs, Sampler, matrix, terms
from serve.samplers.schedule import NoiseSchedule


def _coefficients(h: float, order: int, rks: list[float]) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(h_phi_1, B_h, R, b) of UniPC's bh2 variant for data prediction (hh = -h)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = math.expm1(hh)
    factorial, R, b = 1, [], []
    r = np.array([*rks, 1.0])
    for i in range(1, order + 1):
        R.append(r ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, np.array(R), np.array(b)


class UniPC(Sampler):
    name = "unipc"
    state = ("x", "x_last", "m1", "m2")
    summary = "UniPC bh2, order 2 (Zhao et al. 2023): predictor-corrector, good at 5-10 steps"

    @classmethod
    def plan(cls, schedule: NoiseSchedule, pairs: Pairs, eta: float) -> np.ndarray:
        x, x_last, m1, m2, x0, _ = terms(cls)
        ts = [t for t, _ in pairs]
        a, s, lam = schedule.alpha, schedule.sigma, schedule.lam
        out, last_order, warm = [], 0, 0
        for i, (t, tp) in enumerate(pairs):
            sample = x
            if i > 0:  # UniC: correct x_i with m_i, from x_{i-1} and the outputs m_{i-1}, m_{i-2}
                s0 = ts[i - 1]
                h = lam(t) - lam(s0)
                rks = [(lam(ts[i - 2]) - lam(s0)) / h] if last_order == 2 else []
                h_phi_1, b_h, R, b = _coefficients(h, last_order, rks)
                rhos = np.array([0.5]) if last_order == 1 else np.linalg.solve(R, b)
                base = (s(t) / s(s0)) * x_last - (a(t) * h_phi_1) * m1
                corr = Lin.zero(len(x.c))
                if rks:
                    corr = rhos[0] * ((m2 - m1) / rks[0])
                sample = base - (a(t) * b_h) * (corr + rhos[-1] * (x0 - m1))
            order = min(2, len(pairs) - i, warm + 1)  # lower_order_final, and warm-up from order 1
            if tp < 0:  # the final step goes to sigma = 0: UniP of order 1 returns the data prediction
                nxt = x0
            else:  # UniP: predict x_{i+1} from the (corrected) x_i and m_i, m_{i-1}
                h = lam(tp) - lam(t)
                rks = [(lam(ts[i - 1]) - lam(t)) / h] if order == 2 else []
                h_phi_1, b_h, _, _ = _coefficients(h, order, rks)
                nxt = (s(tp) / s(t)) * sample - (a(tp) * h_phi_1) * x0
                if rks:
                    nxt = nxt - (a(tp) * b_h * 0.5) * ((m1 - x0) / rks[0])
            out.append(matrix(nxt, sample, x0, m1))
            last_order, warm = order, min(warm + 1, 2)
        return np.stack(out)
