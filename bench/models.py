"""The models the benchmarks run: the shipped default presets, at full size, with untrained weights.

Speed does not depend on the weights, so instead of training, each default model (gen.defaults) is
built from its preset, saved as a run and exported with trainer.export into a repository under
bench/.cache, exactly as `make models` would export a trained one. The bench therefore needs nothing
shipped in exported/. The cache is keyed by the sources that decide the graphs, so an edit to a model
or to the exporter rebuilds it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"
SOURCES = ["trainer/models/*.py", "trainer/export.py", "trainer/presets.py", "trainer/layers.py", "gen/defaults.py"]


def _key() -> str:
    import torch

    h = hashlib.sha256(torch.__version__.encode())
    for pattern in SOURCES:
        for path in sorted(ROOT.glob(pattern)):
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def build_repository(log=print) -> Path:
    """bench/.cache/<key>/: runs/<name> (config + checkpoint) and exported/<name>/1 for every default model."""
    from gen.defaults import DEFAULT_MODELS

    base = CACHE / _key()
    repo = base / "exported"
    if (base / "done").exists():
        return base
    shutil.rmtree(base, ignore_errors=True)
    for model in DEFAULT_MODELS:
        log(f"  building {model.name} (preset {model.preset}) and exporting it")
        _save_run(model, base / "runs" / model.name)
        from trainer.export import export_model

        export_model(base / "runs" / model.name, model.name, repo=repo, version=1)
    (base / "done").write_text("ok\n")
    return base


def _save_run(model, run_dir: Path) -> None:
    """A run folder as fit() writes it, holding the initial weights (step 0)."""
    import torch

    from trainer.data import load_dataset
    from trainer.loop import atomic_write, build_family, family_config_dict
    from trainer.models import get_family
    from trainer.presets import preset_config

    config = preset_config(model.preset, dict(model.options), seed=model.seed, run_dir=str(run_dir), device="cpu")
    dataset = load_dataset(config.data, get_family(config.family).spec().data_kind, config.image_size, config.channels,
                           config.direction)
    torch.manual_seed(config.seed)
    family = build_family(config, dataset, torch.device("cpu"))
    record = {"train": dataclasses.asdict(config), "family": family_config_dict(family),
              "data": {"source": dataset.source, **dataclasses.asdict(dataset.info)}, "world_size": 1,
              "git_commit": None, "torch": torch.__version__}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.json", lambda f: f.write(json.dumps(record, indent=2).encode()))
    state = {"step": 0, "family": family.state_dict(), "rng": []}
    atomic_write(run_dir / "checkpoint.pt", lambda f: torch.save(state, f))


def load_families(base: Path) -> dict:
    """name -> the PyTorch family (eval mode) of every model in the cache."""
    from trainer.loop import load_run

    return {p.name: load_run(p)[0] for p in sorted((base / "runs").iterdir()) if p.is_dir()}
