"""Flow matching (rectified flow): the same U-Net as diffusion, trained on a straight path from data to noise.

Training follows Liu et al. (2022) and Lipman et al. (2023), as Stable Diffusion 3 does: draw t ~ U(0, 1) and
eps ~ N(0, I), form x_t = (1 - t) x0 + t eps and regress the network's output on the velocity v = eps - x0,
the derivative of x_t along the path. Labels are replaced by the null class with probability `p_uncond`, so one
network is conditional and unconditional (classifier-free guidance). An EMA of the weights samples and exports.

Serving reads the manifest's `diffusion` section: the schedule "rectified_flow" (alpha_t = 1 - t, sigma_t = t,
continuous t in [0, 1]) and the prediction "velocity" (x0 = x_t - t v). So every serving sampler runs on it, and
step-level batching, guidance, previews and cancellation are the same as for diffusion. Its own sampler is Euler,
the flow's ODE (serve/samplers/euler.py): x_{t'} = x_t + (t' - t) v on the trailing grid t_i = (S - i) / S.

The exported `denoiser` takes t as float32 in [0, 1]; the U-Net embeds 1000 t, the range its sinusoidal time
embedding was sized for.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from serve.manifest import DENOISING
from serve.samplers import SAMPLERS, NoiseSchedule
from trainer.denoising import UNet, check_config, drop_labels, optimise, sample_grid, served_loop_check, update_ema
from trainer.models.base import ConfigError, DataInfo, ExportGraph, Family, FamilyConfig, TensorSpec

SCHEDULE, PREDICTION = "rectified_flow", "velocity"  # the manifest's words for this family's path and output
TIME_SCALE = 1000.0  # t in [0, 1] is embedded as 1000 t: the U-Net's sinusoidal embedding spans 0..1000


@dataclass(kw_only=True)
class FlowConfig(FamilyConfig):
    width: int = 32  # channels at full resolution
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one U-Net level per entry; 32x32 -> 32, 16, 8
    num_res_blocks: int = 1
    attn_resolution: int = 8  # self-attention at this resolution and below
    dropout: float = 0.0
    num_train_timesteps: int = 1000  # the most sampling steps a request may ask for (t itself is continuous)
    lr: float = 1e-3
    warmup_steps: int = 200  # linear learning-rate warm-up
    grad_clip: float = 1.0  # global gradient-norm clip; 0 turns it off
    ema_decay: float = 0.999  # reached gradually: decay_n = min(ema_decay, (1 + n) / (10 + n))
    p_uncond: float = 0.1  # label dropout for classifier-free guidance
    conditional: bool | None = None  # None: conditional exactly when the data has classes
    sampler: str = "euler"  # the progress grid's sampler, and export's served-loop check
    sample_steps: int = 20  # its steps
    guidance: float = 1.25  # CFG scale for the grid (conditional models); a request's default when served


class _Denoiser(nn.Module):
    """x_t, t in [0, 1] [, label] -> the velocity, for export."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = unet
        self.num_classes, self.guidance_emb = unet.num_classes, None  # what run_sampler asks of a U-Net

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x_t, t * TIME_SCALE, label)


class Flow(Family):
    name = "flow"
    Config = FlowConfig
    class_accuracy_bar, frechet_bar = 0.97, 2.0
    eval_sampling = ("euler", 20)

    @classmethod
    def check(cls, config: FlowConfig, info: DataInfo) -> None:
        if config.num_train_timesteps < 1:
            raise ConfigError(f"--set num_train_timesteps={config.num_train_timesteps}: use 1 or more")
        if config.sampler not in SAMPLERS:
            raise ConfigError(f"--set sampler={config.sampler}: use one of {', '.join(SAMPLERS)}")
        check_config(config, info, cls.name)

    def __init__(self, config: FlowConfig, info: DataInfo, device: torch.device):
        super().__init__(config, info, device)
        cond = bool(info.class_names) if config.conditional is None else config.conditional
        self.num_classes = info.num_classes if cond else 0  # K; the null label is K
        unet = self.add_net("unet", UNet(info.channels, info.size, config.width, tuple(config.channel_mult),
                                         config.num_res_blocks, config.attn_resolution, config.dropout,
                                         self.num_classes))
        self.ema = copy.deepcopy(unet).eval().requires_grad_(False)
        self.ema_updates = 0
        self.optimizers["unet"] = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
        warmup = max(1, config.warmup_steps)
        self.schedulers["unet"] = torch.optim.lr_scheduler.LambdaLR(
            self.optimizers["unet"], lambda i: min(1.0, (i + 1) / warmup))

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        x0, y = (v.to(self.device) for v in batch)
        B = x0.shape[0]
        t = torch.rand(B, device=self.device)
        eps = torch.randn_like(x0)
        tt = t[:, None, None, None]
        x_t = (1 - tt) * x0 + tt * eps
        label = drop_labels(y, self.num_classes, self.config.p_uncond)
        loss = F.mse_loss(self.train_nets["unet"](x_t, t * TIME_SCALE, label), eps - x0)
        return optimise(self.optimizers["unet"], self.nets["unet"], loss, self.config.grad_clip)

    def on_step_end(self, step: int) -> None:
        super().on_step_end(step)
        update_ema(self.ema, self.nets["unet"], self.ema_updates, self.config.ema_decay)
        self.ema_updates += 1

    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.of(SCHEDULE, self.config.num_train_timesteps, PREDICTION)

    def denoiser(self) -> nn.Module:
        return _Denoiser(self.ema).eval()

    @torch.no_grad()
    def sample(self, batch: tuple[torch.Tensor, torch.Tensor], seed: int) -> torch.Tensor:
        return sample_grid(self.denoiser(), self.noise_schedule(), batch[0].shape[0], self.info, self.config.sampler,
                           self.config.sample_steps, self.config.guidance, seed, self.device)

    def export_graphs(self) -> dict[str, ExportGraph]:
        C, S, K = self.info.channels, self.info.size, self.num_classes
        image = (-1, C, S, S)
        inputs = {"x_t": TensorSpec("float32", image, -3.0, 3.0), "t": TensorSpec("float32", (-1,), 0.0, 1.0)}
        if K:
            inputs["label"] = TensorSpec("int64", (-1,), 0, K + 1)
        return {"denoiser": ExportGraph(self.denoiser(), inputs, {"output": TensorSpec("float32", image)})}

    def export_checks(self, version_dir, manifest: dict) -> dict:
        """The served loop over the exported denoiser against the same sampler in PyTorch."""
        return served_loop_check(self.denoiser(), self.num_classes, version_dir, manifest, self.config.sampler,
                                 self.config.sample_steps)

    def manifest_sections(self) -> dict:
        """What serving needs beyond the graphs: the path, the output's meaning, the null class."""
        return {DENOISING: {"num_train_timesteps": self.config.num_train_timesteps, "schedule": SCHEDULE,
                              "prediction": PREDICTION, "timestep_spacing": "trailing",
                              "null_label": self.num_classes}}

    def extra_state(self) -> dict:
        return {"ema": self.ema.state_dict(), "ema_updates": self.ema_updates}

    def load_extra_state(self, state: dict) -> None:
        if "ema" in state:
            self.ema.load_state_dict(state["ema"])
            self.ema_updates = state["ema_updates"]

