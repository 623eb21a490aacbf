"""The VAE family: shapes, losses, sampling, export modules, resume, config checks and the ELBO maths."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.models.base import ConfigError, DataInfo
from trainer.models.vae import VAE, VAEConfig, kl_divergence, reconstruction_loss

CPU = torch.device("cpu")
DIGITS = tuple(str(i) for i in range(10))


def tiny(**kw) -> VAEConfig:
    return VAEConfig(**{"width": 8, "latent_dim": 4, "batch_size": 8, **kw})


def info(classes=DIGITS, channels=1, size=32) -> DataInfo:
    return DataInfo("images", channels, size, classes)


def batch(i: DataInfo, n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, i.channels, i.size, i.size, generator=g) * 2 - 1
    y = torch.randint(0, max(i.num_classes, 1), (n,), generator=g)
    return x, y


def make(config=None, i=None, seed=0) -> VAE:
    torch.manual_seed(seed)
    config, i = config or tiny(), i or info()
    VAE.check(config, i)
    return VAE(config, i, CPU)


@pytest.mark.parametrize("classes, conditional, expected", [
    (DIGITS, None, True), (DIGITS, False, False), ((), None, False), (DIGITS, True, True)])
def test_conditional_resolution(classes, conditional, expected):
    assert make(tiny(conditional=conditional), info(classes)).conditional is expected


@pytest.mark.parametrize("conditional", [True, False])
@pytest.mark.parametrize("channels, size", [(1, 32), (3, 64)])
def test_train_step_returns_finite_detached_losses(conditional, channels, size):
    i = info(channels=channels, size=size)
    vae = make(tiny(conditional=conditional, beta=0.5), i)
    before = [p.clone() for p in vae.nets["decoder"].parameters()]
    losses = vae.train_step(batch(i), step=0)
    assert set(losses) == {"loss", "recon", "kl"}
    for v in losses.values():
        assert v.dim() == 0 and torch.isfinite(v) and not v.requires_grad
    assert losses["loss"].item() == pytest.approx(losses["recon"].item() + 0.5 * losses["kl"].item(), rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, vae.nets["decoder"].parameters()))


def test_loss_decreases_on_a_fixed_batch():
    vae = make(tiny(conditional=False))
    b = batch(info(), n=16)
    first = vae.train_step(b, 0)["loss"].item()
    for s in range(1, 30):
        last = vae.train_step(b, s)["loss"].item()
    assert last < first


@pytest.mark.parametrize("conditional", [True, False])
def test_sample_is_deterministic_in_range_and_restores_train_mode(conditional):
    vae = make(tiny(conditional=conditional))
    b = batch(info(), n=12)
    rng = torch.get_rng_state()
    a, c = vae.sample(b, seed=3), vae.sample(b, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is the loop's, not ours
    assert a.shape == (12, 1, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, c) and not torch.equal(a, vae.sample(b, seed=4))
    assert all(net.training for net in vae.nets.values())


def test_conditional_sample_cycles_labels():
    vae = make(tiny(conditional=True))
    images = vae.sample(batch(info(), n=20), seed=1)
    z = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
    vae.train(False)
    expected = torch.tanh(vae.nets["decoder"](z, torch.arange(20) % 10))
    torch.testing.assert_close(images, expected)


@pytest.mark.parametrize("conditional", [True, False])
def test_export_graphs_run_with_declared_specs(conditional):
    vae = make(tiny(conditional=conditional), info(channels=3))
    graphs = vae.export_graphs()
    assert set(graphs) == {"encoder", "decoder"}
    label_in = ["label"] if conditional else []
    assert list(graphs["encoder"].inputs) == ["image", *label_in]
    assert list(graphs["decoder"].inputs) == ["z", *label_in]
    assert list(graphs["encoder"].outputs) == ["mean", "logvar"]
    assert list(graphs["decoder"].outputs) == ["image"]
    if conditional:
        assert graphs["decoder"].inputs["label"].dtype == "int64"
        assert graphs["decoder"].inputs["label"].high == 10
    for graph in graphs.values():
        assert not graph.module.training
        args = [example(spec, 5) for spec in graph.inputs.values()]
        out = graph.module(*args)
        out = out if isinstance(out, tuple) else (out,)
        for tensor, spec in zip(out, graph.outputs.values()):
            assert tensor.shape == (5, *spec.shape[1:])
    assert graphs["encoder"].inputs["image"].shape == (-1, 3, 32, 32)
    assert graphs["decoder"].inputs["z"].shape == (-1, 4)
    assert all(net.training for net in vae.nets.values())  # exporting leaves the live nets alone


def example(spec, n):
    shape = (n, *spec.shape[1:])
    if spec.dtype == "int64":
        return torch.randint(int(spec.low), int(spec.high), shape)
    return torch.rand(shape) * (spec.high - spec.low) + spec.low


def test_export_matches_reconstruct():
    vae = make(tiny(conditional=True))
    x, y = batch(info())
    graphs = vae.export_graphs()
    mean, _ = graphs["encoder"].module(x, y)
    torch.testing.assert_close(graphs["decoder"].module(mean, y), vae.reconstruct(x, y))


def test_onnx_export_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    vae = make(tiny(conditional=True))
    graph = vae.export_graphs()["decoder"]
    z, label = torch.randn(3, 4), torch.tensor([0, 5, 9])
    batch_dim = torch.export.Dim("batch")
    path = tmp_path / "decoder.onnx"
    torch.onnx.export(graph.module, (z, label), str(path), dynamo=True, external_data=False, opset_version=18,
                      input_names=list(graph.inputs), output_names=list(graph.outputs),
                      dynamic_shapes=({0: batch_dim}, {0: batch_dim}))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"z": z.numpy(), "label": label.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), graph.module(z, label), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("conditional", [True, False])
def test_resume_is_exact(conditional):
    config, i = tiny(conditional=conditional), info()
    batches = [batch(i, seed=s) for s in range(6)]

    straight = make(config, i)
    torch.manual_seed(123)
    expected = [straight.train_step(b, s) for s, b in enumerate(batches)]

    first = make(config, i)
    torch.manual_seed(123)
    for s, b in enumerate(batches[:3]):
        first.train_step(b, s)
    state, rng = first.state_dict(), torch.get_rng_state()
    resumed = make(config, i, seed=99)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    got = [resumed.train_step(b, s) for s, b in enumerate(batches[3:], start=3)]
    for want, have in zip(expected[3:], got):
        for k in want:
            assert have[k].item() == pytest.approx(want[k].item(), abs=1e-6, rel=1e-6)


@pytest.mark.parametrize("config, data, message", [
    (tiny(), info(size=48), "--image-size 48"),
    (tiny(), info(size=16), "--image-size 16"),
    (tiny(), info(size=512), "--image-size 512"),
    (tiny(), info(channels=2), "channels"),
    (tiny(conditional=True), info(classes=()), "--set conditional"),
    (tiny(width=0), info(), "--set width"),
    (VAEConfig(latent_dim=0), info(), "--set latent_dim"),
    (VAEConfig(beta=-1.0), info(), "--set beta"),
])
def test_check_rejects_with_a_message_naming_the_option(config, data, message):
    with pytest.raises(ConfigError, match=message):
        VAE.check(config, data)


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_check_accepts_powers_of_two(size):
    VAE.check(tiny(), info(size=size, channels=3))


def test_kl_divergence_matches_the_closed_form():
    assert kl_divergence(torch.zeros(4, 3), torch.zeros(4, 3)).item() == 0.0
    mean, logvar = torch.randn(5, 3), torch.randn(5, 3)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    expected = torch.distributions.kl_divergence(q, p).sum(1).mean()
    torch.testing.assert_close(kl_divergence(mean, logvar), expected)


def test_reconstruction_loss_is_bce_of_the_tanh_image_on_the_unit_scale():
    h = torch.randn(4, 1, 8, 8)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    image01 = (torch.tanh(h) + 1) / 2
    expected = F.binary_cross_entropy(image01, (x + 1) / 2, reduction="sum") / 4
    torch.testing.assert_close(reconstruction_loss(h, x), expected)
    # the best reconstruction of a binary image costs (almost) nothing
    target = torch.sign(torch.randn(2, 1, 4, 4))
    assert reconstruction_loss(target * 20.0, target).item() < 1e-6 * math.prod(target.shape)


def test_conditional_decoder_uses_the_label():
    vae = make(tiny(conditional=True))
    decoder = vae.export_graphs()["decoder"].module
    z = torch.randn(1, 4).repeat(2, 1)
    out = decoder(z, torch.tensor([1, 7]))
    assert not torch.allclose(out[0], out[1])
