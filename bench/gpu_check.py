"""`make gpu-check`: on a CUDA machine, the gpu-marked tests, then step times per batch-size bucket of the shipped
diffusion model's denoising iteration with and without CUDA graphs. Prints a table; measures nothing on a CPU-only
machine (it says so and exits 0, so the target is safe to run anywhere).

    python -m bench.gpu_check [--repo exported] [--model mnist-diffusion] [--repeats 50]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", default="exported")
    ap.add_argument("--model", default="mnist-diffusion")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()

    import onnxruntime as ort

    from serve.manifest import scan_repository
    from serve.samplers import state_size
    from serve.session import CUDA, DenoisingSession, buckets

    if CUDA not in ort.get_available_providers():
        print(f"gpu-check: this onnxruntime ({ort.__version__}) has no {CUDA}; nothing measured")
        return 0
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    entry = max((e for e in scan_repository(Path(args.repo)) if e.healthy and e.name == args.model),
                key=lambda e: e.version)
    print(f"{args.model} v{entry.version}: one denoising iteration (denoiser with guidance + sampler update), "
          f"median of {args.repeats} runs after 3 warm-up runs")
    print("| batch | CUDA, ms | CUDA graphs, ms | ratio |")
    print("|---|---|---|---|")
    S = state_size()
    for b in buckets(64):
        times = {}
        for graphs in (False, True):
            session = DenoisingSession(entry.path, entry.manifest, S, capacity=64, device="cuda", fp16=False,
                                       cuda_graphs=graphs)
            if session.device != "cuda":
                print(f"gpu-check: the session fell back to {session.device}; check the CUDA/cuDNN libraries")
                return 1
            slots = np.arange(b)
            session.admit(slots, np.random.default_rng(0).standard_normal((b, *session.image_shape), np.float32))
            coef = np.zeros((b, S, S + 2), np.float32)
            coef[:, 0, 0] = 1.0
            feeds = dict(slots=slots, t=np.full(b, 500), label=np.arange(b) % max(entry.manifest.num_classes, 1),
                         guidance=np.full(b, 1.25, np.float32), conv=np.tile(np.float32([1, 0, 1]), (b, 1)),
                         coef=coef, noise=None)
            runs = []
            for i in range(args.repeats + 3):
                t0 = time.perf_counter()
                session.step(**feeds).x()  # include the copy of the finished images: a full iteration's cost
                if i >= 3:
                    runs.append(time.perf_counter() - t0)
            times[graphs] = statistics.median(runs) * 1e3
        print(f"| {b} | {times[False]:.3f} | {times[True]:.3f} | x{times[False] / times[True]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
