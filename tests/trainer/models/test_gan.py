"""The GAN family: both architectures, all three losses, conditional and not."""
from __future__ import annotations

import pytest
import torch

from trainer.layers import GAN_LOSSES
from trainer.models.base import ConfigError, DataInfo
from trainer.models.gan import GAN, GANConfig, mode_seeking_loss

CPU = torch.device("cpu")
DIGITS = tuple(str(i) for i in range(10))
ARCHS = ("mlp", "dcgan")


def tiny(**kw) -> GANConfig:
    return GANConfig(**{"width": 8, "z_dim": 8, "batch_size": 8, **kw})


def info(classes=DIGITS, channels=1, size=32) -> DataInfo:
    return DataInfo("images", channels, size, classes)


def batch(i: DataInfo, n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, i.channels, i.size, i.size, generator=g) * 2 - 1
    y = torch.randint(0, max(i.num_classes, 1), (n,), generator=g)
    return x, y


def make(config=None, i=None, seed=0) -> GAN:
    torch.manual_seed(seed)
    config, i = config or tiny(), i or info()
    GAN.check(config, i)
    return GAN(config, i, CPU)


@pytest.mark.parametrize("classes, conditional, expected", [
    (DIGITS, None, True), (DIGITS, False, False), ((), None, False), (DIGITS, True, True)])
def test_conditional_resolution(classes, conditional, expected):
    assert make(tiny(conditional=conditional), info(classes)).conditional is expected


@pytest.mark.parametrize("conditional", [True, False])
@pytest.mark.parametrize("loss", GAN_LOSSES)
@pytest.mark.parametrize("arch", ARCHS)
def test_train_step_updates_both_nets_with_finite_losses(arch, loss, conditional):
    gan = make(tiny(arch=arch, loss=loss, conditional=conditional))
    before = {k: [p.clone() for p in net.parameters()] for k, net in gan.nets.items()}
    losses = gan.train_step(batch(info()), step=0)
    assert set(losses) == {"d_loss", "g_loss", "d_real", "d_fake"} | ({"mode_seeking"} if conditional else set())
    for v in losses.values():
        assert v.dim() == 0 and torch.isfinite(v) and not v.requires_grad
    for k, net in gan.nets.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[k], net.parameters())), k


@pytest.mark.parametrize("arch, size", [("dcgan", 64), ("mlp", 28)])
def test_other_sizes_and_rgb(arch, size):
    i = info(channels=3, size=size)
    gan = make(tiny(arch=arch), i)
    gan.train_step(batch(i), 0)
    assert gan.sample(batch(i, n=4), seed=0).shape == (4, 3, size, size)


def test_mode_seeking_loss_rewards_images_that_move_with_z():
    za, zb = torch.zeros(4, 8), torch.ones(4, 8)
    same = torch.zeros(4, 1, 4, 4)
    assert mode_seeking_loss(same, same, za, zb).item() == pytest.approx(1e5)
    apart = mode_seeking_loss(same, same + 0.5, za, zb).item()
    assert apart == pytest.approx(2.0, rel=1e-4) and apart < mode_seeking_loss(same, same + 0.1, za, zb).item()


def test_mode_seeking_is_off_at_zero_weight_and_for_unconditional_models():
    assert "mode_seeking" not in make(tiny(mode_seeking=0.0)).train_step(batch(info()), 0)
    assert "mode_seeking" not in make(tiny(conditional=False)).train_step(batch(info()), 0)
    odd = make(tiny()).train_step(batch(info(), n=7), 0)  # an odd batch pairs 3 of its 7 fakes
    assert torch.isfinite(odd["mode_seeking"])


@pytest.mark.parametrize("arch", ARCHS)
def test_hinge_and_least_squares_losses_are_non_negative(arch):
    gan = make(tiny(arch=arch, loss="hinge", conditional=False))
    losses = gan.train_step(batch(info()), 0)
    assert losses["d_loss"].item() >= 0  # hinge terms are non-negative
    gan = make(tiny(arch=arch, loss="lsgan", conditional=False))
    losses = gan.train_step(batch(info()), 0)
    assert losses["g_loss"].item() >= 0


