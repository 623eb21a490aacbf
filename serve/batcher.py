"""The dynamic batcher: one per graph, merging concurrent requests into one onnxruntime run.

Requests (dicts of arrays sharing a batch axis) wait in a bounded FIFO queue. A worker thread takes
rows from the head of the queue until the batch holds `max_batch_size` rows or the oldest request has
waited `max_queue_delay_ms`, runs the graph once on the concatenation, and hands each request its
slice. A request with more rows than `max_batch_size` is split across consecutive runs and answered
when all of its rows are done. `max_batch_size=1` or a delay of 0 turns batching off: every run then
holds the rows of a single request.

Why a thread rather than an asyncio task: the run itself blocks (onnxruntime releases the GIL), so it
must leave the event loop anyway, and a thread-owned queue serves every caller alike: grpc.aio
handlers, other event loops, and plain synchronous code (`run_sync`). Callers on an event loop await
`run()`; cancelling the awaiting task cancels the request, and a cancelled request, or one whose
deadline (an absolute `time.monotonic()` value) has passed, is dropped when the next batch is formed,
never run. An exception in a run fails only the requests of that batch.
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from serve.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    ServeError,
    Unavailable,
)

RunFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
# upper bounds (seconds) of the latency histograms that /metrics exports
BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    """Durations counted per bucket (not cumulative; the last bucket is +Inf) and their sum."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS_S) + 1))
    sum_ns: int = 0

    def observe(self, ns: int) -> None:
        self.counts[bisect.bisect_left(BUCKETS_S, ns / 1e9)] += 1  # bucket i holds v <= BUCKETS_S[i]
        self.sum_ns += ns

    def copy(self) -> Histogram:
        return Histogram(list(self.counts), self.sum_ns)


