"""Image-to-image (SDEdit) and inpainting (RePaint's replacement) through the step-level loop: against float64
reference loops written from diffusers' img2img (its timesteps, its noised start) and from RePaint, mixed with plain
generation in one batch, and refused with INVALID_ARGUMENT naming the field over gRPC."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc
from serve.diffusion import row_rng, start_grid
from serve.images import encode_png
from serve.runtime import Final, Runtime
from serve.samplers import NoiseSchedule
from serve.wire import tensor_to_pb

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from tests.serve.samplers.test_against_diffusers import GUIDANCE, make_scheduler  # noqa: E402

REPO = Path(__file__).resolve().parents[2] / "exported"
MODEL = "mnist-diffusion"  # the shipped one: real digits to start from, a classifier-free-guided U-Net
SHAPE = (1, 32, 32)
LABELS = [8, 2]
SEED = 5


def digits() -> np.ndarray:
    """Two smooth digit-like images in [-1, 1] (a ring and a bar), so that the test needs no dataset."""
    yy, xx = np.mgrid[:32, :32] / 31.0 * 2 - 1
    ring = np.exp(-((np.hypot(xx, yy * 1.3) - 0.55) ** 2) / 0.02)
    bar = np.exp(-(xx**2) / 0.02) * (np.abs(yy) < 0.7)
    return (np.stack([ring, bar])[:, None] * 2 - 1).astype(np.float32)


LOWER_HALF = np.zeros((1, *SHAPE), np.float32)
LOWER_HALF[..., 16:, :] = 1.0


@pytest.fixture(scope="module")
def denoiser():
    return ort.InferenceSession(str(REPO / MODEL / "1" / "denoiser.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def runtime():
    with Runtime(REPO, device="cpu") as rt:
        yield rt


def eps_of(session, x: np.ndarray, t: int) -> np.ndarray:
    """The guided model output, one doubled batch as the server runs it, float64."""
    labels = np.array(LABELS, np.int64)
    tt = np.full(len(labels), t, np.int64)
    xf = x.astype(np.float32)
    out = session.run(None, {"x_t": np.concatenate([xf, xf]), "t": np.concatenate([tt, tt]),
                             "label": np.concatenate([labels, np.full_like(labels, 10)])})[0].astype(np.float64)
    return out[len(x):] + GUIDANCE * (out[:len(x)] - out[len(x):])


def draws(steps: int, noisy: bool):
    """Each row's documented draws: x_T first, then (noisy) one per step."""
    rngs = [row_rng(SEED, i) for i in range(len(LABELS))]
    x_T = np.stack([r.standard_normal(SHAPE, dtype=np.float32) for r in rngs]).astype(np.float64)
    per_step = [np.stack([r.standard_normal(SHAPE, dtype=np.float32) for r in rngs]).astype(np.float64)
                for _ in range(steps if noisy else 0)]
    return x_T, per_step


