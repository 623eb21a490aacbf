"""GenClient and the CLI over three real `gen serve` replicas: calls go round-robin, one call at a time, over
one channel; a Generate stream stays on the replica it started on. Per-replica ModelStatistics say who ran what.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from serve.client import GenClient, Images
from serve.launch import ROOT, start_server, stop_server
from tests.replicas import STREAM_MODEL, UNARY_MODEL, small_repo, successes


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    repo = small_repo(tmp_path_factory.mktemp("balancing") / "exported")
    servers = []
    try:
        for _ in range(3):
            servers.append(start_server(repo, "--max-queue-delay-ms", "0"))
        yield servers
    finally:
        for s in servers:
            stop_server(s, timeout=15)


def gains(replicas, model: str, before: list[int]) -> list[int]:
    return [successes(r.target, model) - b for r, b in zip(replicas, before)]


def test_calls_reach_every_replica(replicas):
    before = [successes(r.target, UNARY_MODEL) for r in replicas]
    with GenClient(",".join(r.target for r in replicas), timeout=60) as client:
        for seed in range(12):
            assert client.sample(UNARY_MODEL, n=1, seed=seed).pixels.shape == (1, 32, 32, 1)
    gained = gains(replicas, UNARY_MODEL, before)
    assert sum(gained) == 12 and all(g >= 1 for g in gained), f"calls per replica: {gained}"


def test_a_stream_stays_on_one_replica_while_other_calls_rotate(replicas):
    stream_before = [successes(r.target, STREAM_MODEL) for r in replicas]
    unary_before = [successes(r.target, UNARY_MODEL) for r in replicas]
    steps, result = 0, None
    with GenClient(",".join(r.target for r in replicas), timeout=60) as client:
        for event in client.generate(STREAM_MODEL, n=1, seed=0, steps=12):
            if isinstance(event, Images):
                result = event
            else:
                steps += 1
                client.sample(UNARY_MODEL, n=1, seed=steps)  # the same channel keeps rotating meanwhile
    assert steps == 12 and result is not None and result.pixels.shape == (1, 32, 32, 1)
    stream_gained = gains(replicas, STREAM_MODEL, stream_before)
    assert sum(1 for g in stream_gained if g) == 1, f"diffusion work per replica: {stream_gained}"
    unary_gained = gains(replicas, UNARY_MODEL, unary_before)
    assert sum(unary_gained) == 12 and all(g >= 1 for g in unary_gained), f"calls per replica: {unary_gained}"


def gen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gen", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_takes_several_servers(replicas, tmp_path):
    before = [successes(r.target, UNARY_MODEL) for r in replicas]
    servers = ",".join(r.target for r in replicas)
    for i in range(3):  # each command is one call: a new channel starts at a random replica
        proc = gen("sample", "--server", servers, "--model", UNARY_MODEL, "-n", "2", "-o", str(tmp_path / f"{i}.png"))
        assert proc.returncode == 0, proc.stderr
    assert sum(gains(replicas, UNARY_MODEL, before)) == 3


def test_cli_says_what_a_list_of_servers_must_be(tmp_path):
    proc = gen("sample", "--server", "gen-a:50051,gen-b:50051", "--model", UNARY_MODEL, "-o", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("gen: error: --server gen-a:50051: ") and "dns:///" in proc.stderr
