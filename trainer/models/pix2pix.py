"""pix2pix (Isola et al. 2017): paired image-to-image translation with a conditional GAN.

Follows junyanz/pytorch-CycleGAN-and-pix2pix: a U-Net generator that goes down to 1x1, a PatchGAN
discriminator that sees (input, output) pairs, the vanilla GAN loss plus 100 x L1, Adam(2e-4, 0.5),
learning rate decayed linearly to zero over the second half of training.
The U-Net is sized to the image (log2(size) levels) so it also works on small images.
"""
from __future__ import annotations

import copy
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


@dataclass(kw_only=True)
class Pix2PixConfig(FamilyConfig):
    batch_size: int = 1  # the reference batch size: batch norm then acts like instance norm in training
    width: int = 32  # base channels of U-Net and PatchGAN (reference: 64; 32 is 4x cheaper on CPU at 32x32)
    norm: str = "batch"  # batch | instance
    gan_loss: str = "bce"  # "vanilla" in the reference
    lambda_l1: float = 100.0
    dropout: float = 0.5  # in the innermost decoder levels: the paper's only source of noise
    dropout_levels: int = 3  # how many innermost decoder levels get dropout (the paper's first 3)
    beta1: float = 0.5
    steps: int = 10_000  # total training steps; the loop sets it from --steps
    decay_start: float = 0.5  # fraction of `steps` after which the learning rate falls linearly to 0


class UNetLevel(nn.Module):
    """One U-Net level: down to `inner` channels, the levels below, up to `outer`, concat the skip.

    The reference's UnetSkipConnectionBlock applies its LeakyReLU in place, so its skip carries the
    activated features; here that is written out.
    """

    def __init__(self, outer: int, inner: int, below: nn.Module | None, norm: str, dropout: float):
        super().__init__()
        bias = norm == "instance"  # batch norm has its own shift
        down: list[nn.Module] = [nn.Conv2d(outer, inner, 4, 2, 1, bias=bias)]
        if below is not None:  # the innermost level (1x1) has no norm
            down.append(norm_layer(norm, inner))
        self.down = nn.Sequential(*down)
        self.below = below if below is not None else nn.Identity()
        up_in = inner * 2 if below is not None else inner  # levels below return [skip, up]
        up: list[nn.Module] = [nn.ReLU(), nn.ConvTranspose2d(up_in, outer, 4, 2, 1, bias=bias),
                               norm_layer(norm, outer)]
        if dropout > 0:
            up.append(nn.Dropout(dropout))
        self.up = nn.Sequential(*up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(x, 0.2)
        return torch.cat([x, self.up(self.below(self.down(x)))], 1)


class UNet(nn.Module):
    """The pix2pix U-Net (reference: UnetGenerator) with log2(size) levels, down to 1x1.

    Level i (0 = outermost) has width * min(2**i, 8) channels.
    """

    def __init__(self, channels: int, size: int, width: int = 64, norm: str = "batch",
                 dropout: float = 0.5, dropout_levels: int = 3):
        super().__init__()
        n_levels = size.bit_length() - 1
        chans = [width * min(2**i, 8) for i in range(n_levels)]
        level: nn.Module | None = None
        for i in reversed(range(1, n_levels)):  # build from the innermost level outwards
            from_inner = n_levels - 1 - i
            level = UNetLevel(chans[i - 1], chans[i], level, norm,
                              dropout if from_inner < dropout_levels else 0.0)
        self.down = nn.Conv2d(channels, width, 4, 2, 1, bias=norm == "instance")
        self.below = level
        self.up = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(width * 2, channels, 4, 2, 1), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.below(self.down(x)))


def check_image(family: str, info: DataInfo) -> None:
    """The checks pix2pix and CycleGAN share: a power-of-two size, 1 or 3 channels (the loop checks
    the data kind)."""
    if info.size not in (32, 64, 128, 256):
        raise ConfigError(f"--image-size {info.size} is not supported by {family}: "
                          "use a power of two from 32 to 256")
    if info.channels not in (1, 3):
        raise ConfigError(f"--channels {info.channels} is not supported by {family}: use 1 or 3")


def triples(*columns: torch.Tensor) -> torch.Tensor:
    """[a0, b0, c0, a1, b1, c1, ...] from equal-length batches a, b, c."""
    return torch.stack(columns, 1).flatten(0, 1)


