"""Denoising diffusion (DDPM) with a small U-Net, classifier-free guidance and a per-sample step module.

Training is the DDPM objective of Ho et al. (2020): draw t ~ U[0, T), noise x0 to
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps and regress the U-Net output on eps ("eps") or on
v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 ("v", Salimans & Ho 2022). Labels are replaced by the null
class with probability `p_uncond` so one network is both conditional and unconditional (Ho & Salimans,
classifier-free guidance). An EMA of the U-Net weights is what samples and what is exported.

Sampling is serving code: the samplers live in serve/samplers/ (one file each) and the export is the `denoiser`
alone. The training-time sample grids run the same samplers' plans here in PyTorch (`run_sampler`), so the grids
and the server agree (export checks it: the served loop against this one).

Timesteps ("trailing" spacing, as diffusers' timestep_spacing="trailing"): for `steps` sampling steps
of a model trained with T timesteps, step i = 0..steps-1 runs at

    t_i = round(T * (steps - i) / steps) - 1        (round half to even, as Python and numpy do)

and goes to t_{i+1}, the last step going to t_prev = -1 ("t = 0 reached": abar = 1, sigma = 0). The
first step is always t = T - 1, the noisiest timestep, which is why trailing beats "leading" spacing
at few steps. `timestep_pairs` returns these (t, t_prev) pairs; every sampler uses them.
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from serve.diffusion import timestep_pairs  # one copy of the rule, shared with the server (no torch there)
from serve.samplers import SAMPLERS, NoiseSchedule
from serve.samplers.schedule import SCHEDULES, alpha_bar
from trainer.models.base import ConfigError, DataInfo, ExportGraph, Family, FamilyConfig, TensorSpec

GUIDANCE_SCALE = 100.0  # guidance scales 1..3 become embedding positions 100..300 (timesteps span 0..999)
NORM_GROUPS = 8  # GroupNorm groups: width 32 gives 4 channels per group, DDPM's ratio (128 ch / 32 groups)
PREDICTIONS = ("eps", "v")


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
    guidance: float = 3.0  # CFG scale for the progress grid (conditional models); a request's default when served
    # --- distillation (trainer/distill.py): set distill_from to train a few-step student of an exported model
    distill_from: str = ""  # the teacher's version folder, e.g. exported/mnist-diffusion/1; "" trains a teacher
    student_steps: tuple[int, ...] = (1, 2, 4)  # the step counts the student serves; each divides the largest
    # how the student is served: a registered sampler, or one per step count ({"2": "consistency", "4": "ddim"})
    student_sampler: str | dict = "ddim"
    teacher_steps: int = 8  # steps of the teacher's trajectories; a multiple of the largest student count
    teacher_sampler: str = "dpm++"  # the (deterministic) serving sampler that solves the teacher's trajectories
    trajectories: int = 10000  # teacher trajectories, made once at the first step (a pure function of the seed)
    guidance_range: tuple[float, float] = (1.0, 3.0)  # each trajectory's guidance scale is drawn from here
    huber_c: float = 0.0  # Pseudo-Huber constant; 0: 0.00054 sqrt(pixels) (Song & Dhariwal 2023)


# --- schedule ------------------------------------------------------------------------------------

def alpha_bar_schedule(schedule: str, num_train_timesteps: int) -> torch.Tensor:
    """abar_t for t = 0..T-1, float64 (serve.samplers.schedule has the rule: one copy for both sides)."""
    return torch.from_numpy(alpha_bar(schedule, num_train_timesteps))


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
                 num_res_blocks: int = 1, attn_resolution: int = 8, dropout: float = 0.0, num_classes: int = 0,
                 guidance_input: bool = False):
        super().__init__()
        emb_dim = 4 * width
        self.num_classes = num_classes
        self.time_emb = TimeEmbedding(width, emb_dim)
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        # a distilled student takes the guidance scale as an input (Meng et al. 2023), embedded like t; the last
        # layer starts at zero, so a student starts as its teacher's conditional model
        self.guidance_emb = TimeEmbedding(width, emb_dim) if guidance_input else None
        if self.guidance_emb is not None:
            nn.init.zeros_(self.guidance_emb.mlp[-1].weight)
            nn.init.zeros_(self.guidance_emb.mlp[-1].bias)
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

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_emb(t)
        if self.class_emb is not None:
            emb = emb + self.class_emb(label)
        if self.guidance_emb is not None:
            emb = emb + self.guidance_emb(GUIDANCE_SCALE * guidance)
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


# --- sampling: the server's sampler plans, applied in PyTorch ------------------------------------

def guided_output(unet: UNet, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor,
                  guidance: float) -> torch.Tensor:
    """The U-Net output with classifier-free guidance: one doubled batch (label, then the null class K); a
    student takes the scale as an input instead."""
    if not unet.num_classes:
        return unet(x, t)
    if unet.guidance_emb is not None:
        return unet(x, t, label, torch.full((x.shape[0],), guidance, dtype=torch.float32, device=x.device))
    null = torch.full_like(label, unet.num_classes)
    out = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([label, null]))
    cond, uncond = out[: x.shape[0]], out[x.shape[0]:]
    return uncond + guidance * (cond - uncond)


def run_sampler(unet: UNet, schedule: NoiseSchedule, x_T: torch.Tensor, labels: torch.Tensor, sampler: str,
                steps: int, guidance: float, eta: float, generator: torch.Generator | None,
                noises: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """`sampler` (a serve.samplers name) from x_T over `timestep_pairs(steps, T)`; returns the final sample.

    The same plan the server runs: x0 from the model output (clipped where the sampler says), then the plan's
    linear update of the sampler state. Samplers that use noise draw one tensor of x_T's shape per step from
    `generator`, or take step i's from `noises[i]`.
    """
    s = SAMPLERS[sampler]
    pairs = timestep_pairs(steps, schedule.T)
    plan = torch.from_numpy(s.plan(schedule, pairs, eta)).to(x_T.device, torch.float32)
    state = [x_T] + [torch.zeros_like(x_T) for _ in s.state[1:]]
    for i, (t, _) in enumerate(pairs):
        tt = torch.full((x_T.shape[0],), t, dtype=torch.int64, device=x_T.device)
        out = guided_output(unet, state[0], tt, labels, guidance)
        cx, co = schedule.to_x0(t)
        x0 = cx * state[0] + co * out
        if s.clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        if not s.uses_noise(eta):
            noise = torch.zeros_like(x_T)
        elif noises is not None:
            noise = noises[i]
        else:
            noise = torch.randn(x_T.shape, generator=generator, device=x_T.device, dtype=x_T.dtype)
        terms = [*state, x0, noise]
        state = [sum(plan[i, j, k] * terms[k] for k in range(len(terms))) for j in range(len(s.state))]
    return state[0]


class _Denoiser(nn.Module):
    """The raw U-Net output (eps or v) for export; `label` only when the model is conditional."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x_t, t, label, guidance)


