"""gen eval: the metrics' maths, the cached classifier, and scoring real exported models end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from trainer.data import load_dataset
from trainer.evaluate import EvalConfig, EvalError, classifier_for, evaluate, frechet_distance, quantise


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    n, d = 200_000, 4
    s1, s2 = np.array([1.0, 2.0, 0.5, 1.5]), np.array([0.5, 1.0, 2.0, 1.5])
    mu = np.array([1.0, 0.0, -1.0, 0.5])
    a = rng.standard_normal((n, d)) * np.sqrt(s1)
    b = mu + rng.standard_normal((n, d)) * np.sqrt(s2)
    expected = (mu ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_quantise_is_the_manifest_mapping_to_8_bits():
    x = np.array([-1.5, -1.0, 0.0, 0.004, 1.0, 2.0], np.float32)
    expected = np.array([0, 0, 128, 128, 255, 255]) / 127.5 - 1.0  # round((x + 1) * 127.5), clipped
    np.testing.assert_allclose(quantise(x), expected, atol=1e-6)


def test_the_classifier_learns_the_digits_and_is_cached(tmp_path):
    data = load_dataset("digits", "images", 32, 1)
    (x, y), (xt, yt) = data.train, data.test
    logs = []
    net = classifier_for(x, y, 10, tmp_path, log=logs.append)
    _, pred = net.predict(xt.numpy().astype(np.float32) / 127.5 - 1)
    assert (pred == yt.numpy()).mean() >= 0.9
    assert len(logs) == 1 and len(list(tmp_path.glob("classifier-*.pt"))) == 1
    again = classifier_for(x, y, 10, tmp_path, log=logs.append)
    assert len(logs) == 1, "the second call must load the cached classifier, not train"
    for p, q in zip(net.state_dict().values(), again.state_dict().values()):
        assert torch.equal(p, q)
    classifier_for(x[:100], y[:100], 10, tmp_path, log=logs.append)
    assert len(logs) == 2, "other training data is another classifier"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("eval-cache")


def test_every_family_is_scored_through_the_runtime(tiny_repo, cache):
    """Tiny two-step models are far below the quality bars: the bars must say so."""
    config = EvalConfig(n=40, steps=3, request_size=16, cache=cache)
    expected = {
        "tiny-vae": {"frechet distance", "frechet real-vs-real", "reconstruction accuracy", "class accuracy"},
        "tiny-gan": {"frechet distance", "frechet real-vs-real", "class accuracy"},
        "tiny-diffusion": {"frechet distance", "class accuracy"},
        "tiny-pix2pix": {"L1", "PSNR"},
        "tiny-cyclegan": {"A->B looks like B", "B->A looks like A", "cycle L1 A->B->A", "cycle L1 B->A->B"},
    }
    for model, names in expected.items():
        report = evaluate(tiny_repo / "exported", model, config=config, log=lambda m: None)
        metrics = {m.name: m for m in report.metrics}
        assert names <= set(metrics), (model, sorted(metrics))
        assert all(np.isfinite(m.value) for m in report.metrics)
        assert not report.passed, f"{model} after 2 training steps cannot pass its quality bar"
        if "frechet distance" in metrics:
            # untrained samples are much further from the held-out digits than training digits are
            assert metrics["frechet distance"].value > 2 * metrics["frechet real-vs-real"].value
            assert metrics["classifier held-out accuracy"].value >= 0.9


def test_pix2pix_scores_match_a_direct_onnxruntime_computation(tiny_repo, cache):
    import onnxruntime as ort

    report = evaluate(tiny_repo / "exported", "tiny-pix2pix", config=EvalConfig(n=10, cache=cache),
                      log=lambda m: None)
    data = load_dataset("shapes", "paired", 32, 3)
    src, tgt = (t.numpy().astype(np.float32) / 127.5 - 1 for t in data.test)
    session = ort.InferenceSession(str(tiny_repo / "exported/tiny-pix2pix/1/generator.onnx"))
    out = quantise(session.run(None, {"source": src})[0])
    err = (out - tgt) / 2
    psnr = (10 * np.log10(1 / (err ** 2).reshape(len(err), -1).mean(1))).mean()
    metrics = {m.name: m.value for m in report.metrics}
    assert metrics["PSNR"] == pytest.approx(psnr, abs=1e-3)
    assert metrics["L1"] == pytest.approx(np.abs(err).mean(), abs=1e-5)
    assert report.details["pairs"] == len(src) == 200


def test_unknown_model_is_an_eval_error(tiny_repo, cache):
    with pytest.raises(EvalError, match="nope"):
        evaluate(tiny_repo / "exported", "nope", config=EvalConfig(cache=cache))


def test_gen_eval_cli_writes_json_and_check_fails_below_the_bar(tiny_repo, cache, tmp_path):
    out = tmp_path / "quality.json"
    env = {"GEN_CACHE": str(cache), "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "gen", "eval", "tiny-gan", "tiny-pix2pix", "--repo",
                          str(tiny_repo / "exported"), "-n", "20", "--json", str(out), "--check"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 1, run.stderr
    assert run.stderr.strip().splitlines()[-1] == "gen: error: below the quality bar: tiny-gan, tiny-pix2pix"
    assert "Traceback" not in run.stderr
    reports = json.loads(out.read_text())
    assert [r["model"] for r in reports] == ["tiny-gan", "tiny-pix2pix"]
    assert "PSNR" in run.stdout and "class accuracy" in run.stdout

    bad = subprocess.run([sys.executable, "-m", "gen", "eval", "nope", "--repo", str(tiny_repo / "exported")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith("gen: error:") and "nope" in bad.stderr and "Traceback" not in bad.stderr
