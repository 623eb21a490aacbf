import io

import pytest
import torch

from trainer.models.base import ConfigError, DataInfo
from trainer.models.cyclegan import CycleGAN, CycleGANConfig, ImagePool, ResnetGenerator

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny nets gain nothing from threads, and on a busy 2-core machine a second thread makes
    them 10-100x slower (threads wait on each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
INFO = DataInfo("unpaired", 3, 32)


def make(seed: int = 0, **kw) -> CycleGAN:
    torch.manual_seed(seed)
    return CycleGAN(CycleGANConfig(**{"width": 4, "n_blocks": 1, **kw}), INFO, CPU)


def batches(n: int, bs: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [(torch.rand(bs, 3, 32, 32, generator=g) * 2 - 1,
             torch.rand(bs, 3, 32, 32, generator=g) * 2 - 1) for _ in range(n)]


def test_resnet_generator_shapes():
    net = ResnetGenerator(3, width=4, n_blocks=2)
    seen = []
    net.net[10].register_forward_hook(lambda mod, inp, out: seen.append(out.shape))  # first residual block
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3, 32, 32) and out.abs().max() <= 1
    assert seen == [(2, 16, 8, 8)]  # two stride-2 downsamples, 4 x width channels


@pytest.mark.parametrize("size, setting, expected", [(32, -1, 1), (64, -1, 2), (256, -1, 2), (32, 2, 2), (32, 0, 0)])
def test_generator_downsamplings(size, setting, expected):
    torch.manual_seed(0)
    m = CycleGAN(CycleGANConfig(width=4, n_blocks=1, downsamplings=setting), DataInfo("unpaired", 3, size), CPU)
    net = m.nets["generator_ab"]
    strided = [mod for mod in net.modules() if isinstance(mod, torch.nn.Conv2d) and mod.stride == (2, 2)]
    assert len(strided) == expected
    x = torch.rand(2, 3, size, size) * 2 - 1
    assert net(x).shape == x.shape


def test_residual_generator_is_the_input_plus_a_change():
    net = ResnetGenerator(3, width=4, n_blocks=1, residual=True, downsamplings=1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.nn.init.zeros_(net.net[-1].weight)
    torch.nn.init.zeros_(net.net[-1].bias)
    assert torch.equal(net(x), x)  # no change: the input itself, whatever it holds
    torch.nn.init.constant_(net.net[-1].bias, 5.0)
    assert torch.equal(net(x), torch.ones_like(x))  # clamped to the image range


def test_check():
    CycleGAN.check(CycleGANConfig(), INFO)
    CycleGAN.check(CycleGANConfig(), DataInfo("unpaired", 1, 256))
    with pytest.raises(ConfigError, match="--image-size 100"):
        CycleGAN.check(CycleGANConfig(), DataInfo("unpaired", 3, 100))
    with pytest.raises(ConfigError, match="channel"):
        CycleGAN.check(CycleGANConfig(), DataInfo("unpaired", 4, 32))
    with pytest.raises(ConfigError, match="--set decay_start"):
        CycleGAN.check(CycleGANConfig(decay_start=1.5), INFO)
    with pytest.raises(ConfigError, match="--steps"):
        CycleGAN.check(CycleGANConfig(steps=0), INFO)
    with pytest.raises(ConfigError, match="--set downsamplings=4"):
        CycleGAN.check(CycleGANConfig(downsamplings=4), INFO)
    with pytest.raises(ConfigError, match="--set norm"):
        CycleGAN.check(CycleGANConfig(norm="group"), INFO)
    with pytest.raises(ConfigError, match="--set cycle_b_scale"):
        CycleGAN.check(CycleGANConfig(cycle_b_scale=-0.5), INFO)
    with pytest.raises(ConfigError, match="--set cycle_warmup"):
        CycleGAN.check(CycleGANConfig(cycle_warmup=-1), INFO)


def test_cycle_b_scale_changes_only_the_weight_of_the_b_cycle():
    def after_one_step(**kw):
        torch.manual_seed(0)
        m = make(**kw)
        m.train_step(batches(1)[0], 0)
        return m.nets["generator_ab"].state_dict()

    default, scaled_1, scaled_0 = after_one_step(), after_one_step(cycle_b_scale=1.0), after_one_step(cycle_b_scale=0.0)
    assert all(torch.equal(default[k], scaled_1[k]) for k in default)
    assert any(not torch.equal(default[k], scaled_0[k]) for k in default)


def test_cycle_warmup_ramps_the_cycle_and_identity_weights():
    def after_step(step, **kw):
        m = make(**kw)
        m.train_step(batches(1)[0], step)
        return m.nets["generator_ab"].state_dict()

    def same(x, y):
        return all(torch.allclose(x[k], y[k], atol=1e-7) for k in x)

    # step 0 of a warm-up: no cycle or identity term; halfway: half of lambda_cycle; after it: the full weight
    assert same(after_step(0, cycle_warmup=100), after_step(0, lambda_cycle=0.0))
    assert not same(after_step(0, cycle_warmup=100), after_step(0))
    assert same(after_step(50, cycle_warmup=100), after_step(50, lambda_cycle=5.0))
    assert same(after_step(100, cycle_warmup=100), after_step(100))


def test_defaults_follow_the_reference():
    c = CycleGANConfig()
    assert (c.lr, c.beta1, c.gan_loss, c.lambda_cycle, c.lambda_identity, c.pool_size, c.n_blocks) == (
        2e-4, 0.5, "lsgan", 10.0, 0.5, 50, 6)


def test_train_step_returns_finite_detached_scalars():
    m = make(steps=10)
    for i, batch in enumerate(batches(2)):
        losses = m.train_step(batch, i)
        m.on_step_end(i)
    assert set(losses) == {"g_gan", "cycle", "identity", "d_a", "d_b"}
    for v in losses.values():
        assert v.shape == () and torch.isfinite(v) and not v.requires_grad
    assert losses["identity"] > 0


def test_identity_off():
    losses = make(lambda_identity=0.0).train_step(batches(1)[0], 0)
    assert losses["identity"] == 0 and torch.isfinite(losses["cycle"])


def test_pool_returns_inputs_until_full_then_half_stored():
    torch.manual_seed(0)
    pool = ImagePool(50)
    first = torch.randn(50, 3, 4, 4)
    assert torch.equal(pool.query(first[:30]), first[:30])
    assert torch.equal(pool.query(first[30:]), first[30:])
    assert len(pool.images) == 50
    before = list(pool.images)
    new = torch.randn(2000, 3, 4, 4)
    out = torch.cat([pool.query(new[i:i + 20]) for i in range(0, 2000, 20)])
    assert len(pool.images) == 50
    passed = (out == new).flatten(1).all(1)
    assert 0.45 < passed.float().mean() < 0.55  # probability 0.5 of swapping
    # a swapped-out image is one stored earlier: from the first fill or from an earlier query
    history = torch.cat([torch.stack(before), new])
    for img in out[~passed][:50]:
        assert (history == img).flatten(1).all(1).any()


def test_pool_of_size_zero_passes_through():
    x = torch.randn(3, 3, 4, 4)
    assert ImagePool(0).query(x) is x


def test_pool_is_exact_after_resume():
    torch.manual_seed(1)
    pool = ImagePool(5)
    for _ in range(4):
        pool.query(torch.randn(2, 3, 4, 4))
    buf = io.BytesIO()
    torch.save(pool.state(), buf)
    rng = torch.get_rng_state()
    new = [torch.randn(2, 3, 4, 4) for _ in range(10)]
    torch.set_rng_state(rng)
    straight = [pool.query(x) for x in new]
    fresh = ImagePool(5)
    buf.seek(0)
    fresh.load(torch.load(buf), CPU)
    torch.set_rng_state(rng)
    assert all(torch.equal(fresh.query(x), y) for x, y in zip(new, straight))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # no optimiser steps here
@pytest.mark.parametrize("decay_start, expected", [
    (0.5, [1, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0.0]),
    (0.0, [1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]),
    (1.0, [1] * 11),
])
def test_lr_constant_then_linear_to_zero(decay_start, expected):
    m = make(steps=10, decay_start=decay_start)
    lrs = []
    for step in range(11):
        lrs += [opt.param_groups[0]["lr"] for opt in m.optimizers.values()]
        m.on_step_end(step)
    assert lrs == pytest.approx([2e-4 * f for f in expected for _ in range(2)])


def test_sample_is_input_translation_reconstruction():
    m = make()
    a, b = batches(1, bs=3)[0]
    grid = m.sample((a, b), seed=0)
    assert grid.shape == (9, 3, 32, 32) and grid.abs().max() <= 1
    assert torch.equal(grid[0::3], a)
    with torch.no_grad():
        fake = m.nets["generator_ab"](a)
        assert torch.allclose(grid[1::3], fake)
        assert torch.allclose(grid[2::3], m.nets["generator_ba"](fake))
    assert all(net.training for net in m.nets.values())


def test_export_graphs():
    m = make()
    graphs = m.export_graphs()
    assert set(graphs) == {"generator_ab", "generator_ba"}
    x = batches(1, bs=3)[0][0]
    for name, g in graphs.items():
        assert list(g.inputs) == ["source"] and list(g.outputs) == ["image"]
        assert g.inputs["source"].shape == (-1, 3, 32, 32) == g.outputs["image"].shape
        assert not g.module.training and m.nets[name].training
        with torch.no_grad():
            assert torch.allclose(g.module(x), m.nets[name](x))


def test_resume_is_exact():
    # a pool of 2 fills in the first step, and 8 steps put the resumed half in the LR decay
    kw = {"pool_size": 2, "steps": 8}
    data = batches(8)
    m = make(seed=0, **kw)
    for i in range(4):
        m.train_step(data[i], i)
        m.on_step_end(i)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    rng = torch.get_rng_state()  # the loop saves and restores it (the pool draws from it)
    straight = []
    for i in range(4, 8):
        straight.append(m.train_step(data[i], i))
        m.on_step_end(i)

    resumed = make(seed=1, **kw)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf))
    torch.set_rng_state(rng)
    for i in range(4, 8):
        losses = resumed.train_step(data[i], i)
        resumed.on_step_end(i)
        for k, v in losses.items():
            assert abs(v.item() - straight[i - 4][k].item()) <= 1e-6, (i, k)
    assert resumed.optimizers["generators"].param_groups[0]["lr"] == 0.0
