"""Variational autoencoder (Kingma & Welling 2014) with a beta-weighted KL (Higgins et al. 2017).

A convolutional encoder halves the image down to 4x4 and maps it to the mean and log-variance of a
diagonal Gaussian over `latent_dim` latents; a decoder maps a latent back up to an image. With class
labels (conditional VAE, Sohn et al. 2015) a label embedding is fed to both: the encoder then only has
to encode style, and the decoder draws the requested class.

Reconstruction loss: Bernoulli likelihood, i.e. binary cross-entropy between the decoder's output and the
image mapped to [0, 1], summed over pixels and averaged over the batch; the KL is summed over latents the
same way, so beta=1 is the true evidence lower bound. BCE (rather than squared error) gives sharp
strokes on digit-like data and needs no variance to tune. The decoder's last layer gives a pre-tanh map h
and the image is tanh(h); since (tanh(h) + 1) / 2 = sigmoid(2h), the BCE is taken on the logits 2h, which
is numerically exact and stable.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.base import (
    ConfigError,
    DataInfo,
    ExportGraph,
    Family,
    FamilyConfig,
    TensorSpec,
    step_optimizer,
)

LABEL_DIM = 32  # size of the label embedding fed to encoder and decoder


@dataclass(kw_only=True)
class VAEConfig(FamilyConfig):
    lr: float = 1e-3  # a VAE is a plain likelihood model: Adam at 1e-3 trains it fastest
    width: int = 32  # channels of the first conv; doubles per halving, capped at 8x
    latent_dim: int = 16
    beta: float = 1.0  # weight of the KL term; 1 is the ELBO, >1 trades sharpness for disentanglement
    conditional: bool | None = None  # None: conditional when the data has classes


class Encoder(nn.Module):
    """Image [, label] -> (mean, logvar), each [B, latent_dim]."""

    def __init__(self, channels: int, size: int, width: int, latent_dim: int, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        ch_in, ch = channels, width
        for _ in range(size.bit_length() - 3):  # size -> 4x4
            layers += [nn.Conv2d(ch_in, ch, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
            ch_in, ch = ch, min(ch * 2, width * 8)
        self.convs = nn.Sequential(*layers)
        self.embed = nn.Embedding(num_classes, LABEL_DIM) if num_classes else None
        self.head = nn.Linear(ch_in * 16 + (LABEL_DIM if num_classes else 0), 2 * latent_dim)

    def forward(self, image: torch.Tensor, label: torch.Tensor | None = None):
        h = self.convs(image).flatten(1)
        if self.embed is not None:
            h = torch.cat([h, self.embed(label)], 1)
        mean, logvar = self.head(h).chunk(2, dim=1)
        return mean, logvar


class Decoder(nn.Module):
    """Latent [, label] -> pre-tanh map h [B, C, H, W]; the image is tanh(h)."""

    def __init__(self, channels: int, size: int, width: int, latent_dim: int, num_classes: int):
        super().__init__()
        n_up = size.bit_length() - 3  # 4x4 -> size
        chans = [min(width * 2**i, width * 8) for i in range(n_up + 1)][::-1]  # top .. width
        self.top = chans[0]
        self.embed = nn.Embedding(num_classes, LABEL_DIM) if num_classes else None
        self.fc = nn.Linear(latent_dim + (LABEL_DIM if num_classes else 0), chans[0] * 16)
        layers: list[nn.Module] = [nn.LeakyReLU(0.2, inplace=True)]
        for c_in, c_out in itertools.pairwise(chans):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        layers += [nn.Conv2d(chans[-1], channels, 3, 1, 1)]
        self.convs = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(label)], 1)
        return self.convs(self.fc(z).view(-1, self.top, 4, 4))


class EncoderGraph(nn.Module):
    """Export wrapper: image [, label] -> mean, logvar."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, image: torch.Tensor, label: torch.Tensor | None = None):
        return self.encoder(image, label)


