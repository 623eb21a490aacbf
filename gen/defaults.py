"""The default models shipped in exported/, and `make models`, which retrains and re-exports them.

Each is a preset from trainer/presets.py with a fixed seed, trained on the embedded data. A model is
exported to a staging repository first and swapped in only when its export verified, so a failed or
interrupted rebuild leaves the shipped model as it was.

    python -m gen.defaults [NAME ...] [--repo exported] [--runs runs/default]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DefaultModel:
    name: str  # the model's name in exported/
    preset: str  # trainer/presets.py
    seed: int = 0
    options: tuple[tuple[str, object], ...] = ()  # family options on top of the preset's
    quantize: str | None = None  # "int8": also export an int8 variant, kept where it passes its bars (docs/export.md)


DEFAULT_MODELS = (
    # unconditional, so that its reconstructions keep their class through the latent alone
    DefaultModel("mnist-vae", "vae", options=(("conditional", False),)),
    DefaultModel("mnist-cgan", "gan"),
    DefaultModel("mnist-diffusion", "diffusion"),
    # distilled from the mnist-diffusion just built (its preset's distill_from): keep it after its teacher
    DefaultModel("mnist-diffusion-student", "diffusion-student", quantize="int8"),
    DefaultModel("mnist-flow", "flow"),
    DefaultModel("shapes-pix2pix", "pix2pix"),
    DefaultModel("stripes-cyclegan", "cyclegan"),
)


def build(model: DefaultModel, repo: Path, runs: Path, progress: bool | None = None) -> dict:
    """Train and export one default model into repo/<name>/1; returns what it took."""
    from trainer.export import export_model
    from trainer.loop import fit
    from trainer.presets import preset_config

    run_dir = runs / model.name
    shutil.rmtree(run_dir, ignore_errors=True)
    config = preset_config(model.preset, dict(model.options), seed=model.seed, run_dir=str(run_dir))
    result = fit(config, progress=progress)
    staging = repo.parent / f".{repo.name}-staging"
    shutil.rmtree(staging / model.name, ignore_errors=True)
    export_model(run_dir, model.name, repo=staging, version=1, quantize=model.quantize,
                 log=lambda m: print(f"  {m}", flush=True))
    # Swap in: the old model moves aside first, so a crash leaves one of the two in place.
    repo.mkdir(parents=True, exist_ok=True)
    final, old = repo / model.name, repo / f".{model.name}-old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    (staging / model.name).rename(final)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    size = sum(f.stat().st_size for f in final.rglob("*.onnx"))
    return {"name": model.name, "preset": model.preset, "seed": model.seed, "steps": result.steps,
            "train_seconds": result.seconds, "onnx_bytes": size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gen.defaults", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="default models to rebuild [default: all]")
    parser.add_argument("--repo", default="exported", type=Path)
    parser.add_argument("--runs", default="runs/default", type=Path)
    args = parser.parse_args(argv)
    known = {m.name: m for m in DEFAULT_MODELS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown default model {unknown[0]!r}: choose from {', '.join(known)}")
    chosen = [known[n] for n in args.names] or list(DEFAULT_MODELS)
    t0 = time.time()
    for model in chosen:
        print(f"[{time.time() - t0:6.0f}s] {model.name}: training preset {model.preset!r}, seed {model.seed}",
              flush=True)
        record = build(model, args.repo, args.runs, progress=None)
        print(f"[{time.time() - t0:6.0f}s] {model.name}: {record['steps']} steps in {record['train_seconds']:.0f} s, "
              f"{record['onnx_bytes'] / 1e6:.1f} MB of ONNX", flush=True)
        with open(args.runs / "timings.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
