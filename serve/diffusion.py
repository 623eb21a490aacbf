"""Step-level batching of diffusion sampling: one loop per model, one step-graph run per iteration.

The exported `step` graph does one whole denoising step with every coefficient per sample (see
trainer/models/diffusion.py, `DiffusionStep`): inputs x_t, t, t_prev, label, guidance, eta, noise,
sampler, x0_prev, t_last; outputs x_prev and x0. So rows of different requests, at different steps,
with different samplers, step counts, guidance and eta, can share one run. The scheduler keeps each
sample row's state and, every iteration, gathers up to `max_batch_size` unfinished rows (oldest
request first, then row order), runs the graph once and advances each row by one step. Requests join
and leave between iterations; a cancelled or expired request is dropped before the next run, so it
leaves within one step.

Per row (sample i of a request with seed s):
  * rng = np.random.default_rng(np.random.SeedSequence([s, i])); x_T is its first draw, then one
    noise draw per step, in step order, used by the sampler or not (as trainer's `run_sampler`), so
    a row's result depends on nothing but its own parameters, not on what it was batched with;
  * the (t, t_prev) pairs of the trailing rule below, its position in them, x_t, the previous x0
    estimate and its timestep t_last (the DPM-Solver++(2M) state; t_last = -1: none yet).

Like the batcher, the loop is a thread (every iteration is a blocking run) and talks to callers
through a `deliver` callback, so asyncio handlers and synchronous code use it alike.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from serve.batcher import RunFn, Stats
from serve.errors import Cancelled, DeadlineExceeded, Internal, ResourceExhausted, ServeError, Unavailable


def timestep_pairs(steps: int, num_train_timesteps: int) -> list[tuple[int, int]]:
    """Trailing spacing: t_i = round(T (S - i) / S) - 1 for i = 0..S-1 (round half to even), then -1."""
    T = num_train_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    ts = [round(T * (steps - i) / steps) - 1 for i in range(steps)]
    return list(zip(ts, ts[1:] + [-1]))


def row_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of sample `index` of a request with `seed`: latents and noise come from it alone."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


@dataclass
class Progress:
    """A request's rows have all finished `step` of `total` steps; `preview` is their x0 estimate."""

    step: int
    total: int
    preview: np.ndarray | None = None  # float32 NCHW in [-1, 1], every `preview_every` steps
    kind: ClassVar[str] = "progress"


@dataclass
class Done:
    images: np.ndarray  # float32 NCHW, clipped to [-1, 1]


class _Row:
    __slots__ = ("request", "index", "rng", "x", "x0", "t_last", "pos")

    def __init__(self, request: GenerationRequest, index: int, shape: tuple[int, ...]):
        self.request = request
        self.index = index
        self.rng = row_rng(request.seed, index)
        self.x = self.rng.standard_normal(shape, dtype=np.float32)  # x_T: the row's first draw
        self.x0 = np.zeros(shape, np.float32)
        self.t_last = -1
        self.pos = 0  # steps done


class GenerationRequest:
    """One generate call inside the scheduler; `cancel()` takes it out before the next step."""

    def __init__(self, seq: int, seed: int, labels: np.ndarray, guidance: float, eta: float, sampler: int,
                 steps: int, num_train_timesteps: int, preview_every: int, deadline: float | None,
                 deliver: Callable[[object], None]):
        self.seq = seq
        self.seed = seed
        self.labels = np.asarray(labels, np.int64)
        self.guidance = float(guidance)
        self.eta = float(eta)
        self.sampler = int(sampler)
        self.steps = steps
        self.pairs = timestep_pairs(steps, num_train_timesteps)
        self.preview_every = preview_every
        self.deadline = deadline
        self.deliver = deliver
        self.rows: list[_Row] = []
        self.reported = 0  # last step sent as Progress
        self.cancelled = False
        self.finished = False
        self.created_ns = time.perf_counter_ns()
        self.started = False

    @property
    def n(self) -> int:
        return len(self.labels)

    def cancel(self) -> None:
        self.cancelled = True  # read by the loop between runs


