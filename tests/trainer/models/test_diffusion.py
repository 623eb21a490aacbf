"""The diffusion family: U-Net, training step, EMA, resume, guidance, the training-time sampling loop, export.

The samplers' maths is serving code, tested in tests/serve/samplers/ against diffusers."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from serve.samplers import NoiseSchedule
from trainer.denoising import UNet, guided_output, run_sampler
from trainer.models.base import ConfigError, DataInfo
from trainer.models.diffusion import Diffusion, DiffusionConfig, alpha_bar_schedule, timestep_pairs

CPU = torch.device("cpu")
K = 3  # classes in the conditional fixture
INFO = DataInfo("images", 1, 32, tuple(f"c{i}" for i in range(K)))
INFO_UNCOND = DataInfo("images", 1, 32)


def tiny(info: DataInfo = INFO, **kw) -> Diffusion:
    cfg = DiffusionConfig(width=8, channel_mult=(1, 2), attn_resolution=16, batch_size=4, **kw)
    Diffusion.check(cfg, info)
    return Diffusion(cfg, info, CPU)


def randomise(net: torch.nn.Module, seed: int = 0) -> None:
    """The zero-initialised output layers make a fresh U-Net predict 0: perturb every weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def unet() -> UNet:
    torch.manual_seed(0)
    model = tiny()
    randomise(model.ema)
    return model.ema


def batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 32, 32, generator=g) * 2 - 1, torch.randint(0, K, (n,), generator=g)


def full(n: int, value, dtype=torch.int64) -> torch.Tensor:
    return torch.full((n,), value, dtype=dtype)


# --- schedule and timesteps ------------------------------------------------------------------------

def test_timestep_pairs_trailing_as_diffusers():
    for T, steps in [(1000, 50), (1000, 1), (1000, 3), (1000, 7), (1000, 16), (1000, 1000), (10, 4)]:
        ts = (np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1).tolist()  # diffusers "trailing"
        pairs = timestep_pairs(steps, T)
        assert [t for t, _ in pairs] == ts
        assert [p for _, p in pairs] == ts[1:] + [-1]
    assert timestep_pairs(1000, 1000) == [(t, t - 1) for t in range(999, -1, -1)]
    assert timestep_pairs(50, 1000)[:2] == [(999, 979), (979, 959)]
    with pytest.raises(ValueError):
        timestep_pairs(0, 1000)


