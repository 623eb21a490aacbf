"""`python -m bench [--mode quick|full] [--cases forward,serving,...]` (CASES below): run, then write BENCHMARKS.md.

quick (`make bench`) takes about a quarter of an hour on 2 cores (case 2's 96 perf_analyzer points about seven
minutes of it, case 6's real-size U-Net about four, plus one or two to export it the first time): fewer repeats and
shorter load runs; full (`make bench-full`) over an hour (case 2 about fifty minutes: 3 repeats of 96 points of
2 + 8 s); smoke checks that everything runs (case 2 in about two minutes). Each regenerates BENCHMARKS.md,
bench/plots/*.png and bench/results.json from scratch; the exported models are rebuilt into bench/.cache when the
model sources changed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

# torch's OpenMP threads must not spin: the bench shares the cores with its own servers (see trainer/__init__.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
CASES = ("forward", "options", "serving", "diffusion", "roofline", "students", "large_model", "warmup")
MODES = {
    "quick": {"forward_repeats": 5, "serving_repeats": 1, "serving_seconds": 3.0, "serving_warmup": 1.0,
              "diffusion_repeats": 1, "diffusion_steps": 50, "roofline_repeats": 5, "options_repeats": 3,
              "students_repeats": 1, "students_images": 8, "warmup_repeats": 1,
              # case 6 (bench/large_model.py): the real-size U-Net; batch 1 timed on 8 images (images/s is per image)
              "large_config": "cifar10", "large_repeats": 1, "large_requests": 32, "large_steps": (10, 50),
              "large_batch1_images": 8, "large_cost_repeats": 3},
    "full": {"forward_repeats": 15, "serving_repeats": 3, "serving_seconds": 8.0, "serving_warmup": 2.0,
             "diffusion_repeats": 3, "diffusion_steps": 50, "roofline_repeats": 10, "options_repeats": 7,
             "students_repeats": 3, "students_images": 16, "warmup_repeats": 3,
             "large_config": "cifar10", "large_repeats": 3, "large_requests": 32, "large_steps": (10, 50),
             "large_batch1_images": 32, "large_cost_repeats": 5},
    # a check that everything runs (seconds of load, 2 diffusion steps): its numbers mean nothing
    "smoke": {"forward_repeats": 1, "serving_repeats": 1, "serving_seconds": 0.5, "serving_warmup": 0.2,
              "diffusion_repeats": 1, "diffusion_steps": 2, "roofline_repeats": 1, "options_repeats": 1,
              "students_repeats": 1, "students_images": 1, "warmup_repeats": 1,
              # case 6 on a tiny U-Net of the same block layout (bench/large_model.py, TINY_UNET), 4 requests
              "large_config": "tiny", "large_repeats": 1, "large_requests": 4, "large_steps": (2,),
              "large_batch1_images": 1, "large_cost_repeats": 1},
}


def log(msg: str) -> None:
    print(msg, flush=True)


def _profile_missed(base: Path, rows: list[dict], limit: int = 4) -> dict[str, list[dict]]:
    """onnxruntime's per-op profile of the graphs that missed case 1's target (the worst few)."""
    from bench import profile

    out = {}
    for r in sorted((r for r in rows if r["speedup"] < 1.5), key=lambda r: r["speedup"])[:limit]:
        src = base / "exported" / r["model"] / "1"
        graph = json.loads((src / "manifest.json").read_text())["graphs"][r["graph"]]
        out[f"{r['model']}.{r['graph']} batch {r['batch']}"] = profile.op_times(
            src / graph["file"], profile.random_feeds(graph, r["batch"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=sorted(MODES), default="quick")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite BENCHMARKS.md from bench/results.json (the last run) without measuring")
    args = ap.parse_args()
    if args.report_only:
        from bench import report

        results = json.loads((ROOT / "bench" / "results.json").read_text())
        plots = {c: f"bench/plots/{c}.png" for c in CASES if (ROOT / "bench" / "plots" / f"{c}.png").exists()}
        report.write(results, Path(args.out), plots)
        log(f"wrote {args.out} from bench/results.json")
        return
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise SystemExit(f"--cases: unknown {unknown}; use {', '.join(CASES)}")
    p = MODES[args.mode]

    from bench import plots, report
    from bench.models import build_repository, load_families
    from bench.timing import machine

    t0 = time.time()
    results: dict = {"mode": args.mode, "machine": machine(),
                     "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "command": f"python -m bench --mode {args.mode}" + ("" if args.cases == ",".join(CASES)
                                                                        else f" --cases {args.cases}"),
                     "parameters": p}
    log("models: the default presets, exported into bench/.cache")
    base = build_repository(log)
    families = load_families(base) if {"forward", "diffusion"} & set(cases) else {}
    if "forward" in cases:
        from bench import forward

        log("case 1: per-graph forward, PyTorch eager vs onnxruntime")
        results["forward"] = forward.run(base, families, p["forward_repeats"], log)
        results["profile_forward"] = _profile_missed(base, results["forward"])
    if "options" in cases:
        from bench import options

        log("session options: the server's against one-change variants")
        results["options"] = options.run(base, p["options_repeats"], log)
    if "serving" in cases:
        from bench import serving

        log("case 2: serving under 1..128 concurrent clients")
        results["serving"] = serving.run(base, p["serving_repeats"], p["serving_seconds"], p["serving_warmup"], log)
        results["serving"].update(seconds=p["serving_seconds"], warmup=p["serving_warmup"],
                                  repeats=p["serving_repeats"])
    if "diffusion" in cases:
        from bench import diffusion

        log("case 3: 32 concurrent generate requests of 50 DDIM steps")
        results["diffusion"] = diffusion.run(base, families, p["diffusion_repeats"], p["diffusion_steps"], log)
    if "roofline" in cases:
        from bench import profile, roofline

        log("case 4: roofline of one denoising step")
        results["roofline"] = roofline.run(base, p["roofline_repeats"], log)
        model, manifest, _ = roofline.iteration(base)  # the iteration graph at 64 rows, as case 4 timed it
        results["profile_step"] = profile.op_times(model.SerializeToString(),
                                                   roofline.graph_feeds(manifest, roofline.BATCH))
    if "students" in cases:
        from bench import students

        log("case 5: a distilled student against its teacher, images/s through the server")
        results["students"] = students.run(p["students_repeats"], p["students_images"], log)
    if "large_model" in cases:
        from bench import large_model

        log("case 6: a real-size U-Net from diffusers (DDPM CIFAR-10), gen serve against DDIMPipeline")
        results["large_model"] = large_model.run(p, log)
    if "warmup" in cases:
        from bench import warmup

        log("case 7: the first request after ready against the next ones")
        results["warmup"] = warmup.run(p["warmup_repeats"], log)
    results["seconds"] = time.time() - t0
    results["load_after"] = os.getloadavg()
    make = {"quick": "make bench", "full": "make bench-full"}.get(args.mode, f"make bench MODE={args.mode}")
    results["commands"] = [f"{make}    # = {sys.executable.replace(str(ROOT) + '/', '')} -m bench --mode {args.mode}",
                           "# the PyTriton side: python3 -m venv bench/.venv-pytriton && "
                           "bench/.venv-pytriton/bin/pip install nvidia-pytriton==0.7.0 onnxruntime onnx && "
                           "bench/.venv-pytriton/bin/python bench/pytriton_patch.py"]

    plot_dir = ROOT / "bench" / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    made = {}
    for case, draw, data in (("forward", plots.forward, results.get("forward")),
                             ("serving", plots.serving, (results.get("serving") or {}).get("rows")),
                             ("diffusion", plots.diffusion, results.get("diffusion")),
                             ("roofline", plots.roofline, results.get("roofline"))):
        if data:
            draw(data, plot_dir / f"{case}.png")
            made[case] = f"bench/plots/{case}.png"
    (ROOT / "bench" / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    report.write(results, Path(args.out), made)
    log(f"wrote {args.out}, {len(made)} plots and bench/results.json in {results['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
