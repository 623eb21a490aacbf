"""The contract every model family implements.

A family owns its networks, optimisers and training step; the training loop (trainer/loop.py)
owns everything else: data order, progress, checkpoints, resume, DDP. Export (trainer/export.py) needs
`export_graphs()`, `export_checks()` and `manifest_sections()`; what serving does with the graphs is the family's
line in serve/families.py (its task, graphs, data kind, latent), which `spec` returns. How `gen eval` scores the
family and whether `gen distill` can make a student of it are class attributes here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from serve.families import FAMILIES, FamilySpec


@dataclass(frozen=True)
class DataInfo:
    """What a family needs to know about its data to size its networks."""

    kind: str  # "images" (x, y) | "paired" (a, b) | "unpaired" (a, b)
    channels: int  # 1 or 3
    size: int  # square images, size x size
    class_names: tuple[str, ...] = ()  # empty: unconditional data

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. -1 marks a dynamic dimension (always the batch axis)."""

    dtype: str  # "float32" | "int64"
    shape: tuple[int, ...]
    low: float = -1.0  # range of example values drawn for export parity checks
    high: float = 1.0  # for int64: exclusive upper bound


@dataclass
class ExportGraph:
    """An eval-mode module whose forward takes the inputs positionally, in `inputs` order."""

    module: nn.Module
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]


@dataclass(kw_only=True)
class FamilyConfig:
    """Fields every family config has. Families subclass with their own keyword-only fields."""

    lr: float = 2e-4
    batch_size: int = 64


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the option."""


class Family:
    """Base class. Subclasses set `name` (their line in serve/families.py) and `Config`, build nets in __init__."""

    name: ClassVar[str]
    Config: ClassVar[type[FamilyConfig]]
    # how `gen eval` scores the family's models (trainer/evaluate.py); None: reported, no bar
    class_accuracy_bar: ClassVar[float | None] = None  # share of conditional samples classified as their label
    frechet_bar: ClassVar[float | None] = None  # Frechet distance of samples, times the real-vs-real baseline
    eval_sampling: ClassVar[tuple[str, int] | None] = None  # a denoiser's (sampler, steps) when eval names none
    # a denoiser's image-to-image bar: (strength, share of edits towards another class classified as that class);
    # strength is in the schedule's own time, so the noise it means differs between schedules
    image_to_image_bar: ClassVar[tuple[float, float] | None] = None
    student_family: ClassVar[str | None] = None  # the family `gen distill` trains a few-step student in, if any

    @classmethod
    def spec(cls) -> FamilySpec:
        """The family's contract, shared with the server: task, graphs, data kind."""
        return FAMILIES[cls.name]

    def __init__(self, config: FamilyConfig, info: DataInfo, device: torch.device):
        self.config = config
        self.info = info
        self.device = device
        self.nets: dict[str, nn.Module] = {}  # raw modules: checkpoints, EMA, export
        self.train_nets: dict[str, nn.Module] = {}  # what train_step calls: nets, or DDP wrappers
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}

    # --- called by subclasses -------------------------------------------------------------
    def add_net(self, name: str, net: nn.Module) -> nn.Module:
        net = net.to(self.device)
        self.nets[name] = net
        self.train_nets[name] = net
        return net

    # --- the contract -----------------------------------------------------------------------
    @classmethod
    def check(cls, config: FamilyConfig, info: DataInfo) -> None:
        """Raise ConfigError naming the option if this config cannot train on this data."""

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch; returns detached scalar losses by name."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, batch: tuple[torch.Tensor, torch.Tensor], seed: int) -> torch.Tensor:
        """Images for the progress grid, [N, C, H, W] in [-1, 1], rows of the grid stacked.

        Generators ignore the images in `batch` but may use its labels; translators return
        input | output | target triples (3 images per example, in that order).
        """
        raise NotImplementedError

    def on_step_end(self, step: int) -> None:
        """After the optimiser steps: EMA updates, learning-rate schedules."""
        for sched in self.schedulers.values():
            sched.step()

    def export_graphs(self) -> dict[str, ExportGraph]:
        """The ONNX graphs this family exports, by graph name (the spec's `graphs`)."""
        raise NotImplementedError

    def export_checks(self, version_dir, manifest: dict) -> dict:
        """Checks of the exported version as a whole, beyond each graph's parity (a denoising model: the server's
        loop against PyTorch): {name: {"max_abs", "tolerance"[, "what"]}}; export refuses any over tolerance."""
        return {}

    def manifest_sections(self) -> dict:
        """Family-specific manifest sections serving reads (diffusion: its schedule); none by default."""
        return {}

    def calibration_batches(self, n: int, seed: int) -> dict[str, list[dict[str, np.ndarray]]]:
        """What `gen export --quantize int8` calibrates on: {graph: [feeds]}, the inputs each graph sees when it
        serves n samples. Empty (the default): the family has no int8 variant."""
        return {}

    def extra_state(self) -> dict:
        """State beyond nets/optimisers/schedulers that resume needs (EMA, image pools)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # --- checkpointing (shared) -----------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "nets": {k: v.state_dict() for k, v in self.nets.items()},
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
            "schedulers": {k: v.state_dict() for k, v in self.schedulers.items()},
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        for k, v in state["nets"].items():
            self.nets[k].load_state_dict(v)
        for k, v in state["optimizers"].items():
            self.optimizers[k].load_state_dict(v)
        for k, v in state["schedulers"].items():
            self.schedulers[k].load_state_dict(v)
        self.load_extra_state(state.get("extra", {}))

    def train(self, mode: bool = True) -> None:
        for net in self.nets.values():
            net.train(mode)


def linear_decay(step: int, steps: int, decay_start: float) -> float:
    """Learning-rate factor of pytorch-CycleGAN-and-pix2pix's "linear" policy: 1 until decay_start *
    steps, then linear to 0 at `steps`."""
    start = int(decay_start * steps)
    return max(0.0, 1.0 - max(0, step - start) / max(1, steps - start))


def step_optimizer(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """zero_grad, backward, step: the three lines every family repeats."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

