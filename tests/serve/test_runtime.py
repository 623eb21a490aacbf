"""The in-process serving API on the tiny models: every task, validation, determinism, images, no torch."""
from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from serve import images as im
from serve.diffusion import row_rng
from serve.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from serve.manifest import file_sha256
from serve.runtime import EncodeResult, GraphRunner, Runtime, SampleResult
from serve.samplers import SAMPLERS
from tests.conftest import TINY_MODELS

ROOT = Path(__file__).resolve().parents[2]
RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def rt(tiny_repo):
    with Runtime(tiny_repo / "exported", device="cpu", max_queue_delay_ms=20) as runtime:
        yield runtime


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """Max abs difference relative to b's scale: the tiny models (2 training steps) have tiny outputs."""
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))


def rgb(n: int) -> np.ndarray:
    return RNG.uniform(-1, 1, (n, 3, 32, 32)).astype(np.float32)


def grey(n: int) -> np.ndarray:
    return RNG.uniform(-1, 1, (n, 1, 32, 32)).astype(np.float32)


# --- tasks -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["tiny-gan", "tiny-vae"])
def test_sample_is_seeded_per_image(rt, model):
    eight = rt.sync.sample(model, 8, seed=5)
    four = rt.sync.sample(model, 4, seed=5)
    assert isinstance(eight, SampleResult) and eight.images.shape == (8, 1, 32, 32)
    assert eight.images.dtype == np.float32 and np.isfinite(eight.images).all()
    assert rel(eight.images[:4], four.images) <= 1e-4, "sample i must not depend on n"
    assert eight.labels.tolist() == [i % 10 for i in range(8)] and eight.seed == 5
    assert (eight.model, eight.version) == (model, 1)
    assert rt.sync.sample(model, 3, seed=5, labels=[7]).labels.tolist() == [7, 7, 7]
    assert rt.sync.sample(model, 2, seed=5, labels=[4, 2]).labels.tolist() == [4, 2]
    other = rt.sync.sample(model, 4, seed=6)
    assert rel(other.images, four.images) > 1e-2


def test_sample_latents_are_the_documented_draws(rt, tiny_repo):
    """Image i is the generator applied to default_rng(SeedSequence([seed, i])).standard_normal(z)."""
    result = rt.sync.sample("tiny-gan", 3, seed=123)
    z = np.stack([row_rng(123, i).standard_normal((8,), dtype=np.float32) for i in range(3)])
    session = ort.InferenceSession(str(tiny_repo / "exported" / "tiny-gan" / "1" / "generator.onnx"))
    (expected,) = session.run(["image"], {"z": z, "label": np.arange(3, dtype=np.int64)})
    assert rel(result.images, expected) <= 1e-4


def test_a_random_seed_is_returned_and_reproduces(rt):
    a, b = rt.sync.sample("tiny-gan", 2), rt.sync.sample("tiny-gan", 2)
    assert a.seed != b.seed and rel(a.images, b.images) > 1e-2
    again = rt.sync.sample("tiny-gan", 2, seed=a.seed)
    assert rel(again.images, a.images) <= 1e-6


def test_a_request_in_a_busy_batch_equals_it_alone(tiny_repo):
    with Runtime(tiny_repo / "exported", device="cpu", max_queue_delay_ms=50) as rt:
        alone = rt.sync.sample("tiny-gan", 3, seed=11, labels=[1, 2, 3])

        async def busy():
            others = [rt.sample("tiny-gan", 1 + i % 4, seed=100 + i) for i in range(12)]
            results = await asyncio.gather(rt.sample("tiny-gan", 3, seed=11, labels=[1, 2, 3]), *others)
            return results[0]

        # the batcher merges what is queued when a run ends, and a run of this graph takes microseconds, so
        # whether the 13 requests overlap is timing (the worker may take each as it comes): up to 5 rounds
        batcher = rt.batcher(rt.repository.resolve("tiny-gan"), "generator")
        for _ in range(5):
            before = batcher.statistics().execution_count
            shared = asyncio.run(busy())
            assert rel(shared.images, alone.images) <= 1e-4
            stats = batcher.statistics()
            if stats.execution_count - before < 13:
                break
        assert stats.execution_count - before < 13, "13 concurrent requests must share runs"
        assert max(stats.batch_sizes) > 4


