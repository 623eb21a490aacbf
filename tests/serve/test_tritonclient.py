"""The official tritonclient[grpc] against the real server: metadata, config, inference on every graph,
statistics, repository index and control. Results are compared with onnxruntime run here on the same file."""
from __future__ import annotations

import concurrent.futures

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from serve.manifest import scan_repository
from tests.conftest import tiny_graph_count

OIP_TYPES = {"float32": "FP32", "int64": "INT64"}


def _graphs(repo):
    for entry in scan_repository(repo):
        for g in entry.manifest.graphs.values():
            yield f"{entry.name}.{g.name}", entry, g


def _inputs(graph, batch, rng):
    arrays = {}
    for t in graph.inputs:
        shape = (batch, *t.shape[1:])
        arrays[t.name] = rng.integers(0, 2, shape).astype(np.int64) if t.dtype == "int64" \
            else rng.standard_normal(shape).astype(np.float32)
    return arrays


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(server.target)
    yield c
    c.close()


def test_server_metadata_and_liveness(client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "gen" and "model_repository" in meta["extensions"]


def test_every_graph_infers_like_onnxruntime(client, server):
    rng = np.random.default_rng(0)
    names = []
    for name, entry, graph in _graphs(server.repo):
        names.append(name)
        assert client.is_model_ready(name)
        meta = client.get_model_metadata(name, as_json=True)
        assert [i["name"] for i in meta["inputs"]] == [t.name for t in graph.inputs]
        assert meta["platform"] == "onnxruntime_onnx"
        config = client.get_model_config(name, as_json=True)["config"]
        assert int(config["max_batch_size"]) >= 1 and "dynamic_batching" in config
        assert [int(d) for d in config["input"][0]["dims"]] == list(graph.inputs[0].shape[1:])
        local = ort.InferenceSession(str(entry.path / graph.file), providers=["CPUExecutionProvider"])
        for batch in (1, 5):
            arrays = _inputs(graph, batch, rng)
            inputs = []
            for t in graph.inputs:
                inp = triton.InferInput(t.name, list(arrays[t.name].shape), OIP_TYPES[t.dtype])
                inp.set_data_from_numpy(arrays[t.name])
                inputs.append(inp)
            result = client.infer(name, inputs, outputs=[triton.InferRequestedOutput(t.name) for t in graph.outputs])
            expected = local.run(None, arrays)
            for t, exp in zip(graph.outputs, expected):
                got = result.as_numpy(t.name)
                assert got.shape == exp.shape
                np.testing.assert_allclose(got, exp, atol=1e-4)
    assert len(names) == tiny_graph_count()  # every graph of every family, and the student's


def test_concurrent_requests_are_batched(client):
    """16 concurrent requests on one graph run in fewer executions (ModelStatistics). The batcher merges the rows
    queued when a run ends, and a run of this graph takes microseconds, so whether 16 client threads' requests
    overlap in the server is a matter of timing: up to 5 rounds, one of which must batch."""
    name = "tiny-gan.generator"
    z_dim = int(client.get_model_metadata(name, as_json=True)["inputs"][0]["shape"][1])

    def one(i):
        inputs = [triton.InferInput("z", [1, z_dim], "FP32"), triton.InferInput("label", [1], "INT64")]
        inputs[0].set_data_from_numpy(np.full((1, z_dim), i / 16, np.float32))
        inputs[1].set_data_from_numpy(np.array([i % 10], np.int64))
        return client.infer(name, inputs).as_numpy("image")

    rounds = []
    for _ in range(5):
        before = client.get_inference_statistics(name, as_json=True)["model_stats"][0]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            outs = list(pool.map(one, range(16)))
        assert all(o.shape[0] == 1 for o in outs)
        after = client.get_inference_statistics(name, as_json=True)["model_stats"][0]
        requests = int(after["inference_count"]) - int(before.get("inference_count", 0))
        executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
        assert requests == 16, requests
        rounds.append(executions)
        if executions < 16:
            break
    assert rounds[-1] < 16, rounds
    assert int(after["inference_stats"]["success"]["count"]) >= 16


def test_repository_index_and_control(client):
    index = client.get_model_repository_index(as_json=True)["models"]
    names = {m["name"] for m in index}
    assert "tiny-vae.decoder" in names and all(m["state"] == "READY" for m in index)
    client.unload_model("tiny-vae")
    assert not client.is_model_ready("tiny-vae.decoder")
    client.load_model("tiny-vae")
    assert client.is_model_ready("tiny-vae.decoder")


@pytest.mark.parametrize("call,code", [
    (lambda c: c.get_model_metadata("no-such.generator"), "NOT_FOUND"),
    (lambda c: c.get_model_metadata("tiny-gan.generator", model_version="99"), "NOT_FOUND"),
    (lambda c: c.get_model_metadata("tiny-gan.generator", model_version="x"), "INVALID_ARGUMENT"),
])
def test_errors(client, call, code):
    with pytest.raises(InferenceServerException) as info:
        call(client)
    assert code in str(info.value.status())


def test_bad_infer_input_names_the_field(client):
    inputs = [triton.InferInput("z", [1, 3], "FP32")]
    inputs[0].set_data_from_numpy(np.zeros((1, 3), np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("tiny-gan.generator", inputs)
    assert "INVALID_ARGUMENT" in str(info.value.status())
    assert client.is_server_live()


def test_model_config_is_the_triton_layouts_and_per_row_scalars_take_either_shape(client, server):
    """ModelConfig declares a per-row scalar (a label, a timestep) as Triton does, dims [1] reshaped to [] (what
    `gen models --triton` writes too: tests/serve/test_triton_repository.py); such an input is accepted as [N] and
    as [N, 1] with the same result."""
    scalar_inputs = 0
    for name, _entry, graph in _graphs(server.repo):
        config = client.get_model_config(name).config
        for t, declared in zip(graph.inputs, config.input):
            if list(t.shape) == [-1]:
                assert list(declared.dims) == [1] and declared.HasField("reshape"), (name, t.name)
                assert list(declared.reshape.shape) == []
            else:
                assert list(declared.dims) == list(t.shape[1:]) and not declared.HasField("reshape"), (name, t.name)
        rows = [t.name for t in graph.inputs if list(t.shape) == [-1]]
        if not rows:
            continue
        scalar_inputs += len(rows)
        arrays = _inputs(graph, 3, np.random.default_rng(2))
        results = []
        for column in (False, True):
            inputs = []
            for t in graph.inputs:
                array = arrays[t.name][:, None] if column and t.name in rows else arrays[t.name]
                inp = triton.InferInput(t.name, list(array.shape), OIP_TYPES[t.dtype])
                inp.set_data_from_numpy(array)
                inputs.append(inp)
            results.append(client.infer(name, inputs).as_numpy(graph.outputs[0].name))
        np.testing.assert_array_equal(results[0], results[1])
    assert scalar_inputs >= 4, "labels of the conditional generators and the denoisers' t and label"


def test_an_input_in_another_datatype_is_refused_naming_it(client, server):
    """As Triton: FP64 data for an FP32 input is INVALID_ARGUMENT (gRPC) and 400 (REST), not converted."""
    import tritonclient.http as httpclient

    z = np.zeros((1, *_z_shape(client)), np.float64)
    label = np.zeros(1, np.int64)
    for module, target in ((triton, server.target), (httpclient, server.http_target)):
        c = client if module is triton else httpclient.InferenceServerClient(target)
        inputs = [module.InferInput("z", list(z.shape), "FP64"), module.InferInput("label", [1], "INT64")]
        inputs[0].set_data_from_numpy(z)
        inputs[1].set_data_from_numpy(label)
        with pytest.raises(InferenceServerException) as e:
            c.infer("tiny-gan.generator", inputs)
        assert "z: the model takes FP32, got FP64" in str(e.value)
        assert ("INVALID_ARGUMENT" in str(e.value.status())) if module is triton else e.value.status() == "400"


def _z_shape(client) -> list[int]:
    meta = client.get_model_metadata("tiny-gan.generator", as_json=True)
    return [int(d) for d in meta["inputs"][0]["shape"][1:]]
