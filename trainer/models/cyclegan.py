"""CycleGAN (Zhu et al. 2017): unpaired translation between domains A and B with cycle consistency.

Follows junyanz/pytorch-CycleGAN-and-pix2pix: two ResNet generators (reflection padding, instance
norm), two PatchGAN discriminators, least-squares GAN, cycle weight 10, identity weight 0.5 x 10,
a pool of 50 past fakes per discriminator, Adam(2e-4, 0.5), learning rate decayed linearly to zero
over the second half of training.

One departure, on by default (`--set residual=false` gives the reference's generator): the generators
output clamp(input + change) instead of tanh(features). The reference's generator has to rebuild every
pixel through instance norm, which divides each channel by its spread over the image and so keeps little
of a flat colour on a flat background: on the embedded stripes its translations (and the cycle's hidden
code) kept the stripes but turned every shape into a blurred blob of one colour. With the
input carried through, the generator only has to learn what differs between the domains.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.layers import GAN_LOSSES, PatchGAN, gan_loss, init_weights, norm_layer
from trainer.models.base import (
    ConfigError,
    DataInfo,
    ExportGraph,
    Family,
    FamilyConfig,
    TensorSpec,
    linear_decay,
    step_optimizer,
)
from trainer.models.pix2pix import check_image, triples


@dataclass(kw_only=True)
class CycleGANConfig(FamilyConfig):
    batch_size: int = 1  # the reference batch size
    width: int = 32  # base channels of all four nets (reference: 64; 32 is 4x cheaper on CPU at 32x32)
    n_blocks: int = 6  # residual blocks: the reference uses 6 below 256x256, 9 at 256
    norm: str = "instance"  # generators' normalisation: instance | batch | none
    residual: bool = True  # generators output clamp(input + change); false: the reference's tanh output
    downsamplings: int = -1  # generators' stride-2 stages; -1: the reference's 2, or 1 below 64x64
    gan_loss: str = "lsgan"
    lambda_cycle: float = 10.0
    # weight of the B->A->B cycle as a fraction of lambda_cycle (the reference's lambda_B / lambda_A). A plain
    # image cannot say where a striped one's stripes were, so a full-weight B->A->B cycle pays G_ba to hide
    # them in noise that a plain output should not have
    cycle_b_scale: float = 1.0
    lambda_identity: float = 0.5  # multiplied by lambda_cycle, as in the reference
    # steps over which the cycle and identity weights rise linearly from 0 to their values. Residual generators
    # without normalisation start as the identity, which meets both losses exactly; L1's gradient does not
    # shrink near that point, so at full weight it can outweigh the adversarial push for good (two runs in three
    # never left it). 0: full weight from the first step, as in the reference
    cycle_warmup: int = 0
    pool_size: int = 50  # past fakes shown to each discriminator (Shrivastava et al. 2017)
    beta1: float = 0.5
    steps: int = 10_000  # total training steps; the loop sets it from --steps
    decay_start: float = 0.5  # fraction of `steps` after which the learning rate falls linearly to 0


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, norm: str = "instance"):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), norm_layer(norm, dim), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), norm_layer(norm, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """c7s1-w, d2w, d4w, n_blocks x R4w, u2w, uw, c7s1-C, tanh (reference: ResnetGenerator)."""

    def __init__(self, channels: int, width: int = 64, n_blocks: int = 6, norm: str = "instance",
                 residual: bool = False, downsamplings: int = 2):
        super().__init__()
        self.residual = residual
        w = width
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(channels, w, 7),
                                   norm_layer(norm, w), nn.ReLU()]
        mults = [2**i for i in range(downsamplings)]
        for mult in mults:
            layers += [nn.Conv2d(w * mult, w * mult * 2, 3, 2, 1), norm_layer(norm, w * mult * 2),
                       nn.ReLU()]
        layers += [ResnetBlock(w * 2**downsamplings, norm) for _ in range(n_blocks)]
        for mult in reversed(mults):
            layers += [nn.ConvTranspose2d(w * mult * 2, w * mult, 3, 2, 1, output_padding=1),
                       norm_layer(norm, w * mult), nn.ReLU()]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(w, channels, 7)]
        if not residual:
            layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual:
            return torch.clamp(x + self.net(x), -1.0, 1.0)
        return self.net(x)


def generator_downsamplings(config: CycleGANConfig, size: int) -> int:
    """The reference's two stride-2 stages leave 64x64 of a 256x256 image but 8x8 of a 32x32 one, too
    coarse to say where a small shape's edge is: below 64x64, one stage (16x16 at 32x32)."""
    if config.downsamplings >= 0:
        return config.downsamplings
    return 2 if size >= 64 else 1


