"""`make demo`: train every family briefly on the embedded data, export it, and show where the grids are.

Short schedules, so the whole demo takes a few minutes on 2 CPU cores; `gen train NAME` with the preset's
full schedule gives the real models.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

OUT = Path("demo-out")
# preset -> steps for the demo (the presets' own schedules are longer)
DEMO_STEPS = {"gan": 300, "vae": 300, "pix2pix": 150, "cyclegan": 80, "diffusion": 300}


def main() -> int:
    from trainer.export import export_model
    from trainer.loop import TrainConfig, fit
    from trainer.presets import PRESETS

    shutil.rmtree(OUT, ignore_errors=True)
    grids = []
    t0 = time.time()
    for name, steps in DEMO_STEPS.items():
        preset = dict(PRESETS[name])
        options = preset.pop("family_options", {})
        config = TrainConfig(**{**preset, "steps": steps, "run_dir": str(OUT / "runs" / name),
                                "sample_every": steps, "checkpoint_every": steps, "family_options": options})
        print(f"[{time.time() - t0:5.0f}s] training {name} ({preset['family']} on {preset['data']}, {steps} steps)",
              flush=True)
        fit(config, progress=sys.stderr.isatty())
        path = export_model(config.run_dir, f"demo-{name}", repo=OUT / "exported")
        print(f"[{time.time() - t0:5.0f}s] exported {path}", flush=True)
        grids.append(Path(config.run_dir) / "samples" / f"step_{steps:06d}.png")
    print(f"\ndone in {time.time() - t0:.0f} s. Sample grids:")
    for g in grids:
        print(f"  {g}")
    print(f"Model repository: {OUT / 'exported'} (list it with `gen models --repo {OUT / 'exported'}`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