def test_thread_and_spin_options_reach_the_sessions_and_not_the_results(rt, tiny_repo):
    # gen serve --threads 1 --no-spin: for hosts shared with other work (BENCHMARKS.md, session options)
    with Runtime(tiny_repo / "exported", device="cpu", threads=1, spin=False) as lean:
        result = lean.sync.sample("tiny-gan", 3, seed=5, labels=[0, 1, 2])
        options = lean.repository.resolve("tiny-gan").runners["generator"].session.get_session_options()
        assert options.intra_op_num_threads == 1
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert rel(result.images, rt.sync.sample("tiny-gan", 3, seed=5, labels=[0, 1, 2]).images) <= 1e-5
    default = rt.repository.resolve("tiny-gan").runners["generator"].session.get_session_options()
    assert default.intra_op_num_threads == rt.threads >= 1
    with pytest.raises(ValueError, match="threads"):
        Runtime(tiny_repo / "exported", device="cpu", threads=0)


def test_translate(rt, tiny_repo):
    x = rgb(3)
    out = rt.sync.translate("tiny-pix2pix", x)
    assert out.images.shape == (3, 3, 32, 32) and out.labels.size == 0 and out.seed is None
    ab = rt.sync.translate("tiny-cyclegan", x, direction="AtoB").images
    ba = rt.sync.translate("tiny-cyclegan", x, direction="BtoA").images
    assert rel(ab, ba) > 1e-2
    folder = tiny_repo / "exported" / "tiny-cyclegan" / "1"
    for graph, got in (("generator_ab", ab), ("generator_ba", ba)):
        (expected,) = ort.InferenceSession(str(folder / f"{graph}.onnx")).run(["image"], {"source": x})
        assert rel(got, expected) <= 1e-4
    with pytest.raises(InvalidArgument, match="direction: .*pix2pix"):
        rt.sync.translate("tiny-pix2pix", x, direction="BtoA")
    with pytest.raises(InvalidArgument, match="direction"):
        rt.sync.translate("tiny-cyclegan", x, direction="sideways")


def test_encode_and_decode(rt):
    x = grey(3)
    result = rt.sync.encode("tiny-vae", x, labels=[1, 2, 3])
    assert isinstance(result, EncodeResult)
    mean, logvar = result
    assert mean.shape == logvar.shape == (3, 4) and result.labels.tolist() == [1, 2, 3]
    images = rt.sync.decode("tiny-vae", mean, labels=[1, 2, 3]).images
    assert images.shape == (3, 1, 32, 32)
    # decode of the sampled latents is sample
    z = np.stack([row_rng(9, i).standard_normal((4,), dtype=np.float32) for i in range(2)])
    assert rel(rt.sync.decode("tiny-vae", z).images, rt.sync.sample("tiny-vae", 2, seed=9).images) <= 1e-4
    assert rt.sync.encode("tiny-vae", x).labels.tolist() == [0, 1, 2], "labels default to i % K"
    with pytest.raises(InvalidArgument, match=r"z: expected shape \[-1, 4\]"):
        rt.sync.decode("tiny-vae", np.zeros((2, 5), np.float32))