# --- the family ----------------------------------------------------------------------------------

class Diffusion(Family):
    name = "diffusion"
    Config = DiffusionConfig

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
        if config.distill_from:
            cls._check_student(config, info)

    # architecture and schedule: a student keeps its teacher's, since it starts from the teacher's weights
    TEACHER_FIELDS = ("width", "channel_mult", "num_res_blocks", "attn_resolution", "prediction", "schedule",
                      "num_train_timesteps")

    @classmethod
    def _check_student(cls, config: DiffusionConfig, info: DataInfo) -> None:
        from trainer.distill import TeacherError, load_teacher

        try:
            teacher = load_teacher(config.distill_from)
        except TeacherError as e:
            raise ConfigError(str(e)) from None
        for name in cls.TEACHER_FIELDS:
            mine, theirs = getattr(config, name), teacher.config.get(name)
            if (list(mine) if isinstance(mine, tuple) else mine) != theirs:
                raise ConfigError(f"--set {name}={mine}: the teacher {teacher.path} has {theirs}; a student keeps "
                                  "its teacher's architecture and schedule")
        image = teacher.manifest["image"]
        if (image["channels"], image["height"]) != (info.channels, info.size) or \
                len(teacher.manifest.get("classes", [])) != info.num_classes:
            raise ConfigError(f"--data: the teacher {teacher.path} was trained on {image['channels']}x{image['height']}"
                              f"x{image['width']} images with {len(teacher.manifest.get('classes', []))} classes; "
                              "train the student on the teacher's data")
        steps = tuple(config.student_steps)
        if not steps or min(steps) < 1 or any(max(steps) % k for k in steps) or max(steps) > config.num_train_timesteps:
            raise ConfigError(f"--set student_steps={','.join(map(str, steps))}: use step counts that divide the "
                              "largest, e.g. 1,2,4")
        if config.teacher_steps < 1 or config.teacher_steps % max(steps):
            raise ConfigError(f"--set teacher_steps={config.teacher_steps}: use a multiple of {max(steps)} "
                              "(the student's largest step count)")
        lo, hi = config.guidance_range
        if not 0.0 <= lo <= hi:
            raise ConfigError(f"--set guidance_range={lo},{hi}: use 0 <= low <= high")
        chosen = config.student_sampler
        named = chosen.values() if isinstance(chosen, dict) else [chosen]
        if not named or any(s not in SAMPLERS for s in named) or \
                isinstance(chosen, dict) and set(chosen) != {str(k) for k in steps}:
            raise ConfigError(f"--set student_sampler={json.dumps(chosen)}: use one of {', '.join(SAMPLERS)}, or an "
                              "object with one for each of student_steps, e.g. {\"2\": \"consistency\", \"4\": "
                              "\"ddim\"}")
        if config.teacher_sampler not in SAMPLERS or SAMPLERS[config.teacher_sampler].uses_noise(0.0):
            raise ConfigError(f"--set teacher_sampler={config.teacher_sampler}: use a deterministic sampler: "
                              + ", ".join(k for k, v in SAMPLERS.items() if not v.uses_noise(0.0)))
        if config.trajectories < 1:
            raise ConfigError(f"--set trajectories={config.trajectories}: use 1 or more")

    def __init__(self, config: DiffusionConfig, info: DataInfo, device: torch.device):
        super().__init__(config, info, device)
        cond = bool(info.class_names) if config.conditional is None else config.conditional
        self.num_classes = info.num_classes if cond else 0  # K; the null label is K
        self.student = bool(config.distill_from)
        unet = self.add_net("unet", UNet(info.channels, info.size, config.width, tuple(config.channel_mult),
                                         config.num_res_blocks, config.attn_resolution, config.dropout,
                                         self.num_classes, guidance_input=self.student and self.num_classes > 0))
        if self.student:  # the trajectories' seed comes from the run's seed; kept in the checkpoint for resume
            self.trajectory_seed = int(torch.randint(0, 2**31 - 1, ()).item())
            self._pairs: dict[str, torch.Tensor] | None = None
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
        if self.student:
            return self._distill_step(batch[0].shape[0], step)
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
        return self._optimise(loss)

    def _optimise(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        opt = self.optimizers["unet"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.nets["unet"].parameters(), self.config.grad_clip)
        opt.step()
        return {"loss": loss.detach()}

    # --- distillation (trainer/distill.py has the method) ----------------------------------------

    def student_grid(self) -> list[int]:
        from trainer.distill import student_grid

        return student_grid(max(self.config.student_steps), self.config.num_train_timesteps)

    def _start_student(self) -> None:
        """The teacher's weights into the student (a fresh run's first step): read from its ONNX file, checked."""
        from trainer.distill import TeacherError, check_same_outputs, load_teacher, unet_from_onnx

        teacher = load_teacher(self.config.distill_from)
        unet = self.nets["unet"]
        missing = unet_from_onnx(teacher.onnx_path, unet)
        unknown = [k for k in missing if not k.startswith("guidance_emb.")]
        if unknown:
            raise TeacherError(f"{teacher.onnx_path}: has no weights for {unknown[:3]}: not this architecture")
        was = unet.training
        unet.eval()
        check_same_outputs(teacher, unet, self.num_classes)
        unet.train(was)
        self.ema.load_state_dict(unet.state_dict())

    def _trajectory_pairs(self) -> dict[str, torch.Tensor]:
        """This process's share of the teacher's trajectories (made once; a pure function of the seed)."""
        from trainer.distill import load_teacher, log_stderr, trajectories

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        cfg = self.config
        n = -(-cfg.trajectories // world)
        seed = int(np.random.SeedSequence([self.trajectory_seed, rank]).generate_state(1)[0])
        data = trajectories(load_teacher(cfg.distill_from), n, self.student_grid(), cfg.teacher_steps,
                            tuple(cfg.guidance_range), cfg.p_uncond, seed, sampler=cfg.teacher_sampler,
                            log=log_stderr if rank == 0 else None)
        return {k: torch.from_numpy(v) for k, v in data.items()}

    def _distill_step(self, B: int, step: int) -> dict[str, torch.Tensor]:
        """Regress the student's x0 at a trajectory point on the trajectory's end (Pseudo-Huber)."""
        from trainer.distill import default_huber_c

        if step == 0:
            self._start_student()
        if self._pairs is None:  # once per process: the trajectories and the timesteps they were kept at
            self._pairs, self._grid = self._trajectory_pairs(), torch.tensor(self.student_grid())
        P, grid = self._pairs, self._grid
        idx = torch.randint(0, len(P["x0"]), (B,))
        g = torch.randint(0, len(grid), (B,))
        x_t, target = P["x"][idx, g].to(self.device), P["x0"][idx].to(self.device)
        t = grid[g].to(self.device)
        label = P["label"][idx].to(self.device) if self.num_classes else None
        w = P["guidance"][idx].to(self.device) if self.num_classes else None
        out = self.train_nets["unet"](x_t, t, label, w)
        a, s = self._sqrt_ab[t][:, None, None, None], self._sqrt_1m_ab[t][:, None, None, None]
        x0 = (x_t - s * out) / a if self.config.prediction == "eps" else a * x_t - s * out
        c = self.config.huber_c or default_huber_c(x0[0].numel())
        distance = torch.sqrt(((x0 - target) ** 2).flatten(1).sum(1) + c * c) - c
        # error in x0 at high noise is the output's error times sigma / alpha (156 at t = 999 here): weighting by
        # alpha / sigma (at most 1) keeps the noisiest steps from drowning the others' gradients (unweighted, every
        # step count scored worse in a 400-step pilot; README, "Few-step students")
        weight = (a / s).flatten().clamp(max=1.0)
        return self._optimise((weight * distance).mean())

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

    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule(self.alpha_bar.numpy(), self.config.prediction)

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
        sampler, steps = self.served_sampling() if self.student else ("ddim", self.config.sample_steps)
        images = run_sampler(self.ema, self.noise_schedule(), x_T, labels, sampler, steps,
                             self.config.guidance if K else 1.0, 0.0, gen)
        for k, net in self.nets.items():
            net.train(modes[k])
        return images.clamp(-1, 1)

    def export_graphs(self) -> dict[str, ExportGraph]:
        """The denoiser alone: samplers are serving code (serve/samplers/), assembled around it at load time."""
        C, S, T, K = self.info.channels, self.info.size, self.config.num_train_timesteps, self.num_classes
        image = (-1, C, S, S)
        inputs = {"x_t": TensorSpec("float32", image, -3.0, 3.0), "t": TensorSpec("int64", (-1,), 0, T)}
        if K:
            inputs["label"] = TensorSpec("int64", (-1,), 0, K + 1)
        if self.ema.guidance_emb is not None:
            inputs["guidance"] = TensorSpec("float32", (-1,), *self.config.guidance_range)
        return {"denoiser": ExportGraph(_Denoiser(self.ema).eval(), inputs, {"output": TensorSpec("float32", image)})}

    def student_samplers(self) -> dict[int, str]:
        """A student's sampler for each of its step counts."""
        chosen = self.config.student_sampler
        return {k: chosen[str(k)] if isinstance(chosen, dict) else chosen for k in sorted(self.config.student_steps)}

    def served_sampling(self) -> tuple[str, int]:
        """(sampler, steps) of export's served-loop check: 50 DDIM steps, or a student's own at its most steps."""
        if self.student:
            steps = max(self.config.student_steps)
            return self.student_samplers()[steps], steps
        return "ddim", 50

    def manifest_sections(self) -> dict:
        """What serving needs beyond the graphs: the schedule, the prediction type, the null class."""
        cfg = self.config
        section = {"num_train_timesteps": cfg.num_train_timesteps, "schedule": cfg.schedule,
                   "prediction": cfg.prediction, "timestep_spacing": "trailing", "null_label": self.num_classes}
        if self.student:  # how it samples: serving takes its defaults from here and refuses other step counts
            from trainer.distill import load_teacher

            teacher = {"path": cfg.distill_from}
            try:
                t = load_teacher(cfg.distill_from)
                teacher.update(name=t.manifest["name"], version=t.manifest["version"],
                               sha256=t.manifest["graphs"]["denoiser"]["sha256"])
            except Exception:  # noqa: BLE001 - exported where the teacher is not: the path is what is known
                pass
            section["student"] = {"samplers": {str(k): v for k, v in self.student_samplers().items()},
                                  "steps": sorted(cfg.student_steps),
                                  "default_steps": max(cfg.student_steps),
                                  "guidance": "input" if self.num_classes else "none",
                                  "guidance_range": list(cfg.guidance_range), "teacher": teacher}
        return {"diffusion": section}

    def extra_state(self) -> dict:
        state = {"ema": self.ema.state_dict(), "ema_updates": self.ema_updates}
        if self.student:
            state["trajectory_seed"] = self.trajectory_seed
        return state

    def load_extra_state(self, state: dict) -> None:
        if "ema" in state:
            self.ema.load_state_dict(state["ema"])
            self.ema_updates = state["ema_updates"]
        if self.student and "trajectory_seed" in state:
            self.trajectory_seed = state["trajectory_seed"]
