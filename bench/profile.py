"""Per-op time of one graph in onnxruntime (its built-in profiler): where a run's time goes, by op type.

This is the evidence behind the gaps BENCHMARKS.md explains: e.g. how much of a denoising step is
convolution (compute-bound, comparable to the matmul peak) and how much is normalisation, activations
and element-wise sampler arithmetic (memory-bound, far below it).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np


def op_times(model: Path | bytes, feeds: dict[str, np.ndarray], runs: int = 3) -> list[dict]:
    """[{op, ms per run, share}] sorted by time, from `runs` profiled runs after one warm-up; `model` is a
    graph file or a serialized ModelProto (e.g. the iteration graph assembled at load time)."""
    import onnxruntime as ort

    from serve.session import session_options

    options = session_options()
    prefix = Path(tempfile.mkdtemp(prefix="gen-bench-profile-")) / "ort"
    options.enable_profiling = True
    options.profile_file_prefix = str(prefix)
    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                   providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    session.run(outputs, feeds)
    for _ in range(runs):
        session.run(outputs, feeds)
    trace = session.end_profiling()
    events = json.loads(Path(trace).read_text())
    os.remove(trace)
    by_op: dict[str, float] = {}
    model_us = 0.0
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"]
        elif e.get("cat") == "Session" and e.get("name") == "model_run":
            model_us += e["dur"]
    total = sum(by_op.values()) or 1.0
    rows = [{"op": op, "ms": us / 1e3 / (runs + 1), "share": us / total}
            for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])]
    return rows


def random_feeds(graph_json: dict, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a manifest graph entry at `batch`: normal floats, zero integers (valid labels/timesteps)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in graph_json["inputs"]:
        shape = [batch, *t["shape"][1:]]
        feeds[t["name"]] = rng.standard_normal(shape, dtype=np.float32) if t["dtype"] == "float32" \
            else np.zeros(shape, np.int64)
    return feeds
