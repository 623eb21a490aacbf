"""gen.v1.Generator, health, reflection, metrics and the CLI client against the real server."""
from __future__ import annotations

import concurrent.futures
import io
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc
from serve.client import GenClient, Images, ProgressEvent
from tests.conftest import TINY_MODELS
from tests.serve.conftest import ROOT


@pytest.fixture(scope="module")
def client(server):
    with GenClient(server.target, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.GeneratorStub(channel)
    channel.close()


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_list_models(client):
    models = {m.name: m for m in client.list_models()}
    assert set(models) == set(TINY_MODELS)
    gan = models["tiny-gan"]
    assert gan.family == "gan" and gan.task == "sample" and gan.state == "READY" and len(gan.classes) == 10
    assert models["tiny-diffusion"].task == "denoise" and models["tiny-pix2pix"].channels == 3


@pytest.mark.parametrize("model", ["tiny-gan", "tiny-vae"])
def test_sample_is_seeded_per_image(client, model):
    eight = client.sample(model, n=8, seed=5)
    four = client.sample(model, n=4, seed=5)
    assert eight.pixels.shape == (8, 32, 32, 1) and eight.pixels.dtype == np.uint8
    assert np.array_equal(eight.pixels[:4], four.pixels), "sample i must not depend on n"
    assert eight.labels == [i % 10 for i in range(8)] and eight.seed == 5
    labelled = client.sample(model, n=3, seed=5, labels=[7])
    assert labelled.labels == [7, 7, 7]


def test_translate_png_and_directions(client):
    rng = np.random.default_rng(0)
    images = [_png(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    out = client.translate("tiny-pix2pix", images)
    assert out.pixels.shape == (3, 32, 32, 3)
    ab = client.translate("tiny-cyclegan", images, direction="AtoB")
    ba = client.translate("tiny-cyclegan", images, direction="BtoA")
    assert ab.pixels.shape == ba.pixels.shape == (3, 32, 32, 3)
    assert not np.array_equal(ab.pixels, ba.pixels)


def test_encode_decode(client):
    digit = _png(np.full((32, 32), 200, np.uint8))
    mean, logvar = client.encode("tiny-vae", [digit, digit], labels=[3])
    assert mean.shape == logvar.shape and mean.shape[0] == 2
    recon = client.decode("tiny-vae", mean, labels=[3])
    assert recon.pixels.shape == (2, 32, 32, 1)


def test_raw_tensor_format(stub):
    resp = stub.Sample(pb.SampleRequest(model="tiny-gan", n=2, seed=1, format=pb.RAW))
    assert list(resp.tensor.shape) == [2, 1, 32, 32] and not resp.png
    x = np.frombuffer(resp.tensor.data, "<f4")
    assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("model,sampler", [("tiny-diffusion", "ddim"), ("tiny-flow", "euler"), ("tiny-flow", "ab2")])
def test_generate_streams_progress_then_images(client, model, sampler):
    events = list(client.generate(model, n=2, seed=3, steps=5, sampler=sampler, labels=[1, 2], preview_every=2))
    progress = [e for e in events if isinstance(e, ProgressEvent)]
    assert [p.step for p in progress] == [1, 2, 3, 4, 5] and all(p.total == 5 for p in progress)
    assert progress[1].preview is not None and progress[0].preview is None
    final = events[-1]
    assert isinstance(final, Images) and final.pixels.shape == (2, 32, 32, 1) and final.labels == [1, 2]
    again = [e for e in client.generate(model, n=2, seed=3, steps=5, sampler=sampler, labels=[1, 2])][-1]
    assert np.array_equal(final.pixels, again.pixels)
    other = [e for e in client.generate(model, n=2, seed=4, steps=5, sampler=sampler, labels=[1, 2])][-1]
    assert not np.array_equal(final.pixels, other.pixels), "the seed decides the images"


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_every_sampler(client, sampler):
    final = list(client.generate("tiny-diffusion", n=1, seed=0, steps=3, sampler=sampler))[-1]
    assert final.pixels.shape == (1, 32, 32, 1)


def test_concurrent_generate_mixed_steps_share_step_runs(server):
    """16 concurrent Generate requests with different step counts: fewer denoiser runs than the sum of
    their steps, and each equal to the same request served alone (RAW tensors, <= 1e-4)."""
    import tritonclient.grpc as triton

    steps = [3 + (i % 4) for i in range(16)]
    stats = triton.InferenceServerClient(server.target)

    def runs():
        return int(stats.get_inference_statistics("tiny-diffusion", as_json=True)["model_stats"][0]
                   .get("execution_count", 0))  # the model's denoising loop: one row per iteration

    def generate(i):
        channel = grpc.insecure_channel(server.target)
        stub = pb_grpc.GeneratorStub(channel)
        req = pb.GenerateRequest(model="tiny-diffusion", n=1, seed=100 + i, steps=steps[i], labels=[i % 10],
                                 sampler=["ddim", "ddpm", "dpm++"][i % 3], format=pb.RAW)
        last = list(stub.Generate(req, timeout=120))[-1].result
        channel.close()
        return np.frombuffer(last.tensor.data, "<f4")

    before = runs()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(generate, range(16)))
    used = runs() - before
    assert max(steps) <= used < sum(steps), (used, sum(steps))
    for i in (0, 5, 10, 15):
        alone = generate(i)
        assert np.abs(alone - together[i]).max() <= 1e-4


@pytest.mark.parametrize("model", ["tiny-diffusion", "tiny-flow"])
def test_cancelled_generate_stops(server, client, model):
    """A client that cancels mid-stream frees the server: a long request is abandoned after 2 events."""
    import tritonclient.grpc as triton

    stats = triton.InferenceServerClient(server.target)
    runs = lambda: int(stats.get_inference_statistics(model, as_json=True)  # noqa: E731
                       ["model_stats"][0].get("execution_count", 0))
    before = runs()
    stream = client.generate(model, n=1, seed=0, steps=1000)
    for i, _ in enumerate(stream):
        if i == 1:
            break
    stream.close()
    import time

    time.sleep(1.0)
    settled = runs()
    time.sleep(1.0)
    assert runs() == settled, "the cancelled request kept running"
    assert settled - before < 1000


@pytest.mark.parametrize("request_,field", [
    (pb.SampleRequest(model="nope", n=1), "NOT_FOUND"),
    (pb.SampleRequest(model="tiny-gan", n=-1), "n"),
    (pb.SampleRequest(model="tiny-gan", n=2, labels=[10]), "labels"),
    (pb.SampleRequest(model="tiny-gan", n=3, labels=[1, 2]), "labels"),
    (pb.SampleRequest(model="../etc", n=1), "model"),
    (pb.SampleRequest(model="tiny-pix2pix", n=1), "tiny-pix2pix"),
])
def test_sample_errors_name_the_field(stub, request_, field):
    with pytest.raises(grpc.RpcError) as info:
        stub.Sample(request_)
    assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                 grpc.StatusCode.FAILED_PRECONDITION)
    assert field in info.value.details() or field == info.value.code().name


@pytest.mark.parametrize("request_,field", [
    (pb.GenerateRequest(model="tiny-diffusion", n=1, steps=5, sampler="heun"), "sampler"),
    (pb.GenerateRequest(model="tiny-diffusion", n=1, steps=1001), "steps"),
    (pb.GenerateRequest(model="tiny-diffusion", n=1, steps=-3), "steps"),
    (pb.GenerateRequest(model="tiny-diffusion", n=1, steps=5, eta=2.0), "eta"),
    (pb.GenerateRequest(model="tiny-diffusion", n=1, steps=5, guidance=float("nan")), "guidance"),
])
def test_generate_errors_name_the_field(stub, request_, field):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request_))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in info.value.details()


