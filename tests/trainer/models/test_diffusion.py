"""The diffusion family: U-Net, training step, EMA, resume, the step module's maths, ONNX export."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from trainer.models.base import ConfigError, DataInfo
from trainer.models.diffusion import (
    SAMPLERS,
    Diffusion,
    DiffusionConfig,
    DiffusionStep,
    UNet,
    alpha_bar_schedule,
    run_sampler,
    timestep_pairs,
)

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
def step() -> DiffusionStep:
    torch.manual_seed(0)
    model = tiny()
    randomise(model.ema)
    return model.step_module()


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


# --- the step module -----------------------------------------------------------------------------

def test_guidance_one_is_conditional_zero_is_unconditional(step):
    x, label = batch(4)
    t = torch.tensor([999, 500, 10, 0])
    with torch.no_grad():
        cond = step.unet(x, t, label)
        uncond = step.unet(x, t, full(4, K))
        assert torch.allclose(step.model_output(x, t, label, full(4, 1.0, torch.float32)), cond, atol=1e-5)
        assert torch.allclose(step.model_output(x, t, label, full(4, 0.0, torch.float32)), uncond, atol=1e-5)
        w = torch.tensor([0.0, 1.0, 2.5, 4.0])
        expected = uncond + w[:, None, None, None] * (cond - uncond)
        assert torch.allclose(step.model_output(x, t, label, w), expected, atol=1e-5)
        assert not torch.allclose(cond, uncond, atol=1e-3)  # the label matters


def tables(step: DiffusionStep) -> torch.Tensor:
    return alpha_bar_schedule("linear", step.T)  # float64; the fixture's schedule


def ref_guided(step, x, t, label, w) -> torch.Tensor:
    """The guided U-Net output the references use (the U-Net itself is not what they check)."""
    t = torch.as_tensor(t).expand(x.shape[0])
    with torch.no_grad():
        return step.model_output(x.float(), t, label, full(x.shape[0], w, torch.float32)).double()


def test_ddim_eta0_deterministic_and_matches_reference(step):
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(3, 1, 32, 32, generator=g)
    label = torch.tensor([0, 1, 2])
    with torch.no_grad():
        a = run_sampler(step, x_T, label, "ddim", 5, 2.0, 0.0, torch.Generator().manual_seed(0))
        b = run_sampler(step, x_T, label, "ddim", 5, 2.0, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)  # eta = 0: the noise input is not used

    ab = tables(step)
    x = x_T.double()
    for t, tp in timestep_pairs(5, step.T):  # Song et al. eq. 12, eta = 0
        ab_t, ab_p = ab[t], (ab[tp] if tp >= 0 else torch.tensor(1.0, dtype=torch.float64))
        eps = ref_guided(step, x, t, label, 2.0)
        x0 = ((x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()).clamp(-1, 1)
        eps = (x - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()
        x = ab_p.sqrt() * x0 + (1 - ab_p).sqrt() * eps
    assert torch.allclose(a.double(), x, atol=1e-4)


def test_ddim_eta_noise(step):
    x, label = batch(2)
    noise = torch.randn(2, 1, 32, 32)
    args = {"t": full(2, 500), "t_prev": full(2, 400), "label": label, "guidance": full(2, 1.0, torch.float32),
            "sampler": full(2, SAMPLERS["ddim"]), "x0_prev": torch.zeros_like(x), "t_last": full(2, -1)}
    ab = tables(step)
    with torch.no_grad():
        noisy, x0 = step(x, eta=full(2, 1.0, torch.float32), noise=noise, **args)
        plain, _ = step(x, eta=full(2, 0.0, torch.float32), noise=noise, **args)
    x0 = x0.double()
    sigma = ((1 - ab[400]) / (1 - ab[500]) * (1 - ab[500] / ab[400])).sqrt()  # Song et al. eq. 16, eta = 1
    eps = (x.double() - ab[500].sqrt() * x0) / (1 - ab[500]).sqrt()
    mean = ab[400].sqrt() * x0 + (1 - ab[400] - sigma**2).sqrt() * eps
    assert torch.allclose(noisy.double(), mean + sigma * noise.double(), atol=1e-5)
    assert not torch.allclose(noisy, plain)


def test_ddpm_full_schedule_is_textbook_posterior(step):
    """t -> t-1 on the 1000-step schedule: q(x_{t-1} | x_t, x0) of Ho et al. eq. 6-7."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas, ab = 1 - betas, torch.cumprod(1 - betas, 0)
    x, label = batch(4)
    t = torch.tensor([999, 500, 37, 1])
    noise = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        out, x0 = step(x, t, t - 1, label, full(4, 1.5, torch.float32), full(4, 0.0, torch.float32), noise,
                       full(4, SAMPLERS["ddpm"]), torch.zeros_like(x), full(4, -1))
    eps = ref_guided(step, x, t, label, 1.5)
    for i in range(4):
        ti = int(t[i])
        x0_ref = ((x[i].double() - (1 - ab[ti]).sqrt() * eps[i]) / ab[ti].sqrt()).clamp(-1, 1)
        assert torch.allclose(x0[i].double(), x0_ref, atol=1e-4)
        mean = (ab[ti - 1].sqrt() * betas[ti] / (1 - ab[ti]) * x0_ref
                + alphas[ti].sqrt() * (1 - ab[ti - 1]) / (1 - ab[ti]) * x[i].double())
        var = betas[ti] * (1 - ab[ti - 1]) / (1 - ab[ti])
        assert torch.allclose(out[i].double(), mean + var.sqrt() * noise[i].double(), atol=1e-4)