class Pix2Pix(Family):
    name = "pix2pix"
    Config = Pix2PixConfig

    def __init__(self, config: Pix2PixConfig, info: DataInfo, device: torch.device):
        super().__init__(config, info, device)
        c = config
        self.add_net("generator", init_weights(UNet(info.channels, info.size, c.width, c.norm,
                                                    c.dropout, c.dropout_levels)))
        # conditional D: sees the input and the output side by side
        self.add_net("discriminator", init_weights(PatchGAN(2 * info.channels, c.width, norm=c.norm,
                                                            image_size=info.size)))
        betas = (c.beta1, 0.999)
        self.optimizers["generator"] = torch.optim.Adam(self.nets["generator"].parameters(), c.lr, betas)
        self.optimizers["discriminator"] = torch.optim.Adam(self.nets["discriminator"].parameters(),
                                                            c.lr, betas)
        for name, opt in self.optimizers.items():
            self.schedulers[name] = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: linear_decay(step, c.steps, c.decay_start))

    @classmethod
    def check(cls, config: Pix2PixConfig, info: DataInfo) -> None:
        check_image(cls.name, info)
        if config.width < 1:
            raise ConfigError(f"--set width={config.width} must be at least 1")
        if config.norm not in ("batch", "instance"):
            raise ConfigError(f"--set norm={config.norm} is not supported by pix2pix: use batch or instance")
        if config.gan_loss not in GAN_LOSSES:
            raise ConfigError(f"--set gan_loss={config.gan_loss} is not supported: use one of "
                              f"{', '.join(GAN_LOSSES)}")
        if not 0 <= config.dropout < 1:
            raise ConfigError(f"--set dropout={config.dropout} must be in [0, 1)")
        if config.steps < 1:
            raise ConfigError(f"--steps {config.steps} must be at least 1")
        if not 0 <= config.decay_start <= 1:
            raise ConfigError(f"--set decay_start={config.decay_start} must be a fraction in [0, 1]")

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        c = self.config
        a, b = (t.to(self.device) for t in batch)
        G, D = self.train_nets["generator"], self.train_nets["discriminator"]
        fake = G(a)

        # D: real pairs -> 1, fake pairs -> 0, halved as in the reference (D learns slower than G)
        d_loss = 0.5 * (gan_loss(c.gan_loss, D(torch.cat([a, b], 1)), True)
                        + gan_loss(c.gan_loss, D(torch.cat([a, fake.detach()], 1)), False))
        step_optimizer(self.optimizers["discriminator"], d_loss)

        # G: fool the updated D and stay close to the target. The G backward also leaves gradients
        # on D; step_optimizer clears them before D's next backward.
        g_gan = gan_loss(c.gan_loss, D(torch.cat([a, fake], 1)), True, for_discriminator=False)
        g_l1 = F.l1_loss(fake, b)
        step_optimizer(self.optimizers["generator"], g_gan + c.lambda_l1 * g_l1)
        # g_l1 is logged unweighted (mean absolute error in [-1, 1] units)
        return {"g_gan": g_gan.detach(), "g_l1": g_l1.detach(), "d_loss": d_loss.detach()}

    @torch.no_grad()
    def sample(self, batch: tuple[torch.Tensor, torch.Tensor], seed: int) -> torch.Tensor:
        """input | output | target triples. Deterministic (eval mode: dropout off), so `seed` is unused."""
        a, b = (t.to(self.device) for t in batch)
        G = self.nets["generator"]
        was_training = G.training
        G.eval()
        try:
            fake = G(a)
        finally:
            G.train(was_training)
        return triples(a, fake, b)

    def export_graphs(self) -> dict[str, ExportGraph]:
        # The reference keeps dropout (and batch statistics) on at test time as its noise source;
        # the export is meant to be a deterministic graph, so it is the generator in eval mode:
        # dropout off, batch norm on its running statistics. A copy, so training mode is untouched.
        c, s = self.info.channels, self.info.size
        spec = TensorSpec("float32", (-1, c, s, s))
        return {"generator": ExportGraph(copy.deepcopy(self.nets["generator"]).eval(),
                                         inputs={"source": spec}, outputs={"image": spec})}
