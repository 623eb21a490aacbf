"""The dynamic batcher: one per graph, merging concurrent requests into one onnxruntime run.

Requests (dicts of arrays sharing a batch axis) wait in a bounded FIFO queue. A worker thread runs the
graph once on the concatenation of up to `max_batch_size` rows from the head of the queue and hands each
request its slice. The policy never makes a request wait for nothing: an idle graph runs a lone request
at once; batches form from the requests that arrive while a run is in flight; and `max_queue_delay_ms`
only holds a partial batch back while requests arrive faster than a run of one row takes, the fixed cost
that merging saves (see `_hold`). A request with more rows than `max_batch_size` is split across
consecutive runs and answered when all of its rows are done. `max_batch_size=1` or a delay of 0 turns
batching off: every run then holds the rows of a single request.

The request path is kept lean: one lock acquisition per request to queue it and one per run for all the
counters; answers to asyncio callers are settled on their loop by one callback per run, not one wake-up
of the loop per request.

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
import math
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

    def add(self, other: Stats) -> None:
        """Add another process's counters of the same model version (gen serve --workers)."""
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, Histogram):
                mine.counts = [a + b for a, b in zip(mine.counts, theirs.counts)]
                mine.sum_ns += theirs.sum_ns
            elif f.name == "failures":
                for code, count in theirs.items():
                    mine[code] = mine.get(code, 0) + count
            elif f.name == "batch_sizes":
                for size, entry in theirs.items():
                    mine[size] = [a + b for a, b in zip(mine.get(size, [0, 0, 0, 0]), entry)]
            elif f.name == "last_inference_ms":
                self.last_inference_ms = max(mine, theirs)
            elif f.type == "int" and f.name != "version":
                setattr(self, f.name, mine + theirs)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Stats:
        hists = {k: Histogram(**d[k]) for k in ("request_hist", "queue_hist", "compute_hist")}
        return cls(**{**d, **hists, "batch_sizes": {int(k): v for k, v in d["batch_sizes"].items()}})

    def snapshot(self) -> Stats:
        """A copy (take it under the owner's lock)."""
        return dataclasses.replace(self, failures=dict(self.failures),
                                   batch_sizes={k: list(v) for k, v in self.batch_sizes.items()},
                                   request_hist=self.request_hist.copy(), queue_hist=self.queue_hist.copy(),
                                   compute_hist=self.compute_hist.copy())


class _Request:
    __slots__ = ("inputs", "rows", "taken", "done", "pieces", "future", "loop", "deadline", "enqueued_ns", "started",
                 "failed")

    def __init__(self, inputs: dict[str, np.ndarray], rows: int, deadline: float | None,
                 loop: asyncio.AbstractEventLoop | None):
        self.inputs = inputs
        self.rows = rows
        self.taken = 0  # rows handed to runs so far
        self.done = 0  # rows whose run finished
        self.pieces: list[tuple[int, dict[str, np.ndarray]]] = []
        # an asyncio future of `loop` for run(), settled on that loop; a concurrent one for submit()
        self.future = loop.create_future() if loop is not None else concurrent.futures.Future()
        self.loop = loop
        self.deadline = deadline
        self.enqueued_ns = time.perf_counter_ns()
        self.started = False
        self.failed = False  # answered with an error (an asyncio future learns it later, on its loop)


def _copy_error(error: ServeError) -> ServeError:
    return type(error)(error.message)  # one instance per request: futures on other threads add tracebacks


def _settle(answers: list[tuple[asyncio.Future, object, bool]]) -> None:
    """On the futures' loop: one call per batch, not one wake-up of the loop per request."""
    for future, value, failed in answers:
        if not future.done():
            future.set_exception(value) if failed else future.set_result(value)