def test_ddpm_and_dpm_final_step_returns_x0(step):
    x, label = batch(3)
    with torch.no_grad():
        out, x0 = step(x, full(3, 19), full(3, -1), label, full(3, 2.0, torch.float32),
                       full(3, 1.0, torch.float32), torch.randn_like(x), torch.tensor([0, 1, 2]),
                       torch.rand_like(x), full(3, 39))
    assert torch.allclose(out, x0, atol=1e-6)  # sigma = 0 on the final step, DPM-Solver first order


def test_dpm_solver_2m_matches_diffusers_formulas(step):
    g = torch.Generator().manual_seed(6)
    x_T = torch.randn(2, 1, 32, 32, generator=g)
    label = torch.tensor([2, 0])
    steps = 6
    with torch.no_grad():
        got = run_sampler(step, x_T, label, "dpmpp_2m", steps, 3.0, 0.0, None)

    # DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
    # final_sigmas_type="zero"), written out; model outputs converted to (clipped) x0
    ab = torch.cat([tables(step), torch.ones(1, dtype=torch.float64)])  # index -1: abar = 1
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    lam = torch.log(alpha) - torch.log(sigma)
    x, outputs, prev_t = x_T.double(), [], None
    for i, (s0, t) in enumerate(timestep_pairs(steps, step.T)):
        eps = ref_guided(step, x, s0, label, 3.0)
        outputs.append(((x - sigma[s0] * eps) / alpha[s0]).clamp(-1, 1))
        h = lam[t] - lam[s0]
        if i == 0 or t == -1:  # first step, and lower_order_final
            x = sigma[t] / sigma[s0] * x - alpha[t] * (torch.exp(-h) - 1.0) * outputs[-1]
        else:
            s1 = prev_t
            r0 = (lam[s0] - lam[s1]) / h
            d0, d1 = outputs[-1], (1.0 / r0) * (outputs[-1] - outputs[-2])
            x = (sigma[t] / sigma[s0] * x - alpha[t] * (torch.exp(-h) - 1.0) * d0
                 - 0.5 * (alpha[t] * (torch.exp(-h) - 1.0)) * d1)
        prev_t = s0
    assert torch.allclose(got.double(), x, atol=1e-4)


class Elementwise(torch.nn.Module):
    """A stand-in denoiser that is exactly batch-invariant (a conv net's float32 sums are not quite)."""

    num_classes = K

    def forward(self, x, t, label=None):
        return torch.tanh(x * (t[:, None, None, None] / 700.0) + 0.3 * label[:, None, None, None] - 0.5)