@pytest.mark.parametrize("conditional", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_sample_is_deterministic_in_range_and_restores_train_mode(arch, conditional):
    gan = make(tiny(arch=arch, conditional=conditional))
    gan.train_step(batch(info()), 0)
    b = batch(info(), n=12)
    rng = torch.get_rng_state()
    a, c = gan.sample(b, seed=3), gan.sample(b, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert a.shape == (12, 1, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, c) and not torch.equal(a, gan.sample(b, seed=4))
    assert all(net.training for net in gan.nets.values())


def test_conditional_sample_cycles_labels_and_the_label_matters():
    gan = make(tiny(conditional=True))
    gan.train_step(batch(info()), 0)
    images = gan.sample(batch(info(), n=20), seed=1)
    z = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
    g = gan.export_graphs()["generator"].module
    torch.testing.assert_close(images, g(z, torch.arange(20) % 10))
    assert not torch.allclose(g(z[:1], torch.tensor([1])), g(z[:1], torch.tensor([2])))


@pytest.mark.parametrize("arch", ARCHS)
def test_discriminator_projection_uses_the_label(arch):
    gan = make(tiny(arch=arch, conditional=True))
    d = gan.nets["discriminator"].eval()
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        assert d(x, torch.tensor([0])).item() != d(x, torch.tensor([1])).item()


@pytest.mark.parametrize("conditional", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_export_graph_runs_with_declared_specs(arch, conditional):
    gan = make(tiny(arch=arch, conditional=conditional), info(channels=3))
    gan.train_step(batch(info(channels=3)), 0)
    graphs = gan.export_graphs()
    assert set(graphs) == {"generator"}
    graph = graphs["generator"]
    assert list(graph.inputs) == (["z", "label"] if conditional else ["z"])
    assert graph.inputs["z"].shape == (-1, 8) and graph.inputs["z"].low == -3 and graph.inputs["z"].high == 3
    if conditional:
        assert graph.inputs["label"].dtype == "int64" and graph.inputs["label"].high == 10
    assert graph.outputs["image"].shape == (-1, 3, 32, 32)
    assert not graph.module.training
    args = [torch.randn(5, 8)] + ([torch.randint(0, 10, (5,))] if conditional else [])
    out = graph.module(*args)
    assert out.shape == (5, 3, 32, 32) and out.abs().max() <= 1
    torch.testing.assert_close(graph.module(*args)[:2], graph.module(*[a[:2] for a in args]))  # no batch stats
    assert all(net.training for net in gan.nets.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_export_matches_torch(tmp_path, arch):
    ort = pytest.importorskip("onnxruntime")
    gan = make(tiny(arch=arch, conditional=True))
    gan.train_step(batch(info()), 0)
    graph = gan.export_graphs()["generator"]
    z, label = torch.randn(3, 8), torch.tensor([0, 5, 9])
    batch_dim = torch.export.Dim("batch")
    path = tmp_path / "generator.onnx"
    torch.onnx.export(graph.module, (z, label), str(path), dynamo=True, external_data=False, opset_version=18,
                      input_names=list(graph.inputs), output_names=list(graph.outputs),
                      dynamic_shapes=({0: batch_dim}, {0: batch_dim}))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"z": z.numpy(), "label": label.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), graph.module(z, label), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch, loss, conditional", [("dcgan", "bce", True), ("mlp", "hinge", False)])
def test_resume_is_exact(arch, loss, conditional):
    config, i = tiny(arch=arch, loss=loss, conditional=conditional), info()
    batches = [batch(i, seed=s) for s in range(6)]

    straight = make(config, i)
    torch.manual_seed(123)
    expected = [straight.train_step(b, s) for s, b in enumerate(batches)]

    first = make(config, i)
    torch.manual_seed(123)
    for s, b in enumerate(batches[:3]):
        first.train_step(b, s)
    state, rng = first.state_dict(), torch.get_rng_state()
    resumed = make(config, i, seed=99)
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    got = [resumed.train_step(b, s) for s, b in enumerate(batches[3:], start=3)]
    for want, have in zip(expected[3:], got):
        for k in want:
            assert have[k].item() == pytest.approx(want[k].item(), abs=1e-6, rel=1e-6)


def test_weights_use_the_dcgan_init():
    gan = make(GANConfig(conditional=False), info())
    convs = [m for m in gan.nets["generator"].modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert all(abs(m.weight.std().item() - 0.02) < 0.005 for m in convs)


@pytest.mark.parametrize("config, data, message", [
    (tiny(arch="stylegan"), info(), "--set arch=stylegan"),
    (tiny(loss="wgan"), info(), "--set loss=wgan"),
    (tiny(), info(size=48), "--image-size 48 is not supported by dcgan"),
    (tiny(), info(size=16), "--image-size 16"),
    (tiny(), info(size=512), "--image-size 512"),
    (tiny(), info(channels=4), "channels"),
    (tiny(conditional=True), info(classes=()), "--set conditional"),
    (tiny(z_dim=0), info(), "--set z_dim"),
    (tiny(width=0), info(), "--set width"),
    (tiny(mode_seeking=-1.0), info(), "--set mode_seeking"),
])
def test_check_rejects_with_a_message_naming_the_option(config, data, message):
    with pytest.raises(ConfigError, match=message):
        GAN.check(config, data)


def test_check_accepts_any_size_for_the_mlp():
    GAN.check(tiny(arch="mlp"), info(size=28))
    GAN.check(tiny(arch="mlp"), info(size=48, channels=3))
