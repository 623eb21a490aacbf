"""serve/samplers/schedule.py against diffusers' schedulers: the betas of every beta_schedule and the grid of every
timestep_spacing a model from elsewhere can bring (`gen export --from-diffusers`), and the manifest keys that carry
them."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from serve.manifest import ManifestError, parse_manifest
from serve.samplers.schedule import NoiseSchedule

diffusers = pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[3]

BETAS = {"linear": ("linear", 1e-4, 0.02), "scaled_linear": ("scaled_linear", 0.00085, 0.012),
         "cosine": ("squaredcos_cap_v2", 1e-4, 0.02)}


@pytest.mark.parametrize("ours", list(BETAS))
def test_alpha_bar_matches_diffusers(ours):
    theirs, start, end = BETAS[ours]
    reference = diffusers.DDPMScheduler(beta_schedule=theirs, beta_start=start, beta_end=end).alphas_cumprod
    schedule = NoiseSchedule.of(ours, 1000, beta_start=start, beta_end=end)
    assert np.abs(schedule.abar - reference.double().numpy()).max() < 1e-6  # diffusers computes in float32


@pytest.mark.parametrize("spacing,offset", [("trailing", 0), ("leading", 0), ("leading", 1), ("linspace", 0)])
@pytest.mark.parametrize("steps", [1, 4, 10, 50, 999])
def test_the_grid_is_diffusers_timesteps(spacing, offset, steps):
    reference = diffusers.DDPMScheduler(timestep_spacing=spacing, steps_offset=offset)
    reference.set_timesteps(steps)
    pairs = NoiseSchedule.of("linear", 1000, spacing=spacing, steps_offset=offset).pairs(steps)
    assert [t for t, _ in pairs] == reference.timesteps.tolist()
    assert [tp for _, tp in pairs] == [t for t, _ in pairs][1:] + [-1]


def test_a_leading_offset_past_the_last_timestep_is_refused():
    with pytest.raises(ValueError, match="steps_offset 1"):
        NoiseSchedule.of("linear", 10, spacing="leading", steps_offset=1).pairs(10)


def test_clip_range_comes_from_the_manifest():
    base = {"schedule": "linear", "num_train_timesteps": 1000, "prediction": "eps"}
    assert NoiseSchedule.from_manifest(base).clip_range == 1.0  # gen's own models: clipped to [-1, 1]
    assert NoiseSchedule.from_manifest({**base, "clip_sample_range": 1.5}).clip_range == 1.5
    assert NoiseSchedule.from_manifest({**base, "clip_sample": False}).clip_range == 0.0


@pytest.mark.parametrize("key,value,match", [
    ("timestep_spacing", "karras", "timestep_spacing"),
    ("steps_offset", -1, "steps_offset"),
    ("beta_start", 0.5, "beta_start"),
    ("beta_end", "0.02", "beta_end"),
    ("clip_sample", "yes", "clip_sample"),
    ("clip_sample_range", 0, "clip_sample_range"),
    ("null_label", 3, "null_label"),
])
def test_bad_schedule_keys_are_refused_by_name(served_manifest, key, value, match):
    raw = copy.deepcopy(served_manifest)
    raw["diffusion"][key] = value
    with pytest.raises(ManifestError, match=match):
        parse_manifest(raw)


def test_a_flow_schedule_with_an_eps_prediction_is_refused(served_manifest):
    raw = copy.deepcopy(served_manifest)
    raw["diffusion"].update(schedule="rectified_flow", prediction="eps")
    with pytest.raises(ManifestError, match="cannot be sampled on a flow"):
        parse_manifest(raw)


def test_a_conditional_model_without_null_class(served_manifest):
    raw = copy.deepcopy(served_manifest)
    raw["diffusion"]["null_label"] = None
    m = parse_manifest(raw)
    assert m.classes and not m.null_class and m.default_guidance == 1.0
    assert parse_manifest(served_manifest).null_class


@pytest.fixture
def served_manifest():
    """The shipped class-conditional diffusion model's manifest."""
    return json.loads((ROOT / "exported" / "mnist-diffusion" / "1" / "manifest.json").read_text())
