"""OIP v2 over REST against the real server: tritonclient.http on every graph (JSON and binary tensor data),
metadata, config, statistics, the repository extension, error codes and bodies, and docs/serving.md's curl
examples."""
from __future__ import annotations

import concurrent.futures
import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from tests.conftest import tiny_graph_count
from tests.serve.conftest import ROOT, start_server, stop_server
from tests.serve.test_tritonclient import OIP_TYPES, _graphs, _inputs


@pytest.fixture(scope="module")
def client(server):
    c = httpclient.InferenceServerClient(server.http_target, network_timeout=60)
    yield c
    c.close()


def _request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON body) of one plain HTTP request."""
    req = urllib.request.Request(f"http://{server.http_target}{path}", data=body, method=method,
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_metadata_and_health(client, server):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "gen" and "binary_tensor_data" in meta["extensions"]
    assert _request(server, "GET", "/v2/health/ready") == (200, {"ready": True})


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_graph_infers_like_onnxruntime(client, server, binary):
    rng = np.random.default_rng(1)
    names = []
    for name, entry, graph in _graphs(server.repo):
        names.append(name)
        assert client.is_model_ready(name)
        meta = client.get_model_metadata(name)
        assert [i["name"] for i in meta["inputs"]] == [t.name for t in graph.inputs]
        assert meta["inputs"][0]["shape"] == list(graph.inputs[0].shape)
        config = client.get_model_config(name)
        assert config["max_batch_size"] >= 1 and config["input"][0]["dims"] == list(graph.inputs[0].shape[1:])
        for t, declared in zip(graph.inputs, config["input"]):  # a per-row scalar as Triton declares it
            assert declared["dims"] == (list(t.shape[1:]) or [1]) and ("reshape" in declared) == (len(t.shape) == 1)
        assert config["input"][0]["data_type"] == "TYPE_" + OIP_TYPES[graph.inputs[0].dtype]
        local = ort.InferenceSession(str(entry.path / graph.file), providers=["CPUExecutionProvider"])
        arrays = _inputs(graph, 3, rng)
        inputs = []
        for t in graph.inputs:
            inp = httpclient.InferInput(t.name, list(arrays[t.name].shape), OIP_TYPES[t.dtype])
            inp.set_data_from_numpy(arrays[t.name], binary_data=binary)
            inputs.append(inp)
        outputs = [httpclient.InferRequestedOutput(t.name, binary_data=binary) for t in graph.outputs]
        result = client.infer(name, inputs, outputs=outputs, request_id="r1")
        assert result.get_response()["id"] == "r1"
        for t, expected in zip(graph.outputs, local.run(None, arrays)):
            np.testing.assert_allclose(result.as_numpy(t.name), expected, atol=1e-4)
    assert len(names) == tiny_graph_count()  # every graph of every family, and the student's


def test_repository_index_and_control(client):
    index = client.get_model_repository_index()
    assert {"name": "tiny-vae.decoder", "version": "1", "state": "READY", "reason": ""} in index
    client.unload_model("tiny-vae")
    assert not client.is_model_ready("tiny-vae.decoder")
    client.load_model("tiny-vae")
    assert client.is_model_ready("tiny-vae.decoder")


@pytest.mark.parametrize("method,path,body,status,words", [
    ("GET", "/v2/models/no-such.generator", None, 404, "no-such"),
    ("GET", "/v2/models/tiny-gan.generator/versions/99", None, 404, "99"),
    ("GET", "/v2/models/tiny-gan.generator/versions/x/config", None, 400, "model_version"),
    ("GET", "/v2/models/no-such.generator/ready", None, 404, "no-such"),
    ("GET", "/v2/nothing-here", None, 404, "no such endpoint"),
    ("DELETE", "/v2/models/tiny-gan.generator", None, 405, "not allowed"),
    ("POST", "/v2/models/tiny-gan.generator/infer", b"{not json", 400, "not valid JSON"),
    ("POST", "/v2/models/tiny-gan.generator/infer", b"[1]", 400, "JSON object"),
    ("POST", "/v2/models/tiny-gan.generator/infer", b'{"inputs": []}', 400, "inputs"),
    ("POST", "/v2/models/tiny-gan.generator/infer",
     b'{"inputs": [{"name": "z", "shape": [1, 8], "datatype": "FP32", "data": [1, 2]}]}', 400, "inputs[0] (z).data"),
    ("POST", "/v2/models/tiny-gan.generator/infer",
     b'{"inputs": [{"name": "z", "shape": [1, 8], "datatype": "BYTES", "data": ["a"]}]}', 400, "datatype"),
    ("POST", "/v2/models/tiny-gan.generator/infer",
     b'{"inputs": [{"name": "z", "shape": [1, "8"], "datatype": "FP32", "data": [1]}]}', 400, "shape"),
    ("POST", "/v2/models/tiny-gan.generator/infer",
     b'{"inputs": [{"name": "z", "shape": [1, 2], "datatype": "FP32", "data": ["x", "y"]}]}', 400, "data"),
    ("POST", "/v2/models/tiny-gan.generator/infer",
     b'{"inputs": [{"name": "z", "shape": [1, 8], "datatype": "FP32", "data": [0,0,0,0,0,0,0,0]}]}', 400,
     "label"),
    ("POST", "/v2/repository/models/tiny-gan/unload", b"", 200, None),
])
def test_bad_requests_get_the_protocols_codes_and_bodies(server, method, path, body, status, words):
    if status == 200:  # the session server allows repository control: put the model back afterwards
        assert _request(server, method, path, body)[0] == 200
        assert _request(server, "POST", "/v2/repository/models/tiny-gan/load", b"")[0] == 200
        return
    got, doc = _request(server, method, path, body)
    assert got == status and set(doc) == {"error"} and words in doc["error"], (got, doc)
    assert _request(server, "GET", "/v2/health/ready")[0] == 200, "the server keeps serving"


def test_binary_data_mistakes_are_400(server):
    header = json.dumps({"inputs": [{"name": "z", "shape": [1, 8], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 32}},
                                    {"name": "label", "shape": [1], "datatype": "INT64", "data": [1]}]}).encode()
    path = "/v2/models/tiny-gan.generator/infer"
    for body, length, words in ((header + bytes(16), len(header), "more bytes"),
                                (header + bytes(40), len(header), "no input claims"),
                                (header + bytes(32), len(header) + 99, "Inference-Header-Content-Length")):
        got, doc = _request(server, "POST", path, body, {"Inference-Header-Content-Length": str(length)})
        assert got == 400 and words in doc["error"], doc
    ok, doc = _request(server, "POST", path, header + bytes(32), {"Inference-Header-Content-Length": str(len(header))})
    assert ok == 200 and doc["outputs"][0]["shape"] == [1, 1, 32, 32]


def test_a_full_queue_is_429_and_the_rest_are_served(served_repo):
    srv = start_server(served_repo, "--max-queue-size", "1", "--max-queue-delay-ms", "50", "--max-batch-size", "2")
    try:
        meta = json.loads(urllib.request.urlopen(f"http://{srv.http_target}/v2/models/tiny-vae.decoder",
                                                 timeout=30).read())
        rows = 64  # 32 runs of 2 while the other requests queue
        tensors = [{"name": t["name"], "shape": [rows, *t["shape"][1:]], "datatype": t["datatype"],
                    "data": [0] * (rows * int(np.prod(t["shape"][1:])))} for t in meta["inputs"]]
        body = json.dumps({"inputs": tensors}).encode()

        def one(_):
            return _request(srv, "POST", "/v2/models/tiny-vae.decoder/infer", body)

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(12)))
        codes = [code for code, _ in results]
        assert 429 in codes and 200 in codes, codes
        full = next(doc for code, doc in results if code == 429)
        assert "queue is full" in full["error"]
        assert _request(srv, "POST", "/v2/models/tiny-vae.decoder/infer", body)[0] == 200
    finally:
        stop_server(srv)


def _docs_curl_block() -> str:
    text = (ROOT / "docs" / "serving.md").read_text()
    match = re.search(r"<!-- rest-examples: run by tests/serve/test_rest.py -->\n```sh\n(.*?)```", text, re.S)
    assert match, "docs/serving.md lost its REST examples block"
    return match.group(1)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_docs_curl_examples_run_as_written(tmp_path):
    """docs/serving.md's block, with only its PORT= line set to the port this server got, against exported/."""
    block = _docs_curl_block()
    assert re.search(r"^PORT=8000$", block, re.M)
    srv = start_server(ROOT / "exported", "--device", "cpu")
    try:
        script = re.sub(r"^PORT=8000$", f"PORT={srv.http_port}", block, flags=re.M)
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        for expected in ('{"ready": true}', '"max_batch_size": 64', '"model_name": "mnist-vae.decoder"',
                         '"shape": [1, 1, 32, 32]', '{"error": "model \'mnist-gan.generator\' is not in the repository',
                         "HTTP/1.1 404", "nv_inference_request_success_total"):
            assert expected in out.stdout, (expected, out.stdout[-3000:])
    finally:
        stop_server(srv)
