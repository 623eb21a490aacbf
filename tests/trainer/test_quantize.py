"""gen export --quantize int8 (trainer/quantize.py): calibrated, timed and scored on the draft version, kept or not
by its bars, and served by `gen serve --precision int8`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from serve.client import GenClient
from serve.launch import start_server, stop_server
from serve.manifest import file_sha256
from trainer.quantize import quality_misses


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "GEN_CACHE": str(tmp_path_factory.mktemp("eval-cache")), "OMP_NUM_THREADS": "2"}


def export(run, repo, env, *args):
    return subprocess.run([sys.executable, "-m", "gen", "export", str(run), "--name", "s8", "--repo", str(repo),
                           "--quantize", "int8", "--int8-eval-n", "20", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def denoise(server, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The denoiser graph over OIP REST: float outputs, so that a precision change shows."""
    body = {"inputs": [{"name": k, "shape": list(v.shape), "datatype": "FP32" if v.dtype == np.float32 else "INT64",
                        "data": v.ravel().tolist()} for k, v in feeds.items()]}
    req = urllib.request.Request(f"http://{server.http_target}/v2/models/s8.denoiser/infer",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        out = json.loads(resp.read())["outputs"][0]
    return np.array(out["data"], np.float32).reshape(out["shape"])


def test_an_int8_variant_is_calibrated_scored_written_and_served(tiny_repo, tmp_path, env):
    repo = tmp_path / "repo"
    done = export(tiny_repo / "runs" / "diffusion-student", repo, env, "--int8-min-speedup", "0")
    assert done.returncode == 0, done.stderr
    assert "int8 variant written" in done.stdout
    version = repo / "s8" / "1"
    entry = json.loads((version / "manifest.json").read_text())["graphs"]["denoiser"]["int8"]
    assert entry["sha256"] == file_sha256(version / entry["file"])
    check = entry["check"]
    assert check["batch"] == 64 and check["speedup"] > 0
    # gen eval of both precisions at each of the student's step counts
    assert [row["sampling"]["steps"] for row in check["quality"]] == [1, 2, 4]
    assert quality_misses(check["quality"]) == []
    ops = [n.op_type for n in onnx.load(str(version / entry["file"])).graph.node]
    assert ops.count("DequantizeLinear") > ops.count("Conv") > 0  # each Conv's input and weight come dequantised

    rng = np.random.default_rng(0)
    feeds = {"x_t": rng.standard_normal((4, 1, 32, 32)).astype(np.float32), "t": np.array([999, 749, 499, 249]),
             "label": np.array([0, 1, 2, 3]), "guidance": np.full(4, 1.5, np.float32)}
    outputs = {}
    for precision in ("fp32", "int8"):
        srv = start_server(repo, "--precision", precision)
        try:
            outputs[precision] = denoise(srv, feeds)
            with GenClient(srv.target, timeout=120) as client:  # the denoising loop runs the variant too
                final = list(client.generate("s8", n=2, seed=3, steps=1))[-1]
            assert final.pixels.shape[0] == 2
        finally:
            stop_server(srv)
    # each server's output is its file's, run here by onnxruntime (the tiny student's zero-initialised output layer
    # keeps its outputs near 0, so the comparison is with the files, not a tolerance)
    files = {"fp32": version / "denoiser.onnx", "int8": version / entry["file"]}
    local = {p: ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
             for p, f in files.items()}
    assert np.abs(local["int8"] - local["fp32"]).max() > 1e-3 * np.abs(local["fp32"]).max()
    for precision in files:
        np.testing.assert_allclose(outputs[precision], local[precision], rtol=1e-4, atol=1e-7)


def test_a_variant_that_misses_a_bar_is_not_written(tiny_repo, tmp_path, env):
    repo = tmp_path / "repo"
    done = export(tiny_repo / "runs" / "diffusion-student", repo, env, "--int8-min-speedup", "100")
    assert done.returncode == 0, done.stderr
    assert "int8 variant not written: denoiser x" in done.stdout and "(needs x100)" in done.stdout
    version = repo / "s8" / "1"
    assert "int8" not in json.loads((version / "manifest.json").read_text())["graphs"]["denoiser"]
    assert sorted(p.name for p in version.iterdir()) == ["denoiser.onnx", "manifest.json"]
    # gen eval --precision int8 of a model without the variant would score fp32 under int8's name: refused
    bad = subprocess.run([sys.executable, "-m", "gen", "eval", "s8", "--repo", str(repo), "--precision", "int8"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--precision int8: s8 v1 has no int8 variant" in bad.stderr


def test_a_family_without_an_int8_path_is_one_line(tiny_repo, tmp_path, env):
    done = export(tiny_repo / "runs" / "gan", tmp_path / "repo", env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["gen: error: --quantize int8: gan models have no int8 variant yet "
                                                "(diffusion models do)"]
    assert not (tmp_path / "repo").exists()


def test_quality_bars():
    row = lambda acc8, fd8: {"sampling": {"sampler": "ddim", "steps": 4},  # noqa: E731
                             "fp32": {"class_accuracy": 0.98, "frechet": 1.0},
                             "int8": {"class_accuracy": acc8, "frechet": fd8}}
    assert quality_misses([row(0.975, 1.14)]) == []
    assert quality_misses([row(0.965, 1.0)]) == ["class accuracy 96.5% vs fp32 98.0% at ddim 4 steps"]
    assert quality_misses([row(0.98, 1.2)]) == ["Frechet distance 1.2 vs fp32 1 at ddim 4 steps"]
