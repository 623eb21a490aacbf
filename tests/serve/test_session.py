"""The session layer: the denoising state stays on the device between steps, on the same IO-binding code as CUDA."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from serve.manifest import read_manifest
from serve.runtime import Runtime
from serve.samplers import state_size
from serve.session import DenoisingSession, buckets, parse_device


@pytest.fixture(scope="module")
def repo(tiny_repo):
    return tiny_repo / "exported"


def test_intermediate_steps_copy_nothing_back(repo):
    with Runtime(repo, device="cpu") as rt:
        mv = rt.repository.resolve("tiny-diffusion")
        sched = rt.scheduler(mv)
        session = sched.session
        assert isinstance(session, DenoisingSession) and session.device == "cpu"
        before = session.transfers.snapshot()
        events = list(rt.sync.generate("tiny-diffusion", 3, seed=1, sampler="ddim", steps=12))
        after = session.transfers.snapshot()
        assert len(events) == 13 and sched.executions == 12
        assert after.downloads - before.downloads == 1, "only the finished images come back"
        assert after.uploads - before.uploads == 1, "only x_T goes up (DDIM at eta 0 draws no noise)"

        before = session.transfers.snapshot()
        events = list(rt.sync.generate("tiny-diffusion", 2, seed=1, sampler="ddpm", steps=6, preview_every=3))
        after = session.transfers.snapshot()
        assert [e.preview is not None for e in events[:-1]] == [False, False, True, False, False, True]
        assert after.downloads - before.downloads == 1 + 2, "the finished images and two previews"
        assert after.uploads - before.uploads == 1 + 6, "x_T, then one noise tensor per step"


def test_the_state_lives_in_device_buffers_that_alternate(repo):
    m = read_manifest(repo / "tiny-diffusion" / "1")
    session = DenoisingSession(repo / "tiny-diffusion" / "1", m, state_size(), capacity=4, device="cpu")
    assert all(isinstance(p, ort.OrtValue) for p in session._pool)
    first = session._cur
    session.admit(np.array([0, 2]), np.zeros((2, *session.image_shape), np.float32))
    assert session._cur != first, "a run writes the other buffer; the next one reads it"
    S = session.state_size
    coef = np.zeros((2, S, S + 2), np.float32)
    coef[:, 0, 0] = 1.0  # x' = x
    coef[:, 1, S] = 1.0  # state 1 <- x0
    out = session.step(slots=np.array([2, 0]), t=np.array([5, 5]), label=np.array([0, 1]),
                       guidance=np.ones(2, np.float32), conv=np.tile(np.float32([1, 0, 0]), (2, 1)), coef=coef,
                       noise=None)
    assert session.transfers.downloads == 0
    assert np.abs(out.x()).max() == 0 and np.abs(out.x0()).max() == 0  # x0 = 1 * x + 0 * out = 0
    assert session.transfers.downloads == 2


def test_devices_and_buckets():
    assert parse_device("cpu") == ("cpu", 0) and parse_device("cuda:3") == ("cuda", 3)
    for bad in ("gpu", "cuda:x", "cpu:1"):
        with pytest.raises(ValueError, match="device"):
            parse_device(bad)
    assert buckets(64) == [1, 2, 4, 8, 16, 32, 64] and buckets(48) == [1, 2, 4, 8, 16, 32, 48]
