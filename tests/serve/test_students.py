"""A distilled student served next to its teacher: its own sampler and step counts, guidance as its input,
concurrent requests equal to their solo results, and clear errors for what it was not trained for."""
from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from serve.client import GenClient, Images
from serve.errors import InvalidArgument
from serve.runtime import Final, Runtime

STUDENT, TEACHER = "tiny-diffusion-student", "tiny-diffusion"


@pytest.fixture(scope="module")
def runtime(tiny_repo):
    with Runtime(tiny_repo / "exported", device="cpu", max_batch_size=8) as rt:
        yield rt


def solo(rt, model: str, **kw) -> np.ndarray:
    return list(rt.sync.generate(model, **kw))[-1].result.images


def test_a_student_samples_with_its_own_sampler_and_steps_by_default(runtime):
    events = list(runtime.sync.generate(STUDENT, 2, seed=1))
    assert [e.step for e in events[:-1]] == [1, 2, 3, 4] and events[0].total == 4
    explicit = solo(runtime, STUDENT, n=2, seed=1, sampler="ddim", steps=4)  # its sampler at 4 steps
    assert np.array_equal(events[-1].result.images, explicit)
    two = solo(runtime, STUDENT, n=2, seed=1, steps=2)
    assert np.array_equal(two, solo(runtime, STUDENT, n=2, seed=1, sampler="consistency", steps=2))
    info = next(m for m in runtime.models() if m["name"] == STUDENT)
    assert info["samplers"] == ["consistency", "ddim"]


def test_guidance_is_an_input_of_the_student(runtime):
    low = solo(runtime, STUDENT, n=2, seed=3, labels=[1, 2], guidance=1.0)
    high = solo(runtime, STUDENT, n=2, seed=3, labels=[1, 2], guidance=3.0)
    assert low.shape == high.shape == (2, 1, 32, 32)
    with Runtime(runtime.repository.root, device="cpu") as rt:  # a fresh loop: the same image for the same scale
        assert np.abs(solo(rt, STUDENT, n=2, seed=3, labels=[1, 2], guidance=3.0) - high).max() <= 1e-4


def test_student_and_teacher_requests_served_together_equal_their_solo_results(runtime):
    cases = [(STUDENT, dict(n=3, seed=10, steps=4, guidance=1.5)), (STUDENT, dict(n=2, seed=11, steps=1)),
             (STUDENT, dict(n=4, seed=12, steps=2, guidance=2.5, labels=[5])),
             (TEACHER, dict(n=3, seed=13, sampler="ddim", steps=6)), (TEACHER, dict(n=2, seed=14, steps=3))]
    alone = [solo(runtime, model, **kw) for model, kw in cases]

    async def one(model, kw):
        async for event in runtime.generate(model, **kw):
            if isinstance(event, Final):
                return event.result.images

    async def together():
        return await asyncio.gather(*(one(model, kw) for model, kw in cases))

    runs_before = runtime.scheduler(runtime.repository.resolve(STUDENT, None)).executions
    for (model, kw), got, expected in zip(cases, asyncio.run(together()), alone):
        assert np.abs(got - expected).max() <= 1e-4, (model, kw)
    runs = runtime.scheduler(runtime.repository.resolve(STUDENT, None)).executions - runs_before
    assert runs < 4 + 1 + 2, f"the student's three requests shared step runs ({runs} runs)"


@pytest.mark.parametrize("kw,field", [(dict(steps=3), "steps"), (dict(sampler="consistency"), "sampler"),
                                      (dict(sampler="ddim", steps=2), "sampler"),
                                      (dict(guidance=-1.0), "guidance"), (dict(guidance=3.5), "guidance")])
def test_what_a_student_was_not_trained_for_is_refused(runtime, kw, field):
    with pytest.raises(InvalidArgument, match=field):
        list(runtime.sync.generate(STUDENT, 1, seed=0, **kw))


def test_over_grpc_a_student_streams_and_refuses_other_step_counts(server):
    with GenClient(server.target, timeout=120) as client:
        events = list(client.generate(STUDENT, n=2, seed=4, steps=2))
        assert [e.step for e in events[:-1]] == [1, 2] and isinstance(events[-1], Images)
        assert events[-1].pixels.shape == (2, 32, 32, 1)
        with pytest.raises(grpc.RpcError) as err:
            list(client.generate(STUDENT, n=1, steps=8))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "steps" in err.value.details()
        assert "1, 2, 4" in err.value.details()
