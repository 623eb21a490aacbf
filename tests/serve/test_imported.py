"""Plain ONNX graphs imported with `gen import`, served by a real `gen serve`: tritonclient over gRPC and REST
against onnxruntime on the same file, batched and unbatched graphs, and gen.v1's task calls refused.

Graphs are built here with onnx.helper, so the whole module needs no training and runs in seconds.
"""
from __future__ import annotations

import asyncio

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
import tritonclient.http as httpclient
from onnx import TensorProto, helper, numpy_helper

from serve.client import GenClient
from serve.errors import InvalidArgument
from serve.manifest import read_manifest
from tests.serve.conftest import start_server, stop_server
from trainer.onnx_import import import_graph

OIP = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="tests")
    model.ir_version = 9  # what this onnxruntime reads, whatever onnx.helper defaults to
    return model


def mlp(batch="batch") -> onnx.ModelProto:
    """x [batch, 4] float32 -> relu(x W + b) [batch, 3]; batch=1 makes the first dimension fixed (unbatched)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "B")
    return _model([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["a"]),
                   helper.make_node("Relu", ["a"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])], [w, b])


def two_inputs() -> onnx.ModelProto:
    """x [n, 4] float32 and label [n] int64 (a per-row scalar) -> y = x * label [n, 4] float32,
    s = label + 1 [n] int64."""
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    one = numpy_helper.from_array(np.array(1, np.int64), "one")
    return _model([helper.make_node("Unsqueeze", ["label", "axes"], ["k2"]),
                   helper.make_node("Cast", ["k2"], ["kf"], to=TensorProto.FLOAT),
                   helper.make_node("Mul", ["x", "kf"], ["y"]), helper.make_node("Add", ["label", "one"], ["s"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
                   helper.make_tensor_value_info("label", TensorProto.INT64, ["n"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4]),
                   helper.make_tensor_value_info("s", TensorProto.INT64, ["n"])], [axes, one])


def _inputs(session: ort.InferenceSession, batch: int | None, rng) -> dict[str, np.ndarray]:
    arrays = {}
    for i in session.get_inputs():
        shape = [batch if not isinstance(d, int) else d for d in i.shape]
        arrays[i.name] = rng.integers(-3, 4, shape).astype(np.int64) if i.type == "tensor(int64)" \
            else rng.standard_normal(shape).astype(np.float32)
    return arrays


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """name -> the source file, imported into one repository; the repository."""
    base = tmp_path_factory.mktemp("imported")
    files = {"mlp": mlp(), "mlp-fixed": mlp(batch=1), "two": two_inputs()}
    repo = base / "exported"
    for name, model in files.items():
        onnx.save(model, base / f"{name}.onnx")
        import_graph(base / f"{name}.onnx", name, repo=repo)
    return {name: base / f"{name}.onnx" for name in files}, repo


@pytest.fixture(scope="module")
def served(graphs):
    srv = start_server(graphs[1], "--max-queue-delay-ms", "5")
    yield srv
    stop_server(srv)


def test_the_manifests_say_what_the_graphs_declare(graphs):
    files, repo = graphs
    m = read_manifest(repo / "mlp" / "1")
    assert (m.family, m.task, m.image, m.classes, m.batched) == ("onnx", "graph", {}, (), True)
    g = m.graphs["model"]
    assert [(t.name, t.dtype, t.shape) for t in g.inputs] == [("x", "float32", (-1, 4))]
    assert [(t.name, t.dtype, t.shape) for t in g.outputs] == [("y", "float32", (-1, 3))]
    assert m.serving["max_batch_size"] == 64
    fixed = read_manifest(repo / "mlp-fixed" / "1")
    assert not fixed.batched and fixed.serving["max_batch_size"] == 0
    assert fixed.graphs["model"].inputs[0].shape == (1, 4), "an unbatched graph's shapes are recorded as they are"
    two = read_manifest(repo / "two" / "1").graphs["model"]
    assert [(t.name, t.dtype, t.shape) for t in two.inputs] == [("x", "float32", (-1, 4)), ("label", "int64", (-1,))]
    assert [(t.name, t.dtype, t.shape) for t in two.outputs] == [("y", "float32", (-1, 4)), ("s", "int64", (-1,))]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_tritonclient_infers_like_onnxruntime(graphs, served, protocol):
    files, _ = graphs
    lib = triton if protocol == "grpc" else httpclient
    client = lib.InferenceServerClient(served.target if protocol == "grpc" else served.http_target)
    rng = np.random.default_rng(1)
    try:
        for name, path in files.items():
            model = f"{name}.model"
            assert client.is_model_ready(model)
            local = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            batched = name != "mlp-fixed"
            for batch in (1, 5) if batched else (None,):
                arrays = _inputs(local, batch, rng)
                inputs = []
                for key, array in arrays.items():
                    if protocol == "http" and array.ndim == 1:  # a per-row scalar as Triton declares it: [n, 1]
                        array = array[:, None]
                    inp = lib.InferInput(key, list(array.shape), OIP[array.dtype])
                    inp.set_data_from_numpy(array)
                    inputs.append(inp)
                result = client.infer(model, inputs)
                for out, expected in zip(local.get_outputs(), local.run(None, arrays)):
                    got = result.as_numpy(out.name)
                    assert got.dtype == expected.dtype and got.shape == expected.shape, (model, out.name)
                    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    finally:
        client.close()


def test_metadata_and_config(graphs, served):
    client = triton.InferenceServerClient(served.target)
    try:
        meta = client.get_model_metadata("two.model", as_json=True)
        assert [(i["name"], i["datatype"], [int(d) for d in i["shape"]]) for i in meta["inputs"]] == \
            [("x", "FP32", [-1, 4]), ("label", "INT64", [-1, 1])]  # a per-row scalar as Triton reports it
        config = client.get_model_config("two.model", as_json=True)["config"]
        assert int(config["max_batch_size"]) == 64 and "dynamic_batching" in config
        k = config["input"][1]
        assert [int(d) for d in k["dims"]] == [1] and "reshape" in k, "a per-row scalar: dims [1], reshape []"
        fixed = client.get_model_config("mlp-fixed.model", as_json=True)["config"]
        assert int(fixed.get("max_batch_size", 0)) == 0 and "dynamic_batching" not in fixed
        assert [int(d) for d in fixed["input"][0]["dims"]] == [1, 4], "unbatched: the whole shape"
        index = {m["name"]: m["state"] for m in client.get_model_repository_index(as_json=True)["models"]}
        assert index == {"mlp.model": "READY", "mlp-fixed.model": "READY", "two.model": "READY"}
    finally:
        client.close()


def test_an_unbatched_graph_takes_only_its_whole_shape(served):
    client = triton.InferenceServerClient(served.target)
    try:
        inp = triton.InferInput("x", [2, 4], "FP32")
        inp.set_data_from_numpy(np.zeros((2, 4), np.float32))
        with pytest.raises(triton.InferenceServerException) as info:
            client.infer("mlp-fixed.model", [inp])
        assert "INVALID_ARGUMENT" in str(info.value.status()) and "[1, 4]" in info.value.message()
    finally:
        client.close()


def test_gen_v1_tasks_are_refused_and_list_models_shows_the_graph(served):
    with GenClient(served.target, timeout=30) as client:
        for call in (lambda: client.sample("mlp", 1), lambda: list(client.generate("mlp", 1, steps=2))):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "mlp.model" in info.value.details(), info.value.details()
        rows = {m.name: m for m in client.list_models()}
        assert rows["mlp"].family == "onnx" and rows["mlp"].task == "graph" and list(rows["mlp"].graphs) == ["model"]


def test_the_runtime_in_process(graphs):
    """The same through the in-process API: every gen.v1 task is an InvalidArgument, infer works unbatched."""
    from serve.runtime import Runtime

    _, repo = graphs
    with Runtime(repo, device="cpu") as rt:
        for call in (lambda: rt.sync.sample("two", 1), lambda: rt.sync.translate("two", np.zeros((1, 3, 8, 8))),
                     lambda: rt.sync.encode("two", np.zeros((1, 3, 8, 8))),
                     lambda: rt.sync.decode("two", np.zeros((1, 4))), lambda: list(rt.sync.generate("two", 1))):
            with pytest.raises(InvalidArgument, match="two.model"):
                call()
        assert rt.graph("mlp-fixed.model").max_batch_size == 0
        out = rt.sync.infer("mlp-fixed.model", {"x": np.ones((1, 4), np.float32)})
        assert out["y"].shape == (1, 3)
        with pytest.raises(InvalidArgument, match=r"x: expected shape \[1, 4\]"):
            rt.sync.infer("mlp-fixed.model", {"x": np.ones((4,), np.float32)})
        # a label-like integer input of an imported graph is the graph's business, not a class index
        out = asyncio.run(rt.infer("two.model", {"x": np.ones((2, 4), np.float32), "label": np.array([7, -2])}))
        np.testing.assert_array_equal(out["s"], [8, -1])
        row = next(r for r in rt.models() if r["name"] == "two")
        assert (row["family"], row["task"], row["graphs"], row["channels"]) == ("onnx", "graph", ["model"], 0)


def test_gen_models_lists_them_and_writes_them_for_triton(graphs, tmp_path):
    """`gen models` and `gen models --triton OUT` (a subprocess: protobuf holds one `inference` package at a time,
    and tritonclient's model_config_pb2 is read here)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from serve.manifest import file_sha256
    from tests.test_cli import gen

    files, repo = graphs
    listing = gen("models", "--repo", str(repo))
    assert listing.returncode == 0, listing.stderr
    assert any(line.split()[:3] == ["two", "1", "onnx"] for line in listing.stdout.splitlines()), listing.stdout
    out = tmp_path / "triton"
    proc = gen("models", "--repo", str(repo), "--triton", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["mlp-fixed.model", "mlp.model", "two.model"]
    types = {"tensor(float)": mc.TYPE_FP32, "tensor(int64)": mc.TYPE_INT64}
    for name, source in files.items():
        folder = out / f"{name}.model"
        assert file_sha256(folder / "1" / "model.onnx") == file_sha256(source), "the graph, byte for byte"
        config = text_format.Parse((folder / "config.pbtxt").read_text(), mc.ModelConfig())
        session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
        batched = name != "mlp-fixed"
        assert config.max_batch_size == (64 if batched else 0)
        assert config.HasField("dynamic_batching") == batched, "Triton batches nothing at max_batch_size 0"
        for declared, actual in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
            assert [t.name for t in declared] == [a.name for a in actual]
            for t, a in zip(declared, actual):
                assert t.data_type == types[a.type]
                dims = [d for d in a.shape[1:]] if batched else list(a.shape)
                assert list(t.dims) == (dims or [1]) and t.HasField("reshape") == (not dims), (name, t.name)
