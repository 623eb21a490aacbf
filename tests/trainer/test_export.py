"""`gen export` on tiny real runs of every family: checker, parity, manifest, atomic publish,
torch-free loading, and `gen models --verify`."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve.families import FAMILIES as SPECS
from serve.manifest import parse_manifest, read_manifest, scan_repository
from tests.conftest import FAMILIES, TINY_MODELS, tiny_graph_count
from trainer.denoising import SERVED_LOOP_TOLERANCE
from trainer.export import FP32_TOLERANCE, ExportError, export_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def repo(tiny_repo, tmp_path_factory):
    """A private copy of the session's tiny repository: these tests add and break versions."""
    base = tmp_path_factory.mktemp("export")
    shutil.copytree(tiny_repo / "exported", base / "exported")
    (base / "runs").symlink_to(tiny_repo / "runs")
    return base


@pytest.mark.parametrize("family", FAMILIES)
def test_manifest_and_parity(repo, family):
    vdir = repo / "exported" / f"tiny-{family}" / "1"
    m = read_manifest(vdir)
    assert m.family == family and set(m.graphs) == SPECS[family].graphs
    parse_manifest(json.loads((vdir / "manifest.json").read_text()))
    for g in m.graphs.values():
        assert (vdir / g.file).is_file()
        assert set(g.parity) >= {"batch_1", "batch_7"}
        assert g.parity["batch_1"] <= FP32_TOLERANCE and g.parity["batch_7"] <= FP32_TOLERANCE
        assert all(t.shape[0] == -1 for t in g.inputs + g.outputs)
    prov = m.provenance
    assert prov["steps"] == 2 and prov["seed"] == 0 and prov["dataset"] and prov["exported_at"]
    assert m.image["channels"] in (1, 3) and m.image["height"] == 32
    if family == "diffusion":
        assert m.parity["ddim_50_steps"]["max_abs"] <= SERVED_LOOP_TOLERANCE
        assert m.diffusion["null_label"] == m.num_classes == 10
    assert not [p for p in vdir.iterdir() if p.name.startswith(".")], "no temporary files left"


def test_graphs_run_without_torch(repo):
    """Every exported graph loads in onnxruntime and runs at batch 1 and 5 where `import torch` fails."""
    script = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name == "trainer" or name.startswith("trainer."):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
import numpy as np, onnxruntime as ort
from serve.manifest import scan_repository
rng = np.random.default_rng(0)
runs = 0
for entry in scan_repository(sys.argv[1], verify=True):
    assert entry.healthy, entry.problems
    for g in entry.manifest.graphs.values():
        sess = ort.InferenceSession(str(entry.path / g.file), providers=["CPUExecutionProvider"])
        for batch in (1, 5):
            feeds = {}
            for t in g.inputs:
                shape = (batch, *t.shape[1:])
                feeds[t.name] = (rng.integers(0, 2, shape) if t.dtype == "int64"
                                 else rng.standard_normal(shape).astype(np.float32))
            outs = sess.run(None, feeds)
            for o, spec in zip(outs, g.outputs):
                assert o.shape == (batch, *spec.shape[1:]), (g.name, o.shape, spec.shape)
                assert np.isfinite(o).all()
            runs += 1
assert "torch" not in sys.modules
print("runs", runs)
"""
    proc = subprocess.run([sys.executable, "-c", script, str(repo / "exported")], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["runs", str(2 * tiny_graph_count())]


def test_versions_increment_and_refuse_overwrite(repo):
    from trainer.models import ConfigError

    out = export_model(repo / "runs" / "gan", "tiny-gan", repo=repo / "exported")
    assert out.name == "2"
    with pytest.raises(ConfigError, match="--version 2"):
        export_model(repo / "runs" / "gan", "tiny-gan", repo=repo / "exported", version=2)
    shutil.rmtree(out)


def test_failed_verification_writes_nothing(repo, monkeypatch):
    import trainer.export as export

    monkeypatch.setattr(export, "FP32_TOLERANCE", 0.0)  # no real graph is bit-exact, so parity must fail
    target = repo / "fail-repo"
    with pytest.raises(ExportError, match="nothing was written"):
        export_model(repo / "runs" / "vae", "vae-fail", repo=target)
    assert not (target / "vae-fail").exists()  # not even an empty model folder


def test_interrupted_export_leaves_no_version(repo):
    target = repo / "killed-repo"
    proc = subprocess.Popen([sys.executable, "-m", "gen", "export", str(repo / "runs" / "cyclegan"),
                             "--name", "killed", "--repo", str(target)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the first graph file is on disk, then kill -9
        if list(target.glob("killed/.tmp-*/*.onnx")):
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(target.glob("killed/.tmp-*/*.onnx")), "the export was killed mid-way"
    assert not [p for p in (target / "killed").iterdir() if not p.name.startswith(".")]
    assert scan_repository(target) == []
    assert export_model(repo / "runs" / "cyclegan", "killed", repo=target).name == "1"


def test_models_verify_reports_a_one_byte_change(repo, tmp_path):
    copy = tmp_path / "exported"
    shutil.copytree(repo / "exported", copy)
    victim = copy / "tiny-pix2pix" / "1" / "generator.onnx"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))

    proc = subprocess.run([sys.executable, "-m", "gen", "models", "--verify", "--repo", str(copy)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    broken = [line for line in lines if "BROKEN" in line]
    assert len(broken) == 1 and "tiny-pix2pix" in broken[0]
    assert "generator.onnx: sha256 mismatch" in broken[0]
    for family in FAMILIES:
        if family != "pix2pix":
            assert any(line.startswith(f"tiny-{family} ") and "BROKEN" not in line for line in lines)
    assert f"{len(TINY_MODELS) - 1} healthy, 1 broken" in proc.stdout


def test_fp16_variant(repo, tmp_path):
    from trainer.export import FP16_TOLERANCE

    vdir = export_model(repo / "runs" / "vae", "vae16", repo=tmp_path / "exported", fp16=True)
    m = read_manifest(vdir)
    for g in m.graphs.values():
        assert g.fp16_file == f"{g.name}.fp16.onnx" and (vdir / g.fp16_file).is_file()
        fp16 = m.raw["graphs"][g.name]["fp16"]["parity"]
        assert fp16["batch_1"] <= FP16_TOLERANCE and fp16["batch_7"] <= FP16_TOLERANCE
        assert (vdir / g.fp16_file).stat().st_size < (vdir / g.file).stat().st_size
    assert [e.healthy for e in scan_repository(tmp_path / "exported", verify=True)] == [True]