class DiffusionScheduler:
    """The step-level batching loop of one diffusion model version; see the module docstring."""

    def __init__(self, run: RunFn, *, image_shape: tuple[int, int, int], num_train_timesteps: int,
                 name: str = "diffusion", max_batch_size: int = 64, max_queue_size: int = 1024):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self._run = run
        self.name = name
        self.image_shape = tuple(image_shape)
        self.num_train_timesteps = num_train_timesteps
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.stats = Stats(name=name)
        self._requests: list[GenerationRequest] = []  # active, in arrival order
        self._seq = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def executions(self) -> int:
        """Step-graph runs so far."""
        return self.stats.execution_count

    def active(self) -> int:
        """Requests in the loop (not finished, failed or dropped yet)."""
        with self._cond:
            return len(self._requests)

    def statistics(self) -> Stats:
        with self._cond:
            return self.stats.snapshot()

    def submit(self, *, seed: int, labels: np.ndarray, guidance: float, eta: float, sampler: int, steps: int,
               deliver: Callable[[object], None], preview_every: int = 0,
               deadline: float | None = None) -> GenerationRequest:
        """Add a request (already validated); its events go to `deliver`: Progress..., then Done or an error."""
        with self._cond:
            if self._closed:
                raise Unavailable(f"{self.name} is unloaded; retry to reach the current version")
            if len(self._requests) >= self.max_queue_size:
                error = ResourceExhausted(f"{self.name}: {self.max_queue_size} generate requests are running "
                                          "already; retry later")
                self.stats.record_done(0, error)
                raise error
            req = GenerationRequest(self._seq, seed, labels, guidance, eta, sampler, steps,
                                    self.num_train_timesteps, preview_every, deadline, deliver)
            self._seq += 1
            req.rows = [_Row(req, i, self.image_shape) for i in range(req.n)]
            self._requests.append(req)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"diffusion-{self.name}", daemon=True)
                self._thread.start()
            self._cond.notify()
        return req

    def close(self, drain: bool = True) -> None:
        """Refuse new requests; let the running ones finish (drain) or fail them with Unavailable."""
        with self._cond:
            self._closed = True
            if not drain:
                for req in self._requests:
                    self._end(req, Unavailable(f"{self.name} was unloaded"))
                self._requests = []
            self._cond.notify_all()

    # --- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._requests and not self._closed:
                    self._cond.wait()
                if not self._requests:
                    self._thread = None
                    return  # closed and drained
                self._prune()
                rows = self._pick()
            if rows:
                self._step(rows)

    def _prune(self) -> None:
        """Drop cancelled and expired requests (under the lock)."""
        now = time.monotonic()
        keep = []
        for req in self._requests:
            if req.cancelled:
                self._end(req, Cancelled("cancelled"))
            elif req.deadline is not None and now > req.deadline:
                self._end(req, DeadlineExceeded(f"{self.name}: the deadline passed after step {req.reported} "
                                                f"of {req.steps}"))
            else:
                keep.append(req)
        self._requests = keep

    def _pick(self) -> list[_Row]:
        """Up to max_batch_size unfinished rows, oldest request first (under the lock)."""
        rows: list[_Row] = []
        for req in self._requests:
            for row in req.rows:
                if row.pos < req.steps:
                    rows.append(row)
                    if len(rows) == self.max_batch_size:
                        return rows
        return rows

    def _step(self, rows: list[_Row]) -> None:
        t0 = time.perf_counter_ns()
        requests = list({id(r.request): r.request for r in rows}.values())
        with self._cond:
            for req in requests:
                if not req.started:
                    req.started = True
                    self.stats.queue_count += 1
                    self.stats.queue_ns += t0 - req.created_ns
        try:
            pairs = [r.request.pairs[r.pos] for r in rows]
            feeds = {
                "x_t": np.stack([r.x for r in rows]),
                "t": np.array([p[0] for p in pairs], np.int64),
                "t_prev": np.array([p[1] for p in pairs], np.int64),
                "label": np.array([r.request.labels[r.index] for r in rows], np.int64),
                "guidance": np.array([r.request.guidance for r in rows], np.float32),
                "eta": np.array([r.request.eta for r in rows], np.float32),
                "noise": np.stack([r.rng.standard_normal(self.image_shape, dtype=np.float32) for r in rows]),
                "sampler": np.array([r.request.sampler for r in rows], np.int64),
                "x0_prev": np.stack([r.x0 for r in rows]),
                "t_last": np.array([r.t_last for r in rows], np.int64),
            }
            t1 = time.perf_counter_ns()
            out = self._run(feeds)
            t2 = time.perf_counter_ns()
            x_prev, x0 = out["x_prev"], out["x0"]
            if len(x_prev) != len(rows) or len(x0) != len(rows):
                raise Internal(f"{self.name}: the step graph returned {len(x_prev)} rows for {len(rows)}")
        except Exception as e:  # noqa: BLE001 - fails the requests of this run only
            error = e if isinstance(e, ServeError) else Internal(f"{self.name}: step failed: {e}")
            with self._cond:
                for req in requests:
                    self._end(req, error)
                self._requests = [r for r in self._requests if not r.finished]
            return
        for k, (row, (t, _)) in enumerate(zip(rows, pairs)):
            row.x, row.x0, row.t_last = x_prev[k].copy(), x0[k].copy(), t
            row.pos += 1
        t3 = time.perf_counter_ns()
        with self._cond:  # counted before anyone hears of it: statistics read after an answer include its run
            self.stats.record_run(len(rows), t1 - t0, t2 - t1, t3 - t2)
        for req in requests:
            self._report(req)
        with self._cond:
            self._requests = [r for r in self._requests if not r.finished]

    def _report(self, req: GenerationRequest) -> None:
        """Progress when every row of the request finished one more step; Done after the last."""
        if req.cancelled:
            return  # dropped by the next _prune
        step = min(r.pos for r in req.rows)
        if step <= req.reported:
            return
        req.reported = step
        preview = None
        if req.preview_every and step % req.preview_every == 0:
            preview = np.stack([r.x0 for r in req.rows])
        self._send(req, Progress(step, req.steps, preview))
        if step == req.steps:
            images = np.clip(np.stack([r.x for r in req.rows]), -1.0, 1.0)
            self._send(req, Done(images))
            with self._cond:
                self._end(req, None)

    def _send(self, req: GenerationRequest, event: object) -> None:
        try:
            req.deliver(event)
        except Exception:  # noqa: BLE001 - the caller is gone (e.g. its event loop closed): drop the request
            req.cancelled = True

    def _end(self, req: GenerationRequest, error: ServeError | None) -> None:
        """Mark a request finished and account for it (under the lock); errors are delivered."""
        if req.finished:
            return
        req.finished = True
        if error is not None and not isinstance(error, Cancelled):
            self._send(req, type(error)(error.message))
        self.stats.record_done(time.perf_counter_ns() - req.created_ns, error)
