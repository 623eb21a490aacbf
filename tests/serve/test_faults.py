"""Faults against a real `gen serve`: broken model files, an onnxruntime error at run time, cancellation,
loading a new version under load, SIGTERM with work in flight, message and request size limits.

One server (batching off, so every run holds one request) serves healthy models next to broken ones.
"""
from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2 as oip  # the OIP messages; ours cannot share this interpreter
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc
from serve.manifest import file_sha256
from tests.serve.conftest import start_server, stop_server
from tests.serve.test_repository import clone

LABELS_IN_TABLE = 3  # the runtime-failing graph only has rows for labels 0..2 of the manifest's 10


def _rehash(version_dir: Path, graph: str = "generator") -> None:
    """Make the manifest's sha256 agree with the file again, so only onnxruntime can object."""
    path = version_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["graphs"][graph]["sha256"] = file_sha256(version_dir / manifest["graphs"][graph]["file"])
    path.write_text(json.dumps(manifest))


def _failing_generator(path: Path, opset: int) -> None:
    """z [B, 8], label [B] -> image [B, 1, 32, 32] by a table lookup with rows for 3 labels only: labels 3..9
    pass the server's checks (the manifest has 10 classes) and make onnxruntime's Gather fail at run time."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [LABELS_IN_TABLE, 1024],
                               np.linspace(-1, 1, LABELS_IN_TABLE * 1024, dtype=np.float32))
    nodes = [
        helper.make_node("Gather", ["table", "label"], ["rows"], axis=0),
        helper.make_node("ReduceSum", ["z", "axes"], ["zsum"], keepdims=1),
        helper.make_node("Mul", ["zsum", "zero"], ["nothing"]),
        helper.make_node("Add", ["rows", "nothing"], ["flat"]),
        helper.make_node("Reshape", ["flat", "shape"], ["image"]),
    ]
    graph = helper.make_graph(
        nodes, "failing", [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["B", 8]),
                           helper.make_tensor_value_info("label", TensorProto.INT64, ["B"])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", 1, 32, 32])],
        [table, helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
         helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
         helper.make_tensor("shape", TensorProto.INT64, [4], [-1, 1, 32, 32])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)


@pytest.fixture(scope="module")
def fault_repo(tiny_repo, tmp_path_factory) -> Path:
    src, repo = tiny_repo / "exported", tmp_path_factory.mktemp("faults") / "exported"
    for name in ("tiny-gan", "tiny-diffusion"):
        shutil.copytree(src / name, repo / name)
    gan = src / "tiny-gan" / "1"
    clone(gan, repo, "reload-gan")
    corrupt = clone(gan, repo, "corrupt-gan")
    (corrupt / "generator.onnx").write_bytes(b"\x08\x07garbage that is not a protobuf model" * 50)
    _rehash(corrupt)
    truncated = clone(gan, repo, "truncated-gan")
    data = (truncated / "generator.onnx").read_bytes()
    (truncated / "generator.onnx").write_bytes(data[:len(data) // 2])
    _rehash(truncated)
    bad_hash = clone(gan, repo, "badhash-gan")
    with open(bad_hash / "generator.onnx", "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xfe\xfd")
    failing = clone(gan, repo, "failing-gan")
    _failing_generator(failing / "generator.onnx", json.loads((gan / "manifest.json").read_text())["opset"])
    _rehash(failing)
    return repo


@pytest.fixture(scope="module")
def faulty(fault_repo):
    srv = start_server(fault_repo, "--max-batch-size", "1", "--allow-repository-control", "--max-message-mb", "1",
                       "--max-images", "16", "--grace", "30", "--threads", "1", "--no-spin")  # shared-host options
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def stubs(faulty):
    channel = grpc.insecure_channel(faulty.target)
    yield pb_grpc.GeneratorStub(channel), oip_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def _step_runs(oip_stub) -> int:
    stats = oip_stub.ModelStatistics(oip.ModelStatisticsRequest(name="tiny-diffusion")).model_stats
    return int(stats[0].execution_count)


def test_broken_models_are_refused_with_their_reason_and_the_others_serve(stubs):
    gen, infer = stubs
    index = {m.name: m for m in infer.RepositoryIndex(oip.RepositoryIndexRequest()).models}
    assert index["tiny-gan.generator"].state == "READY"
    for name, reason in [("corrupt-gan", "generator.onnx: cannot be served"),
                         ("truncated-gan", "generator.onnx: cannot be served"),
                         ("badhash-gan", "generator.onnx: sha256 mismatch")]:
        row = index[f"{name}.generator"]
        assert row.state == "UNAVAILABLE" and reason in row.reason, (name, row)
        with pytest.raises(grpc.RpcError) as info:
            gen.Sample(pb.SampleRequest(model=name, n=1))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and reason in info.value.details()
        listed = gen.ListModels(pb.ListModelsRequest(model=name)).models[0]
        assert listed.state == "UNAVAILABLE" and reason in listed.reason
    assert len(gen.Sample(pb.SampleRequest(model="tiny-gan", n=2, seed=0)).png) == 2


def test_an_onnxruntime_error_fails_only_its_own_batch(stubs):
    """Label 5 passes validation (10 classes) but the graph's table has 3 rows: that run fails in
    onnxruntime. With batching off, the concurrent good requests on the same graph all succeed."""
    gen, _ = stubs

    def sample(label):
        try:
            return len(gen.Sample(pb.SampleRequest(model="failing-gan", n=1, seed=label, labels=[label]),
                                  timeout=60).png)
        except grpc.RpcError as e:
            return e

    labels = [5 if i % 4 == 0 else i % LABELS_IN_TABLE for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(sample, labels))
    for label, result in zip(labels, results):
        if label == 5:
            assert isinstance(result, grpc.RpcError) and result.code() == grpc.StatusCode.INTERNAL
            assert "inference failed" in result.details()
        else:
            assert result == 1, result
    assert len(gen.Sample(pb.SampleRequest(model="failing-gan", n=1, labels=[1])).png) == 1


def test_cancelling_mid_generate_frees_the_slot(stubs):
    """Batching is off: B waits while A (1000 steps) holds the only slot. Once A's client cancels, B
    runs: the step graph runs about B's 3 steps more, not A's remaining ~1000."""
    gen, infer = stubs
    a = gen.Generate(pb.GenerateRequest(model="tiny-diffusion", n=1, seed=0, steps=1000))
    next(a), next(a)
    b_events, b_done = [], threading.Event()

    def run_b():
        for event in gen.Generate(pb.GenerateRequest(model="tiny-diffusion", n=1, seed=1, steps=3), timeout=60):
            b_events.append(event)
        b_done.set()

    thread = threading.Thread(target=run_b)
    thread.start()
    time.sleep(0.5)
    assert not b_events, "B should wait while A holds the only slot"
    before = _step_runs(infer)
    a.cancel()
    assert b_done.wait(30), "B never ran after A was cancelled"
    thread.join()
    assert b_events[-1].HasField("result")
    time.sleep(0.3)
    assert _step_runs(infer) - before <= 3 + 4, "the cancelled request kept stepping"


def test_loading_new_versions_under_load_fails_no_request(stubs, fault_repo, tiny_repo):
    gen, infer = stubs
    stop, errors, versions = threading.Event(), [], set()
    z = np.zeros((1, 8), np.float32)

    def hammer(i):
        while not stop.is_set():
            try:
                if i % 2:
                    versions.add(gen.Sample(pb.SampleRequest(model="reload-gan", n=2, seed=i), timeout=60).version)
                else:
                    req = oip.ModelInferRequest(model_name="reload-gan.generator", raw_input_contents=[
                        z.tobytes(), np.array([i % 10], np.int64).tobytes()])
                    req.inputs.add(name="z", datatype="FP32", shape=[1, 8])
                    req.inputs.add(name="label", datatype="INT64", shape=[1])
                    versions.add(int(infer.ModelInfer(req, timeout=60).model_version))
            except grpc.RpcError as e:
                errors.append(f"{e.code().name}: {e.details()}")

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(hammer, i) for i in range(4)]
        for version in (2, 3):
            time.sleep(0.3)
            clone(tiny_repo / "exported" / "tiny-gan" / "1", fault_repo, "reload-gan", version)
            infer.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="reload-gan"))
        time.sleep(0.5)
        stop.set()
        for f in futures:
            f.result()
    assert not errors, errors[:3]
    assert 1 in versions and 3 in versions, versions
    assert gen.Sample(pb.SampleRequest(model="reload-gan", n=1)).version == 3


def test_message_and_image_count_limits(stubs):
    gen, _ = stubs
    with pytest.raises(grpc.RpcError) as info:
        gen.Translate(pb.TranslateRequest(model="tiny-gan", images=[b"\0" * (2 * 1024 * 1024)]))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as info:
        gen.Sample(pb.SampleRequest(model="tiny-gan", n=17))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "between 1 and 16" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        gen.Encode(pb.EncodeRequest(model="tiny-gan", images=[b"x"] * 17))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 16 images" in info.value.details()
    assert len(gen.Sample(pb.SampleRequest(model="tiny-gan", n=16)).png) == 16


def test_sigterm_finishes_in_flight_work_and_exits_0(tiny_repo, tmp_path):
    repo = tmp_path / "exported"
    shutil.copytree(tiny_repo / "exported" / "tiny-diffusion", repo / "tiny-diffusion")
    srv = start_server(repo, "--grace", "60")
    try:
        channel = grpc.insecure_channel(srv.target)
        stream = pb_grpc.GeneratorStub(channel).Generate(
            pb.GenerateRequest(model="tiny-diffusion", n=2, seed=0, steps=1000), timeout=120)
        events = [next(stream)]
        srv.proc.send_signal(signal.SIGTERM)
        refused = None
        for _ in range(50):  # new calls are refused while the stream still runs
            probe = grpc.insecure_channel(srv.target)
            try:
                pb_grpc.GeneratorStub(probe).ListModels(pb.ListModelsRequest(), timeout=2)
            except grpc.RpcError as e:
                refused = e.code()
                break
            finally:
                probe.close()
            time.sleep(0.05)
        events += list(stream)
        channel.close()
        # grpc.aio cancels calls that arrive after stop(); one that finds the port closed is UNAVAILABLE
        assert refused in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert events[-1].HasField("result") and len(events[-1].result.png) == 2
        assert [e.progress.step for e in events[:-1]] == list(range(1, 1001)), "every step ran to the end"
        assert srv.proc.wait(timeout=60) == 0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
