import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.base import ConfigError, DataInfo
from trainer.models.pix2pix import Pix2Pix, Pix2PixConfig, UNet, UNetLevel

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny nets gain nothing from threads, and on a busy 2-core machine a second thread makes
    them 10-100x slower (threads wait on each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
INFO = DataInfo("paired", 3, 32)


def make(seed: int = 0, **kw) -> Pix2Pix:
    torch.manual_seed(seed)
    return Pix2Pix(Pix2PixConfig(**{"width": 8, **kw}), INFO, CPU)


def batches(n: int, bs: int = 2, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [(torch.rand(bs, 3, size, size, generator=g) * 2 - 1,
             torch.rand(bs, 3, size, size, generator=g) * 2 - 1) for _ in range(n)]


@pytest.mark.parametrize("size", [32, 64])
def test_unet_goes_down_to_1x1_with_capped_width(size):
    net = UNet(3, size, width=4)
    n_levels = size.bit_length() - 1
    assert sum(isinstance(m, UNetLevel) for m in net.modules()) == n_levels - 1
    assert max(m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)) == 4 * 8
    seen = []
    innermost = [m for m in net.modules() if isinstance(m, UNetLevel)][-1]
    innermost.down.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    assert net(torch.randn(2, 3, size, size)).shape == (2, 3, size, size)
    assert seen[0][-2:] == (1, 1)


def test_unet_at_256():
    net = UNet(3, 256, width=4).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 256, 256))
    assert out.shape == (1, 3, 256, 256) and out.abs().max() <= 1


@pytest.mark.parametrize("size", [32, 256])
def test_dropout_in_the_3_innermost_decoder_levels(size):
    levels = 3
    net = UNet(3, size, width=2)
    drops = [isinstance(m.up[-1], nn.Dropout) for m in net.modules() if isinstance(m, UNetLevel)]
    assert drops[-levels:] == [True] * levels and not any(drops[:-levels])
    assert all(m.p == 0.5 for m in net.modules() if isinstance(m, nn.Dropout))


def test_check():
    Pix2Pix.check(Pix2PixConfig(), INFO)
    Pix2Pix.check(Pix2PixConfig(), DataInfo("paired", 1, 256))
    with pytest.raises(ConfigError, match="--image-size 48"):
        Pix2Pix.check(Pix2PixConfig(), DataInfo("paired", 3, 48))
    with pytest.raises(ConfigError, match="--image-size 16"):
        Pix2Pix.check(Pix2PixConfig(), DataInfo("paired", 3, 16))
    with pytest.raises(ConfigError, match="channel"):
        Pix2Pix.check(Pix2PixConfig(), DataInfo("paired", 2, 32))
    with pytest.raises(ConfigError, match="--set gan_loss"):
        Pix2Pix.check(Pix2PixConfig(gan_loss="wgan"), INFO)
    with pytest.raises(ConfigError, match="--set norm"):
        Pix2Pix.check(Pix2PixConfig(norm="group"), INFO)


def test_defaults_follow_the_reference():
    c = Pix2PixConfig()
    assert (c.lr, c.beta1, c.lambda_l1, c.gan_loss, c.norm, c.dropout) == (2e-4, 0.5, 100.0, "bce", "batch", 0.5)
    m = make()
    assert m.optimizers["generator"].defaults["betas"] == (0.5, 0.999)
    # conditional D: input and output stacked on channels
    assert m.nets["discriminator"].net[0].in_channels == 6


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # no optimiser steps here
def test_lr_constant_for_the_first_half_then_linear_to_zero():
    m = make(steps=10)
    lrs = []
    for step in range(11):
        lrs += [opt.param_groups[0]["lr"] for opt in m.optimizers.values()]
        m.on_step_end(step)
    expected = [1, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0.0]
    assert lrs == pytest.approx([2e-4 * f for f in expected for _ in range(2)])
    with pytest.raises(ConfigError, match="--set decay_start"):
        Pix2Pix.check(Pix2PixConfig(decay_start=-0.1), INFO)


def test_train_step_returns_finite_detached_scalars():
    m = make()
    for i, batch in enumerate(batches(2)):
        losses = m.train_step(batch, i)
        m.on_step_end(i)
    assert set(losses) == {"g_gan", "g_l1", "d_loss"}
    for v in losses.values():
        assert v.shape == () and torch.isfinite(v) and not v.requires_grad


def test_l1_pulls_output_to_target():
    m = make(dropout=0.0, lr=1e-3)
    a = F.interpolate(batches(1, bs=4)[0][0][:, :, :4, :4], size=32, mode="bilinear")  # smooth
    batch = (a, -a)
    first = m.train_step(batch, 0)["g_l1"]
    for i in range(1, 30):
        last = m.train_step(batch, i)["g_l1"]
    assert last < 0.5 * first


def test_sample_is_input_output_target_in_eval_mode():
    m = make()
    a, b = batches(1, bs=3)[0]
    grid = m.sample((a, b), seed=0)
    assert grid.shape == (9, 3, 32, 32) and grid.abs().max() <= 1
    assert torch.equal(grid[0::3], a) and torch.equal(grid[2::3], b)
    assert all(net.training for net in m.nets.values())  # train mode restored
    G = m.nets["generator"].eval()
    with torch.no_grad():
        assert torch.allclose(grid[1::3], G(a))
    assert torch.equal(m.sample((a, b), seed=1), grid)  # deterministic: dropout off


def test_export_graph_is_an_eval_copy():
    m = make()
    graphs = m.export_graphs()
    assert set(graphs) == {"generator"}
    g = graphs["generator"]
    assert list(g.inputs) == ["source"] and list(g.outputs) == ["image"]
    assert g.inputs["source"].shape == (-1, 3, 32, 32) == g.outputs["image"].shape
    assert not g.module.training and m.nets["generator"].training
    a, b = batches(1, bs=3)[0]
    with torch.no_grad():
        out = g.module(a)
    assert out.shape == (3, 3, 32, 32)
    assert torch.allclose(out, m.sample((a, b), 0)[1::3])


def test_resume_is_exact():
    data = batches(6)
    m = make(seed=0)
    for i in range(3):
        m.train_step(data[i], i)
        m.on_step_end(i)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    rng = torch.get_rng_state()  # the loop saves and restores it (dropout draws from it)
    straight = []
    for i in range(3, 6):
        straight.append(m.train_step(data[i], i))
        m.on_step_end(i)

    resumed = make(seed=1)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf))
    torch.set_rng_state(rng)
    for i in range(3, 6):
        losses = resumed.train_step(data[i], i)
        resumed.on_step_end(i)
        for k, v in losses.items():
            assert abs(v.item() - straight[i - 3][k].item()) <= 1e-6, (i, k)


def test_discriminator_loss_is_the_halved_bce():
    m = make()
    a, b = batches(1)[0]
    D = m.nets["discriminator"]
    # with a zero-output D, both BCE terms are log 2
    for p in D.parameters():
        nn.init.zeros_(p)
    losses = m.train_step((a, b), 0)
    assert losses["d_loss"].item() == pytest.approx(F.softplus(torch.tensor(0.0)).item())
