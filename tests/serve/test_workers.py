"""gen serve --workers N: N processes on the same ports (SO_REUSEPORT), metrics added up, stopped together."""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from serve.client import GenClient
from serve.launch import ROOT, start_server, stop_server

REQUESTS = 24


def _metrics(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _value(text: str, line_start: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def _workers(server) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(server.proc.pid), "-f", "multiprocessing.spawn"],
                         capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


@pytest.fixture(scope="module")
def workers(served_repo):
    srv = start_server(served_repo, "--device", "cpu", "--workers", "2", "--metrics-port", "0")
    yield srv
    stop_server(srv)


def test_two_workers_share_the_ports_and_add_up_their_metrics(workers):
    assert any("2 workers" in line for line in workers.log)
    assert len(_workers(workers)) == 2
    for i in range(REQUESTS):  # a new connection each time: the kernel spreads connections over the workers
        with GenClient(workers.target, timeout=60) as client:
            assert client.sample("tiny-gan", n=1, seed=i).pixels.shape[0] == 1
    own = []  # what each worker served, from the loopback port it shows the others (serve/peers.py)
    for port_file in glob.glob(f"/tmp/gen-workers-{workers.proc.pid}-*/*.port"):
        with urllib.request.urlopen(f"http://127.0.0.1:{open(port_file).read()}/statistics", timeout=10) as reply:
            own += [s["success_count"] for s in json.load(reply) if s["name"] == "tiny-gan.generator"]
    assert len(own) == 2 and all(own) and sum(own) == REQUESTS, own  # both served, and nothing twice
    name = 'nv_inference_request_success_total{model="tiny-gan.generator"'
    for port in (workers.metrics_port, workers.http_port):  # whichever worker answers adds up both
        text = _metrics(port)
        assert _value(text, "gen_workers ") == 2, text[:500]
        assert _value(text, name) == REQUESTS
        assert _value(text, "process_resident_memory_bytes ") > 0
    for _ in range(8):  # ModelStatistics too, over REST and gRPC, on new connections
        url = f"http://127.0.0.1:{workers.http_port}/v2/models/tiny-gan.generator/stats"
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = reply.read().decode().replace(" ", "")
        assert int(re.search(r'"success":\{"count":"?(\d+)', body).group(1)) == REQUESTS, body[:300]


def test_sigterm_lets_every_worker_finish_its_calls(served_repo):
    srv = start_server(served_repo, "--device", "cpu", "--workers", "2", "--no-http")
    results, errors = [], []

    def generate(seed):
        try:
            with GenClient(srv.target, timeout=120) as client:
                events = list(client.generate("tiny-diffusion", n=2, seed=seed, steps=300))
                results.append(events[-1])
        except Exception as e:  # noqa: BLE001 - the assertion below shows it
            errors.append(e)

    threads = [threading.Thread(target=generate, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the calls are in the workers' loops (together they take about 2 s)
    assert not results and not errors, "the calls must still be running when SIGTERM comes"
    assert stop_server(srv) == 0
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 6, errors
    assert not _workers(srv)


def test_a_worker_that_dies_stops_the_server(served_repo):
    srv = start_server(served_repo, "--device", "cpu", "--workers", "2", "--no-http")
    try:
        victim = _workers(srv)[0]
        os.kill(victim, signal.SIGKILL)
        assert srv.proc.wait(timeout=60) == 1
        assert not _workers(srv)
    finally:
        if srv.proc.poll() is None:
            stop_server(srv)


def test_repository_control_needs_one_worker(served_repo):
    proc = subprocess.run([sys.executable, "-m", "gen", "serve", "--repo", str(served_repo), "--port", "0",
                           "--no-http", "--workers", "2", "--allow-repository-control"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--allow-repository-control with --workers" in proc.stderr


def test_a_taken_port_is_an_error_not_a_split(served_repo):
    """One server per port unless it is gen serve's own workers: gRPC would otherwise share it silently."""
    first = start_server(served_repo, "--device", "cpu", "--no-http")
    try:
        proc = subprocess.run([sys.executable, "-m", "gen", "serve", "--repo", str(served_repo), "--port",
                               str(first.port), "--no-http", "--device", "cpu"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert f"{first.port}" in proc.stderr, proc.stderr[-500:]
    finally:
        stop_server(first)


def _running(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def test_workers_do_not_outlive_a_killed_supervisor(served_repo):
    srv = start_server(served_repo, "--device", "cpu", "--workers", "2", "--no-http")
    workers = _workers(srv)
    assert len(workers) == 2
    srv.proc.kill()
    srv.proc.wait(timeout=10)
    deadline = time.monotonic() + 60  # they drain as on SIGTERM, then exit
    while time.monotonic() < deadline and any(_running(pid) for pid in workers):
        time.sleep(0.2)
    assert not [pid for pid in workers if _running(pid)], "workers still run after their supervisor was killed"