@dataclass
class Stats:
    """Plain counters for Triton's ModelStatistics and Prometheus; times in nanoseconds.

    Per request: success/fail (with the failure reason, a status code name), time queued (until its
    first run started). Per run: execution_count, inference_count (rows run), compute split into
    input (concatenate), infer (the graph) and output (split), and the same per batch size.
    `name` and `version` say whose counters these are ("<model>.<graph>" for a graph's batcher).
    """

    name: str = ""
    version: int = 0
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # status code name -> count
    queue_count: int = 0
    queue_ns: int = 0
    execution_count: int = 0
    inference_count: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0
    batch_sizes: dict[int, list[int]] = field(default_factory=dict)  # size -> [count, input, infer, output ns]
    last_inference_ms: int = 0  # unix time of the last run, as Triton reports it
    request_hist: Histogram = field(default_factory=Histogram)  # per request, queued to answered
    queue_hist: Histogram = field(default_factory=Histogram)  # per request, until its first run
    compute_hist: Histogram = field(default_factory=Histogram)  # per run

    def record_queue(self, ns: int) -> None:
        self.queue_count += 1
        self.queue_ns += ns
        self.queue_hist.observe(ns)

    def record_run(self, rows: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.execution_count += 1
        self.inference_count += rows
        self.compute_input_ns += input_ns
        self.compute_infer_ns += infer_ns
        self.compute_output_ns += output_ns
        entry = self.batch_sizes.setdefault(rows, [0, 0, 0, 0])
        entry[0] += 1
        entry[1] += input_ns
        entry[2] += infer_ns
        entry[3] += output_ns
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.compute_hist.observe(input_ns + infer_ns + output_ns)

    def record_done(self, duration_ns: int, error: BaseException | None = None) -> None:
        self.request_hist.observe(duration_ns)
        if error is None:
            self.success_count += 1
            self.success_ns += duration_ns
        else:
            self.fail_count += 1
            self.fail_ns += duration_ns
            code = getattr(error, "code", "INTERNAL")
            self.failures[code] = self.failures.get(code, 0) + 1

    @property
    def compute_ns(self) -> int:
        return self.compute_input_ns + self.compute_infer_ns + self.compute_output_ns

    @property
    def batches(self) -> dict[int, tuple[int, int]]:
        """Batch size -> (runs, compute ns), sorted by size."""
        return {size: (v[0], v[1] + v[2] + v[3]) for size, v in sorted(self.batch_sizes.items())}

    def snapshot(self) -> Stats:
        """A copy (take it under the owner's lock)."""
        return dataclasses.replace(self, failures=dict(self.failures),
                                   batch_sizes={k: list(v) for k, v in self.batch_sizes.items()},
                                   request_hist=self.request_hist.copy(), queue_hist=self.queue_hist.copy(),
                                   compute_hist=self.compute_hist.copy())


class _Request:
    __slots__ = ("inputs", "rows", "taken", "done", "pieces", "future", "deadline", "enqueued_ns", "started")

    def __init__(self, inputs: dict[str, np.ndarray], rows: int, deadline: float | None):
        self.inputs = inputs
        self.rows = rows
        self.taken = 0  # rows handed to runs so far
        self.done = 0  # rows whose run finished
        self.pieces: list[tuple[int, dict[str, np.ndarray]]] = []
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.deadline = deadline
        self.enqueued_ns = time.perf_counter_ns()
        self.started = False


def _copy_error(error: ServeError) -> ServeError:
    return type(error)(error.message)  # one instance per request: futures on other threads add tracebacks


class DynamicBatcher:
    """Batches requests for one graph; see the module docstring."""

    def __init__(self, run: RunFn, *, name: str = "graph", max_batch_size: int = 64,
                 max_queue_delay_ms: float = 2.0, max_queue_size: int = 1024):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {max_queue_delay_ms}")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        self._run = run
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue_delay_ms = max_queue_delay_ms
        self.max_queue_size = max_queue_size
        self.batching = max_batch_size > 1 and max_queue_delay_ms > 0
        self.stats = Stats(name=name)
        self._queue: collections.deque[_Request] = collections.deque()
        self._untaken = 0  # rows in the queue not yet handed to a run
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    # --- submitting ------------------------------------------------------------------------------

    def submit(self, inputs: dict[str, np.ndarray], deadline: float | None = None) -> concurrent.futures.Future:
        """Queue a request; the future resolves to the outputs (dict of arrays, the request's rows)."""
        rows = {len(v) if np.ndim(v) else -1 for v in inputs.values()}
        if not inputs or len(rows) != 1 or min(rows) < 1:
            raise InvalidArgument(f"inputs of {self.name}: every input needs the same batch size >= 1")
        req = _Request(inputs, rows.pop(), deadline)
        with self._cond:
            if self._closed:
                raise Unavailable(f"{self.name} is unloaded; retry to reach the current version")
            if len(self._queue) >= self.max_queue_size:
                error = ResourceExhausted(f"{self.name}: the queue is full ({self.max_queue_size} requests "
                                          "waiting); retry later")
                self.stats.record_done(0, error)
                raise error
            self._queue.append(req)
            self._untaken += req.rows
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"batcher-{self.name}", daemon=True)
                self._thread.start()
            self._cond.notify()
        return req.future

    async def run(self, inputs: dict[str, np.ndarray], deadline: float | None = None) -> dict[str, np.ndarray]:
        """Await the outputs; cancelling the awaiting task takes the request out of the queue."""
        future = self.submit(inputs, deadline)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise

    def run_sync(self, inputs: dict[str, np.ndarray], deadline: float | None = None) -> dict[str, np.ndarray]:
        """Blocking version of `run`, for code without an event loop."""
        return self.submit(inputs, deadline).result()

    def statistics(self) -> Stats:
        """A consistent copy of the counters."""
        with self._cond:
            return self.stats.snapshot()

    def queue_size(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, drain: bool = True) -> None:
        """Refuse new requests; finish the queued ones (drain) or fail them with Unavailable."""
        with self._cond:
            self._closed = True
            if not drain:
                while self._queue:
                    self._fail(self._queue.popleft(), Unavailable(f"{self.name} was unloaded"))
                self._untaken = 0
            self._cond.notify_all()

    # --- the worker ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    self._thread = None
                    return  # closed and drained
                if self.batching:
                    close_at = self._queue[0].enqueued_ns + int(self.max_queue_delay_ms * 1e6)
                    while self._untaken < self.max_batch_size and not self._closed:
                        wait_ns = close_at - time.perf_counter_ns()
                        if wait_ns <= 0:
                            break
                        self._cond.wait(wait_ns / 1e9)
                batch = self._take()
            if batch:
                self._execute(batch)

    def _take(self) -> list[tuple[_Request, int, int]]:
        """Rows from the head of the queue for one run, as (request, start, stop); under the lock."""
        now = time.monotonic()
        batch, rows = [], 0
        while self._queue and rows < self.max_batch_size:
            req = self._queue[0]
            if req.future.done() or (req.deadline is not None and now > req.deadline):
                self._queue.popleft()
                self._untaken -= req.rows - req.taken
                if req.future.cancelled():
                    self.stats.record_done(time.perf_counter_ns() - req.enqueued_ns, Cancelled("cancelled"))
                elif not req.future.done():
                    self._fail(req, DeadlineExceeded(f"{self.name}: the deadline passed while the request "
                                                     "was queued"))
                continue
            if batch and not self.batching:
                break  # batching off: one request per run
            k = min(req.rows - req.taken, self.max_batch_size - rows)
            batch.append((req, req.taken, req.taken + k))
            req.taken += k
            rows += k
            self._untaken -= k
            if req.taken == req.rows:
                self._queue.popleft()
        return batch

    def _execute(self, batch: list[tuple[_Request, int, int]]) -> None:
        t0 = time.perf_counter_ns()
        with self._cond:
            for req, _, _ in batch:
                if not req.started:
                    req.started = True
                    self.stats.record_queue(t0 - req.enqueued_ns)
        rows = sum(stop - start for _, start, stop in batch)
        try:
            req0, start0, stop0 = batch[0]
            if len(batch) == 1 and start0 == 0 and stop0 == req0.rows:
                feeds = req0.inputs
            else:
                feeds = {name: np.concatenate([req.inputs[name][a:b] for req, a, b in batch])
                         for name in req0.inputs}
            t1 = time.perf_counter_ns()
            outputs = self._run(feeds)
            t2 = time.perf_counter_ns()
            bad = [k for k, v in outputs.items() if np.ndim(v) == 0 or len(v) != rows]
            if bad:
                raise Internal(f"{self.name}: output {bad[0]} does not have the batch's {rows} rows")
            offset, finished = 0, []
            for req, a, b in batch:
                req.pieces.append((a, {k: v[offset:offset + b - a] for k, v in outputs.items()}))
                offset += b - a
                req.done += b - a
                if req.done == req.rows:
                    finished.append(req)
            t3 = time.perf_counter_ns()
        except Exception as e:  # noqa: BLE001 - the batch's requests get the error, the worker goes on
            error = e if isinstance(e, ServeError) else Internal(f"{self.name}: inference failed: {e}")
            with self._cond:
                for req, _, _ in batch:
                    self._fail(req, error)
            return
        # Counters first, answers second: a caller that reads the statistics after its answer arrived
        # must see the run that produced it.
        with self._cond:
            self.stats.record_run(rows, t1 - t0, t2 - t1, t3 - t2)
        for req in finished:
            self._finish(req)

    def _finish(self, req: _Request) -> None:
        if len(req.pieces) == 1:
            result = req.pieces[0][1]
        else:
            pieces = [p for _, p in sorted(req.pieces, key=lambda p: p[0])]
            result = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
        req.pieces = []
        with self._cond:
            if req.future.cancelled():  # cancelled while it ran
                self.stats.record_done(time.perf_counter_ns() - req.enqueued_ns, Cancelled("cancelled"))
                return
            self.stats.record_done(time.perf_counter_ns() - req.enqueued_ns)
        try:
            req.future.set_result(result)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled between the check and here; already counted as a success

    def _fail(self, req: _Request, error: ServeError) -> None:
        """Fail a request (under the lock); its remaining rows are skipped when they reach the head."""
        if req.future.done():
            return
        try:
            req.future.set_exception(_copy_error(error))
        except concurrent.futures.InvalidStateError:
            return
        self.stats.record_done(time.perf_counter_ns() - req.enqueued_ns, error)