def test_schedules():
    lin = alpha_bar_schedule("linear", 1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(lin, torch.cumprod(1 - betas, 0))
    cos = alpha_bar_schedule("cosine", 1000)
    assert (cos.diff() < 0).all() and 0 < cos[-1] < 1e-6 and cos[0] > 0.999


# --- networks and training -----------------------------------------------------------------------

@pytest.mark.parametrize("mult,size,classes", [((1, 2), 32, 3), ((1, 2, 2), 32, 0), ((1, 1, 2, 2), 64, 10)])
def test_unet_shapes(mult, size, classes):
    net = UNet(3, size, width=8, channel_mult=mult, num_res_blocks=2, attn_resolution=8, num_classes=classes)
    x = torch.randn(2, 3, size, size)
    label = torch.tensor([0, classes]) if classes else None  # index K is the null class
    assert net(x, torch.tensor([0, 999]), label).shape == x.shape
    if classes:
        assert net.class_emb.num_embeddings == classes + 1


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_train_step_finite(prediction, schedule):
    torch.manual_seed(0)
    model = tiny(prediction=prediction, schedule=schedule)
    for i in range(2):
        losses = model.train_step(batch(), i)
        model.on_step_end(i)
    assert set(losses) == {"loss"} and torch.isfinite(losses["loss"]) and not losses["loss"].requires_grad


def test_unconditional_by_default_without_classes():
    model = tiny(INFO_UNCOND)
    assert model.num_classes == 0 and model.nets["unet"].class_emb is None
    assert tiny(conditional=False).num_classes == 0
    with pytest.raises(ConfigError, match="--set conditional"):
        Diffusion.check(DiffusionConfig(conditional=True), INFO_UNCOND)


def test_check_rejects_bad_options():
    with pytest.raises(ConfigError, match="--image-size 48"):
        Diffusion.check(DiffusionConfig(), DataInfo("images", 1, 48))
    with pytest.raises(ConfigError, match="--set width=12"):
        Diffusion.check(DiffusionConfig(width=12), INFO)
    with pytest.raises(ConfigError, match="--set prediction"):
        Diffusion.check(DiffusionConfig(prediction="x0"), INFO)
    with pytest.raises(ConfigError, match="--set schedule"):
        Diffusion.check(DiffusionConfig(schedule="sqrt"), INFO)
    with pytest.raises(ConfigError, match="--set channel_mult"):
        Diffusion.check(DiffusionConfig(channel_mult=(1, 1, 1, 1, 1, 1)), INFO)


def test_ema_update_with_warmup():
    torch.manual_seed(0)
    model = tiny(ema_decay=0.9)
    before = [p.clone() for p in model.ema.parameters()]
    model.train_step(batch(), 0)
    model.on_step_end(0)  # first update: decay = min(0.9, 1/10) = 0.1
    for e, b, p in zip(model.ema.parameters(), before, model.nets["unet"].parameters()):
        assert torch.allclose(e, 0.1 * b + 0.9 * p, atol=1e-7)
    for _ in range(20):
        model.update_ema()
    before = [p.clone() for p in model.ema.parameters()]
    model.update_ema()  # later: the configured decay
    for e, b, p in zip(model.ema.parameters(), before, model.nets["unet"].parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * p, atol=1e-7)
    assert model.ema_updates == 22


def test_resume_is_exact():
    def run(model, steps, start):
        out = []
        for i in range(start, start + steps):
            out.append(model.train_step(batch(seed=i), i)["loss"].item())
            model.on_step_end(i)
        return out

    torch.manual_seed(1)
    straight = tiny()
    losses = run(straight, 4, 0)

    torch.manual_seed(1)
    first = tiny()
    resumed = run(first, 2, 0)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    rng = torch.get_rng_state()
    second = tiny()  # constructing draws random weights: the loop restores the RNG after loading
    buf.seek(0)
    second.load_state_dict(torch.load(buf))
    torch.set_rng_state(rng)
    resumed += run(second, 2, 2)
    assert np.allclose(losses, resumed, atol=1e-6, rtol=0)
    for a, b in zip(straight.ema.parameters(), second.ema.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_sample_images_and_modes():
    model = tiny()
    randomise(model.ema)
    model.config.sample_steps = 4
    model.train(True)
    images = model.sample(batch(6), seed=3)
    assert images.shape == (6, 1, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert model.nets["unet"].training
    assert torch.equal(images, model.sample(batch(6), seed=3))
    assert not torch.equal(images, model.sample(batch(6), seed=4))


# --- guidance and the training-time sampling loop --------------------------------------------------

def test_guidance_one_is_conditional_zero_is_unconditional(unet):
    x, label = batch(4)
    t = torch.tensor([999, 500, 10, 0])
    with torch.no_grad():
        cond = unet(x, t, label)
        uncond = unet(x, t, full(4, K))
        assert torch.allclose(guided_output(unet, x, t, label, 1.0), cond, atol=1e-5)
        assert torch.allclose(guided_output(unet, x, t, label, 0.0), uncond, atol=1e-5)
        expected = uncond + 2.5 * (cond - uncond)
        assert torch.allclose(guided_output(unet, x, t, label, 2.5), expected, atol=1e-5)
        assert not torch.allclose(cond, uncond, atol=1e-3)  # the label matters


def test_run_sampler_ddim_is_song_et_al_eq12(unet):
    """The training-time loop applies the served DDIM plan: Song et al. eq. 12 at eta 0, x0 clipped."""
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(3, 1, 32, 32, generator=g)
    label = torch.tensor([0, 1, 2])
    schedule = NoiseSchedule.of("linear", 1000)
    with torch.no_grad():
        a = run_sampler(unet, schedule, x_T, label, "ddim", 5, 2.0, 0.0, torch.Generator().manual_seed(0))
        b = run_sampler(unet, schedule, x_T, label, "ddim", 5, 2.0, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)  # eta = 0: no noise
    ab = alpha_bar_schedule("linear", 1000)
    x = x_T.double()
    for t, tp in timestep_pairs(5, 1000):
        ab_t, ab_p = ab[t], (ab[tp] if tp >= 0 else torch.tensor(1.0, dtype=torch.float64))
        with torch.no_grad():
            eps = guided_output(unet, x.float(), full(3, t), label, 2.0).double()
        x0 = ((x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()).clamp(-1, 1)
        eps = (x - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()
        x = ab_p.sqrt() * x0 + (1 - ab_p).sqrt() * eps
    assert torch.allclose(a.double(), x, atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++", "unipc", "euler_a"])
def test_run_sampler_every_sampler_finite_and_seeded(unet, sampler):
    x_T, label = torch.randn(2, 1, 32, 32), torch.tensor([0, 2])
    schedule = NoiseSchedule.of("linear", 1000)
    with torch.no_grad():
        a = run_sampler(unet, schedule, x_T, label, sampler, 6, 1.5, 1.0, torch.Generator().manual_seed(0))
        b = run_sampler(unet, schedule, x_T, label, sampler, 6, 1.5, 1.0, torch.Generator().manual_seed(0))
    assert torch.isfinite(a).all() and torch.equal(a, b)


def example(spec, n: int, g: torch.Generator) -> torch.Tensor:
    shape = tuple(n if d == -1 else d for d in spec.shape)
    if spec.dtype == "int64":
        return torch.randint(int(spec.low), int(spec.high), shape, generator=g)
    return torch.rand(shape, generator=g) * (spec.high - spec.low) + spec.low


@pytest.mark.parametrize("info", [INFO, INFO_UNCOND], ids=["conditional", "unconditional"])
def test_export_graphs_run_in_torch(info):
    model = tiny(info)
    graphs = model.export_graphs()
    assert set(graphs) == {"denoiser"} == set(model.spec().graphs), "samplers are serving code: no step graph"
    assert ("label" in graphs["denoiser"].inputs) == bool(info.class_names)
    assert model.manifest_sections()["diffusion"]["null_label"] == (K if info.class_names else 0)
    g = torch.Generator().manual_seed(0)
    graph = graphs["denoiser"]
    assert not graph.module.training
    args = [example(s, 3, g) for s in graph.inputs.values()]
    with torch.no_grad():
        out = graph.module(*args)
    assert out.shape == (3, 1, 32, 32) and torch.isfinite(out).all()
