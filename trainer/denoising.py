"""What the denoising families (trainer/models/diffusion.py, flow.py) share: the U-Net, the sampling loop the
server runs, written in PyTorch for training-time grids, and export's check of the served loop against it.

`run_sampler` runs a serving sampler's plan (serve/samplers/) over any schedule (serve/samplers/schedule.py): x0 from
the network's output as the schedule's prediction says, then the plan's linear update. So the grids a family draws
while training, export's check and the server agree.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from serve.samplers import SAMPLERS, NoiseSchedule
from trainer.models.base import ConfigError, DataInfo

GUIDANCE_SCALE = 100.0  # guidance scales 1..3 become embedding positions 100..300 (timesteps span 0..999)
NORM_GROUPS = 8  # GroupNorm groups: width 32 gives 4 channels per group, DDPM's ratio (128 ch / 32 groups)
SERVED_LOOP_TOLERANCE = 1e-3  # export's served loop vs PyTorch, on the [-1, 1] image scale


def check_config(config, info: DataInfo, family: str) -> None:
    """ConfigError naming the option when the fields every denoising family's config has (the U-Net's width,
    channel_mult, num_res_blocks; sample_steps, p_uncond, ema_decay, conditional) do not fit the data or each other.
    The family checks num_train_timesteps first."""
    if info.size not in (32, 64, 128, 256):
        raise ConfigError(f"--image-size {info.size} is not supported by {family}: "
                          "use a power of two from 32 to 256")
    if info.channels not in (1, 3):
        raise ConfigError(f"--channels {info.channels} is not supported: use 1 or 3")
    if config.width < NORM_GROUPS or config.width % NORM_GROUPS:
        raise ConfigError(f"--set width={config.width} is not supported by {family}: "
                          f"use a multiple of {NORM_GROUPS} (GroupNorm groups)")
    mult = tuple(config.channel_mult)
    if not mult or min(mult) < 1 or info.size % 2 ** (len(mult) - 1) or info.size >> (len(mult) - 1) < 4:
        raise ConfigError(f"--set channel_mult={','.join(map(str, mult))} does not fit {info.size}x{info.size} "
                          "images: one positive entry per level, lowest resolution at least 4")
    if config.num_res_blocks < 1:
        raise ConfigError(f"--set num_res_blocks={config.num_res_blocks}: use 1 or more")
    if not 1 <= config.sample_steps <= config.num_train_timesteps:
        raise ConfigError(f"--set sample_steps={config.sample_steps}: use 1 to {config.num_train_timesteps}")
    if not 0.0 <= config.p_uncond < 1.0:
        raise ConfigError(f"--set p_uncond={config.p_uncond}: use a probability in [0, 1)")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ConfigError(f"--set ema_decay={config.ema_decay}: use a value in [0, 1)")
    if config.conditional and not info.class_names:
        raise ConfigError("--set conditional=true needs labelled data: these images have no classes")


def drop_labels(y: torch.Tensor, num_classes: int, p_uncond: float) -> torch.Tensor | None:
    """Labels with each replaced by the null class K with probability p_uncond (classifier-free guidance's
    training); None for an unconditional model."""
    if not num_classes:
        return None
    drop = torch.rand(y.shape[0], device=y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, num_classes), y)


def optimise(opt: torch.optim.Optimizer, net: nn.Module, loss: torch.Tensor, grad_clip: float) -> dict:
    """One optimiser step, the global gradient norm clipped at grad_clip (0: not clipped); the loss by name."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    opt.step()
    return {"loss": loss.detach()}


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, updates: int, ema_decay: float) -> None:
    """One EMA step of `net`'s weights into `ema`, the `updates`-th; early weights are forgotten fast (warm-up)."""
    decay = min(ema_decay, (1 + updates) / (10 + updates))
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)


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
        self.eps_below = 0  # set_eps_below

    def set_eps_below(self, below: int, alpha_bar: torch.Tensor) -> None:
        """A v model whose output is eps at timesteps below `below`, turned into v here (v = (eps - sigma x_t) /
        alpha): a student of an eps teacher starts there at its teacher's prediction exactly (0: v everywhere).
        The tables are buffers outside the state dict: checkpoints and the teacher's weights are unchanged."""
        self.eps_below = below
        alpha_bar = alpha_bar.to(self.conv_in.weight.device)
        self.register_buffer("_alpha", alpha_bar.sqrt().float(), persistent=False)
        self.register_buffer("_sigma", (1 - alpha_bar).sqrt().float(), persistent=False)

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
        out = self.out(h)
        if self.eps_below:
            a, s = self._alpha[t][:, None, None, None], self._sigma[t][:, None, None, None]
            out = torch.where((t < self.eps_below)[:, None, None, None], (out - s * x) / a, out)
        return out

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
    if not getattr(unet, "null_class", True):  # a model from elsewhere without the null class: guidance 1 only
        return unet(x, t, label)
    if unet.guidance_emb is not None:
        return unet(x, t, label, torch.full((x.shape[0],), guidance, dtype=torch.float32, device=x.device))
    null = torch.full_like(label, unet.num_classes)
    out = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([label, null]))
    cond, uncond = out[: x.shape[0]], out[x.shape[0]:]
    return uncond + guidance * (cond - uncond)


