"""Blocks that two or more families share: GAN losses, the PatchGAN discriminator, weight init."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GAN_LOSSES = ("bce", "lsgan", "hinge")


def gan_loss(kind: str, logits: torch.Tensor, real: bool, for_discriminator: bool = True) -> torch.Tensor:
    """The GAN objective on raw discriminator outputs.

    `real` says which side the logits should be pushed to. Hinge is asymmetric: the
    discriminator gets the margin loss, the generator the plain -D(G(z)).
    """
    if kind == "bce":
        target = torch.ones_like(logits) if real else torch.zeros_like(logits)
        return F.binary_cross_entropy_with_logits(logits, target)
    if kind == "lsgan":
        target = torch.ones_like(logits) if real else torch.zeros_like(logits)
        return F.mse_loss(logits, target)
    if kind == "hinge":
        if not for_discriminator:
            return -logits.mean()
        return F.relu(1.0 - logits).mean() if real else F.relu(1.0 + logits).mean()
    raise ValueError(f"unknown GAN loss {kind!r}: use one of {', '.join(GAN_LOSSES)}")


def init_weights(net: nn.Module, gain: float = 0.02) -> nn.Module:
    """DCGAN / pix2pix init: conv and linear weights ~ N(0, 0.02), norm scales ~ N(1, 0.02)."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
    return net


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}: use batch, instance or none")


class PatchGAN(nn.Module):
    """The 70x70 PatchGAN of pix2pix (n_layers=3): one real/fake logit per overlapping patch.

    For small images the number of stride-2 layers is capped so the output stays at least 2x2.
    """

    def __init__(self, in_channels: int, width: int = 64, n_layers: int = 3, norm: str = "batch",
                 image_size: int = 256):
        super().__init__()
        max_down = max(1, (image_size.bit_length() - 1) - 3)  # 32 -> 2 downsamples, output 4x4 (+/- k4)
        n_layers = min(n_layers, max_down)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for i in range(1, n_layers):
            prev, mult = mult, min(2**i, 8)
            layers += [nn.Conv2d(width * prev, width * mult, 4, 2, 1, bias=False),
                       norm_layer(norm, width * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [nn.Conv2d(width * prev, width * mult, 4, 1, 1, bias=False),
                   norm_layer(norm, width * mult), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(width * mult, 1, 4, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
