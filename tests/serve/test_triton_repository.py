"""`gen models --triton OUT` over the shipped repository: every config.pbtxt parses with Triton's
model_config.proto (tritonclient's copy, read here; the writer uses ours in its own process, since protobuf
cannot hold both) and matches the graph it sits beside, as onnxruntime reads that graph.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from serve.launch import ROOT
from serve.manifest import file_sha256, scan_repository

ORT_TYPES = {"tensor(float)": mc.TYPE_FP32, "tensor(float16)": mc.TYPE_FP16, "tensor(int64)": mc.TYPE_INT64}
REPO = ROOT / "exported"


def gen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gen", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "models"
    proc = gen("models", "--repo", str(REPO), "--triton", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def latest_versions():
    latest = {}
    for entry in scan_repository(REPO):
        if entry.healthy:
            latest[entry.name] = entry
    return latest


def test_one_triton_model_per_graph_of_every_model(written):
    out, stdout = written
    expected = {f"{name}.{graph}": entry for name, entry in latest_versions().items()
                for graph in entry.manifest.served_graphs}  # not the legacy step graph
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    assert f"wrote {len(expected)} Triton models" in stdout
    for folder_name, entry in expected.items():
        folder = out / folder_name
        graph = entry.manifest.graphs[folder_name.split(".", 1)[1]]
        assert sorted(p.name for p in folder.iterdir()) == sorted(["config.pbtxt", str(entry.version)])
        assert file_sha256(folder / str(entry.version) / "model.onnx") == graph.sha256, "the graph, unchanged"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no temporary folder left behind"


def _expected_dims(shape) -> tuple[list[int], bool]:
    """Triton's dims for an onnxruntime shape (batch axis first): without the batch axis; a batch-only
    tensor is [1] with an empty reshape."""
    rest = list(shape[1:])
    return (rest, False) if rest else ([1], True)


def _check_tensors(declared, actual, where: str) -> None:
    assert [t.name for t in declared] == [a.name for a in actual], where
    for t, a in zip(declared, actual):
        assert t.data_type == ORT_TYPES[a.type], f"{where} {t.name}"
        assert not isinstance(a.shape[0], int), f"{where} {t.name}: the graph's batch axis is dynamic"
        dims, reshaped = _expected_dims(a.shape)
        assert list(t.dims) == dims, f"{where} {t.name}"
        assert t.HasField("reshape") == reshaped and list(t.reshape.shape) == [], f"{where} {t.name}"


def test_every_config_parses_with_tritons_schema_and_matches_its_graph(written):
    out, _ = written
    latest = latest_versions()
    configs = sorted(out.glob("*/config.pbtxt"))
    assert configs
    for path in configs:
        config = text_format.Parse(path.read_text(), mc.ModelConfig())  # unknown fields would raise
        model, _ = path.parent.name.split(".", 1)
        manifest = latest[model].manifest
        assert config.name == path.parent.name and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == manifest.serving["max_batch_size"]
        assert config.HasField("dynamic_batching")
        assert config.dynamic_batching.max_queue_delay_microseconds == \
            round(manifest.serving.get("max_queue_delay_ms", 0) * 1000)
        session = ort.InferenceSession(str(path.parent / str(latest[model].version) / "model.onnx"),
                                       providers=["CPUExecutionProvider"])
        _check_tensors(config.input, session.get_inputs(), f"{path}: input")
        _check_tensors(config.output, session.get_outputs(), f"{path}: output")


def test_refuses_a_folder_that_is_not_empty(written, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = gen("models", "--repo", str(REPO), "--triton", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("gen: error: --triton ") and "not an empty folder" in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_writes_only_healthy_versions(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "mnist-cgan", repo / "mnist-cgan")
    broken = repo / "mnist-cgan" / "2"
    shutil.copytree(repo / "mnist-cgan" / "1", broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["version"] = 2
    (broken / "manifest.json").write_text(json.dumps(manifest))
    (broken / "generator.onnx").write_bytes(b"not the graph the manifest hashed")
    proc = gen("models", "--repo", str(repo), "--triton", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in (tmp_path / "out" / "mnist-cgan.generator").iterdir() if p.is_dir()] == ["1"]
