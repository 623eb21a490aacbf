"""Case 4: how close one denoising step at batch 64 comes to the machine's matrix-multiply peak.

FLOPs are counted from the exported step graph itself: the batch axis is fixed to 64, onnx shape
inference gives every tensor's shape, and each Conv, ConvTranspose, Gemm and MatMul node contributes
2 * multiply-accumulates (the element-wise ops are left out: they are memory-bound and their FLOPs are
negligible next to these). The peak is measured, not taken from a data sheet: the faster of numpy's
and onnxruntime's float32 MatMul of two large square matrices on all cores.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.timing import median_ms

MODEL = "mnist-diffusion"
BATCH = 64
PEAK_N = 2048


def count_flops(path: Path, batch: int) -> dict[str, float]:
    """FLOPs of one run of the graph at `batch`, by op type (Conv, ConvTranspose, Gemm, MatMul)."""
    import onnx

    model = onnx.load(str(path))
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = batch
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)

    def shape(name):
        s = shapes.get(name)
        if s is None or any(d is None for d in s):
            raise ValueError(f"shape inference left {name} without a static shape")
        return s

    flops: dict[str, float] = {}
    for node in model.graph.node:
        op = node.op_type
        if op == "Conv":
            w, y = shape(node.input[1]), shape(node.output[0])  # w: [Cout, Cin/g, kh, kw]
            f = 2.0 * np.prod(y) * np.prod(w[1:])
        elif op == "ConvTranspose":
            x, w = shape(node.input[0]), shape(node.input[1])  # w: [Cin, Cout/g, kh, kw]
            f = 2.0 * np.prod(x) * np.prod(w[1:])
        elif op == "Gemm":
            a, y = shape(node.input[0]), shape(node.output[0])
            trans_a = next((att.i for att in node.attribute if att.name == "transA"), 0)
            f = 2.0 * np.prod(y) * (a[0] if trans_a else a[1])
        elif op == "MatMul":
            a, y = shape(node.input[0]), shape(node.output[0])
            f = 2.0 * np.prod(y) * a[-1]
        else:
            continue
        flops[op] = flops.get(op, 0.0) + float(f)
    return flops


def matmul_peak(repeats: int) -> dict[str, float]:
    """GFLOP/s of an N x N float32 MatMul: numpy (its BLAS) and onnxruntime (MLAS), all cores."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from serve.runtime import session_options

    n = PEAK_N
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    flop = 2.0 * n**3
    np_ms = median_ms(lambda: a @ b, repeats, warmup=2)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    onnx.checker.check_model(model)
    ort_ms = median_ms(lambda: session.run(["c"], {"a": a, "b": b}), repeats, warmup=2)
    return {"numpy_gflops": flop / np_ms / 1e6, "onnxruntime_gflops": flop / ort_ms / 1e6, "n": n}


def run(base: Path, repeats: int, log=print) -> dict:
    from serve.manifest import parse_manifest
    from serve.runtime import GraphRunner

    src = base / "exported" / MODEL / "1"
    manifest = parse_manifest(json.loads((src / "manifest.json").read_text()))
    flops = count_flops(src / "step.onnx", BATCH)
    total = sum(flops.values())
    runner = GraphRunner(src, manifest.graphs["step"], device="cpu")
    feeds = step_feeds(manifest, BATCH)
    step_ms = median_ms(lambda: runner.run(feeds), repeats, warmup=2)
    peak = matmul_peak(repeats)
    peak_gflops = max(peak["numpy_gflops"], peak["onnxruntime_gflops"])
    achieved = total / step_ms / 1e6
    log(f"  step graph at batch {BATCH}: {total / 1e9:.2f} GFLOP in {step_ms:.1f} ms = {achieved:.1f} GFLOP/s; "
        f"matmul peak {peak_gflops:.1f} GFLOP/s ({achieved / peak_gflops:.0%})")
    return {"model": MODEL, "batch": BATCH, "flops_by_op": flops, "gflop": total / 1e9, "step_ms": step_ms,
            "achieved_gflops": achieved, "peak": peak, "peak_gflops": peak_gflops,
            "fraction_of_peak": achieved / peak_gflops}


def step_feeds(manifest, batch: int) -> dict[str, np.ndarray]:
    """Plausible step-graph inputs: DDIM, mid-way through a 50-step run, guidance 3."""
    info = manifest.graphs["step"]
    shape = next(t.shape for t in info.inputs if t.name == "x_t")[1:]
    rng = np.random.default_rng(0)
    image = lambda: rng.standard_normal((batch, *shape), dtype=np.float32)  # noqa: E731
    full = lambda v, dt: np.full(batch, v, dt)  # noqa: E731
    return {"x_t": image(), "t": full(499, np.int64), "t_prev": full(479, np.int64),
            "label": (np.arange(batch) % max(manifest.num_classes, 1)).astype(np.int64),
            "guidance": full(3.0, np.float32), "eta": full(0.0, np.float32), "noise": image(),
            "sampler": full(1, np.int64), "x0_prev": np.clip(image(), -1, 1), "t_last": full(519, np.int64)}