def mixed_rows(n: int = 6):
    """Rows at different steps, of different samplers, step counts, guidance and eta."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 1, 32, 32, generator=g)
    noise = torch.randn(n, 1, 32, 32, generator=g)
    x0_prev = torch.rand(n, 1, 32, 32, generator=g) * 2 - 1
    t = torch.tensor([999, 979, 666, 19, 332, 499])
    t_prev = torch.tensor([979, 959, 332, -1, -1, 249])  # 50, 50, 3, 50, 3 and 4 steps
    t_last = torch.tensor([-1, 999, 999, 39, 666, 749])
    label = torch.tensor([0, 1, 2, 3, 1, 0])  # 3 is the null class
    guidance = torch.tensor([3.0, 1.0, 0.0, 2.0, 4.5, 1.5])
    eta = torch.tensor([0.0, 1.0, 0.5, 0.3, 0.0, 1.0])
    sampler = torch.tensor([1, 0, 2, 1, 2, 1])
    return x, t, t_prev, label, guidance, eta, noise, sampler, x0_prev, t_last


def test_rows_are_independent():
    step = DiffusionStep(Elementwise(), alpha_bar_schedule("linear", 1000)).eval()
    args = mixed_rows()
    with torch.no_grad():
        together = step(*args)
        for i in range(len(args[0])):
            alone = step(*(a[i:i + 1] for a in args))
            for got, want in zip(together, alone):
                assert (got[i:i + 1] - want).abs().max() <= 1e-6


def test_rows_are_independent_with_the_unet(step):
    """The same with the U-Net: its output per row to 1e-5; the step outputs to 1e-5 times the
    eps -> x0 gain sigma_t / alpha_t (156 at t = 999), which amplifies float32 batch-size noise."""
    args = mixed_rows()
    x, t, _, label, guidance = args[:5]
    with torch.no_grad():
        out = step.model_output(x, t, label, guidance)
        together = step(*args)
        for i in range(len(x)):
            alone = step.model_output(x[i:i + 1], t[i:i + 1], label[i:i + 1], guidance[i:i + 1])
            assert (out[i:i + 1] - alone).abs().max() <= 1e-5
            gain = float(step.sqrt_1m_ab[t[i]] / step.sqrt_ab[t[i]])
            for got, want in zip(together, step(*(a[i:i + 1] for a in args))):
                assert (got[i:i + 1] - want).abs().max() <= 1e-5 * (1 + gain)


def test_unconditional_step_ignores_label_and_guidance():
    torch.manual_seed(0)
    model = tiny(INFO_UNCOND)
    randomise(model.ema)
    step = model.step_module()
    x = torch.randn(2, 1, 32, 32)
    common = (full(2, 500), full(2, 300))
    rest = (full(2, 0.0, torch.float32), torch.randn_like(x), full(2, 1), torch.zeros_like(x), full(2, -1))
    with torch.no_grad():
        a = step(x, *common, full(2, 0), full(2, 1.0, torch.float32), *rest)
        b = step(x, *common, full(2, 0), full(2, 4.0, torch.float32), *rest)
    assert torch.equal(a[0], b[0])


# --- export --------------------------------------------------------------------------------------

def example(spec, n: int, g: torch.Generator) -> torch.Tensor:
    shape = tuple(n if d == -1 else d for d in spec.shape)
    if spec.dtype == "int64":
        return torch.randint(int(spec.low), int(spec.high), shape, generator=g)
    return torch.rand(shape, generator=g) * (spec.high - spec.low) + spec.low


@pytest.mark.parametrize("info", [INFO, INFO_UNCOND], ids=["conditional", "unconditional"])
def test_export_graphs_run_in_torch(info):
    model = tiny(info)
    graphs = model.export_graphs()
    assert set(graphs) == {"denoiser", "step"}
    assert list(graphs["step"].inputs) == ["x_t", "t", "t_prev", "label", "guidance", "eta", "noise", "sampler",
                                           "x0_prev", "t_last"]
    assert ("label" in graphs["denoiser"].inputs) == bool(info.class_names)
    g = torch.Generator().manual_seed(0)
    for graph in graphs.values():
        assert not graph.module.training
        args = [example(s, 3, g) for s in graph.inputs.values()]
        with torch.no_grad():
            outs = graph.module(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        for out, spec in zip(outs, graph.outputs.values()):
            assert out.shape == (3, *spec.shape[1:]) and torch.isfinite(out).all()


def test_step_graph_onnx_parity(step):
    """The riskiest part: -1 gathers, torch.where, the doubled batch under a dynamic batch axis."""
    ort = pytest.importorskip("onnxruntime")
    model = tiny()
    model.ema.load_state_dict(step.unet.state_dict())
    graph = model.export_graphs()["step"]
    g = torch.Generator().manual_seed(0)
    args = tuple(example(s, 2, g) for s in graph.inputs.values())
    batch_dim = torch.export.Dim("batch")
    program = torch.onnx.export(graph.module, args, dynamo=True, external_data=False, opset_version=18,
                                input_names=list(graph.inputs), output_names=list(graph.outputs),
                                dynamic_shapes=tuple({0: batch_dim} for _ in args), verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        args = [example(s, n, g) for s in graph.inputs.values()]
        args[1] = torch.randint(1, step.T, (n,), generator=g)  # valid steps: t_last > t > t_prev
        args[2] = (args[1] - torch.randint(1, 300, (n,), generator=g)).clamp(min=-1)
        args[9] = torch.where(torch.arange(n) % 2 == 0, (args[1] + 100).clamp(max=step.T - 1), -1)
        args[7] = torch.arange(n) % 3
        with torch.no_grad():
            want = graph.module(*args)
        got = session.run(None, {k: a.numpy() for k, a in zip(graph.inputs, args)})
        for o, w in zip(got, want):
            assert o.shape == tuple(w.shape)
            assert np.abs(o - w.numpy()).max() <= 1e-4
    # a short DDIM loop through ONNX, against run_sampler
    x_T, label = torch.randn(2, 1, 32, 32), torch.tensor([0, 2])
    with torch.no_grad():
        want = run_sampler(graph.module, x_T, label, "ddim", 4, 3.0, 0.0, None)
    x, x0, t_last = x_T.numpy(), np.zeros_like(x_T.numpy()), -1
    for t, tp in timestep_pairs(4, step.T):
        feed = {"x_t": x, "t": np.full(2, t), "t_prev": np.full(2, tp), "label": label.numpy(),
                "guidance": np.full(2, 3.0, np.float32), "eta": np.zeros(2, np.float32),
                "noise": np.zeros_like(x), "sampler": np.full(2, 1), "x0_prev": x0, "t_last": np.full(2, t_last)}
        x, x0 = session.run(None, feed)
        t_last = t
    assert np.abs(x - want.numpy()).max() <= 1e-4
