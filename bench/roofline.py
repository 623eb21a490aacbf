"""Case 4: how close one denoising step at batch 64 comes to the machine's matrix-multiply peak.

The step is one run of the iteration graph the server assembles at load time around the exported denoiser
(serve/denoising.py: gather the rows' state, the denoiser on the doubled batch of classifier-free guidance,
x0, the sampler update, scatter), timed through serve.session.DenoisingSession as the scheduler runs it
(IO binding, state on the device), 64 rows, i.e. the U-Net at batch 128. FLOPs are counted from that same
graph: every batch axis is fixed to 64, onnx shape inference gives every tensor's shape, and each Conv,
ConvTranspose, Gemm and MatMul node contributes 2 * multiply-accumulates (the element-wise ops are left out:
they are memory-bound and their FLOPs are negligible next to these). The peak is measured, not taken from a
data sheet: the faster of numpy's and onnxruntime's float32 MatMul of two large square matrices on all cores.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.timing import median_ms

MODEL = "mnist-diffusion"
BATCH = 64
PEAK_N = 2048


def count_flops(model, batch: int) -> dict[str, float]:
    """FLOPs of one run of `model` (an onnx.ModelProto) at `batch`, by op type (Conv, ConvTranspose, Gemm, MatMul)."""
    import onnx

    model = onnx.load_from_string(model.SerializeToString())  # a copy: the batch axes are fixed in place
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

    from serve.session import session_options

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


def iteration(base: Path):
    """(the iteration graph of MODEL as the server assembles it, its manifest, its version folder)."""
    import onnx

    from serve.denoising import iteration_model
    from serve.manifest import parse_manifest
    from serve.samplers import state_size

    src = base / "exported" / MODEL / "1"
    manifest = parse_manifest(json.loads((src / "manifest.json").read_text()))
    shape = (manifest.image["channels"], manifest.image["height"], manifest.image["width"])
    denoiser = onnx.load(str(src / manifest.graphs["denoiser"].file))
    return iteration_model(denoiser, shape, state_size(), manifest.num_classes), manifest, src


def step_feeds(manifest, batch: int) -> dict[str, np.ndarray]:
    """DenoisingSession.step's arguments for `batch` rows in slots 0..batch-1: DDIM mid-way through a 50-step
    run (t 499 -> 479), guidance 3, no noise."""
    from serve.samplers import SAMPLERS, NoiseSchedule, padded_plan, state_size

    d = manifest.diffusion
    schedule = NoiseSchedule.from_manifest(d)
    coef = padded_plan(SAMPLERS["ddim"], schedule, [(499, 479)], 0.0, state_size())
    full = lambda v, dt: np.full(batch, v, dt)  # noqa: E731
    return {"slots": np.arange(batch, dtype=np.int64), "t": full(499, np.int64),
            "label": (np.arange(batch) % max(manifest.num_classes, 1)).astype(np.int64),
            "guidance": full(3.0, np.float32), "conv": np.tile(np.float32([*schedule.to_x0(499), 1.0]), (batch, 1)),
            "coef": np.repeat(coef, batch, axis=0), "noise": None}


def graph_feeds(manifest, batch: int) -> dict[str, np.ndarray]:
    """The same step as plain inputs of the iteration graph (for onnxruntime's profiler): a random state pool
    of `batch` slots, zero noise."""
    from serve.denoising import KNOWN
    from serve.samplers import state_size

    feeds = step_feeds(manifest, batch)
    image = (manifest.image["channels"], manifest.image["height"], manifest.image["width"])
    S = state_size()
    feeds["state"] = np.random.default_rng(0).standard_normal((batch, S + KNOWN, *image), dtype=np.float32)
    feeds["state"][:, S + 1] = 1.0  # the mask: regenerate everything (plain generation)
    feeds["noise"] = np.zeros((batch, *image), np.float32)
    feeds["blend"] = np.zeros((batch, 2), np.float32)
    if not manifest.num_classes:
        del feeds["label"], feeds["guidance"]
    return feeds


def run(base: Path, repeats: int, log=print) -> dict:
    from serve.samplers import state_size
    from serve.session import DenoisingSession

    model, manifest, src = iteration(base)
    flops = count_flops(model, BATCH)
    total = sum(flops.values())
    session = DenoisingSession(src, manifest, state_size(), capacity=BATCH, device="cpu")
    feeds = step_feeds(manifest, BATCH)
    session.admit(feeds["slots"], np.random.default_rng(0).standard_normal((BATCH, *session.image_shape),
                                                                           dtype=np.float32))
    step_ms = median_ms(lambda: session.step(**feeds), repeats, warmup=2)
    peak = matmul_peak(repeats)
    peak_gflops = max(peak["numpy_gflops"], peak["onnxruntime_gflops"])
    achieved = total / step_ms / 1e6
    log(f"  iteration graph, {BATCH} rows: {total / 1e9:.2f} GFLOP in {step_ms:.1f} ms = {achieved:.1f} GFLOP/s; "
        f"matmul peak {peak_gflops:.1f} GFLOP/s ({achieved / peak_gflops:.0%})")
    return {"model": MODEL, "batch": BATCH, "flops_by_op": flops, "gflop": total / 1e9, "step_ms": step_ms,
            "achieved_gflops": achieved, "peak": peak, "peak_gflops": peak_gflops,
            "fraction_of_peak": achieved / peak_gflops}
