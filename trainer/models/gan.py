"""Unconditional and class-conditional GANs: the MLP GAN of Goodfellow et al. (2014) and DCGAN
(Radford et al. 2016), with a choice of objective (BCE, least squares, hinge).

With class labels the model is a conditional GAN (Mirza & Osindero 2014): the generator sees a label
embedding concatenated to z, and the discriminator sees a learned per-class map as one more image channel.

DCGAN's discriminator BatchNorm, applied to all-real and all-fake batches, is what stops an unconditional
generator collapsing: a batch of identical fakes normalises to a constant. A conditional generator can
collapse to one image per class instead, which BatchNorm does not see, so for conditional training the
generator also gets the mode-seeking term of Mao et al. (2019): pairs of fakes with the same label and
different z are pushed apart in proportion to their distance in z.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
from torch import nn

from trainer.layers import GAN_LOSSES, gan_loss, init_weights
from trainer.models.base import (
    ConfigError,
    DataInfo,
    ExportGraph,
    Family,
    FamilyConfig,
    TensorSpec,
    step_optimizer,
)
from trainer.models.vae import check_common, cycling_labels, resolve_conditional

ARCHS = ("mlp", "dcgan")
ADAM_BETAS = (0.5, 0.999)  # Radford et al.: beta1 = 0.9 oscillates


@dataclass(kw_only=True)
class GANConfig(FamilyConfig):
    arch: str = "dcgan"  # "mlp" (any image size) | "dcgan" (powers of two 32..256)
    loss: str = "bce"  # one of layers.GAN_LOSSES: "bce" | "lsgan" | "hinge"
    width: int = 32  # dcgan: channels next to the image, doubling per halving (capped 8x); mlp: 4x this
    z_dim: int = 64
    conditional: bool | None = None  # None: conditional (CGAN) when the data has classes
    mode_seeking: float = 1.0  # conditional only: weight of the term that stops G ignoring z; 0 = off


# --- networks ---------------------------------------------------------------------------------------------


def _widths(width: int, n: int) -> list[int]:
    """Channels at 1/2, 1/4, ... of the image size: width, 2 width, ... capped at 8 width."""
    return [min(width * 2**i, width * 8) for i in range(n)]


class DCGANGenerator(nn.Module):
    """z [, label] -> 4x4 -> ... -> image: ConvTranspose + BatchNorm + ReLU, tanh at the end."""

    def __init__(self, z_dim: int, channels: int, size: int, width: int, num_classes: int):
        super().__init__()
        chans = _widths(width, size.bit_length() - 3)[::-1]  # 4x4 .. size/2
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        in_dim = z_dim * (2 if num_classes else 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(in_dim, chans[0], 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(chans[0]), nn.ReLU(True)]
        for c_in, c_out in itertools.pairwise(chans):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(chans[-1], channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(label)], 1)
        return self.net(z[:, :, None, None])


class LabelChannel(nn.Module):
    """Appends a learned per-class size x size map to the image as one more channel."""

    def __init__(self, num_classes: int, size: int):
        super().__init__()
        self.size = size
        self.embed = nn.Embedding(num_classes, size * size)

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return torch.cat([image, self.embed(label).view(-1, 1, self.size, self.size)], 1)


class DCGANDiscriminator(nn.Module):
    """image [, label] -> logit [B]: strided conv + BatchNorm + LeakyReLU down to 4x4, then a 4x4 conv."""

    def __init__(self, channels: int, size: int, width: int, num_classes: int):
        super().__init__()
        chans = _widths(width, size.bit_length() - 3)  # size/2 .. 4x4
        self.label = LabelChannel(num_classes, size) if num_classes else None
        layers: list[nn.Module] = [nn.Conv2d(channels + bool(num_classes), chans[0], 4, 2, 1),
                                   nn.LeakyReLU(0.2, True)]
        for c_in, c_out in itertools.pairwise(chans):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(chans[-1], 1, 4, 1, 0)]  # 4x4 -> 1x1
        self.net = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        if self.label is not None:
            image = self.label(image, label)
        return self.net(image).flatten()


class MLPGenerator(nn.Module):
    """z [, label] -> three hidden layers (BatchNorm + LeakyReLU) -> image."""

    def __init__(self, z_dim: int, channels: int, size: int, width: int, num_classes: int):
        super().__init__()
        self.shape = (channels, size, size)
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        dims = [z_dim * (2 if num_classes else 1), width * 4, width * 8, width * 16]
        layers: list[nn.Module] = []
        for d_in, d_out in itertools.pairwise(dims):
            layers += [nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.LeakyReLU(0.2, True)]
        layers += [nn.Linear(dims[-1], channels * size * size), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(label)], 1)
        return self.net(z).view(-1, *self.shape)


class MLPDiscriminator(nn.Module):
    """image [, label] -> logit [B]: three LeakyReLU hidden layers."""

    def __init__(self, channels: int, size: int, width: int, num_classes: int):
        super().__init__()
        self.label = LabelChannel(num_classes, size) if num_classes else None
        dims = [(channels + bool(num_classes)) * size * size, width * 16, width * 8, width * 4]
        layers: list[nn.Module] = []
        for d_in, d_out in itertools.pairwise(dims):
            layers += [nn.Linear(d_in, d_out), nn.LeakyReLU(0.2, True)]
        layers += [nn.Linear(dims[-1], 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        if self.label is not None:
            image = self.label(image, label)
        return self.net(image.flatten(1)).flatten()


def mode_seeking_loss(a: torch.Tensor, b: torch.Tensor, za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    """Mao et al. 2019: 1 / (|G(za) - G(zb)| / |za - zb|), small when images differ as much as latents."""
    ratio = (a - b).abs().mean() / (za - zb).abs().mean()
    return 1.0 / (ratio + 1e-5)


class GeneratorGraph(nn.Module):
    """Export wrapper: z [, label] -> image in [-1, 1]."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        return self.generator(z, label)


