"""Denoising diffusion (DDPM) with a small U-Net, classifier-free guidance and a per-sample step module.

Training is the DDPM objective of Ho et al. (2020): draw t ~ U[0, T), noise x0 to
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps and regress the U-Net output on eps ("eps") or on
v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 ("v", Salimans & Ho 2022). Labels are replaced by the null
class with probability `p_uncond` so one network is both conditional and unconditional (Ho & Salimans,
classifier-free guidance). An EMA of the U-Net weights is what samples and what is exported.

Sampling is written once, in `DiffusionStep`: one whole denoising step for a batch in which every
coefficient is per sample (timestep, next timestep, label, guidance, eta, sampler, solver state), so
requests at different steps of different samplers share one run of the graph. The three samplers follow
diffusers' DDPMScheduler, DDIMScheduler and DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
solver_order=2, final step first order), with two choices of ours:
  * every x0 prediction is clipped to [-1, 1] (the data range; diffusers' clip_sample), and
  * eps is re-derived from the clipped x0 (diffusers' DDIM `use_clipped_model_output=True`), so x_t, x0
    and eps stay consistent; DDPM's posterior uses x0 and x_t directly, which is the same thing.

Timesteps ("trailing" spacing, as diffusers' timestep_spacing="trailing"): for `steps` sampling steps
of a model trained with T timesteps, step i = 0..steps-1 runs at

    t_i = round(T * (steps - i) / steps) - 1        (round half to even, as Python and numpy do)

and goes to t_{i+1}, the last step going to t_prev = -1 ("t = 0 reached": abar = 1, sigma = 0). The
first step is always t = T - 1, the noisiest timestep, which is why trailing beats "leading" spacing
at few steps. `timestep_pairs` returns these (t, t_prev) pairs; every sampler uses them.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from serve.diffusion import timestep_pairs  # one copy of the rule, shared with the server (no torch there)
from trainer.models.base import ConfigError, DataInfo, ExportGraph, Family, FamilyConfig, TensorSpec

NORM_GROUPS = 8  # GroupNorm groups: width 32 gives 4 channels per group, DDPM's ratio (128 ch / 32 groups)
SAMPLERS = {"ddpm": 0, "ddim": 1, "dpmpp_2m": 2}  # the `sampler` input of the step graph
PREDICTIONS = ("eps", "v")
SCHEDULES = ("linear", "cosine")


@dataclass(kw_only=True)
class DiffusionConfig(FamilyConfig):
    width: int = 32  # channels at full resolution
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one U-Net level per entry; 32x32 -> 32, 16, 8
    num_res_blocks: int = 1  # per level on the way down (the way up has one more, for the extra skip)
    attn_resolution: int = 8  # self-attention at this resolution and below (and in the middle block)
    dropout: float = 0.0  # short runs on small data do not overfit; DDPM used 0.1 on CIFAR-10
    prediction: str = "eps"  # "eps" or "v"
    schedule: str = "linear"  # "linear" (betas 1e-4..0.02, DDPM) or "cosine" (Nichol & Dhariwal)
    num_train_timesteps: int = 1000
    lr: float = 1e-3  # high for a diffusion model, fine for this small U-Net with warm-up and clipping
    warmup_steps: int = 200  # linear learning-rate warm-up
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # global gradient-norm clip, as in DDPM; 0 turns it off
    ema_decay: float = 0.999  # reached gradually: decay_n = min(ema_decay, (1 + n) / (10 + n))
    p_uncond: float = 0.1  # label dropout for classifier-free guidance
    conditional: bool | None = None  # None: conditional exactly when the data has classes
    sample_steps: int = 50  # DDIM steps for the progress grid
    guidance: float = 3.0  # CFG scale for the progress grid (conditional models)


# --- schedule ------------------------------------------------------------------------------------

def alpha_bar_schedule(schedule: str, num_train_timesteps: int) -> torch.Tensor:
    """abar_t = prod_{s <= t} (1 - beta_s) for t = 0..T-1, float64."""
    T = num_train_timesteps
    if schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    elif schedule == "cosine":  # Nichol & Dhariwal (2021), betas clipped at 0.999 as in diffusers
        def f(u: torch.Tensor) -> torch.Tensor:
            return torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        u = torch.arange(T + 1, dtype=torch.float64) / T
        betas = (1 - f(u[1:]) / f(u[:-1])).clamp(max=0.999)
    else:
        raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    return torch.cumprod(1 - betas, dim=0)


# --- the U-Net -----------------------------------------------------------------------------------

def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(NORM_GROUPS, channels), channels)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of the integer timestep (Transformer style), then a 2-layer MLP."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        half = width // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.to(torch.float32)[:, None] * self.freqs[None]
        return self.mlp(torch.cat([torch.sin(args), torch.cos(args)], dim=1))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the (time + class) embedding added in between."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the pixels, residual (as in DDPM)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, 1, C, H * W).transpose(3, 4)  # 1 head: 4D for ONNX export
        h = F.scaled_dot_product_attention(*qkv.unbind(1))  # [B, 1, HW, C]
        return x + self.out(h.transpose(2, 3).reshape(B, C, H, W))


class UNet(nn.Module):
    """DDPM-style U-Net: output has the input's shape (eps or v).

    `num_classes` K > 0 adds a class embedding with K + 1 rows; row K is the null class
    (the last index, so real classes keep their dataset indices).
    """

    def __init__(self, channels: int, image_size: int, width: int = 32, channel_mult: Sequence[int] = (1, 2, 2),
                 num_res_blocks: int = 1, attn_resolution: int = 8, dropout: float = 0.0, num_classes: int = 0):
        super().__init__()
        emb_dim = 4 * width
        self.num_classes = num_classes
        self.time_emb = TimeEmbedding(width, emb_dim)
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)

        def block(cin: int, cout: int, res: int) -> nn.ModuleList:
            layers = [ResBlock(cin, cout, emb_dim, dropout)]
            if res <= attn_resolution:
                layers.append(Attention(cout))
            return nn.ModuleList(layers)

        self.down = nn.ModuleList()
        skips, ch, res = [width], width, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, width * mult, res))
                ch = width * mult
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout),
                                  Attention(ch) if res <= attn_resolution else nn.Identity(),
                                  ResBlock(ch, ch, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(ch + skips.pop(), width * mult, res))
                ch = width * mult
            if level > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(ch, ch, 3, padding=1)]))
                res *= 2
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_emb(t)
        if self.class_emb is not None:
            emb = emb + self.class_emb(label)
        h = self.conv_in(x)
        hs = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            hs.append(h)
        h = self._run(self.mid, h, emb)
        for layers in self.up:
            if isinstance(layers[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(layers, h, emb)
        return self.out(h)

    @staticmethod
    def _run(layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h


# --- one denoising step, per-sample coefficients -------------------------------------------------

class DiffusionStep(nn.Module):
    """One denoising step of DDPM, DDIM or DPM-Solver++(2M), chosen per sample.

    forward(x_t, t, t_prev, label, guidance, eta, noise, sampler, x0_prev, t_last) -> (x_prev, x0)
      x_t [B,C,H,W]; t [B] in [0, T); t_prev [B] in [-1, T), -1 = final step (abar = 1);
      label [B] (K = null class; ignored by an unconditional model); guidance [B]: CFG scale w,
      out = out_null + w * (out_cond - out_null); eta [B]: DDIM eta; noise [B,C,H,W] ~ N(0, 1)
      (used by DDPM and by DDIM with eta > 0); sampler [B]: 0 DDPM, 1 DDIM, 2 (or anything else)
      DPM-Solver++(2M); x0_prev [B,C,H,W] and t_last [B]: the DPM-Solver++ state, the previous step's
      x0 and its timestep (t_last = -1: no previous step, first order).
    Returns the sample at t_prev and this step's clipped x0 (the next call's x0_prev).
    """

    def __init__(self, unet: UNet, alpha_bar: torch.Tensor, prediction: str = "eps"):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}: use one of {', '.join(PREDICTIONS)}")
        self.unet = unet
        self.prediction = prediction
        self.num_classes = unet.num_classes
        ab = torch.cat([alpha_bar.to(torch.float64), torch.ones(1, dtype=torch.float64)])  # index T: abar = 1
        self.register_buffer("sqrt_ab", ab.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_1m_ab", (1 - ab).sqrt().float(), persistent=False)
        self.T = alpha_bar.numel()

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) = (sqrt(abar_t), sqrt(1 - abar_t)) as [B,1,1,1]; t = -1 gives (1, 0)."""
        idx = torch.where(t < 0, torch.full_like(t, self.T), t)
        return self.sqrt_ab[idx][:, None, None, None], self.sqrt_1m_ab[idx][:, None, None, None]

    def model_output(self, x_t: torch.Tensor, t: torch.Tensor, label: torch.Tensor,
                     guidance: torch.Tensor) -> torch.Tensor:
        if not self.num_classes:
            return self.unet(x_t, t)
        # conditional and null halves as one doubled batch
        null = torch.full_like(label, self.num_classes)
        out = self.unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([label, null]))
        cond, uncond = out[: x_t.shape[0]], out[x_t.shape[0]:]  # not chunk(2): it pins the batch in export
        return uncond + guidance[:, None, None, None] * (cond - uncond)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, label: torch.Tensor,
                guidance: torch.Tensor, eta: torch.Tensor, noise: torch.Tensor, sampler: torch.Tensor,
                x0_prev: torch.Tensor, t_last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model_output(x_t, t, label, guidance)
        a_t, s_t = self.coefficients(t)
        a_p, s_p = self.coefficients(t_prev)
        a_l, s_l = self.coefficients(t_last)

        x0 = (x_t - s_t * out) / a_t if self.prediction == "eps" else a_t * x_t - s_t * out
        x0 = x0.clamp(-1.0, 1.0)  # the data range; keeps high-noise steps from overshooting
        eps = (x_t - a_t * x0) / s_t  # consistent with the clipped x0
        # the DDPM posterior variance for a (possibly strided) step t -> t_prev; 0 on the final step
        # (clamped so that out-of-order inputs, t_prev >= t, give finite garbage rather than NaN)
        beta = (1 - (a_t / a_p) ** 2).clamp(min=0)  # 1 - abar_t / abar_prev: the strided step's beta
        var = (s_p / s_t) ** 2 * beta

        # DDPM ancestral: posterior mean with alpha_t = abar_t / abar_prev (DDPMScheduler, custom timesteps)
        ddpm = (a_p * beta / s_t**2) * x0 + ((a_t / a_p) * s_p**2 / s_t**2) * x_t + var.sqrt() * noise

        # DDIM (Song et al. 2021, eq. 12)
        std = eta[:, None, None, None] * var.sqrt()
        ddim = a_p * x0 + (s_p**2 - std**2).clamp(min=0).sqrt() * eps + std * noise

        # DPM-Solver++(2M), data prediction, midpoint form; lambda = log(alpha / sigma).
        # phi = alpha_p (1 - e^-h) written without lambda so the final step (sigma_p = 0, h = inf) is finite.
        phi = a_p - s_p * a_t / s_t
        first = (s_p / s_t) * x_t + phi * x0  # = DDIM with eta = 0
        lam_t, lam_p, lam_l = (torch.log(a) - torch.log(s) for a, s in ((a_t, s_t), (a_p, s_p), (a_l, s_l)))
        # second order needs a previous step (t_last > t; -1 = none) and is off on the final step
        second_order = ((t_last > t) & (t_prev >= 0))[:, None, None, None]  # lower_order_final
        r = torch.where(second_order, (lam_p - lam_t) / (lam_t - lam_l), torch.zeros_like(lam_t))  # 1 / r0
        dpm = first + 0.5 * phi * r * (x0 - x0_prev)

        s = sampler[:, None, None, None]
        x_prev = torch.where(s == 0, ddpm, torch.where(s == 1, ddim, dpm))
        return x_prev, x0


