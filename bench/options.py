"""The session options the server uses, against the alternatives, on the same graphs in the same run.

Evidence for serve.session.session_options(): each variant changes one setting from the server's options
(every graph optimisation, intra-op threads = cores, worker threads that spin while waiting) and is timed
in turn with the others on a small, a middle and a large graph at batch 1 and 64.
"""
from __future__ import annotations

import json
from pathlib import Path

from bench.profile import random_feeds
from bench.timing import interleaved_ms

GRAPHS = (("mnist-cgan", "generator"), ("mnist-vae", "decoder"), ("mnist-diffusion", "denoiser"))
BATCHES = (1, 64)


def variants():
    import onnxruntime as ort

    from serve.session import session_options

    def extended():
        o = session_options()
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        return o

    return {"server's options": session_options, "ORT_ENABLE_EXTENDED (no layout optimisation)": extended,
            "worker threads do not spin": lambda: session_options(spin=False),  # gen serve --no-spin
            "1 intra-op thread": lambda: session_options(threads=1)}  # gen serve --threads 1


def run(base: Path, repeats: int, log=print) -> list[dict]:
    import onnxruntime as ort

    rows = []
    for model, graph in GRAPHS:
        src = base / "exported" / model / "1"
        info = json.loads((src / "manifest.json").read_text())["graphs"][graph]
        sessions = {name: ort.InferenceSession(str(src / info["file"]), make(), providers=["CPUExecutionProvider"])
                    for name, make in variants().items()}
        for batch in BATCHES:
            feeds = random_feeds(info, batch)
            ms = interleaved_ms({name: (lambda s=s, feeds=feeds: s.run(None, feeds)) for name, s in sessions.items()},
                                repeats=repeats, warmup=2, inner=10 if batch == 1 else 1)
            base_ms = ms["server's options"]
            for name, value in ms.items():
                rows.append({"graph": f"{model}.{graph}", "batch": batch, "variant": name, "ms": value,
                             "vs_server": value / base_ms})
            log(f"  {model}.{graph} batch {batch}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()))
    return rows
