"""gen eval: the metrics' maths, the cached classifier, and scoring real exported models end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from trainer.data import STRIPE_WHITE, load_dataset, render_shapes, render_stripes
from trainer.evaluate import (
    EvalConfig,
    EvalError,
    classifier_for,
    colour_errors,
    evaluate,
    frechet_distance,
    label_regions,
    quantise,
    region_colour_errors,
    shape_ious,
)


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
        "tiny-pix2pix": {"L1", "PSNR", "colour error vs target"},
        "tiny-cyclegan": {"A->B looks like B", "B->A looks like A", "cycle L1 A->B->A", "cycle L1 B->A->B",
                          "colour error A->B", "shape IoU A->B", "colour error B->A", "shape IoU B->A"},
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


def _float(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, np.float32) / 127.5 - 1.0


def _striped(scenes) -> np.ndarray:
    """What a perfect plain -> striped translator draws: the same scene, stripes on the shape."""
    size = scenes.images.shape[-1]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    period = max(4.0, size / 6)
    out = scenes.images.copy()
    for i, mask in enumerate(scenes.masks):
        stripe = mask & (((xx + yy + i) % period) < period / 2)
        out[i][:, stripe] = STRIPE_WHITE
    return out


def _plain(scenes) -> np.ndarray:
    """What a perfect striped -> plain translator draws: the shape filled with its colour."""
    out = scenes.images.copy()
    for i, mask in enumerate(scenes.masks):
        out[i][:, mask] = scenes.colours[i][:, None]
    return out


def test_translation_metrics_of_a_perfect_translator():
    plain, striped = render_stripes(60, 32, seed=5, striped=False), render_stripes(60, 32, seed=6, striped=True)
    for source, output in ((plain, _striped(plain)), (striped, _plain(striped))):
        assert np.median(colour_errors(_float(output), source.masks, source.colours)) < 1e-3
        assert shape_ious(_float(output), source.masks).mean() >= 0.95
    # a shape that lost half its pixels to the background, or whose colour moved by (30, 40, 0)
    half = plain.images.copy()
    half[0][:, plain.masks[0] & (np.arange(32) < 16)[None, :]] = half[0][:, 0, :1]
    shifted = plain.images.astype(np.float32)
    shifted[1][:, plain.masks[1]] += np.array([[30.0], [40.0], [0.0]])
    assert shape_ious(_float(half[:1]), plain.masks[:1])[0] == pytest.approx(
        (plain.masks[0] & (np.arange(32) >= 16)[None, :]).sum() / plain.masks[0].sum())
    assert colour_errors(_float(shifted[1:2]), plain.masks[1:2], plain.colours[1:2])[0] == pytest.approx(50.0)


def test_translation_metrics_of_the_identity():
    """Returning the input keeps shape and colour (stripes are left out of the colour): what the domain
    classifier's bar is there to catch, not these."""
    for scenes in (render_stripes(60, 32, seed=7, striped=False), render_stripes(60, 32, seed=8, striped=True)):
        errors = colour_errors(_float(scenes.images), scenes.masks, scenes.colours)
        assert errors.max() < 1e-3  # float32 round trip
        ious = shape_ious(_float(scenes.images), scenes.masks)
        assert np.median(ious) == 1.0 and ious.mean() >= 0.95


def test_translation_metrics_of_a_constant_image():
    scenes = render_stripes(20, 32, seed=9, striped=False)
    grey = np.full_like(scenes.images, 128)
    errors = colour_errors(_float(grey), scenes.masks, scenes.colours)
    expected = np.linalg.norm(scenes.colours.astype(np.float64) - 128.0, axis=1)
    np.testing.assert_allclose(errors, expected, atol=1e-3)
    assert shape_ious(_float(grey), scenes.masks).max() == 0.0  # no foreground at all