class ImagePool:
    """A buffer of past generated images (reference: util/image_pool.py).

    Until full, each image is stored and returned. Then each image, with probability 0.5, is swapped
    for a random stored one (which is returned instead); otherwise it passes through. Draws use the
    global torch RNG so that the loop's RNG checkpointing makes resume exact.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.capacity == 0:
            return images
        out = []
        for image in images.detach():
            if len(self.images) < self.capacity:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand(()).item() < 0.5:
                i = int(torch.randint(self.capacity, ()).item())
                out.append(self.images[i])
                self.images[i] = image.clone()
            else:
                out.append(image)
        return torch.stack(out)

    def state(self) -> torch.Tensor | None:
        return torch.stack(self.images) if self.images else None

    def load(self, images: torch.Tensor | None, device: torch.device) -> None:
        self.images = [] if images is None else list(images.to(device).unbind())


class CycleGAN(Family):
    name = "cyclegan"
    Config = CycleGANConfig

    def __init__(self, config: CycleGANConfig, info: DataInfo, device: torch.device):
        super().__init__(config, info, device)
        c, ch = config, info.channels
        # G_ab: A -> B, G_ba: B -> A; D_a judges domain A images (real a vs G_ba(b)), D_b domain B.
        for name in ("generator_ab", "generator_ba"):
            net = ResnetGenerator(ch, c.width, c.n_blocks, c.norm, c.residual, generator_downsamplings(c, info.size))
            # N(0, 0.02) weights shrink an unnormalised net's signal at every layer: keep PyTorch's
            # fan-in scaled init there
            self.add_net(name, net if c.norm == "none" else init_weights(net))
        for name in ("discriminator_a", "discriminator_b"):
            self.add_net(name, init_weights(PatchGAN(ch, c.width, norm="instance", image_size=info.size)))
        # one optimiser per side over both networks, as in the reference
        betas = (c.beta1, 0.999)
        self.optimizers["generators"] = torch.optim.Adam(itertools.chain(
            self.nets["generator_ab"].parameters(), self.nets["generator_ba"].parameters()), c.lr, betas)
        self.optimizers["discriminators"] = torch.optim.Adam(itertools.chain(
            self.nets["discriminator_a"].parameters(), self.nets["discriminator_b"].parameters()), c.lr, betas)
        for name, opt in self.optimizers.items():
            self.schedulers[name] = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        self.pool_a = ImagePool(c.pool_size)  # fakes G_ba(b) shown to D_a
        self.pool_b = ImagePool(c.pool_size)  # fakes G_ab(a) shown to D_b

    def lr_factor(self, step: int) -> float:
        return linear_decay(step, self.config.steps, self.config.decay_start)

    @classmethod
    def check(cls, config: CycleGANConfig, info: DataInfo) -> None:
        check_image(cls.name, info)
        if config.width < 1:
            raise ConfigError(f"--set width={config.width} must be at least 1")
        if config.n_blocks < 0:
            raise ConfigError(f"--set n_blocks={config.n_blocks} must be at least 0")
        if config.norm not in ("instance", "batch", "none"):
            raise ConfigError(f"--set norm={config.norm} is not supported: use instance, batch or none")
        if config.gan_loss not in GAN_LOSSES:
            raise ConfigError(f"--set gan_loss={config.gan_loss} is not supported: use one of "
                              f"{', '.join(GAN_LOSSES)}")
        if config.downsamplings < -1 or info.size >> max(0, config.downsamplings) < 4:
            raise ConfigError(f"--set downsamplings={config.downsamplings}: use -1 (automatic) or 0 to "
                              f"{info.size.bit_length() - 3} for {info.size}x{info.size} images")
        if config.cycle_warmup < 0:
            raise ConfigError(f"--set cycle_warmup={config.cycle_warmup} must be at least 0")
        if config.cycle_b_scale < 0:
            raise ConfigError(f"--set cycle_b_scale={config.cycle_b_scale} must be at least 0")
        if config.pool_size < 0:
            raise ConfigError(f"--set pool_size={config.pool_size} must be at least 0")
        if config.steps < 1:
            raise ConfigError(f"--steps {config.steps} must be at least 1")
        if not 0 <= config.decay_start <= 1:
            raise ConfigError(f"--set decay_start={config.decay_start} must be a fraction in [0, 1]")

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        c = self.config
        a, b = (t.to(self.device) for t in batch)
        G_ab, G_ba = self.train_nets["generator_ab"], self.train_nets["generator_ba"]
        D_a, D_b = self.train_nets["discriminator_a"], self.train_nets["discriminator_b"]
        fake_b, fake_a = G_ab(a), G_ba(b)

        # generators: fool both discriminators, reconstruct through the cycle, leave the target
        # domain unchanged (identity). Gradients this leaves on D are cleared by D's zero_grad.
        g_gan = (gan_loss(c.gan_loss, D_b(fake_b), True, for_discriminator=False)
                 + gan_loss(c.gan_loss, D_a(fake_a), True, for_discriminator=False))
        cycle_a, cycle_b = F.l1_loss(G_ba(fake_b), a), F.l1_loss(G_ab(fake_a), b)
        cycle = cycle_a + cycle_b
        lambda_cycle = c.lambda_cycle * (min(1.0, step / c.cycle_warmup) if c.cycle_warmup else 1.0)
        loss = g_gan + lambda_cycle * (cycle_a + c.cycle_b_scale * cycle_b)
        identity = torch.zeros((), device=self.device)
        if c.lambda_identity > 0:
            identity = F.l1_loss(G_ab(b), b) + F.l1_loss(G_ba(a), a)
            loss = loss + lambda_cycle * c.lambda_identity * identity
        step_optimizer(self.optimizers["generators"], loss)

        # discriminators: real -> 1, pooled past fakes -> 0, halved as in the reference
        fake_a, fake_b = self.pool_a.query(fake_a), self.pool_b.query(fake_b)
        d_a = 0.5 * (gan_loss(c.gan_loss, D_a(a), True) + gan_loss(c.gan_loss, D_a(fake_a), False))
        d_b = 0.5 * (gan_loss(c.gan_loss, D_b(b), True) + gan_loss(c.gan_loss, D_b(fake_b), False))
        step_optimizer(self.optimizers["discriminators"], d_a + d_b)
        # logged per direction on average, unweighted (cycle/identity: mean absolute error in [-1, 1])
        return {"g_gan": g_gan.detach() / 2, "cycle": cycle.detach() / 2, "identity": identity.detach() / 2,
                "d_a": d_a.detach(), "d_b": d_b.detach()}

    @torch.no_grad()
    def sample(self, batch: tuple[torch.Tensor, torch.Tensor], seed: int) -> torch.Tensor:
        """a | G_ab(a) | G_ba(G_ab(a)) triples: input, translation, reconstruction. `seed` is unused."""
        a = batch[0].to(self.device)
        G_ab, G_ba = self.nets["generator_ab"], self.nets["generator_ba"]
        modes = (G_ab.training, G_ba.training)
        G_ab.eval()  # instance norm without running stats: eval mode changes nothing, but keep the contract
        G_ba.eval()
        try:
            fake = G_ab(a)
            rec = G_ba(fake)
        finally:
            G_ab.train(modes[0])
            G_ba.train(modes[1])
        return triples(a, fake, rec)

    def export_graphs(self) -> dict[str, ExportGraph]:
        c, s = self.info.channels, self.info.size
        spec = TensorSpec("float32", (-1, c, s, s))
        return {name: ExportGraph(copy.deepcopy(self.nets[name]).eval(), inputs={"source": spec},
                                  outputs={"image": spec})
                for name in ("generator_ab", "generator_ba")}

    def extra_state(self) -> dict:
        return {"pool_a": self.pool_a.state(), "pool_b": self.pool_b.state()}

    def load_extra_state(self, state: dict) -> None:
        self.pool_a.load(state.get("pool_a"), self.device)
        self.pool_b.load(state.get("pool_b"), self.device)
