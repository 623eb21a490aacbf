"""Triton's own load generator, perf_analyzer, drives `gen serve` over gRPC and HTTP without an error.

perf_analyzer builds its requests from the model's metadata and config (a per-row scalar such as a label or a
timestep must be declared as Triton declares it, or it stops with "unable to set shape for the input"), so this is
the check that gen looks like Triton to Triton's own tools. `make test` installs it into .venv-perf (tritonclient
2.41's wheel ships the binary); it also needs libb64 (`apt-get install libb64-0d`, which .ci/run does) and
libcudart.so.12 (from the nvidia-cuda-runtime-cu12 wheel in the same venv). Where it cannot run, the test says why.
"""
from __future__ import annotations

import re
import subprocess

import pytest

from bench.perf_analyzer import BINARY, env
from serve.launch import ROOT, start_server, stop_server

MODELS = ["mnist-cgan.generator", "mnist-vae.decoder", "mnist-diffusion.denoiser"]  # the shipped models' graphs


@pytest.fixture(scope="module")
def perf_analyzer():
    if not BINARY.is_file():
        pytest.skip(f"{BINARY} is missing: `make perf-analyzer` installs it (tritonclient 2.41's wheel)")
    probe = subprocess.run([str(BINARY), "--help"], capture_output=True, text=True, env=env(), timeout=60)
    if "error while loading shared libraries" in probe.stderr:
        pytest.skip(f"perf_analyzer cannot start: {probe.stderr.strip().splitlines()[-1]} "
                    "(apt-get install libb64-0d; libcudart.so.12 comes from nvidia-cuda-runtime-cu12)")
    return str(BINARY)


@pytest.fixture(scope="module")
def shipped_server():
    server = start_server(ROOT / "exported", "--device", "cpu")
    yield server
    stop_server(server)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("model", MODELS)
def test_perf_analyzer_runs_at_concurrency_1_to_32(perf_analyzer, shipped_server, model, protocol):
    port = shipped_server.port if protocol == "grpc" else shipped_server.http_port
    proc = subprocess.run(
        [perf_analyzer, "-m", model, "-u", f"127.0.0.1:{port}", "-i", protocol, "--concurrency-range", "1:32:31",
         "--input-data", "zero",  # zeros are in range for every input (labels, timesteps)
         "--measurement-interval", "300", "--max-trials", "3", "--stability-percentage", "999"],
        capture_output=True, text=True, env=env(), timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    assert not re.search(r"error|failed", out, re.IGNORECASE), out[-2000:]
    rates = dict(re.findall(r"Concurrency: (\d+), throughput: ([\d.]+) infer/sec", out))
    assert set(rates) == {"1", "32"} and all(float(v) > 0 for v in rates.values()), out[-2000:]