def run_sampler(unet: UNet, schedule: NoiseSchedule, x_T: torch.Tensor, labels: torch.Tensor, sampler: str,
                steps: int, guidance: float, eta: float, generator: torch.Generator | None,
                noises: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """`sampler` (a serve.samplers name) from x_T over the schedule's grid (`schedule.pairs(steps)`); returns the
    final sample. `unet` is anything with the U-Net's call and its `num_classes` and `guidance_emb`.

    The same plan the server runs: x0 from the model output (clipped where the sampler says), then the plan's
    linear update of the sampler state. Samplers that use noise draw one tensor of x_T's shape per step from
    `generator`, or take step i's from `noises[i]`.
    """
    s = SAMPLERS[sampler]
    pairs = schedule.pairs(steps)
    plan = torch.from_numpy(s.plan(schedule, pairs, eta)).to(x_T.device, torch.float32)
    state = [x_T] + [torch.zeros_like(x_T) for _ in s.state[1:]]
    for i, (t, _) in enumerate(pairs):
        tt = torch.from_numpy(schedule.model_time([t] * x_T.shape[0])).to(x_T.device)
        out = guided_output(unet, state[0], tt, labels, guidance)
        cx, co = schedule.to_x0(t)
        x0 = cx * state[0] + co * out
        if s.clip_x0 and schedule.clip_range:
            x0 = x0.clamp(-schedule.clip_range, schedule.clip_range)
        if not s.uses_noise(eta):
            noise = torch.zeros_like(x_T)
        elif noises is not None:
            noise = noises[i]
        else:
            noise = torch.randn(x_T.shape, generator=generator, device=x_T.device, dtype=x_T.dtype)
        terms = [*state, x0, noise]
        state = [sum(plan[i, j, k] * terms[k] for k in range(len(terms))) for j in range(len(s.state))]
    return state[0]


@torch.no_grad()
def sample_grid(unet: nn.Module, schedule: NoiseSchedule, n: int, info: DataInfo, sampler: str, steps: int,
                guidance: float, seed: int, device: torch.device) -> torch.Tensor:
    """A training-time grid: n images, labels i % K (K = unet.num_classes), x_T and noise from `seed`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    K = unet.num_classes
    labels = torch.arange(n, device=device) % K if K else torch.zeros(n, dtype=torch.int64, device=device)
    x_T = torch.randn((n, info.channels, info.size, info.size), generator=gen, device=device)
    return run_sampler(unet, schedule, x_T, labels, sampler, steps, guidance if K else 1.0, 0.0, gen).clamp(-1, 1)


def served_loop_check(unet: nn.Module, num_classes: int, version_dir: Path, manifest: dict, sampler: str,
                      steps: int, batch: int = 4) -> dict:
    """Export's check of a denoising model: a run through the server's own loop (serve.diffusion over the exported
    denoiser, the iteration graph assembled as at load time) vs `run_sampler` on `unet`, with `sampler` and
    `steps`; its final max abs diff, as a parity entry of the manifest."""
    import queue

    from serve.diffusion import DiffusionScheduler, Done, row_rng
    from serve.manifest import parse_manifest
    from serve.samplers import state_size
    from serve.session import DenoisingSession

    m = parse_manifest(manifest)
    d = m.diffusion
    schedule = NoiseSchedule.from_manifest(d)
    session = DenoisingSession(version_dir, m, state_size(), capacity=batch, device="cpu")
    loop = DiffusionScheduler(session, schedule, name=m.name, max_batch_size=batch)
    k = num_classes
    labels = np.arange(batch) % max(k, 1)
    guidance = 3.0 if k and m.null_class else 1.0
    events: queue.Queue = queue.Queue()
    loop.submit(seed=7, labels=labels, guidance=guidance, eta=0.0, sampler=SAMPLERS[sampler], steps=steps,
                deliver=events.put)
    try:
        while not isinstance(event := events.get(timeout=600), (Done, Exception)):
            pass
    finally:
        loop.close()
    if isinstance(event, Exception):
        from trainer.export import ExportError

        raise ExportError(f"the served loop failed on the exported denoiser: {event}")
    shape = (m.image["channels"], m.image["height"], m.image["width"])
    rngs = [row_rng(7, i) for i in range(batch)]
    x_T = np.stack([rng.standard_normal(shape, dtype=np.float32) for rng in rngs])
    noises = None
    if SAMPLERS[sampler].uses_noise(0.0):  # the rows' own draws, in the server's order: x_T, then one per step
        noises = [torch.from_numpy(np.stack([rng.standard_normal(shape, dtype=np.float32) for rng in rngs]))
                  for _ in range(steps)]
    with torch.no_grad():
        expected = run_sampler(unet, schedule, torch.from_numpy(x_T), torch.from_numpy(labels), sampler,
                               steps, guidance, 0.0, None, noises).clamp(-1, 1)
    err = float(np.abs(event.images - expected.numpy()).max())
    return {f"{sampler}_{steps}_steps": {"max_abs": err, "tolerance": SERVED_LOOP_TOLERANCE,
                                         "what": f"{steps}-step {sampler} loop through the served loop"}}