# --- the family -------------------------------------------------------------------------------------------


class GAN(Family):
    name = "gan"
    class_accuracy_bar = 0.90
    Config = GANConfig

    def __init__(self, config: GANConfig, info: DataInfo, device: torch.device):
        super().__init__(config, info, device)
        self.conditional = resolve_conditional(config.conditional, info)
        k = info.num_classes if self.conditional else 0
        c, s, w = info.channels, info.size, config.width
        if config.arch == "mlp":
            g, d = MLPGenerator(config.z_dim, c, s, w, k), MLPDiscriminator(c, s, w, k)
        else:
            g, d = DCGANGenerator(config.z_dim, c, s, w, k), DCGANDiscriminator(c, s, w, k)
        for name, net in (("generator", g), ("discriminator", d)):
            self.add_net(name, init_weights(net))
            self.optimizers[name] = torch.optim.Adam(net.parameters(), lr=config.lr, betas=ADAM_BETAS)

    @classmethod
    def check(cls, config: GANConfig, info: DataInfo) -> None:
        if config.arch not in ARCHS:
            raise ConfigError(f"--set arch={config.arch} is not a GAN architecture: use one of {', '.join(ARCHS)}")
        if config.loss not in GAN_LOSSES:
            raise ConfigError(f"--set loss={config.loss} is not a GAN loss: use one of {', '.join(GAN_LOSSES)}")
        check_common(config, info, config.arch, any_size=config.arch == "mlp")
        if config.z_dim < 1:
            raise ConfigError(f"--set z_dim={config.z_dim} must be at least 1")
        if config.mode_seeking < 0:
            raise ConfigError(f"--set mode_seeking={config.mode_seeking}: must be non-negative")

    def _label(self, y: torch.Tensor) -> torch.Tensor | None:
        return y.to(self.device) if self.conditional else None

    def train_step(self, batch, step):
        x, y = batch
        real, label = x.to(self.device), self._label(y)
        G, D, kind = self.train_nets["generator"], self.train_nets["discriminator"], self.config.loss
        n, half = real.shape[0], real.shape[0] // 2
        seek = self.conditional and self.config.mode_seeking > 0 and half > 0
        # with mode seeking, fakes i and i + half share a label so that their difference is all z's doing
        fake_label = torch.cat([label[:half], label[:n - half]]) if seek else label
        z = torch.randn(n, self.config.z_dim, device=self.device)
        fake = G(z, fake_label)

        # discriminator: real and fake as separate batches, so that BatchNorm cannot compare them
        # (Radford et al.); each forward is followed by its own backward, as DistributedDataParallel
        # wants when the module has BatchNorm buffers
        opt_d = self.optimizers["discriminator"]
        opt_d.zero_grad(set_to_none=True)
        d_real = D(real, label)
        loss_real = gan_loss(kind, d_real, True)
        loss_real.backward()
        d_fake = D(fake.detach(), fake_label)
        loss_fake = gan_loss(kind, d_fake, False)
        loss_fake.backward()
        opt_d.step()

        # generator: fool the updated discriminator
        g_loss = gan_loss(kind, D(fake, fake_label), True, for_discriminator=False)
        losses = {"d_loss": (loss_real + loss_fake).detach(), "g_loss": g_loss.detach(),
                  "d_real": d_real.detach().mean(), "d_fake": d_fake.detach().mean()}
        if seek:
            ms = mode_seeking_loss(fake[:half], fake[half:2 * half], z[:half], z[half:2 * half])
            g_loss = g_loss + self.config.mode_seeking * ms
            losses["mode_seeking"] = ms.detach()
        step_optimizer(self.optimizers["generator"], g_loss)
        return losses

    @torch.no_grad()
    def sample(self, batch, seed):
        n = batch[0].shape[0]
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.config.z_dim, generator=gen).to(self.device)
        label = cycling_labels(n, self.info.num_classes, self.device) if self.conditional else None
        self.train(False)
        try:
            return self.nets["generator"](z, label)
        finally:
            self.train(True)

    def export_graphs(self):
        c, s = self.info.channels, self.info.size
        label = {"label": TensorSpec("int64", (-1,), 0, self.info.num_classes)} if self.conditional else {}
        generator = GeneratorGraph(copy.deepcopy(self.nets["generator"])).eval()  # the live net stays in train mode
        return {
            "generator": ExportGraph(
                generator,
                inputs={"z": TensorSpec("float32", (-1, self.config.z_dim), -3.0, 3.0), **label},
                outputs={"image": TensorSpec("float32", (-1, c, s, s))},
            ),
        }