def run_sampler(step_module: DiffusionStep, x_T: torch.Tensor, labels: torch.Tensor, sampler: int | str,
                steps: int, guidance: float, eta: float, generator: torch.Generator | None) -> torch.Tensor:
    """Loop `step_module` over `timestep_pairs(steps, T)` from x_T; returns the final sample.

    One noise tensor of x_T's shape is drawn from `generator` before every step, used or not,
    so a loop elsewhere (ONNX, the server) reproduces it by drawing the same way.
    """
    sampler = SAMPLERS[sampler] if isinstance(sampler, str) else int(sampler)
    B = x_T.shape[0]

    def full(value: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.full((B,), value, dtype=dtype, device=x_T.device)

    x, x0_prev, t_last = x_T, torch.zeros_like(x_T), -1
    for t, t_prev in timestep_pairs(steps, step_module.T):
        noise = torch.randn(x_T.shape, generator=generator, device=x_T.device, dtype=x_T.dtype)
        x, x0_prev = step_module(x, full(t, torch.int64), full(t_prev, torch.int64), labels,
                                 full(guidance, torch.float32), full(eta, torch.float32), noise,
                                 full(sampler, torch.int64), x0_prev, full(t_last, torch.int64))
        t_last = t
    return x


class _Denoiser(nn.Module):
    """The raw U-Net output (eps or v) for export; `label` only when the model is conditional."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x_t, t, label)


# --- the family ----------------------------------------------------------------------------------

class Diffusion(Family):
    name = "diffusion"
    Config = DiffusionConfig
    data_kind = "images"

    @classmethod
    def check(cls, config: DiffusionConfig, info: DataInfo) -> None:
        if info.size not in (32, 64, 128, 256):
            raise ConfigError(f"--image-size {info.size} is not supported by diffusion: "
                              "use a power of two from 32 to 256")
        if info.channels not in (1, 3):
            raise ConfigError(f"--channels {info.channels} is not supported: use 1 or 3")
        if config.width < NORM_GROUPS or config.width % NORM_GROUPS:
            raise ConfigError(f"--set width={config.width} is not supported by diffusion: "
                              f"use a multiple of {NORM_GROUPS} (GroupNorm groups)")
        mult = tuple(config.channel_mult)
        if not mult or min(mult) < 1 or info.size % 2 ** (len(mult) - 1) or info.size >> (len(mult) - 1) < 4:
            raise ConfigError(f"--set channel_mult={','.join(map(str, mult))} does not fit {info.size}x{info.size} "
                              "images: one positive entry per level, lowest resolution at least 4")
        if config.num_res_blocks < 1:
            raise ConfigError(f"--set num_res_blocks={config.num_res_blocks}: use 1 or more")
        if config.prediction not in PREDICTIONS:
            raise ConfigError(f"--set prediction={config.prediction}: use one of {', '.join(PREDICTIONS)}")
        if config.schedule not in SCHEDULES:
            raise ConfigError(f"--set schedule={config.schedule}: use one of {', '.join(SCHEDULES)}")
        if config.num_train_timesteps < 2:
            raise ConfigError(f"--set num_train_timesteps={config.num_train_timesteps}: use 2 or more")
        if not 1 <= config.sample_steps <= config.num_train_timesteps:
            raise ConfigError(f"--set sample_steps={config.sample_steps}: use 1 to {config.num_train_timesteps}")
        if not 0.0 <= config.p_uncond < 1.0:
            raise ConfigError(f"--set p_uncond={config.p_uncond}: use a probability in [0, 1)")
        if not 0.0 <= config.ema_decay < 1.0:
            raise ConfigError(f"--set ema_decay={config.ema_decay}: use a value in [0, 1)")
        if config.conditional and not info.class_names:
            raise ConfigError("--set conditional=true needs labelled data: these images have no classes")

    def __init__(self, config: DiffusionConfig, info: DataInfo, device: torch.device):
        super().__init__(config, info, device)
        cond = bool(info.class_names) if config.conditional is None else config.conditional
        self.num_classes = info.num_classes if cond else 0  # K; the null label is K
        unet = self.add_net("unet", UNet(info.channels, info.size, config.width, tuple(config.channel_mult),
                                         config.num_res_blocks, config.attn_resolution, config.dropout,
                                         self.num_classes))
        self.ema = copy.deepcopy(unet).eval().requires_grad_(False)
        self.ema_updates = 0
        self.alpha_bar = alpha_bar_schedule(config.schedule, config.num_train_timesteps)
        ab = self.alpha_bar.to(device)
        self._sqrt_ab, self._sqrt_1m_ab = ab.sqrt().float(), (1 - ab).sqrt().float()
        self.optimizers["unet"] = torch.optim.AdamW(unet.parameters(), lr=config.lr,
                                                    weight_decay=config.weight_decay)
        warmup = max(1, config.warmup_steps)
        self.schedulers["unet"] = torch.optim.lr_scheduler.LambdaLR(
            self.optimizers["unet"], lambda i: min(1.0, (i + 1) / warmup))

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        x, y = (v.to(self.device) for v in batch)
        B = x.shape[0]
        t = torch.randint(0, self.config.num_train_timesteps, (B,), device=self.device)
        noise = torch.randn_like(x)
        a, s = self._sqrt_ab[t][:, None, None, None], self._sqrt_1m_ab[t][:, None, None, None]
        x_t = a * x + s * noise
        target = noise if self.config.prediction == "eps" else a * noise - s * x
        label = None
        if self.num_classes:
            drop = torch.rand(B, device=self.device) < self.config.p_uncond
            label = torch.where(drop, torch.full_like(y, self.num_classes), y)
        loss = F.mse_loss(self.train_nets["unet"](x_t, t, label), target)

        opt = self.optimizers["unet"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.nets["unet"].parameters(), self.config.grad_clip)
        opt.step()
        return {"loss": loss.detach()}

    def on_step_end(self, step: int) -> None:
        super().on_step_end(step)
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        n = self.ema_updates
        decay = min(self.config.ema_decay, (1 + n) / (10 + n))  # warm-up: early weights are forgotten fast
        for e, p in zip(self.ema.parameters(), self.nets["unet"].parameters()):
            e.lerp_(p.detach(), 1.0 - decay)
        self.ema_updates = n + 1

    def step_module(self) -> DiffusionStep:
        """The sampling step around the EMA U-Net (shares its weights), in eval mode."""
        return DiffusionStep(self.ema, self.alpha_bar, self.config.prediction).to(self.device).eval()

    @torch.no_grad()
    def sample(self, batch: tuple[torch.Tensor, torch.Tensor], seed: int) -> torch.Tensor:
        n = batch[0].shape[0]
        modes = {k: net.training for k, net in self.nets.items()}
        self.train(False)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        K = self.num_classes
        labels = torch.arange(n, device=self.device) % K if K else torch.zeros(n, dtype=torch.int64,
                                                                               device=self.device)
        x_T = torch.randn((n, self.info.channels, self.info.size, self.info.size), generator=gen,
                          device=self.device)
        images = run_sampler(self.step_module(), x_T, labels, "ddim", self.config.sample_steps,
                             self.config.guidance if K else 1.0, 0.0, gen)
        for k, net in self.nets.items():
            net.train(modes[k])
        return images.clamp(-1, 1)

    def export_graphs(self) -> dict[str, ExportGraph]:
        C, S, T, K = self.info.channels, self.info.size, self.config.num_train_timesteps, self.num_classes
        image = (-1, C, S, S)
        den_inputs = {"x_t": TensorSpec("float32", image, -3.0, 3.0), "t": TensorSpec("int64", (-1,), 0, T)}
        if K:
            den_inputs["label"] = TensorSpec("int64", (-1,), 0, K + 1)
        step_inputs = {
            "x_t": TensorSpec("float32", image, -3.0, 3.0),
            "t": TensorSpec("int64", (-1,), 0, T),
            "t_prev": TensorSpec("int64", (-1,), -1, T),
            "label": TensorSpec("int64", (-1,), 0, K + 1 if K else 1),
            "guidance": TensorSpec("float32", (-1,), 0.0, 5.0),
            "eta": TensorSpec("float32", (-1,), 0.0, 1.0),
            "noise": TensorSpec("float32", image, -3.0, 3.0),
            "sampler": TensorSpec("int64", (-1,), 0, 3),
            "x0_prev": TensorSpec("float32", image, -1.0, 1.0),
            "t_last": TensorSpec("int64", (-1,), -1, T),
        }
        return {
            "denoiser": ExportGraph(_Denoiser(self.ema).eval(), den_inputs,
                                    {"output": TensorSpec("float32", image)}),
            "step": ExportGraph(self.step_module(), step_inputs,
                                {"x_prev": TensorSpec("float32", image), "x0": TensorSpec("float32", image)}),
        }

    def extra_state(self) -> dict:
        return {"ema": self.ema.state_dict(), "ema_updates": self.ema_updates}

    def load_extra_state(self, state: dict) -> None:
        if "ema" in state:
            self.ema.load_state_dict(state["ema"])
            self.ema_updates = state["ema_updates"]