def test_pix2pix_colour_error_against_the_target():
    labels, targets = render_shapes(30, 32, seed=3)
    regions = label_regions(labels)
    assert ((regions >= 0) == labels.any(1)).all()  # every coloured pixel of the label map is in a region
    assert region_colour_errors(_float(targets), _float(targets), regions).max() == 0.0
    flat = np.full_like(targets, 100)
    errors = region_colour_errors(_float(flat), _float(targets), regions)
    rgb = targets.transpose(0, 2, 3, 1).astype(np.float64)
    i = int(np.argmax(errors))
    expected = np.mean([np.linalg.norm(rgb[i][regions[i] == k].mean(0) - 100.0)
                        for k in np.unique(regions[i]) if k >= 0])
    assert errors[i] == pytest.approx(expected) and errors.min() > 0


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


def test_gen_eval_seeds_scores_each_seed_and_summarises_them(tiny_repo, cache, tmp_path):
    out = tmp_path / "seeds.json"
    env = {"GEN_CACHE": str(cache), "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "gen", "eval", "tiny-gan", "--repo", str(tiny_repo / "exported"), "-n", "20"]
    run = subprocess.run(cmd + ["--seeds", "0-1,3", "--json", str(out)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    reports = json.loads(out.read_text())
    assert [r["details"]["seed"] for r in reports] == [0, 1, 3]
    alone = evaluate(tiny_repo / "exported", "tiny-gan", config=EvalConfig(n=20, seed=3, cache=cache),
                     log=lambda msg: None)
    assert [m["value"] for m in reports[2]["metrics"]] == pytest.approx([m.value for m in alone.metrics], rel=1e-6), \
        "the seed's own scores"
    ratios = [next(m["value"] for m in r["metrics"] if m["name"] == "frechet / baseline") for r in reports]
    assert len(set(ratios)) == 3, "each seed draws its own samples"
    summary = run.stdout[run.stdout.index("tiny-gan v1: 3 seeds (0, 1, 3)"):]
    assert f"mean {np.mean(ratios):.4g}" in next(x for x in summary.splitlines() if "frechet / baseline" in x)

    for extra, match in ((["--seeds", "2-1"], "--seeds 2-1"),
                         (["--seeds", "0-1", "--seed", "4"], "--seed and --seeds")):
        bad = subprocess.run(cmd + extra, capture_output=True, text=True, env=env, timeout=120)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and match in bad.stderr


def test_gen_eval_json_replaces_its_own_rows_and_keeps_the_others(tiny_repo, cache, tmp_path):
    out = tmp_path / "quality.json"
    env = {"GEN_CACHE": str(cache), "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}

    def gen_eval(*args, n=20):
        return subprocess.run([sys.executable, "-m", "gen", "eval", *args, "--repo", str(tiny_repo / "exported"),
                               "-n", str(n), "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)

    assert gen_eval("tiny-gan", "tiny-vae").returncode == 0
    first = json.loads(out.read_text())
    assert gen_eval("tiny-gan", n=30).returncode == 0
    rows = json.loads(out.read_text())
    assert [(r["model"], r["details"]["seed"]) for r in rows] == [("tiny-gan", 0), ("tiny-vae", 0)]
    assert rows[1] == first[1] and rows[0]["metrics"] != first[0]["metrics"], "replaced where it was; the VAE kept"
    assert gen_eval("tiny-gan", "--seeds", "0-1").returncode == 0
    rows = json.loads(out.read_text())
    assert [(r["model"], r["details"]["seed"]) for r in rows] == [("tiny-gan", 0), ("tiny-vae", 0), ("tiny-gan", 1)]
    values = lambda row: [m["value"] for m in row["metrics"]]  # noqa: E731
    assert values(rows[0]) == pytest.approx(values(first[0]), rel=1e-6), "seed 0 at n = 20 again, in its place"

    out.write_text("not json")
    bad = gen_eval("tiny-gan")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--json" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and out.read_text() == "not json"
