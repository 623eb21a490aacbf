"""Step-level batching of diffusion sampling: equal to a plain loop, fewer runs, cancellation, failures."""
from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest

from serve.diffusion import DiffusionScheduler, Done, Progress, timestep_pairs
from serve.errors import DeadlineExceeded, Internal, ResourceExhausted
from serve.runtime import Final, Runtime
from serve.samplers import DEFAULT_SAMPLER, SAMPLERS, NoiseSchedule

SHAPE = (1, 32, 32)
T = 1000


@pytest.fixture(scope="module")
def repo(tiny_repo):
    return tiny_repo / "exported"


# the denoising families' tiny models: DDPM (integer timesteps, eps) and rectified flow (continuous t, velocity)
DENOISING = ["tiny-diffusion", "tiny-flow"]


class Denoiser:
    """A tiny model's exported denoiser and its schedule, read from its manifest as the server reads them."""

    def __init__(self, version_dir):
        import json

        self.session = ort.InferenceSession(str(version_dir / "denoiser.onnx"), providers=["CPUExecutionProvider"])
        d = json.loads((version_dir / "manifest.json").read_text())["diffusion"]
        self.schedule = NoiseSchedule.from_manifest(d)

    def run(self, feeds):
        return self.session.run(None, feeds)


@pytest.fixture(scope="module")
def denoiser(repo):
    return Denoiser(repo / "tiny-diffusion" / "1")


@pytest.fixture(scope="module", params=DENOISING)
def denoising(request, repo):
    """(model name, its Denoiser) for each denoising family."""
    return request.param, Denoiser(repo / request.param / "1")


def reference(session, seed: int, n: int, steps: int, sampler: str = DEFAULT_SAMPLER, guidance: float = 3.0,
              eta: float = 0.0, labels=None) -> np.ndarray:
    """The straightforward loop in numpy: one request alone, the documented draws, the schedule's grid,
    classifier-free guidance as two denoiser calls, the sampler's plan applied row by row."""
    s = SAMPLERS[sampler]
    schedule = session.schedule
    pairs = schedule.pairs(steps)
    plan = s.plan(schedule, pairs, eta).astype(np.float32)
    rngs = [np.random.default_rng(np.random.SeedSequence([seed, i])) for i in range(n)]
    state = [np.stack([r.standard_normal(SHAPE, dtype=np.float32) for r in rngs])]
    state += [np.zeros_like(state[0]) for _ in s.state[1:]]
    labels = np.arange(n, dtype=np.int64) % 10 if labels is None else np.asarray(labels, np.int64)
    for k, (t, _) in enumerate(pairs):
        x = state[0]
        tt = schedule.model_time([t] * n)
        cond = session.run({"x_t": x, "t": tt, "label": labels})[0]
        uncond = session.run({"x_t": x, "t": tt, "label": np.full(n, 10, np.int64)})[0]
        out = uncond + guidance * (cond - uncond)
        cx, co = schedule.to_x0(t)
        x0 = cx * x + co * out
        if s.clip_x0:
            x0 = np.clip(x0, -1, 1)
        noise = np.stack([r.standard_normal(SHAPE, dtype=np.float32) for r in rngs]) if s.uses_noise(eta) \
            else np.zeros_like(x)
        terms = [*state, x0, noise]
        state = [sum(plan[k, j, i] * terms[i] for i in range(len(terms))) for j in range(len(s.state))]
    return np.clip(state[0], -1, 1)


async def collect(agen) -> tuple[list[Progress], Final]:
    progress = []
    async for event in agen:
        if isinstance(event, Final):
            return progress, event
        progress.append(event)
    raise AssertionError("generate ended without a result")


def test_timestep_pairs_match_the_trainer():
    from trainer.models.diffusion import timestep_pairs as trainer_pairs

    for total in (1000, 10, 7, 4):
        for steps in range(1, min(total, 60) + 1):
            assert timestep_pairs(steps, total) == trainer_pairs(steps, total)
    assert timestep_pairs(3, 10) == [(9, 6), (6, 2), (2, -1)]  # 20/3 = 6.67 -> 7 - 1; 10/3 = 3.33 -> 3 - 1
    assert timestep_pairs(4, 10)[1][0] == 7 and timestep_pairs(4, 10)[3][0] == 1  # 7.5 -> 8 - 1; 2.5 -> 2 - 1


def test_generate_streams_progress_then_the_result(repo, denoising):
    model, denoiser = denoising
    with Runtime(repo, device="cpu") as rt:
        progress, final = asyncio.run(collect(rt.generate(model, 3, seed=4, steps=6, preview_every=2)))
    assert [p.step for p in progress] == [1, 2, 3, 4, 5, 6] and {p.total for p in progress} == {6}
    previews = [p.step for p in progress if p.preview is not None]
    assert previews == [2, 4, 6]
    preview = progress[1].preview
    assert preview.shape == (3, *SHAPE) and preview.min() >= -1 and preview.max() <= 1
    r = final.result
    assert r.images.shape == (3, *SHAPE) and r.labels.tolist() == [0, 1, 2] and r.seed == 4
    assert (r.model, r.version) == (model, 1)
    assert np.abs(r.images - reference(denoiser, 4, 3, 6)).max() <= 1e-4


