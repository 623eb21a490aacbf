"""The shipped default models in exported/, and `make demo` serving them (gen.demo)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gen.defaults import DEFAULT_MODELS
from serve.manifest import scan_repository
from trainer.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
REPO = ROOT / "exported"
DOCS_IMAGES = ROOT / "docs" / "images"


def test_every_default_model_is_shipped_healthy_and_small():
    entries = {e.name: e for e in scan_repository(REPO, verify=True)}
    total = 0
    for model in DEFAULT_MODELS:
        entry = entries.get(model.name)
        assert entry is not None, f"{model.name} is not in exported/; run `make models`"
        assert entry.healthy, entry.problems
        preset = PRESETS[model.preset]
        prov = entry.manifest.provenance
        assert prov["seed"] == model.seed and prov["steps"] == preset["steps"], model.name
        assert prov["dataset"] == preset["data"], model.name
        for key, value in {**preset.get("family_options", {}), **dict(model.options)}.items():
            assert entry.manifest.raw["config"][key] == value, (model.name, key)
        total += sum(f.stat().st_size for f in entry.path.iterdir())
    assert total <= 40e6, f"the shipped models take {total / 1e6:.1f} MB; the budget is 40 MB"


def test_demo_serves_every_task_and_writes_the_grids(tmp_path):
    run = subprocess.run([sys.executable, "-m", "gen.demo", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "server stopped (exit status 0)" in run.stdout
    assert "step  50/50" in run.stdout, "the diffusion progress must be streamed"
    assert "step 20/20" in run.stdout, "the flow model's progress must be streamed"
    expected = {"cgan-samples": (10, 8), "vae-samples": (10, 8), "vae-reconstructions": (10, 8),
                "pix2pix-shapes": (10, 6), "cyclegan-stripes": (10, 8), "diffusion-samples": (10, 4),
                "diffusion-halfway": (10, 4), "diffusion-student-samples": (10, 4),
                "flow-samples": (10, 4)}
    for name, (cols, rows) in expected.items():
        path = tmp_path / f"{name}.png"
        assert str(path) in run.stdout
        with Image.open(path) as im:  # 32-pixel images with a 2-pixel gutter
            assert im.size == (2 + cols * 34, 2 + rows * 34), name
            made = np.asarray(im, dtype=np.float32)
        # README shows docs/images/: the demo must still draw those grids (same seeds and models).
        # Not byte-equal: onnxruntime's kernels may round differently on another CPU.
        with Image.open(DOCS_IMAGES / f"{name}.png") as im:
            shown = np.asarray(im, dtype=np.float32)
        assert shown.shape == made.shape, name
        assert np.abs(made - shown).mean() < 1.0, f"{name}: the demo no longer draws README's grid"


@pytest.mark.parametrize("missing", ["mnist-diffusion"])
def test_demo_without_the_models_says_how_to_get_them(tmp_path, missing):
    repo = tmp_path / "exported"
    repo.mkdir()
    run = subprocess.run([sys.executable, "-m", "gen.demo", "--repo", str(repo), "--out", str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert missing in run.stderr and "make models" in run.stderr and "Traceback" not in run.stderr
