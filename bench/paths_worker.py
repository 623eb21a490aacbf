"""One measurement of bench/paths.py, in a process of its own, against whichever source tree PYTHONPATH names.

Run as a script with `python -P` (the script's folder is not put on sys.path), so `serve` comes from
PYTHONPATH: the old revision's tree or the new one. It imports nothing from `bench` (that too would come
from the tree under test) and only what both revisions have: serve.runtime.Runtime and GraphRunner.
Prints one JSON line: the seconds or milliseconds measured and the `serve` package it used.

    PYTHONPATH=TREE python -P bench/paths_worker.py case3 --repo REPO --model mnist-diffusion
    PYTHONPATH=TREE python -P bench/paths_worker.py forward --repo REPO --model mnist-cgan --graph generator \
        --batch 64 --calls 10
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import numpy as np


def case3(repo: Path, model: str, requests: int, steps: int) -> dict:
    """Seconds for `requests` concurrent generate(n=1) calls of `steps` DDIM steps at the model's guidance."""
    from serve.runtime import Final, Runtime

    async def one(rt, seed: int, n_steps: int):
        async for event in rt.generate(model, 1, seed=seed, sampler="ddim", steps=n_steps):
            if isinstance(event, Final):
                return event.result.images

    async def all_of(rt, n_steps: int):
        return await asyncio.gather(*(one(rt, seed, n_steps) for seed in range(requests)))

    with Runtime(repo, device="cpu") as rt:
        asyncio.run(all_of(rt, 2))  # sessions created and warm, the scheduler's thread started
        t0 = time.perf_counter()
        images = asyncio.run(all_of(rt, steps))
        seconds = time.perf_counter() - t0
    if len(images) != requests or any(i.shape[0] != 1 or not np.isfinite(i).all() for i in images):
        raise RuntimeError(f"expected {requests} finite images, got {[i.shape for i in images]}")
    return {"seconds": seconds}


def forward(repo: Path, model: str, graph: str, batch: int, calls: int) -> dict:
    """Median ms of one forward pass of `model.graph` at `batch` through the tree's GraphRunner."""
    try:
        from serve.session import GraphRunner  # the new tree
    except ImportError:
        from serve.runtime import GraphRunner  # the old tree, before serve/session.py existed
    from serve.manifest import parse_manifest

    version_dir = repo / model / "1"
    info = parse_manifest(json.loads((version_dir / "manifest.json").read_text())).graphs[graph]
    runner = GraphRunner(version_dir, info, device="cpu")
    rng = np.random.default_rng(0)
    feeds = {t.name: rng.standard_normal((batch, *t.shape[1:]), dtype=np.float32) if t.dtype == "float32"
             else np.zeros((batch, *t.shape[1:]), np.int64) for t in info.inputs}
    for _ in range(3):
        runner.run(feeds)
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        runner.run(feeds)
        samples.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(samples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("case3", "forward"))
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--graph", default="")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    if args.what == "case3":
        out = case3(args.repo, args.model, args.requests, args.steps)
    else:
        out = forward(args.repo, args.model, args.graph, args.batch, args.calls)
    import serve

    print(json.dumps({**out, "serve": str(Path(serve.__file__).resolve().parent)}), flush=True)


if __name__ == "__main__":
    main()
