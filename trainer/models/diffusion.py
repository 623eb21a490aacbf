"""Denoising diffusion (DDPM) with a small U-Net (trainer/denoising.py) and classifier-free guidance.

Training is the DDPM objective of Ho et al. (2020): draw t ~ U[0, T), noise x0 to
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps and regress the U-Net output on eps ("eps") or on
v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 ("v", Salimans & Ho 2022). Labels are replaced by the null
class with probability `p_uncond` so one network is both conditional and unconditional (Ho & Salimans,
classifier-free guidance). An EMA of the U-Net weights is what samples and what is exported.

Sampling is serving code: the samplers live in serve/samplers/ (one file each) and the export is the `denoiser`
alone. The training-time sample grids run the same samplers' plans in PyTorch (trainer/denoising.py's
`run_sampler`), so the grids and the server agree (export checks it: the served loop against that one).

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from serve.manifest import DENOISING
from serve.samplers import SAMPLERS, NoiseSchedule
from serve.samplers.schedule import (
    DISCRETE_SCHEDULES,
    alpha_bar,
    timestep_pairs,  # noqa: F401 - one copy of the rule, shared with the server
)
from trainer.denoising import (
    UNet,
    check_config,
    drop_labels,
    optimise,
    sample_grid,
    served_loop_check,
    update_ema,
)
from trainer.models.base import ConfigError, DataInfo, ExportGraph, Family, FamilyConfig, TensorSpec

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
    # a v student of an eps teacher: below this timestep the U-Net still predicts eps, turned into v in the graph
    # (UNet.set_eps_below), so there it starts at its teacher's prediction exactly; 0: v everywhere
    eps_below: int = 0


# --- schedule ------------------------------------------------------------------------------------

def alpha_bar_schedule(schedule: str, num_train_timesteps: int) -> torch.Tensor:
    """abar_t for t = 0..T-1, float64 (serve.samplers.schedule has the rule: one copy for both sides)."""
    return torch.from_numpy(alpha_bar(schedule, num_train_timesteps))


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
    class_accuracy_bar, frechet_bar = 0.95, 3.0
    eval_sampling = ("ddim", 50)  # README's quality table and docs/quality.json are measured there
    image_to_image_bar = (0.7, 0.90)
    student_family = "diffusion"  # trainer/distill.py: a copy of the teacher's U-Net, guidance as an input

    @classmethod
    def check(cls, config: DiffusionConfig, info: DataInfo) -> None:
        if config.prediction not in PREDICTIONS:
            raise ConfigError(f"--set prediction={config.prediction}: use one of {', '.join(PREDICTIONS)}")
        if config.schedule not in DISCRETE_SCHEDULES:
            raise ConfigError(f"--set schedule={config.schedule}: use one of {', '.join(DISCRETE_SCHEDULES)}")
        if config.num_train_timesteps < 2:
            raise ConfigError(f"--set num_train_timesteps={config.num_train_timesteps}: use 2 or more")
        check_config(config, info, cls.name)
        if config.eps_below and not config.distill_from:
            raise ConfigError(f"--set eps_below={config.eps_below}: only for a distilled student (distill_from)")
        if config.distill_from:
            cls._check_student(config, info)

    # architecture and schedule: a student keeps its teacher's, since it starts from the teacher's weights (its
    # prediction may differ: the preset's students predict v, docs/samplers.md "Few-step students")
    TEACHER_FIELDS = ("width", "channel_mult", "num_res_blocks", "attn_resolution", "schedule", "num_train_timesteps")

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
        if config.eps_below and not (config.prediction == "v" and teacher.config.get("prediction") == "eps"
                                     and 0 < config.eps_below <= config.num_train_timesteps):
            raise ConfigError(f"--set eps_below={config.eps_below}: only for a v student (prediction=v) of an eps "
                              f"teacher, between 1 and {config.num_train_timesteps}; --set eps_below=0 turns it off")

    def __init__(self, config: DiffusionConfig, info: DataInfo, device: torch.device):
        super().__init__(config, info, device)
        cond = bool(info.class_names) if config.conditional is None else config.conditional
        self.num_classes = info.num_classes if cond else 0  # K; the null label is K
        self.student = bool(config.distill_from)
        unet = self.add_net("unet", UNet(info.channels, info.size, config.width, tuple(config.channel_mult),
                                         config.num_res_blocks, config.attn_resolution, config.dropout,
                                         self.num_classes, guidance_input=self.student and self.num_classes > 0))
        self.alpha_bar = alpha_bar_schedule(config.schedule, config.num_train_timesteps)
        if config.eps_below:
            unet.set_eps_below(config.eps_below, self.alpha_bar)
        if self.student:  # the trajectories' seed comes from the run's seed; kept in the checkpoint for resume
            self.trajectory_seed = int(torch.randint(0, 2**31 - 1, ()).item())
            self._pairs: dict[str, torch.Tensor] | None = None
        self.ema = copy.deepcopy(unet).eval().requires_grad_(False)
        self.ema_updates = 0
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
        label = drop_labels(y, self.num_classes, self.config.p_uncond)
        loss = F.mse_loss(self.train_nets["unet"](x_t, t, label), target)
        return self._optimise(loss)

    def _optimise(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        return optimise(self.optimizers["unet"], self.nets["unet"], loss, self.config.grad_clip)

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
        was, below = unet.training, unet.eps_below
        unet.eval()
        unet.eps_below = 0  # the teacher's own output, eps at every timestep
        check_same_outputs(teacher, unet, self.num_classes)
        unet.train(was)
        unet.eps_below = below
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
        if self.config.prediction == "eps":
            # error in x0 at high noise is the output's error times sigma / alpha (156 at t = 999 here): weighting by
            # alpha / sigma (at most 1) keeps the noisiest steps from drowning the others' gradients (unweighted,
            # every step count scored worse in a 400-step pilot; docs/samplers.md, "Few-step students")
            distance = distance * (a / s).flatten().clamp(max=1.0)
        # v: x0 = a x_t - s v is x_t at the data end and -v at the noise end, so no step amplifies the output's
        # error (by sigma <= 1) and every step weighs the same
        return self._optimise(distance.mean())

    def on_step_end(self, step: int) -> None:
        super().on_step_end(step)
        self.update_ema()

    def update_ema(self) -> None:
        update_ema(self.ema, self.nets["unet"], self.ema_updates, self.config.ema_decay)
        self.ema_updates += 1

    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule(self.alpha_bar.numpy(), self.config.prediction)

    @torch.no_grad()
    def sample(self, batch: tuple[torch.Tensor, torch.Tensor], seed: int) -> torch.Tensor:
        n = batch[0].shape[0]
        modes = {k: net.training for k, net in self.nets.items()}
        self.train(False)
        sampler, steps = self.served_sampling() if self.student else ("ddim", self.config.sample_steps)
        images = sample_grid(self.ema, self.noise_schedule(), n, self.info, sampler, steps, self.config.guidance,
                             seed, self.device)
        for k, net in self.nets.items():
            net.train(modes[k])
        return images

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

    @torch.no_grad()
    def calibration_batches(self, n: int, seed: int) -> dict[str, list[dict[str, np.ndarray]]]:
        """The denoiser's inputs at every U-Net call while n images are sampled at `served_sampling()` (a student:
        its most steps, whose grid holds its fewer-step grids), named as the exported graph's inputs."""
        names = list(self.export_graphs()["denoiser"].inputs)
        feeds: list[dict[str, np.ndarray]] = []

        def record(module, args, kwargs):
            feeds.append({k: a.cpu().numpy() for k, a in zip(names, args) if a is not None})

        handle = self.ema.register_forward_pre_hook(record, with_kwargs=True)
        try:
            sample_grid(self.ema, self.noise_schedule(), n, self.info, *self.served_sampling(), self.config.guidance,
                        seed, self.device)
        finally:
            handle.remove()
        return {"denoiser": feeds}

    def export_checks(self, version_dir: Path, manifest: dict) -> dict:
        """The served loop over the exported denoiser against PyTorch, at `served_sampling()`."""
        return served_loop_check(self.ema, self.num_classes, version_dir, manifest, *self.served_sampling())

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
        return {DENOISING: section}

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