def test_infer_serves_each_graph_as_a_model(rt, tiny_repo):
    z = RNG.standard_normal((5, 8)).astype(np.float32)
    label = np.arange(5, dtype=np.int64)
    out = rt.sync.infer("tiny-gan.generator", {"z": z, "label": label})
    session = ort.InferenceSession(str(tiny_repo / "exported" / "tiny-gan" / "1" / "generator.onnx"))
    assert rel(out["image"], session.run(["image"], {"z": z, "label": label})[0]) <= 1e-4
    enc = rt.sync.infer("tiny-vae.encoder", {"image": grey(2), "label": np.array([0, 1])})
    assert set(enc) == {"mean", "logvar"}
    x = grey(2)
    out = rt.sync.infer("tiny-diffusion.denoiser", {"x_t": x, "t": np.array([999, 500]), "label": np.array([3, 10])})
    assert out["output"].shape == (2, 1, 32, 32)
    handle = rt.graph("tiny-cyclegan.generator_ba")
    assert handle.version == 1 and handle.versions == [1] and [t.name for t in handle.info.inputs] == ["source"]
    with pytest.raises(NotFound, match="tiny-gan.generator"):
        rt.sync.infer("tiny-gan.nope", {})
    with pytest.raises(NotFound, match="<model>.<graph>"):
        rt.sync.infer("tiny-gan", {})


def test_infer_validates_inputs(rt):
    z, label = np.zeros((2, 8), np.float32), np.array([0, 1])
    cases = [
        ({"z": z}, r"inputs: .*missing \['label'\]"),
        ({"z": z, "label": label, "extra": z}, r"unknown \['extra'\]"),
        ({"z": z.astype(np.int64), "label": label}, "z: expected float32"),
        ({"z": np.zeros((2, 9), np.float32), "label": label}, r"z: expected shape \[-1, 8\]"),
        ({"z": np.full((2, 8), np.nan, np.float32), "label": label}, r"z: NaN or Inf at index \[0, 0\]"),
        ({"z": z, "label": np.array([0, 10])}, "label: values must be between 0 and 9, got 10"),
        ({"z": z, "label": np.array([0])}, "same batch size"),
        ({"z": np.zeros((0, 8), np.float32), "label": np.zeros(0, np.int64)}, "z: between 1 and 256"),
    ]
    for inputs, match in cases:
        with pytest.raises(InvalidArgument, match=match):
            rt.sync.infer("tiny-gan.generator", inputs)
    out = rt.sync.infer("tiny-gan.generator", {"z": z.astype(np.float64), "label": label.astype(np.int32)})
    assert out["image"].shape == (2, 1, 32, 32), "same-kind dtypes are converted"


# --- validation ------------------------------------------------------------------------------------

INVALID = [
    ("sample", ("tiny-gan", 0), {}, "n: must be between 1 and 256, got 0"),
    ("sample", ("tiny-gan", 257), {}, "n: must be between 1 and 256, got 257"),
    ("sample", ("tiny-gan", 2.0), {}, "n: must be between"),
    ("sample", ("tiny-gan", 2), {"labels": [10]}, r"labels\[0\]: must be a class index between 0 and 9, got 10"),
    ("sample", ("tiny-gan", 2), {"labels": [-1, 0]}, r"labels\[0\]"),
    ("sample", ("tiny-gan", 3), {"labels": [1, 2]}, r"labels: give none, one, or one per image \(3\), got 2"),
    ("sample", ("tiny-gan", 2), {"labels": ["7"]}, r"labels\[0\]"),
    ("sample", ("tiny-gan", 2), {"seed": -1}, "seed: expected an integer"),
    ("sample", ("tiny-gan", 2), {"seed": 2**64}, "seed"),
    ("sample", ("tiny-gan", 2), {"version": 0}, "version: expected a positive integer"),
    ("sample", ("../tiny-gan", 2), {}, "model: '../tiny-gan' is not a model name"),
    ("translate", ("tiny-pix2pix", np.zeros((2, 1, 32, 32), np.float32)), {}, r"images: expected float NCHW"),
    ("translate", ("tiny-pix2pix", np.zeros((2, 3, 64, 64), np.float32)), {}, r"takes 32x32"),
    ("translate", ("tiny-pix2pix", np.zeros((3, 32, 32), np.float32)), {}, r"images: expected float NCHW"),
    ("translate", ("tiny-pix2pix", np.zeros((1, 3, 32, 32), np.uint8)), {}, r"images: expected floats"),
    ("translate", ("tiny-pix2pix", np.full((1, 3, 32, 32), np.inf, np.float32)), {}, r"images: NaN or Inf"),
    ("translate", ("tiny-pix2pix", np.zeros((300, 3, 32, 32), np.float32)), {}, r"images: between 1 and 256"),
    ("encode", ("tiny-vae", np.zeros((1, 3, 32, 32), np.float32)), {"labels": [0]}, r"images: expected"),
    ("generate", ("tiny-diffusion", 1), {"steps": 0}, "steps: must be between 1 and 1000, got 0"),
    ("generate", ("tiny-diffusion", 1), {"steps": 1001}, "steps: must be between 1 and 1000"),
    ("generate", ("tiny-diffusion", 1), {"guidance": float("nan")}, "guidance: must be a finite number"),
    ("generate", ("tiny-diffusion", 1), {"guidance": 51.0}, "guidance: must be a finite number between 0 and 50"),
    ("generate", ("tiny-diffusion", 1), {"guidance": -0.5}, "guidance"),
    ("generate", ("tiny-diffusion", 1), {"eta": 1.5}, "eta: must be a finite number between 0 and 1"),
    ("generate", ("tiny-diffusion", 1), {"sampler": "heun"},
     "sampler: 'heun' is not one of ab2, consistency, ddim, ddpm, dpm\\+\\+, euler, euler_a, unipc"),
    ("generate", ("tiny-diffusion", 1), {"preview_every": -1}, "preview_every"),
    ("generate", ("tiny-diffusion", 0), {}, "n: must be between 1 and 256"),
    ("generate", ("tiny-diffusion", 2), {"labels": [10]}, r"labels\[0\]"),
]