def _answer(answers: list[tuple[_Request, object, bool]]) -> None:
    """Settle requests' futures from the worker thread: concurrent ones here, asyncio ones on their loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for req, value, failed in answers:
        if req.loop is None:
            try:
                req.future.set_exception(value) if failed else req.future.set_result(value)
            except concurrent.futures.InvalidStateError:
                pass  # cancelled meanwhile
        else:
            by_loop.setdefault(req.loop, []).append((req.future, value, failed))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, items)
        except RuntimeError:
            pass  # the caller's loop is closed: nobody is waiting


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
        # what the hold decision reads (see _hold): moving averages, seconds
        self._arrivals = 0
        self._last_arrival = 0.0
        self._gap_s = math.inf  # between consecutive requests
        self._lone_run_s = 0.0  # of a run of one row: the fixed cost a merged request saves
        self._holding = False  # the worker waits in _hold

    # --- submitting ------------------------------------------------------------------------------

    def _enqueue(self, inputs: dict[str, np.ndarray], deadline: float | None,
                 loop: asyncio.AbstractEventLoop | None) -> _Request:
        rows = {len(v) if np.ndim(v) else -1 for v in inputs.values()}
        if not inputs or len(rows) != 1 or min(rows) < 1:
            raise InvalidArgument(f"inputs of {self.name}: every input needs the same batch size >= 1")
        req = _Request(inputs, rows.pop(), deadline, loop)
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
            now = req.enqueued_ns / 1e9
            gap = now - self._last_arrival
            self._gap_s = gap if self._gap_s == math.inf else 0.8 * self._gap_s + 0.2 * gap
            self._last_arrival = now
            self._arrivals += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"batcher-{self.name}", daemon=True)
                self._thread.start()
            if not self._holding or self._untaken >= self.max_batch_size:
                self._cond.notify()  # a holding worker is woken only by a full batch: each wake-up costs a GIL hand-off
        return req

    def submit(self, inputs: dict[str, np.ndarray], deadline: float | None = None) -> concurrent.futures.Future:
        """Queue a request; the future resolves to the outputs (dict of arrays, the request's rows)."""
        return self._enqueue(inputs, deadline, None).future

    async def run(self, inputs: dict[str, np.ndarray], deadline: float | None = None) -> dict[str, np.ndarray]:
        """Await the outputs; cancelling the awaiting task cancels the request (dropped if not yet run)."""
        return await self._enqueue(inputs, deadline, asyncio.get_running_loop()).future

    def run_sync(self, inputs: dict[str, np.ndarray], deadline: float | None = None) -> dict[str, np.ndarray]:
        """Blocking version of `run`, for code without an event loop."""
        return self.submit(inputs, deadline).result()

    def statistics(self) -> Stats:
        """A consistent copy of the counters."""
        with self._cond:
            return self.stats.snapshot()

    def reset_statistics(self) -> None:
        """Counters and arrival averages back to their start (after the warm-up requests of a load)."""
        with self._cond:
            version, self.stats = self.stats.version, Stats(name=self.name)
            self.stats.version = version
            self._arrivals, self._last_arrival, self._gap_s, self._lone_run_s = 0, 0.0, math.inf, 0.0

    def queue_size(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, drain: bool = True) -> None:
        """Refuse new requests; finish the queued ones (drain) or fail them with Unavailable."""
        failed = []
        with self._cond:
            self._closed = True
            if not drain:
                while self._queue:
                    failed += self._fail(self._queue.popleft(), Unavailable(f"{self.name} was unloaded"))
                self._untaken = 0
            self._cond.notify_all()
        _answer(failed)

    # --- the worker ------------------------------------------------------------------------------

    def _loop(self) -> None:
        started = True  # the thread starts for a request already queued: the graph was idle until then
        while True:
            with self._cond:
                idle, started = started or not self._queue, False
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    self._thread = None
                    return  # closed and drained
                if not idle:
                    self._hold()
                batch, dropped = self._take()
            _answer(dropped)
            if batch:
                self._execute(batch)

    def _hold(self) -> None:
        """Wait for more rows, under the lock, only when that can pay off.

        Never when the graph was idle (a lone request runs at once) nor with batching off. After a run,
        rows that arrived meanwhile form the next batch at once, unless requests arrive faster than a
        run of one row takes (the fixed cost each merged request saves): then wait for company while
        they keep coming, at most until the oldest request has waited max_queue_delay_ms.
        """
        if not self.batching:
            return
        close_at = self._queue[0].enqueued_ns + int(self.max_queue_delay_ms * 1e6)
        self._holding = True
        try:
            while self._untaken < self.max_batch_size and not self._closed and self._gap_s < self._lone_run_s:
                wait_ns = close_at - time.perf_counter_ns()
                if wait_ns <= 0:
                    return
                arrivals = self._arrivals
                self._cond.wait(min(wait_ns / 1e9, 2 * self._gap_s))
                if self._arrivals == arrivals:
                    return  # none came within two gaps: the stream paused
        finally:
            self._holding = False

    def _take(self) -> tuple[list[tuple[_Request, int, int]], list]:
        """Rows from the head of the queue for one run, as (request, start, stop), and the answers of the
        requests dropped on the way (cancelled or past their deadline); under the lock."""
        now = time.monotonic()
        batch, rows, dropped = [], 0, []
        while self._queue and rows < self.max_batch_size:
            req = self._queue[0]
            if req.failed or req.future.done() or (req.deadline is not None and now > req.deadline):
                self._queue.popleft()
                self._untaken -= req.rows - req.taken
                if req.future.cancelled():
                    self.stats.record_done(time.perf_counter_ns() - req.enqueued_ns, Cancelled("cancelled"))
                elif not req.failed and not req.future.done():
                    dropped += self._fail(req, DeadlineExceeded(f"{self.name}: the deadline passed while the "
                                                                "request was queued"))
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
        return batch, dropped

    def _execute(self, batch: list[tuple[_Request, int, int]]) -> None:
        t0 = time.perf_counter_ns()
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
            results = [(req, _joined(req)) for req in finished]
            t3 = time.perf_counter_ns()
        except Exception as e:  # noqa: BLE001 - the batch's requests get the error, the worker goes on
            error = e if isinstance(e, ServeError) else Internal(f"{self.name}: inference failed: {e}")
            with self._cond:
                self._record_queue(batch, t0)
                failed = [answer for req, _, _ in batch for answer in self._fail(req, error)]
            _answer(failed)
            return
        # Counters first, answers second, all under one lock: a caller that reads the statistics after its
        # answer arrived must see the run that produced it.
        answers = []
        with self._cond:
            self._record_queue(batch, t0)
            self.stats.record_run(rows, t1 - t0, t2 - t1, t3 - t2)
            if rows == 1:
                self._lone_run_s = (t3 - t0) / 1e9 if not self._lone_run_s else \
                    0.8 * self._lone_run_s + 0.2 * (t3 - t0) / 1e9
            for req, result in results:
                cancelled = req.future.cancelled()
                self.stats.record_done(t3 - req.enqueued_ns, Cancelled("cancelled") if cancelled else None)
                if not cancelled:
                    answers.append((req, result, False))
        _answer(answers)

    def _record_queue(self, batch: list[tuple[_Request, int, int]], t0: int) -> None:
        for req, _, _ in batch:
            if not req.started:
                req.started = True
                self.stats.record_queue(t0 - req.enqueued_ns)

    def _fail(self, req: _Request, error: ServeError) -> list[tuple[_Request, ServeError, bool]]:
        """Count a failed request (under the lock); its answer, for _answer outside the lock. Its remaining
        rows are skipped when they reach the head of the queue (its future is then done)."""
        if req.failed or req.future.done():
            return []
        req.failed = True
        self.stats.record_done(time.perf_counter_ns() - req.enqueued_ns, error)
        if req.loop is None:
            try:
                req.future.set_exception(_copy_error(error))
            except concurrent.futures.InvalidStateError:
                pass
            return []
        return [(req, _copy_error(error), True)]


def _joined(req: _Request) -> dict[str, np.ndarray]:
    """A finished request's outputs: its one piece, or its pieces from several runs in row order."""
    if len(req.pieces) == 1:
        result = req.pieces[0][1]
    else:
        pieces = [p for _, p in sorted(req.pieces, key=lambda p: p[0])]
        result = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
    req.pieces = []
    return result