def test_translate_rejects_bytes_that_are_not_an_image(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Translate(pb.TranslateRequest(model="tiny-pix2pix", images=[b"not a png"]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "images" in info.value.details()


def test_health_and_reflection(server):
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "gen.v1.Generator", "inference.GRPCInferenceService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"gen.v1.Generator", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    channel.close()


def test_metrics_endpoint(server, client):
    """Scraped and parsed with prometheus_client's own parser, on the metrics port and on the REST port."""
    from prometheus_client.parser import text_string_to_metric_families

    client.sample("tiny-gan", n=2, seed=0)
    for port in (server.metrics_port, server.http_port):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=")  # the text exposition format
            families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
        labels = {"model": "tiny-gan.generator", "version": "1"}
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
        key = tuple(sorted(labels.items()))
        assert families["nv_inference_request_success"].type == "counter"
        assert samples[("nv_inference_request_success_total", key)] >= 1
        assert samples[("nv_inference_exec_count_total", key)] >= 1
        for name in ("gen_request_duration_seconds", "gen_queue_duration_seconds", "gen_compute_duration_seconds"):
            assert families[name].type == "histogram"
            count = samples[(f"{name}_count", key)]
            assert count >= 1 and samples[(f"{name}_sum", key)] > 0
            assert samples[(f"{name}_bucket", tuple(sorted({**labels, "le": "+Inf"}.items())))] == count
        assert families["process_resident_memory_bytes"].samples[0].value > 0


def test_cli_client_commands(server, tmp_path):
    def gen(*args):
        return subprocess.run([sys.executable, "-m", "gen", *args, "--server", server.target], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    out = tmp_path / "s.png"
    proc = gen("sample", "--model", "tiny-gan", "-n", "4", "--seed", "1", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size[0] > 32
    proc = gen("generate", "--model", "tiny-diffusion", "-n", "2", "--steps", "3", "-o", str(tmp_path / "g.png"))
    assert proc.returncode == 0, proc.stderr
    steps = [line for line in proc.stderr.splitlines() if line.startswith("step")]
    assert steps == ["step 1/3", "step 2/3", "step 3/3"], "not a terminal: one line per step, no carriage returns"
    img = tmp_path / "in.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    proc = gen("translate", "--model", "tiny-cyclegan", "--direction", "BtoA", str(img), "-o", str(tmp_path / "t.png"))
    assert proc.returncode == 0, proc.stderr
    proc = gen("encode", "--model", "tiny-vae", str(img), "-o", str(tmp_path / "e.npz"))
    assert proc.returncode == 0 and np.load(tmp_path / "e.npz")["mean"].shape[0] == 1
    proc = gen("sample", "--model", "nope", "-o", str(out))
    assert proc.returncode != 0 and proc.stderr.startswith("gen: error: NOT_FOUND") and "Traceback" not in proc.stderr


def test_cli_generate_from_an_image_with_a_mask(server, tmp_path):
    def gen(*args):
        return subprocess.run([sys.executable, "-m", "gen", "generate", "--model", "tiny-diffusion", *args,
                               "--server", server.target], cwd=ROOT, capture_output=True, text=True, timeout=120)

    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.fromarray(np.full((32, 32), 200, np.uint8)).save(init)
    Image.fromarray(np.repeat(np.array([0, 255], np.uint8), 16)[:, None].repeat(32, 1)).save(mask)  # lower half
    out = tmp_path / "g.png"
    proc = gen("-n", "2", "--steps", "3", "--init", str(init), "--strength", "0.6", "--mask", str(mask),
               "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    grid = np.asarray(Image.open(out).convert("L"))
    assert (grid[2:18, 2:34] == 200).all(), "the kept upper half of the first image is the init image"
    proc = gen("--strength", "0.5", "-o", str(out))
    assert proc.returncode != 0 and "--init" in proc.stderr and "Traceback" not in proc.stderr
    proc = gen("--init", str(init), "--strength", "1.5", "-o", str(out))
    assert proc.returncode != 0 and "strength" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_refuses_an_empty_repository(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gen", "serve", "--repo", str(tmp_path / "none")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "gen export" in proc.stderr and "Traceback" not in proc.stderr


def test_drain_delay_reports_not_ready_and_goes_on_serving(served_repo):
    """--drain-delay: on SIGTERM readiness goes first (gRPC health, /v2/health/ready), the serving later."""
    import signal
    import time

    from serve.launch import start_server

    srv = start_server(served_repo, "--device", "cpu", "--drain-delay", "3")
    try:
        with grpc.insecure_channel(srv.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            sigterm = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            while health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() - sigterm < 2, "health still SERVING 2 s after SIGTERM"
                time.sleep(0.05)
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(f"http://{srv.http_target}/v2/health/ready", timeout=5)
            assert info.value.code == 400
            with GenClient(srv.target, timeout=30) as client:  # a new connection, still served
                assert client.sample("tiny-gan", n=1, seed=0).pixels.shape[0] == 1
            assert time.monotonic() - sigterm < 3, "the calls above ran inside the drain delay"
        assert srv.proc.wait(timeout=60) == 0
        assert time.monotonic() - sigterm >= 3
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