@pytest.mark.parametrize("method, args, kwargs, match", INVALID, ids=[m for _, _, _, m in INVALID])
def test_invalid_arguments_name_the_field(rt, method, args, kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        result = getattr(rt.sync, method)(*args, **kwargs)
        if method == "generate":
            next(result)


@pytest.mark.parametrize("method, args", [
    ("sample", ("tiny-pix2pix", 1)), ("sample", ("tiny-diffusion", 1)),
    ("translate", ("tiny-gan", np.zeros((1, 1, 32, 32), np.float32))),
    ("encode", ("tiny-gan", np.zeros((1, 1, 32, 32), np.float32))),
    ("decode", ("tiny-cyclegan", np.zeros((1, 8), np.float32))), ("generate", ("tiny-vae", 1))])
def test_a_task_on_the_wrong_family_is_a_failed_precondition(rt, method, args):
    with pytest.raises(InvalidArgument, match=f"model: '{args[0]}' is a .* model; {method} works on"):
        result = getattr(rt.sync, method)(*args)
        if method == "generate":
            next(result)


def test_unknown_models_and_versions(rt):
    with pytest.raises(NotFound, match=r"'nope' is not in the repository \(models: tiny-cyclegan, "):
        rt.sync.sample("nope", 1)
    with pytest.raises(NotFound, match="no version 3"):
        rt.sync.sample("tiny-gan", 1, version=3)


def test_a_passed_deadline_is_deadline_exceeded(rt):
    with pytest.raises(DeadlineExceeded):
        rt.sync.sample("tiny-gan", 2, seed=1, deadline=time.monotonic() - 1)


# --- unconditional models (built here: the tiny models are all class-conditional) ---------------------

def _plain_gan(tiny_repo: Path, repo: Path) -> None:
    """A copy of tiny-gan's manifest around a hand-made unconditional generator: z [B, 8] -> tanh image."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(1).normal(0, 0.3, (8, 1024)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, 1, 32, 32], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["z", "w"], ["h"]), helper.make_node("Reshape", ["h", "shape"], ["r"]),
         helper.make_node("Tanh", ["r"], ["image"])], "plain",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 32, 32])], [w, shape])
    folder = repo / "plain-gan" / "1"
    folder.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(folder / "generator.onnx"))
    manifest = json.loads((tiny_repo / "exported" / "tiny-gan" / "1" / "manifest.json").read_text())
    g = manifest["graphs"]["generator"]
    g["inputs"] = [t for t in g["inputs"] if t["name"] != "label"]
    g["sha256"], g["bytes"] = file_sha256(folder / "generator.onnx"), (folder / "generator.onnx").stat().st_size
    manifest.update(name="plain-gan", classes=[])
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_unconditional_models_take_no_labels(tiny_repo, tmp_path):
    _plain_gan(tiny_repo, tmp_path)
    with Runtime(tmp_path, device="cpu") as rt:
        result = rt.sync.sample("plain-gan", 3, seed=2)
        assert result.images.shape == (3, 1, 32, 32) and result.labels.size == 0
        with pytest.raises(InvalidArgument, match="labels: 'plain-gan' is unconditional"):
            rt.sync.sample("plain-gan", 3, seed=2, labels=[1])


# --- the repository through the runtime ---------------------------------------------------------------

def test_models_index_and_statistics(rt):
    models = {m["name"]: m for m in rt.models()}
    assert set(models) == set(TINY_MODELS)
    gan = models["tiny-gan"]
    assert (gan["family"], gan["task"], gan["state"], gan["latent_size"], gan["versions"]) == \
        ("gan", "sample", "READY", 8, [1])
    assert models["tiny-diffusion"]["samplers"] == list(SAMPLERS) and {"unipc", "euler_a"} <= set(SAMPLERS)
    assert models["tiny-diffusion"]["num_train_timesteps"] == 1000 and models["tiny-pix2pix"]["channels"] == 3
    assert [m["name"] for m in rt.models("tiny-vae")] == ["tiny-vae"]
    with pytest.raises(NotFound):
        rt.models("nope")
    names = {e.name for e in rt.oip_index()}
    assert {"tiny-gan.generator", "tiny-cyclegan.generator_ab", "tiny-diffusion.denoiser"} <= names
    stats = {s.name: s for s in rt.statistics()}
    assert "tiny-pix2pix.generator" in stats and "tiny-vae.encoder" in stats
    rt.sync.sample("tiny-gan", 2, seed=0)
    (gan_stats,) = rt.statistics("tiny-gan.generator", 1)
    assert gan_stats.success_count >= 1 and gan_stats.execution_count >= 1 and gan_stats.version == 1


def test_load_and_unload(tiny_repo, tmp_path):
    repo = tmp_path / "exported"
    shutil.copytree(tiny_repo / "exported" / "tiny-gan", repo / "tiny-gan")
    with Runtime(repo, device="cpu") as rt:
        before = rt.sync.sample("tiny-gan", 2, seed=3)
        asyncio.run(rt.unload("tiny-gan.generator"))  # an OIP name works too
        with pytest.raises(Unavailable, match="unloaded"):
            rt.sync.sample("tiny-gan", 2, seed=3)
        rt.load_sync("tiny-gan")
        shutil.copytree(repo / "tiny-gan" / "1", repo / "tiny-gan" / "2")
        manifest = json.loads((repo / "tiny-gan" / "2" / "manifest.json").read_text())
        (repo / "tiny-gan" / "2" / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
        assert rt.sync.sample("tiny-gan", 2, seed=3).version == 1
        asyncio.run(rt.load("tiny-gan"))
        after = rt.sync.sample("tiny-gan", 2, seed=3)
        assert after.version == 2 and rel(after.images, before.images) <= 1e-6
        assert rt.sync.sample("tiny-gan", 2, seed=3, version=1).version == 1


# --- warm versions ---------------------------------------------------------------------------------------

def test_a_version_is_ready_only_when_warm(tiny_repo):
    """Loading builds each denoising model's iteration graph, and each graph's batcher and each denoising loop have
    answered warm-up requests on their own threads before the version is READY; the counters start at zero."""
    with Runtime(tiny_repo / "exported", device="cpu") as rt:
        for name in ("tiny-diffusion", "tiny-flow", "tiny-diffusion-student"):
            mv = rt.repository.resolve(name)
            session = mv.extras["denoising"]
            assert session.transfers.uploads == 0, "the warm-up's copies are not counted"
            scheduler = rt.scheduler(mv)
            assert scheduler.session is session and scheduler._thread is not None, "the loop's thread is running"
            assert scheduler.statistics().execution_count == 0
        mv = rt.repository.resolve("tiny-gan")
        assert "denoising" not in mv.extras
        for graph in mv.runners:
            batcher = rt.batcher(mv, graph)
            assert batcher._thread is not None and batcher.statistics().execution_count == 0
        executions = {s.name: s.execution_count for s in rt.statistics()}
        assert executions and not any(executions.values()), executions


def test_a_denoiser_the_loop_cannot_be_built_around_is_unavailable(tiny_repo, tmp_path):
    """Its graph opens and matches its manifest, but its output is not named `output`: the iteration graph
    cannot be assembled, so the version is UNAVAILABLE with the reason, never READY."""
    import onnx
    from onnx import TensorProto, helper

    repo = tmp_path / "exported"
    shutil.copytree(tiny_repo / "exported" / "tiny-diffusion", repo / "tiny-diffusion")
    vdir = repo / "tiny-diffusion" / "1"
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    graph = helper.make_graph([helper.make_node("Identity", ["x_t"], ["eps"])], "odd",
                              [helper.make_tensor_value_info("x_t", f32, ["B", 1, 32, 32]),
                               helper.make_tensor_value_info("t", i64, ["B"]),
                               helper.make_tensor_value_info("label", i64, ["B"])],
                              [helper.make_tensor_value_info("eps", f32, ["B", 1, 32, 32])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(vdir / "denoiser.onnx"))
    manifest = json.loads((vdir / "manifest.json").read_text())
    entry = manifest["graphs"]["denoiser"]
    entry["sha256"] = file_sha256(vdir / "denoiser.onnx")
    entry["outputs"][0]["name"] = "eps"
    entry.pop("fp16", None)
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    with Runtime(repo, device="cpu") as rt:
        (row,) = rt.repository.index()
        assert row.state == "UNAVAILABLE" and "output" in row.reason, row
        with pytest.raises(Unavailable, match="no ready version"):
            list(rt.sync.generate("tiny-diffusion", 1, seed=0, steps=2))


def test_legacy_graphs_are_verified_but_not_served():
    """mnist-diffusion still ships the pre-registry `step` graph: its hash is checked, but it is not opened,
    listed or inferable over OIP."""
    repo = Path(__file__).resolve().parents[2] / "exported"
    with Runtime(repo, device="cpu") as rt:
        names = {row.name for row in rt.oip_index()}
        assert "mnist-diffusion.denoiser" in names and "mnist-diffusion.step" not in names
        assert "step" not in rt.repository.resolve("mnist-diffusion").runners
        with pytest.raises(NotFound, match="mnist-diffusion.denoiser"):
            rt.graph("mnist-diffusion.step")
        assert rt.models("mnist-diffusion")[0]["graphs"] == ["denoiser"]


# --- images ------------------------------------------------------------------------------------------------

def _encoded(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def test_uint8_mapping():
    x = np.array([-1.0, -0.996, 0.0, 0.5, 1.0, 3.0, -7.0], np.float32)
    assert im.to_uint8(x).tolist() == [0, 1, 128, 191, 255, 255, 0]  # round((x + 1) * 127.5), clipped
    u = np.arange(256, dtype=np.uint8)
    assert np.array_equal(im.to_uint8(im.from_uint8(u)), u)


def test_png_round_trip_grey_and_rgb():
    for c in (1, 3):
        x = im.from_uint8(RNG.integers(0, 256, (2, c, 32, 32), dtype=np.uint8))
        blobs = im.encode_pngs(x)
        assert Image.open(io.BytesIO(blobs[0])).mode == ("L" if c == 1 else "RGB")
        assert np.array_equal(im.decode_images(blobs, c, 32, 32), x)


def test_decode_converts_channels_and_reads_jpeg():
    rgb_pixels = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    as_grey = im.decode_image(_encoded(rgb_pixels), 1, 32, 32)
    assert as_grey.shape == (1, 32, 32)
    as_rgb = im.decode_image(_encoded(rgb_pixels[:, :, 0]), 3, 32, 32)
    assert as_rgb.shape == (3, 32, 32) and np.array_equal(as_rgb[0], as_rgb[2])
    jpeg = im.decode_image(_encoded(rgb_pixels, "JPEG"), 3, 32, 32)
    assert jpeg.shape == (3, 32, 32) and jpeg.dtype == np.float32
    assert im.decode_image(_encoded(rgb_pixels), 3, 16, 16, resize=True).shape == (3, 16, 16)


def test_decode_names_the_bad_image():
    good = _encoded(np.zeros((32, 32), np.uint8))
    with pytest.raises(InvalidArgument, match=r"images\[1\]: expected 32x32 pixels, got 64x48"):
        im.decode_images([good, _encoded(np.zeros((48, 64), np.uint8))], 1, 32, 32)
    with pytest.raises(InvalidArgument, match=r"images\[2\]: not a readable image"):
        im.decode_images([good, good, b"not an image at all"], 1, 32, 32)
    with pytest.raises(InvalidArgument, match="images: need at least one"):
        im.decode_images([], 1, 32, 32)


def test_grid():
    x = np.zeros((5, 1, 8, 8), np.float32)
    g = im.grid(x, ncol=3, padding=2)
    assert g.shape == (1, 2 * 10 + 2, 3 * 10 + 2)
    assert Image.open(io.BytesIO(im.grid_png(x))).size == (3 * 10 + 2, 2 * 10 + 2)


# --- no torch on the serving side ---------------------------------------------------------------------------

BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "trainer", "torchvision"):
            raise ImportError(f"{name} is blocked: serve must not import it")
sys.meta_path.insert(0, Block())
import serve.runtime, serve.batcher, serve.diffusion, serve.images, serve.repository, serve.errors
from serve.runtime import Runtime
rt = Runtime(sys.argv[1], device="cpu")
assert rt.sync.sample("tiny-gan", 2, seed=1).images.shape == (2, 1, 32, 32)
events = list(rt.sync.generate("tiny-diffusion", 1, seed=1, steps=2))
assert events[-1].result.images.shape == (1, 1, 32, 32)
assert not any(m.split(".")[0] in ("torch", "trainer") for m in sys.modules)
rt.close()
print("ok")
"""


def test_serving_runs_without_torch(tiny_repo):
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH, str(tiny_repo / "exported")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# --- devices -------------------------------------------------------------------------------------------------

def test_cuda_without_cuda_is_a_clear_error(tiny_repo):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(FailedPrecondition, match="device='cuda': .*onnxruntime-gpu or use device='cpu'"):
        Runtime(tiny_repo / "exported", device="cuda")
    with pytest.raises(ValueError, match="device"):
        Runtime(tiny_repo / "exported", device="tpu")


@pytest.mark.gpu
def test_cuda_matches_cpu(tiny_repo):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDAExecutionProvider in this onnxruntime")
    with Runtime(tiny_repo / "exported", device="cuda") as gpu, Runtime(tiny_repo / "exported", device="cpu") as cpu:
        mv = gpu.repository.resolve("tiny-gan")
        if not mv.ready:
            pytest.skip(f"CUDA sessions cannot be created here: {mv.reason}")
        assert isinstance(mv.runners["generator"], GraphRunner) and mv.runners["generator"].device == "cuda"
        a, b = gpu.sync.sample("tiny-gan", 4, seed=1), cpu.sync.sample("tiny-gan", 4, seed=1)
        assert rel(a.images, b.images) <= 1e-3
        ga = list(gpu.sync.generate("tiny-diffusion", 2, seed=1, steps=5))[-1].result.images
        gb = list(cpu.sync.generate("tiny-diffusion", 2, seed=1, steps=5))[-1].result.images
        assert np.abs(ga - gb).max() <= 1e-2