class DecoderGraph(nn.Module):
    """Export wrapper: z [, label] -> image in [-1, 1]."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tanh(self.decoder(z, label))


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over latents, averaged over the batch."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(1).mean()


def reconstruction_loss(h: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """BCE of tanh(h) against `image` on the [0, 1] scale, summed over pixels, averaged over the batch."""
    bce = F.binary_cross_entropy_with_logits(2.0 * h, (image + 1.0) / 2.0, reduction="none")
    return bce.flatten(1).sum(1).mean()


class VAE(Family):
    name = "vae"
    Config = VAEConfig

    def __init__(self, config: VAEConfig, info: DataInfo, device: torch.device):
        super().__init__(config, info, device)
        self.conditional = resolve_conditional(config.conditional, info)
        k = info.num_classes if self.conditional else 0
        args = (info.channels, info.size, config.width, config.latent_dim, k)
        self.add_net("encoder", Encoder(*args))
        self.add_net("decoder", Decoder(*args))
        params = [*self.nets["encoder"].parameters(), *self.nets["decoder"].parameters()]
        self.optimizers["vae"] = torch.optim.Adam(params, lr=config.lr)

    @classmethod
    def check(cls, config: VAEConfig, info: DataInfo) -> None:
        check_common(config, info, "vae")
        if config.latent_dim < 1:
            raise ConfigError(f"--set latent_dim={config.latent_dim} must be at least 1")
        if config.beta < 0:
            raise ConfigError(f"--set beta={config.beta} must be non-negative")

    def _label(self, y: torch.Tensor) -> torch.Tensor | None:
        return y.to(self.device) if self.conditional else None

    def train_step(self, batch, step):
        x, y = batch
        x, label = x.to(self.device), self._label(y)
        mean, logvar = self.train_nets["encoder"](x, label)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)  # reparameterisation
        recon = reconstruction_loss(self.train_nets["decoder"](z, label), x)
        kl = kl_divergence(mean, logvar)
        loss = recon + self.config.beta * kl
        step_optimizer(self.optimizers["vae"], loss)
        return {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def sample(self, batch, seed):
        n = batch[0].shape[0]
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.config.latent_dim, generator=gen).to(self.device)
        label = cycling_labels(n, self.info.num_classes, self.device) if self.conditional else None
        self.train(False)
        try:
            return torch.tanh(self.nets["decoder"](z, label))
        finally:
            self.train(True)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean of each image: what the encoder -> decoder graphs return."""
        label = self._label(y)
        self.train(False)
        try:
            mean, _ = self.nets["encoder"](x.to(self.device), label)
            return torch.tanh(self.nets["decoder"](mean, label))
        finally:
            self.train(True)

    def export_graphs(self):
        c, s, zd = self.info.channels, self.info.size, self.config.latent_dim
        label = {"label": TensorSpec("int64", (-1,), 0, self.info.num_classes)} if self.conditional else {}
        encoder = EncoderGraph(copy.deepcopy(self.nets["encoder"])).eval()  # the live nets stay in train mode
        decoder = DecoderGraph(copy.deepcopy(self.nets["decoder"])).eval()
        return {
            "encoder": ExportGraph(
                encoder,
                inputs={"image": TensorSpec("float32", (-1, c, s, s), -1.0, 1.0), **label},
                outputs={"mean": TensorSpec("float32", (-1, zd)), "logvar": TensorSpec("float32", (-1, zd))},
            ),
            "decoder": ExportGraph(
                decoder,
                inputs={"z": TensorSpec("float32", (-1, zd), -3.0, 3.0), **label},
                outputs={"image": TensorSpec("float32", (-1, c, s, s))},
            ),
        }


# --- also used by gan.py ------------------------------------------------------------------------------


def resolve_conditional(conditional: bool | None, info: DataInfo) -> bool:
    return info.num_classes > 0 if conditional is None else conditional


def cycling_labels(n: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """0, 1, ..., K-1, 0, 1, ...: a grid K wide shows one class per column."""
    return torch.arange(n, device=device) % num_classes


def check_common(config, info: DataInfo, arch: str, any_size: bool = False) -> None:
    """Checks every image generator here shares: channels, size, width, conditioning."""
    if info.channels not in (1, 3):
        raise ConfigError(f"--channels {info.channels} is not supported by {arch}: use 1 or 3")
    if not any_size and (info.size < 32 or info.size > 256 or info.size & (info.size - 1)):
        raise ConfigError(
            f"--image-size {info.size} is not supported by {arch}: use a power of two from 32 to 256")
    if info.size < 1:
        raise ConfigError(f"--image-size {info.size} must be positive")
    if config.width < 1:
        raise ConfigError(f"--set width={config.width} must be at least 1")
    if config.conditional and info.num_classes == 0:
        raise ConfigError("--set conditional=true needs a dataset with classes: this one has none")
