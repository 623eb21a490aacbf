"""`python -m bench.paths [--old REV] [--repeats N]`: the old sampling path against the new, in one run.

Issue #11 moved the sampler maths out of the exported step graph into serving code (the iteration graph
assembled at load time around the exported denoiser, serve/denoising.py). Its acceptance point: on the CPU,
cases 1 and 3 are no slower than before, old and new measured in the same run, within 5%. This checks out
REV (default a3676b4, the last commit before the redesign) into a temporary git worktree and alternates:

  * case 3: 32 concurrent generate(n=1) requests of 50 DDIM steps at the model's guidance through
    serve.runtime.Runtime in process, on the shipped exported/mnist-diffusion (the old tree serves its
    step.onnx, the new one builds the iteration graph around its denoiser.onnx; the weights are the same);
  * case 1: one forward pass of graphs that did not change (the shipped files, each tree's GraphRunner).

Every measurement is a fresh process (bench/paths_worker.py) with PYTHONPATH pointing at one tree, old and
new in turn, the order swapped every repeat so that neither always goes first. Prints a markdown table of
medians and new/old ratios with the load average at start and end, and writes it to bench/paths.json.
The temporary worktree is removed at the end, also on error.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD = "a3676b4"
DIFFUSION = "mnist-diffusion"
REQUESTS, STEPS = 32, 50
FORWARD = (("mnist-cgan", "generator", 1), ("mnist-cgan", "generator", 64))
FORWARD_CALLS = {1: 50, 64: 10}  # forward passes per sample (its median is the sample)
TOLERANCE = 1.05  # "no slower, within 5%"


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def measure(tree: Path, args: list[str]) -> dict:
    """One worker process against `tree`: its JSON line; fails loudly when it did not use that tree's `serve`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "bench" / "paths_worker.py"), *args], env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args[0]} on {tree} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(out["serve"]) != (tree / "serve").resolve():
        raise RuntimeError(f"worker on {tree} imported serve from {out['serve']}")
    return out


def run(old_tree: Path, repeats: int, requests: int, steps: int, log=print) -> dict:
    """Interleaved old/new samples of every measurement: {name: {"old": [...], "new": [...], "unit": ...}}."""
    repo = Path(tempfile.mkdtemp(prefix="gen-bench-paths-repo-"))
    try:
        # only the diffusion model in the Runtime's repository: loading the others is not what is measured
        shutil.copytree(ROOT / "exported" / DIFFUSION / "1", repo / DIFFUSION / "1")
        jobs = {f"case 3: {requests} x generate, {steps} DDIM steps": (
                    "s", "seconds", ["case3", "--repo", str(repo), "--model", DIFFUSION,
                                     "--requests", str(requests), "--steps", str(steps)])}
        for model, graph, batch in FORWARD:
            jobs[f"case 1: {model}.{graph}, batch {batch}"] = (
                "ms", "ms", ["forward", "--repo", str(ROOT / "exported"), "--model", model, "--graph", graph,
                             "--batch", str(batch), "--calls", str(FORWARD_CALLS.get(batch, 10))])
        trees = {"old": old_tree, "new": ROOT}
        samples = {name: {"unit": unit, "old": [], "new": []} for name, (unit, _, _) in jobs.items()}
        for rep in range(repeats):
            order = ("old", "new") if rep % 2 == 0 else ("new", "old")
            for name, (_, key, args) in jobs.items():
                for side in order:
                    value = measure(trees[side], args)[key]
                    samples[name][side].append(value)
                    log(f"  [{rep + 1}/{repeats}] {name}, {side}: {value:.3f} {samples[name]['unit']}")
        return samples
    finally:
        shutil.rmtree(repo, ignore_errors=True)


def table(result: dict) -> str:
    lines = [f"`{result['command']}`. Old: {result['old']} (step graph); new: {result['new']} (iteration graph "
             f"around the denoiser). Medians of {result['repeats']} interleaved repeats, each a fresh process; "
             f"load average (1, 5, 15 min) at start {_load(result['load_start'])}, at end {_load(result['load_end'])} "
             f"on {result['cores']} cores.", "",
             "| measurement | old | new | new / old | within 5% |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['old']:.3f} {r['unit']} | {r['new']:.3f} {r['unit']} | "
                     f"x{r['ratio']:.3f} | {'yes' if r['ratio'] <= TOLERANCE else 'no'} |")
    return "\n".join(lines)


def _load(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.paths", description=__doc__.splitlines()[0])
    ap.add_argument("--old", default=OLD, help=f"the revision before the change (default {OLD})")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats per side (default 5)")
    ap.add_argument("--requests", type=int, default=REQUESTS,
                    help=f"case 3's concurrent requests (default {REQUESTS})")
    ap.add_argument("--steps", type=int, default=STEPS, help=f"case 3's DDIM steps (default {STEPS})")
    args = ap.parse_args()
    for name in ("repeats", "requests", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name}: must be at least 1, got {getattr(args, name)}")
    try:
        old = git("rev-parse", "--short", f"{args.old}^{{commit}}")
    except subprocess.CalledProcessError:
        raise SystemExit(f"--old: {args.old!r} is not a commit in this repository; give a revision such as "
                         f"{OLD}") from None
    new = git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if git("status", "--porcelain") else "")

    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="gen-bench-paths-"))
    old_tree = tmp / "old"
    try:
        git("worktree", "add", "--detach", str(old_tree), old)
        print(f"old tree {old} in {old_tree}; {args.repeats} repeat(s), old and new in turn", flush=True)
        samples = run(old_tree, args.repeats, args.requests, args.steps)
    except (subprocess.CalledProcessError, RuntimeError) as e:
        detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) else str(e)
        raise SystemExit(f"bench.paths: {detail}") from None
    finally:
        if old_tree.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for name, s in samples.items():
        o, n = statistics.median(s["old"]), statistics.median(s["new"])
        rows.append({"name": name, "unit": s["unit"], "old": o, "new": n, "ratio": n / o,
                     "old_samples": s["old"], "new_samples": s["new"]})
    result = {"old": old, "new": new, "repeats": args.repeats, "cores": len(os.sched_getaffinity(0)),
              "load_start": load_start, "load_end": os.getloadavg(), "rows": rows,
              "command": f"python -m bench.paths --old {args.old} --repeats {args.repeats}"
                         + (f" --requests {args.requests}" if args.requests != REQUESTS else "")
                         + (f" --steps {args.steps}" if args.steps != STEPS else "")}
    result["table"] = table(result)
    print(result["table"])
    out = ROOT / "bench" / "paths.json"
    partial = out.with_suffix(".json.tmp")
    partial.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(partial, out)  # atomic: a reader never sees half a file
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
