"""DynamicBatcher on plain Python run functions: merging, splitting, limits, deadlines, cancellation, errors."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serve.batcher import DynamicBatcher
from serve.errors import DeadlineExceeded, Internal, ResourceExhausted, Unavailable


class Recorder:
    """A run function that doubles `x` and records each batch; `gate` (when set) holds runs back."""

    def __init__(self, fail_on: float | None = None):
        self.batches: list[np.ndarray] = []
        self.times: list[float] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.fail_on = fail_on

    def __call__(self, feeds):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        x = feeds["x"]
        self.batches.append(x.copy())
        self.times.append(time.monotonic())
        if self.fail_on is not None and (x == self.fail_on).any():
            raise RuntimeError("poisoned batch")
        return {"y": x * 2, "sum": x.sum(axis=1)}


def rows(start: int, n: int) -> dict[str, np.ndarray]:
    return {"x": np.arange(start, start + n, dtype=np.float32)[:, None].repeat(3, axis=1)}


def test_concurrent_requests_share_runs():
    rec = Recorder()
    b = DynamicBatcher(rec, name="t", max_batch_size=64, max_queue_delay_ms=50)

    async def main():
        return await asyncio.gather(*(b.run(rows(10 * i, 2)) for i in range(8)))

    results = asyncio.run(main())
    for i, out in enumerate(results):
        np.testing.assert_array_equal(out["y"], rows(10 * i, 2)["x"] * 2)
        np.testing.assert_array_equal(out["sum"], rows(10 * i, 2)["x"].sum(axis=1))
    stats = b.statistics()
    assert stats.execution_count < 8, "concurrent requests must be merged"
    assert stats.success_count == 8 and stats.inference_count == 16 and stats.fail_count == 0
    assert sum(count for count, _ in stats.batches.values()) == stats.execution_count
    assert stats.queue_count == 8 and stats.compute_ns > 0
    b.close()


def test_a_batch_closes_at_max_batch_size_and_big_requests_are_split():
    rec = Recorder()
    b = DynamicBatcher(rec, name="t", max_batch_size=4, max_queue_delay_ms=5000)  # long: a wait would show
    t0 = time.monotonic()
    out = b.run_sync(rows(0, 10))
    assert rec.times[-1] - t0 < 2.5, "no other request is coming: the rest runs at once, not after the delay"
    np.testing.assert_array_equal(out["y"], rows(0, 10)["x"] * 2)
    assert [len(x) for x in rec.batches] == [4, 4, 2]
    b.close()


def test_a_lone_request_on_an_idle_graph_runs_at_once():
    rec = Recorder()
    b = DynamicBatcher(rec, name="t", max_batch_size=64, max_queue_delay_ms=5000)
    for i in range(3):
        t0 = time.monotonic()
        b.run_sync(rows(i, 1))
        assert rec.times[-1] - t0 < 2.5, "the queue delay must not hold a request that has no company coming"
        time.sleep(0.05)
    b.close()


def test_the_delay_holds_a_partial_batch_only_while_requests_outpace_a_run():
    """Runs cost 30 ms whatever their size and a request comes every ~3 ms: holding for company pays off,
    so runs fill up to max_batch_size instead of taking only what arrived during the last run."""
    def slow(feeds):
        time.sleep(0.03)
        return rec(feeds)

    rec = Recorder()
    b = DynamicBatcher(slow, name="t", max_batch_size=16, max_queue_delay_ms=200)
    futures = []
    for i in range(120):
        futures.append(b.submit(rows(i, 1)))
        time.sleep(0.003)
    for i, f in enumerate(futures):
        np.testing.assert_array_equal(f.result(10)["y"], rows(i, 1)["x"] * 2)
    sizes = [len(x) for x in rec.batches]
    assert sizes[0] == 1, "the first request found the graph idle"
    assert sizes.count(16) >= 3, sizes
    b.close()


def test_split_rows_fill_batches_with_other_requests():
    rec = Recorder()
    rec.gate = threading.Event()
    b = DynamicBatcher(rec, name="t", max_batch_size=4, max_queue_delay_ms=20)
    first = b.submit(rows(100, 1))
    assert rec.entered.wait(5)  # the worker is busy with `first`; the rest queue up
    big, small = b.submit(rows(0, 6)), b.submit(rows(50, 2))
    rec.gate.set()
    np.testing.assert_array_equal(big.result(5)["y"], rows(0, 6)["x"] * 2)
    np.testing.assert_array_equal(small.result(5)["y"], rows(50, 2)["x"] * 2)
    first.result(5)
    assert [len(x) for x in rec.batches] == [1, 4, 4], "6 + 2 rows in two full runs"
    b.close()


@pytest.mark.parametrize("kwargs", [{"max_batch_size": 64, "max_queue_delay_ms": 0},
                                    {"max_batch_size": 1, "max_queue_delay_ms": 50}])
def test_batching_off_runs_one_request_at_a_time(kwargs):
    rec = Recorder()
    b = DynamicBatcher(rec, name="t", **kwargs)
    assert not b.batching

    async def main():
        return await asyncio.gather(*(b.run(rows(10 * i, 1)) for i in range(6)))

    for i, out in enumerate(asyncio.run(main())):
        np.testing.assert_array_equal(out["y"], rows(10 * i, 1)["x"] * 2)
    assert len(rec.batches) == 6 and all(len(x) == 1 for x in rec.batches)
    if kwargs["max_batch_size"] == 64:
        out = b.run_sync(rows(0, 5))
        assert len(rec.batches[-1]) == 5, "batching off still runs a whole request at once"
    b.close()


def test_the_queue_is_bounded():
    rec = Recorder()
    rec.gate = threading.Event()
    b = DynamicBatcher(rec, name="t", max_batch_size=1, max_queue_delay_ms=0, max_queue_size=2)
    running = b.submit(rows(0, 1))
    assert rec.entered.wait(5)
    queued = [b.submit(rows(1, 1)), b.submit(rows(2, 1))]
    with pytest.raises(ResourceExhausted, match="queue is full"):
        b.submit(rows(3, 1))
    rec.gate.set()
    for f in [running, *queued]:
        f.result(5)
    assert b.statistics().failures == {"RESOURCE_EXHAUSTED": 1}
    b.run_sync(rows(4, 1))  # room again
    b.close()


def test_expired_requests_are_dropped_before_running():
    rec = Recorder()
    rec.gate = threading.Event()
    b = DynamicBatcher(rec, name="t", max_batch_size=8, max_queue_delay_ms=1)
    running = b.submit(rows(0, 1))
    assert rec.entered.wait(5)
    expired = b.submit(rows(77, 1), deadline=time.monotonic() + 0.02)
    alive = b.submit(rows(5, 1), deadline=time.monotonic() + 30)
    time.sleep(0.05)
    rec.gate.set()
    with pytest.raises(DeadlineExceeded):
        expired.result(5)
    alive.result(5)
    running.result(5)
    assert not any((x == 77).any() for x in rec.batches), "an expired request must never run"
    assert b.statistics().failures == {"DEADLINE_EXCEEDED": 1}
    b.close()


def test_cancelled_requests_are_dropped_before_running():
    rec = Recorder()
    rec.gate = threading.Event()
    b = DynamicBatcher(rec, name="t", max_batch_size=8, max_queue_delay_ms=1)

    async def main():
        running = asyncio.ensure_future(b.run(rows(0, 1)))
        await asyncio.to_thread(rec.entered.wait, 5)
        doomed = asyncio.ensure_future(b.run(rows(66, 2)))
        kept = asyncio.ensure_future(b.run(rows(3, 1)))
        await asyncio.sleep(0.01)
        doomed.cancel()
        await asyncio.sleep(0.01)
        rec.gate.set()
        await asyncio.gather(running, kept)
        with pytest.raises(asyncio.CancelledError):
            await doomed

    asyncio.run(main())
    assert not any((x == 66).any() for x in rec.batches), "a cancelled request must never run"
    assert b.statistics().failures == {"CANCELLED": 1}
    b.close()


def test_a_failing_batch_fails_only_its_requests():
    rec = Recorder(fail_on=13.0)
    rec.gate = threading.Event()
    b = DynamicBatcher(rec, name="t", max_batch_size=2, max_queue_delay_ms=1)
    blocker = b.submit(rows(100, 1))
    assert rec.entered.wait(5)
    poisoned, neighbour = b.submit(rows(13, 1)), b.submit(rows(20, 1))  # one full batch
    later_rows = b.submit(rows(30, 3))  # the next two batches
    rec.gate.set()
    blocker.result(5)
    with pytest.raises(Internal, match="poisoned batch"):
        poisoned.result(5)
    with pytest.raises(Internal):
        neighbour.result(5)
    np.testing.assert_array_equal(later_rows.result(5)["y"], rows(30, 3)["x"] * 2)
    np.testing.assert_array_equal(b.run_sync(rows(40, 2))["y"], rows(40, 2)["x"] * 2)
    stats = b.statistics()
    assert stats.fail_count == 2 and stats.success_count == 3 and stats.failures == {"INTERNAL": 2}
    b.close()


def test_close_drains_then_refuses():
    rec = Recorder()
    b = DynamicBatcher(rec, name="t", max_batch_size=8, max_queue_delay_ms=30)
    pending = b.submit(rows(0, 2))
    b.close(drain=True)
    np.testing.assert_array_equal(pending.result(5)["y"], rows(0, 2)["x"] * 2)
    with pytest.raises(Unavailable):
        b.submit(rows(0, 1))
