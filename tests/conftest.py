"""Shared test settings: tiny configs of every family, so a few real training steps take seconds."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see trainer/__init__.py; test modules import torch first

# Small enough for seconds on 2 cores; the full-size defaults are exercised by `make models`.
TINY: dict[str, dict] = {
    "vae": {"data": "digits", "batch_size": 8, "family_options": {"width": 8, "latent_dim": 4}},
    "gan": {"data": "digits", "batch_size": 8, "family_options": {"width": 8, "z_dim": 8}},
    "pix2pix": {"data": "shapes", "batch_size": 4, "family_options": {"width": 8}},
    "cyclegan": {"data": "stripes", "batch_size": 2, "family_options": {"width": 8, "n_blocks": 1}},
    "diffusion": {"data": "digits", "batch_size": 8,
                  "family_options": {"width": 8, "channel_mult": [1, 2], "sample_steps": 2}},
    "flow": {"data": "digits", "batch_size": 8,
             "family_options": {"width": 8, "channel_mult": [1, 2], "sample_steps": 2}},
}
FAMILIES = list(TINY)
# a tiny student of the tiny diffusion model (exported as tiny-diffusion/1 in tiny_repo): 8 trajectories of 4 steps
STUDENT = {"distill_from": "", "prediction": "v", "eps_below": 250, "trajectories": 8, "teacher_steps": 4,
           "student_steps": [1, 2, 4],
           "student_sampler": {"1": "consistency", "2": "consistency", "4": "ddim"}}  # as shipped, but consistency at 2
TINY_MODELS = [f"tiny-{f}" for f in FAMILIES] + ["tiny-diffusion-student"]  # what tiny_repo holds


def tiny_graph_count() -> int:
    """Graphs in tiny_repo: every family's, and the student's denoiser."""
    from serve.families import FAMILIES as SPECS

    return sum(len(SPECS[f].graphs) for f in FAMILIES) + len(SPECS["diffusion"].graphs)


def tiny_config(family: str, run_dir, **overrides):
    from trainer.loop import TrainConfig

    spec = TINY[family]
    options = {"family": family, "image_size": 32, "steps": 4, "run_dir": str(run_dir), "sample_every": 2,
               "checkpoint_every": 2, "log_every": 1, **{k: v for k, v in spec.items() if k != "family_options"}}
    options.update(overrides)
    family_options = {**spec["family_options"], **options.pop("family_options", {})}
    return TrainConfig(**options, family_options=family_options)


@pytest.fixture(params=FAMILIES)
def family_name(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory):
    """One tiny trained (2 steps) and exported model per family, built once per test session.

    Returns the base folder: runs in base/runs/<family>, the repository in base/exported with models
    named tiny-<family>, version 1.
    """
    from trainer.export import export_model
    from trainer.loop import fit

    base = tmp_path_factory.mktemp("tiny")
    for family in FAMILIES:
        fit(tiny_config(family, base / "runs" / family, steps=2), progress=False)
        export_model(base / "runs" / family, f"tiny-{family}", repo=base / "exported")
    # a distilled student of tiny-diffusion, so that every test over the repository's models covers one too
    student = {**STUDENT, "distill_from": str(base / "exported" / "tiny-diffusion" / "1")}
    fit(tiny_config("diffusion", base / "runs" / "diffusion-student", steps=2, family_options=student), progress=False)
    export_model(base / "runs" / "diffusion-student", "tiny-diffusion-student", repo=base / "exported")
    return base
