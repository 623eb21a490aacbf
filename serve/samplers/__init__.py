"""Samplers, one file each; the imports below are the registry: adding a sampler is one file and one line here.

A sampler turns the model's x0 prediction into the next sample with per-row coefficients (serve/samplers/base.py);
the server assembles what runs each iteration from the exported denoiser and these plans, so every diffusion
model in the repository gets every sampler without re-export.
"""
from __future__ import annotations

import numpy as np

from serve.samplers.ab2 import AdamsBashforth2  # noqa: F401
from serve.samplers.base import Pairs, Sampler
from serve.samplers.consistency import Consistency  # noqa: F401 - the registry: one import per sampler
from serve.samplers.ddim import DDIM  # noqa: F401
from serve.samplers.ddpm import DDPM  # noqa: F401
from serve.samplers.dpm_solver import DPMSolver  # noqa: F401
from serve.samplers.euler import Euler  # noqa: F401
from serve.samplers.euler_a import EulerAncestral  # noqa: F401
from serve.samplers.schedule import NoiseSchedule
from serve.samplers.unipc import UniPC  # noqa: F401

SAMPLERS: dict[str, type[Sampler]] = {s.name: s for s in Sampler.__subclasses__()}
# What Generate uses when a request names no sampler or step count, chosen by `gen eval --sweep` (README,
# "Samplers: quality per step"): at 5 steps every sampler scored measurably worse than the best; UniPC at 10 steps
# was the best measured, at a fifth of the 50 DDIM steps that were the default before.
DEFAULT_SAMPLER = "unipc"
DEFAULT_STEPS = 10

__all__ = ["SAMPLERS", "DEFAULT_SAMPLER", "DEFAULT_STEPS", "Sampler", "NoiseSchedule", "state_size", "padded_plan"]


def state_size() -> int:
    """Image-sized state tensors per row in the server's pool: the most any registered sampler keeps."""
    return max(len(s.state) for s in SAMPLERS.values())


def padded_plan(sampler: type[Sampler], schedule: NoiseSchedule, pairs: Pairs, eta: float, size: int) -> np.ndarray:
    """The sampler's plan in the pool's layout: [steps, size, size + 2] float32, terms (*state_0..size-1, x0, noise)."""
    plan = sampler.plan(schedule, pairs, eta)
    k = len(sampler.state)
    out = np.zeros((len(plan), size, size + 2), np.float64)
    out[:, :k, :k] = plan[:, :, :k]
    out[:, :k, size:] = plan[:, :, k:]
    return out.astype(np.float32)
