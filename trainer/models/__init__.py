"""Model families, one file each. Adding a family is a new file plus one line in FAMILIES."""
from __future__ import annotations

from trainer.models.base import ConfigError, DataInfo, ExportGraph, Family, FamilyConfig, TensorSpec

__all__ = ["FAMILIES", "get_family", "ConfigError", "DataInfo", "ExportGraph", "Family", "FamilyConfig",
           "TensorSpec"]


def _registry() -> dict[str, type[Family]]:
    from trainer.models.cyclegan import CycleGAN
    from trainer.models.diffusion import Diffusion
    from trainer.models.gan import GAN
    from trainer.models.pix2pix import Pix2Pix
    from trainer.models.vae import VAE

    return {f.name: f for f in (VAE, GAN, Pix2Pix, CycleGAN, Diffusion)}


FAMILY_NAMES = ("vae", "gan", "pix2pix", "cyclegan", "diffusion")


def get_family(name: str) -> type[Family]:
    if name not in FAMILY_NAMES:
        raise ConfigError(f"unknown family {name!r}: use one of {', '.join(FAMILY_NAMES)}")
    return _registry()[name]