def reference_img2img(session, sampler: str, steps: int, strength: float, init: np.ndarray) -> np.ndarray:
    """diffusers' img2img in float64: set_timesteps(N), start at index N - int(N strength) (set_begin_index), the
    init images noised to the first timestep with add_noise, then DPM-Solver++'s own steps, or DDIM's update."""
    n = steps
    while int(n * strength) < steps:  # the least grid that runs `steps` steps, as the server chooses it
        n += 1
    sched = make_scheduler(sampler)
    sched.set_timesteps(n)
    t_start = n - min(int(n * strength), n)
    timesteps = sched.timesteps[t_start * sched.order:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    assert len(timesteps) == steps
    x_T, _ = draws(steps, False)
    x0 = torch.from_numpy(init.astype(np.float64))
    sample = sched.add_noise(x0, torch.from_numpy(x_T), timesteps[:1].repeat(len(init)))
    ts = [int(t) for t in timesteps]
    for i, t in enumerate(ts):
        eps = eps_of(session, sample.numpy(), t)
        if sampler == "ddim":
            # DDIM's update (eq. 12, eta 0, x0 clipped) to the next timestep of the grid: diffusers' DDIMScheduler
            # steps to t - T // N instead, which is not on its own grid when N does not divide T (e.g. N = 15)
            prev = ts[i + 1] if i + 1 < len(ts) else -1
            sample = torch.from_numpy(ddim_step(sample.numpy(), eps, t, prev, sched.alphas_cumprod.double().numpy()))
        else:
            sample = sched.step(torch.from_numpy(eps), t, sample).prev_sample
    return np.clip(sample.numpy(), -1, 1)


def ddim_step(x: np.ndarray, eps: np.ndarray, t: int, prev: int, abar: np.ndarray) -> np.ndarray:
    a_t, a_p = abar[t], (1.0 if prev < 0 else abar[prev])
    x0 = np.clip((x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t), -1, 1)
    eps = (x - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)  # from the clipped x0 (use_clipped_model_output)
    return np.sqrt(a_p) * x0 + np.sqrt(1 - a_p) * eps


def reference_inpaint(session, steps: int, init: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RePaint's replacement around diffusers' DDIM step, float64: from the init images noised to t = T - 1 (the
    first trailing timestep), after each step the kept pixels become the init noised to the step's end with that
    step's draw; the last step ends at t = 0 reached, where that is the init itself."""
    sched = make_scheduler("ddim")
    sched.set_timesteps(steps)
    abar = sched.alphas_cumprod.double().numpy()
    x_T, per_step = draws(steps, True)
    ts = sched.timesteps.tolist()
    x = np.sqrt(abar[ts[0]]) * init + np.sqrt(1 - abar[ts[0]]) * x_T
    sample = torch.from_numpy(x)
    for i, t in enumerate(ts):
        eps = torch.from_numpy(eps_of(session, sample.numpy(), t))
        sample = sched.step(eps, t, sample, use_clipped_model_output=True).prev_sample
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        a, s = (1.0, 0.0) if prev < 0 else (np.sqrt(abar[prev]), np.sqrt(1 - abar[prev]))
        known = a * init + s * per_step[i]
        sample = torch.from_numpy(mask * sample.numpy() + (1 - mask) * known)
    return np.clip(sample.numpy(), -1, 1)


def served(runtime, steps, sampler, **kwargs) -> np.ndarray:
    *_, final = runtime.sync.generate(MODEL, n=len(LABELS), seed=SEED, labels=LABELS, guidance=GUIDANCE,
                                      sampler=sampler, steps=steps, **kwargs)
    return final.result.images


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
@pytest.mark.parametrize("strength", [0.5, 0.7])
def test_image_to_image_equals_diffusers_img2img(denoiser, runtime, sampler, steps, strength):
    init = digits()
    got = served(runtime, steps, sampler, init=init, strength=strength)
    expected = reference_img2img(denoiser, sampler, steps, strength, init.astype(np.float64))
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(got - init).max() > 0.1  # it did change the images


@pytest.mark.parametrize("steps", [10, 50])
def test_inpainting_equals_a_repaint_replacement_loop(denoiser, runtime, steps):
    init = digits()
    got = served(runtime, steps, "ddim", init=init, mask=LOWER_HALF)
    expected = reference_inpaint(denoiser, steps, init.astype(np.float64), np.broadcast_to(LOWER_HALF, init.shape))
    assert np.abs(got - expected).max() <= 1e-4
    assert np.array_equal(got[..., :16, :], init[..., :16, :])  # the kept half is the input, exactly
    assert np.abs(got[..., 16:, :] - init[..., 16:, :]).max() > 0.1


def test_the_grid_runs_the_requested_steps_from_near_strength_times_T():
    schedule = NoiseSchedule.of("linear", 1000)
    for steps, strength in [(10, 0.7), (10, 0.5), (4, 0.9), (50, 0.3), (3, 0.1), (10, 1.0)]:
        pairs = start_grid(schedule, steps, strength)
        assert len(pairs) == steps and pairs[-1][1] == -1
        assert abs(pairs[0][0] + 1 - strength * 1000) <= 1000 * strength / steps + 1
    with pytest.raises(ValueError, match="need a grid"):
        start_grid(schedule, 50, 0.01)


def test_rows_depend_on_their_seed_and_index_only(runtime):
    init = digits()[:1]
    *_, four = runtime.sync.generate(MODEL, n=4, seed=3, labels=[5], sampler="ddpm", steps=6, init=init,
                                     strength=0.6, mask=LOWER_HALF)
    *_, two = runtime.sync.generate(MODEL, n=2, seed=3, labels=[5], sampler="ddpm", steps=6, init=init,
                                    strength=0.6, mask=LOWER_HALF)
    assert np.array_equal(four.result.images[:2], two.result.images)


MIXED = [  # (sampler, steps, strength or None, masked): plain, image-to-image and inpainting rows together
    ("ddim", 6, None, False), ("dpm++", 4, 0.6, False), ("unipc", 5, None, True), ("ddpm", 7, 0.8, True),
    ("euler_a", 3, 0.5, False), ("ddim", 8, 1.0, True), ("dpm++", 5, None, False), ("ddim", 4, 0.3, False),
]


def test_mixed_requests_share_denoiser_runs_and_equal_their_solo_results(tiny_repo):
    """16 concurrent Generates on the tiny diffusion model: fewer iteration-graph runs than their steps added up,
    and each request's images equal to the same request run alone."""
    init = np.stack([np.full((1, 32, 32), v, np.float32) for v in (-0.5, 0.3)])
    requests = []
    for k in range(16):
        sampler, steps, strength, masked = MIXED[k % len(MIXED)]
        kwargs = dict(n=2, seed=100 + k, labels=[k % 10], sampler=sampler, steps=steps)
        if strength is not None or masked:
            kwargs.update(init=init, strength=strength)
        if masked:
            kwargs["mask"] = LOWER_HALF
        requests.append(kwargs)

    async def run(rt, kwargs):
        async for event in rt.generate("tiny-diffusion", **kwargs):
            if isinstance(event, Final):
                return event.result.images

    async def together(rt):
        return await asyncio.gather(*(run(rt, kw) for kw in requests))

    with Runtime(tiny_repo / "exported", device="cpu", max_batch_size=64) as rt:
        solo = [asyncio.run(run(rt, kw)) for kw in requests]
        scheduler = rt.scheduler(rt.repository.resolve("tiny-diffusion"))
        before = scheduler.executions
        mixed = asyncio.run(together(rt))
        runs = scheduler.executions - before
    assert runs < sum(kw["steps"] for kw in requests)
    for a, b in zip(mixed, solo):
        assert np.abs(a - b).max() <= 1e-4


def test_a_flow_model_and_a_student_take_init_images(tiny_repo):
    init = np.zeros((1, 1, 32, 32), np.float32)
    with Runtime(tiny_repo / "exported", device="cpu") as rt:
        for model, kwargs in (("tiny-flow", dict(sampler="euler", steps=4)), ("tiny-diffusion-student", {})):
            *_, final = rt.sync.generate(model, n=2, seed=0, labels=[1], init=init, strength=0.5, mask=LOWER_HALF,
                                         **kwargs)
            assert final.result.images.shape == (2, 1, 32, 32)
            assert np.array_equal(final.result.images[..., :16, :], np.zeros((2, 1, 16, 32), np.float32))


def test_previews_and_cancellation_work_as_for_generation(tiny_repo):
    init = np.zeros((1, 1, 32, 32), np.float32)
    with Runtime(tiny_repo / "exported", device="cpu") as rt:
        events = list(rt.sync.generate("tiny-diffusion", n=2, seed=0, labels=[1], steps=4, init=init, strength=0.5,
                                       mask=LOWER_HALF, preview_every=2))
        assert [e.step for e in events[:-1]] == [1, 2, 3, 4] and events[-1].result.images.shape == (2, 1, 32, 32)
        assert [e.preview.shape for e in events[:-1] if e.preview is not None] == [(2, 1, 32, 32)] * 2
        stream = rt.sync.generate("tiny-diffusion", n=2, seed=0, labels=[1], steps=50, init=init, strength=0.5)
        next(stream)
        stream.close()  # cancels: the loop drops the request before its next step
        scheduler = rt.scheduler(rt.repository.resolve("tiny-diffusion"))
        deadline = time.monotonic() + 10
        while scheduler.active() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.active() == 0


# --- over gRPC: bad input names its field, and the server keeps serving ------------------------------------

def _png(shape=(32, 32), value=0.0) -> bytes:
    """A grey PNG; value in [-1, 1] (1 = white)."""
    return encode_png(np.full((1, *shape), value, np.float32))


@pytest.mark.parametrize("fields,name", [
    (dict(init_images=[_png((16, 16))]), "init_images[0]"),
    (dict(init_tensor=tensor_to_pb(np.zeros((1, 3, 32, 32), np.float32))), "init"),
    (dict(init_images=[_png()] * 3), "init"),
    (dict(init_images=[_png()], mask_images=[_png((32, 16))]), "mask_images[0]"),
    (dict(init_images=[_png()], mask_tensor=tensor_to_pb(np.ones((1, 1, 8, 8), np.float32))), "mask"),
    (dict(init_images=[_png()], strength=0.0), "strength"),
    (dict(init_images=[_png()], strength=1.5), "strength"),
    (dict(mask_images=[_png()]), "mask"),
    (dict(strength=0.5), "strength"),
    (dict(init_images=[_png()], init_tensor=tensor_to_pb(np.zeros((1, 1, 32, 32), np.float32))), "init_images"),
])
def test_bad_init_and_mask_are_invalid_argument_naming_the_field(server, fields, name):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(model="tiny-diffusion", n=2, steps=2, **fields), timeout=60))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and name in e.value.details(), e.value.details()
        ok = list(stub.Generate(pb.GenerateRequest(model="tiny-diffusion", n=1, steps=2, init_images=[_png()],
                                                   strength=0.5, mask_images=[_png(value=1.0)]), timeout=60))
        assert ok[-1].HasField("result")


def test_init_images_on_a_model_that_is_not_a_diffusion_model(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(model="tiny-gan", n=1, init_images=[_png()]), timeout=60))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model" in e.value.details()
