"""`gen export --from-diffusers DIR`: a diffusers UNet2DModel and its scheduler's config -> a served diffusion model.

DIR is what `save_pretrained` wrote: a pipeline (model_index.json, unet/, scheduler/) or a model folder
(config.json and its weights) with scheduler_config.json beside it, in scheduler/ or in ../scheduler/. The
denoiser is the UNet alone, (x_t, t [, label]) -> its output, exported and verified like every gen export (onnx.checker,
onnxruntime against PyTorch, a 50-step DDIM run of the served loop against the same loop in PyTorch). The manifest's
`diffusion` section carries the training schedule from the scheduler's config (beta_schedule, beta_start/end,
num_train_timesteps, prediction_type, timestep_spacing, steps_offset, clip_sample and its range), so every serving
sampler, step-level batching and the rest of Generate apply. The scheduler's own step rule is not used: the samplers
are the server's (serve/samplers/).

What is refused, one line each (NotServable): a folder without a diffusers model, a text-conditioned
UNet2DConditionModel or any other model class, a scheduler class not mapped here, options that change the schedule
in ways the server does not follow (trained_betas, thresholding, rescale_betas_zero_snr, set_alpha_to_one false, a
learned variance, class embeddings that are not a label table, Fourier time embeddings).
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import torch
from torch import nn

from serve.families import FAMILIES
from serve.manifest import DENOISING, FORMAT
from trainer.denoising import served_loop_check
from trainer.export import DEFAULT_OPSET, check_target, publish
from trainer.models.base import ConfigError, ExportGraph, TensorSpec

FAMILY = "diffusion"  # what an imported UNet is served as: a discrete variance-preserving denoiser
UNETS = ("UNet2DModel",)
# the schedulers whose config says how the UNet was trained; the server samples with its own samplers
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "sample"}
CHECK_SAMPLING = ("ddim", 50)  # export's served-loop check, as for gen's own diffusion models
WEIGHTS = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")  # what save_pretrained writes


class NotServable(ConfigError):
    """The folder is not something gen can serve; the message says what and why."""


class DiffusersDenoiser(nn.Module):
    """UNet2DModel as the exported denoiser: (x_t, t [, label]) -> output, with what trainer.denoising's loop reads
    (num_classes, null_class, guidance_emb)."""

    def __init__(self, unet: nn.Module, num_classes: int, null_class: bool):
        super().__init__()
        self.unet = unet
        self.num_classes = num_classes  # K: labels 0..K-1, and K the null class when null_class
        self.null_class = null_class
        self.guidance_emb = None  # guidance is a doubled batch, not an input

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x_t, t, class_labels=label, return_dict=False)[0]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NotServable(f"{path}: not a readable JSON file ({e})") from None


def locate(src: Path) -> tuple[Path, Path]:
    """(the UNet's folder, the scheduler's config file) of a diffusers pipeline or model folder."""
    if not src.is_dir():
        raise NotServable(f"--from-diffusers {src}: no such folder")
    index = src / "model_index.json"
    if index.is_file():
        entries = _read_json(index)
        unet = entries.get("unet")
        if not unet:
            kinds = ", ".join(f"{k}: {v[1]}" for k, v in entries.items() if isinstance(v, list) and len(v) == 2)
            raise NotServable(f"{src}: the pipeline has no unet ({kinds or 'no components'}); gen serves "
                               "UNet2DModel pipelines (DDPMPipeline, DDIMPipeline)")
        unet_dir = src / "unet"
    elif (src / "config.json").is_file():
        unet_dir = src
    else:
        raise NotServable(f"--from-diffusers {src}: not a diffusers model (no model_index.json or config.json); "
                           "give the folder save_pretrained wrote")
    for folder in (unet_dir, src, src / "scheduler", unet_dir.parent / "scheduler"):
        candidate = folder / "scheduler_config.json"
        if candidate.is_file():
            return unet_dir, candidate
    raise NotServable(f"{src}: no scheduler_config.json (looked in {src}, {src / 'scheduler'} and "
                       f"{unet_dir.parent / 'scheduler'}); save the scheduler the model was trained with there, "
                       "e.g. DDPMScheduler(...).save_pretrained(DIR)")


def schedule_section(config: dict, where: Path, num_classes: int, null_class: bool) -> dict:
    """The manifest's `diffusion` section from a scheduler's config; NotServable naming what is not supported."""
    kind = config.get("_class_name")
    if kind not in SCHEDULERS:
        raise NotServable(f"{where}: scheduler {kind} is not supported; gen reads the training schedule from "
                           f"{' or '.join(SCHEDULERS)} configs (DDIMScheduler.from_config(your_scheduler.config)"
                           ".save_pretrained(DIR) writes one)")

    def get(key, default):
        return config.get(key, default) if config.get(key) is not None else default

    refused = {"trained_betas": get("trained_betas", None) is not None, "thresholding": get("thresholding", False),
               "rescale_betas_zero_snr": get("rescale_betas_zero_snr", False),
               "set_alpha_to_one=false": not get("set_alpha_to_one", True)}
    for option, present in refused.items():
        if present:
            raise NotServable(f"{where}: {option} is not supported by gen's samplers")
    beta_schedule, prediction = get("beta_schedule", "linear"), get("prediction_type", "epsilon")
    if beta_schedule not in BETA_SCHEDULES:
        raise NotServable(f"{where}: beta_schedule {beta_schedule!r} is not supported; use one of "
                           f"{', '.join(BETA_SCHEDULES)}")
    if prediction not in PREDICTIONS:
        raise NotServable(f"{where}: prediction_type {prediction!r} is not supported; use one of "
                           f"{', '.join(PREDICTIONS)}")
    spacing = get("timestep_spacing", "leading")
    if spacing not in ("leading", "trailing", "linspace"):
        raise NotServable(f"{where}: timestep_spacing {spacing!r} is not supported; use leading, trailing or "
                           "linspace")
    return {"num_train_timesteps": int(get("num_train_timesteps", 1000)), "schedule": BETA_SCHEDULES[beta_schedule],
            "beta_start": float(get("beta_start", 0.0001)), "beta_end": float(get("beta_end", 0.02)),
            "prediction": PREDICTIONS[prediction], "timestep_spacing": spacing,
            "steps_offset": int(get("steps_offset", 0)), "clip_sample": bool(get("clip_sample", True)),
            "clip_sample_range": float(get("clip_sample_range", 1.0)),
            "null_label": num_classes if null_class else None}


def load_unet(unet_dir: Path) -> nn.Module:
    config = _read_json(unet_dir / "config.json")
    kind = config.get("_class_name")
    if kind == "UNet2DConditionModel":
        raise NotServable(f"{unet_dir}: UNet2DConditionModel (text-conditioned, e.g. Stable Diffusion) is not "
                           "supported; gen serves UNet2DModel, unconditional or class-conditional")
    if kind not in UNETS:
        raise NotServable(f"{unet_dir}: {kind or 'this model'} is not supported; gen serves UNet2DModel")
    if config.get("time_embedding_type", "positional") == "fourier":
        raise NotServable(f"{unet_dir}: time_embedding_type fourier (score SDE, continuous noise levels) is not "
                           "supported; gen serves discrete-timestep UNets")
    if config.get("num_class_embeds") and config.get("class_embed_type") is not None:
        raise NotServable(f"{unet_dir}: class_embed_type {config['class_embed_type']!r} is not supported; gen "
                           "serves class labels through num_class_embeds (an embedding table)")
    if config.get("in_channels", 3) != config.get("out_channels", 3):
        raise NotServable(f"{unet_dir}: out_channels {config.get('out_channels')} != in_channels "
                           f"{config.get('in_channels')} (a learned variance) is not supported")
    weights = [unet_dir / f"diffusion_pytorch_model{ext}" for ext in WEIGHTS]
    if not any(w.is_file() for w in weights):
        raise NotServable(f"{unet_dir}: the UNet's weights are missing (no {' or '.join(w.name for w in weights)})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder; nothing is downloaded
    try:
        import diffusers
        from diffusers import UNet2DModel
    except ImportError:
        raise NotServable("--from-diffusers needs diffusers: pip install 'gen[diffusers]'") from None
    diffusers.utils.logging.set_verbosity_error()  # its warnings would break the one-line errors
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), low_cpu_mem_usage=False)
    except Exception as e:  # noqa: BLE001 - whatever the user's files make diffusers or safetensors raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NotServable(f"{unet_dir}: the UNet's weights could not be loaded: {first}") from None
    return unet.eval()


def export_from_diffusers(src: str | Path, name: str, repo: str | Path = "exported", version: int | None = None,
                          opset: int = DEFAULT_OPSET, null_class: int | None = None, guidance: float = 1.0,
                          max_batch_size: int = 64, log=lambda msg: None) -> Path:
    """Export, verify and publish a diffusers UNet2DModel as REPO/NAME/VERSION/; returns the version folder.

    `null_class`: the label a class-conditional UNet was trained to read as "no class" (classifier-free guidance);
    it must be its last embedding. Without it, the served model samples at guidance 1 only. `guidance`: a request's
    default scale."""
    check_target(name, version, opset)
    src = Path(src)
    unet_dir, scheduler_file = locate(src)
    unet_config = _read_json(unet_dir / "config.json")
    embeds = int(unet_config.get("num_class_embeds") or 0)
    if null_class is not None and (not embeds or null_class != embeds - 1):
        raise NotServable(f"--null-class {null_class}: " + (
            f"the UNet has {embeds} class embeddings; the null class must be the last, {embeds - 1}" if embeds
            else "the UNet is unconditional (no num_class_embeds)"))
    if guidance != 1.0 and null_class is None:
        raise NotServable(f"--guidance {guidance}: only a class-conditional model with a --null-class can be guided")
    num_classes = embeds - 1 if null_class is not None else embeds
    section = schedule_section(_read_json(scheduler_file), scheduler_file, num_classes, null_class is not None)
    unet = load_unet(unet_dir)
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    channels = unet.config.in_channels
    if channels not in (1, 3):
        raise NotServable(f"{unet_dir}: {channels} channels; gen serves images with 1 or 3")
    denoiser = DiffusersDenoiser(unet, num_classes, null_class is not None).eval()
    T = section["num_train_timesteps"]
    image = (-1, channels, height, width)
    inputs = {"x_t": TensorSpec("float32", image, -3.0, 3.0), "t": TensorSpec("int64", (-1,), 0, T)}
    if embeds:
        inputs["label"] = TensorSpec("int64", (-1,), 0, embeds)
    graph = ExportGraph(denoiser, inputs, {"output": TensorSpec("float32", image)})
    graph_name = FAMILIES[FAMILY].denoiser
    import diffusers

    def manifest(version: int, graphs: dict, model_parity: dict) -> dict:
        return {
            "format": FORMAT, "name": name, "version": version, "family": FAMILY, "task": FAMILIES[FAMILY].task,
            "opset": opset, "graphs": graphs,
            "image": {"channels": channels, "height": height, "width": width, "range": [-1.0, 1.0],
                      "to_uint8": "round((x + 1) * 127.5), clipped to [0, 255]"},
            "classes": [str(k) for k in range(num_classes)],
            "serving": {"max_batch_size": max_batch_size, "max_queue_delay_ms": 2},
            "config": {"guidance": guidance, "unet": dict(unet.config), "scheduler": _read_json(scheduler_file)},
            "provenance": {"source": "diffusers", "path": str(src.resolve()), "diffusers": diffusers.__version__,
                           "torch": torch.__version__,
                           "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
            "parity": model_parity,
            DENOISING: section,
        }

    def checks(version_dir: Path, draft: dict) -> dict:
        return served_loop_check(denoiser, num_classes, version_dir, draft, *CHECK_SAMPLING)

    return publish({graph_name: graph}, manifest, checks, name, repo, version, opset, False, log)