def test_sample_i_does_not_depend_on_n(repo):
    with Runtime(repo, device="cpu") as rt:
        eight = list(rt.sync.generate("tiny-diffusion", 8, seed=2, steps=4, sampler="ddpm"))[-1].result
        four = list(rt.sync.generate("tiny-diffusion", 4, seed=2, steps=4, sampler="ddpm"))[-1].result
    assert np.abs(eight.images[:4] - four.images).max() <= 1e-4
    assert np.abs(eight.images[4:] - eight.images[:4]).max() > 1e-2


NAMES = sorted(SAMPLERS)
REQUESTS = [  # 16 requests: every sampler, step counts 4..50, guidance 0..3 and eta 0 and 1, 1 or 2 images
    dict(n=1 + i % 2, seed=100 + i, steps=4 + (13 * i) % 47, sampler=NAMES[i % len(NAMES)],
         guidance=(0.0, 1.0, 1.5, 3.0)[i % 4], eta=(0.0, 1.0)[(i // 2) % 2], labels=[i % 10])
    for i in range(16)
]


def test_mixed_requests_share_step_runs_and_match_their_solo_results(repo, denoising):
    model, denoiser = denoising
    with Runtime(repo, device="cpu") as rt:
        async def together():
            return await asyncio.gather(*(collect(rt.generate(model, **r)) for r in REQUESTS))

        t0 = time.perf_counter()
        results = asyncio.run(together())
        busy_s = time.perf_counter() - t0
        scheduler = rt.scheduler(rt.repository.resolve(model))
        runs = scheduler.executions
        total_steps = sum(r["steps"] for r in REQUESTS)
        assert runs < total_steps, f"{runs} denoiser runs for {total_steps} request-steps"
        assert runs <= max(r["steps"] for r in REQUESTS) + 8, "nearly every request joins the first runs"
        assert max(scheduler.statistics().batch_sizes) > 8
        for (progress, final), r in zip(results, REQUESTS):
            assert [p.step for p in progress] == list(range(1, r["steps"] + 1))
            alone = list(rt.sync.generate(model, **r))[-1].result.images
            assert np.abs(final.result.images - alone).max() <= 1e-4, r
            expected = reference(denoiser, r["seed"], r["n"], r["steps"], r["sampler"], r["guidance"],
                                 r["eta"], r["labels"] * r["n"])
            assert np.abs(final.result.images - expected).max() <= 1e-4, r
    print(f"{model}, 16 mixed requests: {runs} step runs for {total_steps} steps, {busy_s:.2f} s")


def test_requests_larger_than_the_batch(repo, denoiser):
    with Runtime(repo, device="cpu", max_batch_size=4) as rt:
        events = list(rt.sync.generate("tiny-diffusion", 6, seed=8, steps=3, sampler="dpm++"))
        sched = rt.scheduler(rt.repository.resolve("tiny-diffusion"))
        assert max(sched.statistics().batch_sizes) == 4
    assert [e.step for e in events[:-1]] == [1, 2, 3]
    assert np.abs(events[-1].result.images - reference(denoiser, 8, 6, 3, "dpm++")).max() <= 1e-4


def _drained(sched, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while sched.active():
        if time.monotonic() > end:
            return False
        time.sleep(0.002)
    return True


def test_a_closed_stream_leaves_within_one_step(repo, denoising):
    model, denoiser = denoising
    with Runtime(repo, device="cpu") as rt:
        sched = rt.scheduler(rt.repository.resolve(model))

        async def main():
            other = asyncio.ensure_future(collect(rt.generate(model, 1, seed=3, steps=12)))
            agen = rt.generate(model, 2, seed=1, steps=1000)
            for _ in range(3):
                await agen.__anext__()
            await agen.aclose()
            at_close = sched.executions
            assert await asyncio.to_thread(_drained, sched, 10)
            assert sched.executions <= at_close + 1 + 12, "only the other request keeps running"
            return (await other)[1].result.images, at_close

        images, at_close = asyncio.run(main())
        assert np.abs(images - reference(denoiser, 3, 1, 12)).max() <= 1e-4, "a neighbour is unaffected"
        assert sched.statistics().failures == {"CANCELLED": 1}


def test_a_cancelled_task_leaves_within_one_step(repo):
    with Runtime(repo, device="cpu") as rt:
        sched = rt.scheduler(rt.repository.resolve("tiny-diffusion"))
        steps_seen = []

        async def consume():
            async for event in rt.generate("tiny-diffusion", 1, seed=1, steps=1000):
                steps_seen.append(event.step)

        async def main():
            task = asyncio.ensure_future(consume())
            while len(steps_seen) < 3:
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            at_cancel = sched.executions
            assert await asyncio.to_thread(_drained, sched, 10)
            return at_cancel

        at_cancel = asyncio.run(main())
        assert sched.executions <= at_cancel + 1 and sched.executions < 20


def test_a_closed_sync_generator_leaves_too(repo):
    with Runtime(repo, device="cpu") as rt:
        sched = rt.scheduler(rt.repository.resolve("tiny-diffusion"))
        events = rt.sync.generate("tiny-diffusion", 1, seed=1, steps=1000)
        next(events), next(events)
        events.close()
        at_close = sched.executions
        assert _drained(sched) and sched.executions <= at_close + 1


def test_an_expired_request_stops_with_deadline_exceeded(repo):
    with Runtime(repo, device="cpu") as rt:
        events = rt.sync.generate("tiny-diffusion", 1, seed=1, steps=1000, deadline=time.monotonic() + 0.2)
        with pytest.raises(DeadlineExceeded, match="deadline passed after step"):
            for _ in events:
                pass
        sched = rt.scheduler(rt.repository.resolve("tiny-diffusion"))
        assert _drained(sched) and sched.executions < 1000


# --- the scheduler on a fake step graph ------------------------------------------------------------------------

class FakeSession:
    """A numpy stand-in for DenoisingSession: x_new = x / 2 + t; fails on label 7; `gate` holds runs back;
    records the labels of every run. It checks the scheduler's bookkeeping (slots, order, failures) alone."""

    image_shape = (1, 2, 2)
    state_size = 1

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self.pool = np.zeros((capacity, 1, *self.image_shape), np.float32)
        self.runs: list[list[int]] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def admit(self, slots, x_T, known=None, mask=None):
        self.pool[slots, 0] = x_T

    def step(self, *, slots, t, label, guidance, conv, coef, noise, blend=None):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        self.runs.append(label.tolist())
        if (label == 7).any():
            raise RuntimeError("bad row")
        x = self.pool[slots, 0] / 2 + t[:, None, None, None]
        self.pool[slots, 0] = x
        return SimpleNamespace(x=lambda: x.copy(), x0=lambda: x.copy())


def submit(sched: DiffusionScheduler, label: int, n: int = 1, steps: int = 3):
    events = []
    req = sched.submit(seed=label, labels=np.full(n, label), guidance=1.0, eta=0.0, sampler=SAMPLERS["ddim"],
                       steps=steps, deliver=events.append)
    return req, events


def wait_done(events, timeout: float = 5.0):
    end = time.monotonic() + timeout
    while not events or not isinstance(events[-1], (Done, Exception)):
        assert time.monotonic() < end, "no result"
        time.sleep(0.001)
    return events[-1]


def test_a_failing_step_fails_only_the_requests_in_it():
    fake = FakeSession()
    fake.gate = threading.Event()
    sched = DiffusionScheduler(fake, NoiseSchedule.of("linear", 10), max_batch_size=2)
    _, first = submit(sched, 1, steps=1)
    assert fake.entered.wait(5)
    _, bad = submit(sched, 7)
    _, neighbour = submit(sched, 2)  # shares the failing run
    _, later = submit(sched, 3)  # waits: the batch holds 2 rows
    fake.gate.set()
    assert isinstance(wait_done(first), Done)
    assert isinstance(wait_done(bad), Internal) and "bad row" in str(bad[-1])
    assert isinstance(wait_done(neighbour), Internal)
    done = wait_done(later)
    assert isinstance(done, Done) and [e.step for e in later[:-1]] == [1, 2, 3]
    assert sched.statistics().failures == {"INTERNAL": 2}
    sched.close()


def test_oldest_rows_first_and_the_limit():
    fake = FakeSession()
    fake.gate = threading.Event()
    sched = DiffusionScheduler(fake, NoiseSchedule.of("linear", 10), max_batch_size=2, max_queue_size=3)
    _, first = submit(sched, 0, steps=1)
    assert fake.entered.wait(5)
    _, a = submit(sched, 1, n=2, steps=2)
    _, b = submit(sched, 2, n=1, steps=2)
    with pytest.raises(ResourceExhausted):
        submit(sched, 3)
    fake.gate.set()
    for events in (first, a, b):
        assert isinstance(wait_done(events), Done)
    assert fake.runs == [[0], [1, 1], [1, 1], [2], [2]], "the older request's rows go first"
    sched.close()


def test_results_follow_the_step_rule():
    """With the fake session, x after the loop is a function of x_T and the t sequence alone."""
    fake = FakeSession()
    sched = DiffusionScheduler(fake, NoiseSchedule.of("linear", 10), max_batch_size=8)
    _, events = submit(sched, 4, n=2, steps=3)
    done = wait_done(events)
    rng0 = np.random.default_rng(np.random.SeedSequence([4, 0]))
    x = rng0.standard_normal((1, 2, 2), dtype=np.float32)
    for t, _ in timestep_pairs(3, 10):
        x = x / 2 + t
    assert np.allclose(done.images[0], np.clip(x, -1, 1))
    sched.close()
