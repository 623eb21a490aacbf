"""What a sampler is: per-request state and a linear update, with every coefficient per row.

The server runs one batched iteration for rows of many requests (serve/denoising.py): the denoiser, classifier-free
guidance, and the data prediction x0 = c_x x + c_out out (clipped to [-1, 1] when the sampler says so) are
computed in the graph. Everything a sampler does after that is linear in the row's image-sized tensors: its
state (the sample x first, then whatever it keeps, e.g. earlier x0 predictions), this step's x0, and one noise
draw. So a sampler is a `plan`: for each step, a matrix A [len(state), len(state) + 2] with

    new_state[j] = sum_k A[j, k] * terms[k],    terms = (*state, x0, noise)

computed on the host, once per request, from the schedule and the request's steps and eta. Requests with
different samplers, step counts and eta then share one denoiser run, and the state never leaves the device.
Derivations use `Lin`, a linear form over the terms, so the code reads like the paper's update.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from serve.samplers.schedule import NoiseSchedule

Pairs = list[tuple[int, int]]  # (t, t_prev) per step; t_prev = -1 on the last step


class Sampler:
    """Subclass per sampler: name, state, and `plan`; one file each, one registry line."""

    name: ClassVar[str]
    state: ClassVar[tuple[str, ...]] = ("x",)  # image-sized tensors kept per row; "x" (the sample) first
    clip_x0: ClassVar[bool] = True  # x0 clipped to the data range [-1, 1] before the update
    summary: ClassVar[str] = ""

    @classmethod
    def uses_noise(cls, eta: float) -> bool:
        """Whether a row draws one noise tensor per step (in step order, from the row's generator)."""
        return False

    @classmethod
    def plan(cls, schedule: NoiseSchedule, pairs: Pairs, eta: float) -> np.ndarray:
        """[steps, len(state), len(state) + 2] float64: each step's update matrix (see the module docstring)."""
        raise NotImplementedError


class Lin:
    """A linear form over a sampler's terms (*state, x0, noise): Lin.term(k, n) is terms[k]."""

    __slots__ = ("c",)

    def __init__(self, c: np.ndarray):
        self.c = c

    @classmethod
    def term(cls, k: int, n: int) -> Lin:
        c = np.zeros(n)
        c[k] = 1.0
        return cls(c)

    @classmethod
    def zero(cls, n: int) -> Lin:
        return cls(np.zeros(n))

    def __add__(self, other: Lin) -> Lin:
        return Lin(self.c + other.c)

    def __sub__(self, other: Lin) -> Lin:
        return Lin(self.c - other.c)

    def __mul__(self, k: float) -> Lin:
        return Lin(self.c * k)

    __rmul__ = __mul__

    def __truediv__(self, k: float) -> Lin:
        return Lin(self.c / k)


def terms(sampler: type[Sampler]) -> tuple[Lin, ...]:
    """(*state, x0, noise) as Lin forms, for writing a sampler's update."""
    n = len(sampler.state) + 2
    return tuple(Lin.term(k, n) for k in range(n))


def matrix(*rows: Lin) -> np.ndarray:
    """One step's update matrix from the new state's forms, in state order."""
    return np.stack([r.c for r in rows])
