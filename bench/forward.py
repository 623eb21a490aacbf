"""Case 1: one forward pass of every exported graph, PyTorch eager vs onnxruntime, same inputs, same process.

PyTorch runs the module that trainer.export exported (eval mode, inference_mode); onnxruntime runs the
exported file through serve.session.GraphRunner, i.e. with the server's own session options. The two
are timed in turn (A B A B) so that load from elsewhere on the machine lands on both.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.timing import interleaved_ms

BATCHES = (1, 64)


def run(base: Path, families: dict, repeats: int, log=print) -> list[dict]:
    import torch

    from serve.manifest import parse_manifest
    from serve.session import GraphRunner, available_threads
    from trainer.export import example_inputs

    torch.set_num_threads(available_threads())  # the same cores for both sides
    rows = []
    for name, family in families.items():
        version_dir = base / "exported" / name / "1"
        manifest = parse_manifest(__import__("json").loads((version_dir / "manifest.json").read_text()))
        for gname, graph in family.export_graphs().items():
            module = graph.module.eval()
            runner = GraphRunner(version_dir, manifest.graphs[gname], device="cpu")
            for batch in BATCHES:
                args = example_inputs(graph.inputs, batch, torch.Generator().manual_seed(0))
                feeds = {k: a.numpy() for k, a in zip(graph.inputs, args)}

                def eager(module=module, args=args):
                    with torch.inference_mode():
                        return module(*args)

                # small graphs at batch 1 take well under a millisecond: average several calls per sample
                inner = 20 if batch == 1 else 1
                ms = interleaved_ms({"torch": eager, "ort": lambda runner=runner, feeds=feeds: runner.run(feeds)},
                                    repeats=repeats, warmup=3, inner=inner)
                row = {"model": name, "graph": gname, "batch": batch, "torch_ms": ms["torch"], "ort_ms": ms["ort"],
                       "speedup": ms["torch"] / ms["ort"]}
                log(f"  {name}.{gname} batch {batch}: torch {ms['torch']:.3f} ms, onnxruntime {ms['ort']:.3f} ms, "
                    f"x{row['speedup']:.2f}")
                rows.append(row)
            _check_same(module, runner, feeds, args, torch)
    return rows


def _check_same(module, runner, feeds, args, torch) -> None:
    """Both sides computed the same thing (guards against timing a broken session)."""
    with torch.inference_mode():
        expected = module(*args)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    got = list(runner.run(feeds).values())
    worst = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))
    if worst > 1e-3:
        raise AssertionError(f"onnxruntime and PyTorch differ by {worst}")
