"""Three real `gen serve` replicas behind real nginx running deploy/nginx/gen.conf (only its ports changed).

Shows what the file promises: calls (not connections) spread over every replica; a rolling restart under load
(SIGTERM each replica in turn, start it again) fails no unary call and lets a Generate stream in flight on the
draining replica finish; a replica killed with SIGKILL costs only the calls that were in flight on it. Each drill
runs twice: replicas of one process, and replicas of `gen serve --workers 2`.
The load is gen's own client, which retries UNAVAILABLE: nginx retries calls whose connection a replica
refused, but cannot resend one already sent (see the file), which a replica closing its port can drop.
`.ci/run` installs nginx where it is missing; elsewhere this module says why it skips.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc
from serve.client import GenClient
from serve.launch import ROOT, RunningServer, start_server, stop_server
from tests.replicas import STREAM_MODEL, UNARY_MODEL, free_ports, small_repo, successes

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (as root: apt-get install -y "
                                "nginx-light; .ci/run does this), so there is no proxy to test")

CONF = ROOT / "deploy" / "nginx" / "gen.conf"
SHIPPED_LISTEN = "listen 127.0.0.1:8080 http2;"
SHIPPED_REPLICAS = ("127.0.0.1:50051", "127.0.0.1:50052", "127.0.0.1:50053")
FAIL_TIMEOUT_S = 2  # the file's fail_timeout: how long nginx skips a replica that failed
GRACE_S = "60"  # replicas' --grace: far more than a test stream needs, so a slow machine cannot cut one short
STREAM_STEPS = 30
CALL_TIMEOUT_S = 60

# What Debian's /etc/nginx/nginx.conf provides around conf.d/*.conf, kept in the test's folder.
MAIN_CONF = """\
worker_processes 1;
daemon off;
{user}
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    include {d}/gen.conf;
}}
"""


def render(listen_port: int, replica_ports: list[int]) -> str:
    """The shipped file with the test's ports; fails if the file no longer has the lines this test edits."""
    text = CONF.read_text()
    assert text.count(SHIPPED_LISTEN) == 1, f"{CONF}: expected one `{SHIPPED_LISTEN}`"
    text = text.replace(SHIPPED_LISTEN, f"listen 127.0.0.1:{listen_port} http2;")
    for shipped, port in zip(SHIPPED_REPLICAS, replica_ports, strict=True):  # each a primary and a backup
        assert text.count(f"server {shipped} ") == 2, f"{CONF}: expected two `server {shipped} ...` lines"
        text = text.replace(f"server {shipped} ", f"server 127.0.0.1:{port} ")
    assert f"fail_timeout={FAIL_TIMEOUT_S}s" in text
    return text


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nginx did not listen on {port} in {timeout} s")


@dataclass
class Cluster:
    repo: Path
    replicas: list[RunningServer]
    proxy_port: int
    folder: Path
    workers: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.proxy_port}"

    def restart(self, i: int) -> None:
        self.replicas[i] = start_replica(self.repo, self.replicas[i].port, self.workers)

    def error_log(self) -> str:
        return (self.folder / "error.log").read_text(errors="replace")


def start_replica(repo: Path, port: int, workers: int) -> RunningServer:
    return start_server(repo, "--grace", GRACE_S, "--max-queue-delay-ms", "0", "--workers", str(workers), port=port)


def kill_replica(replica: RunningServer) -> None:
    """SIGKILL to every process of a replica (its workers first: killed alone, a supervisor's workers drain)."""
    out = subprocess.run(["pgrep", "-P", str(replica.proc.pid)], capture_output=True, text=True).stdout
    for pid in map(int, out.split()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    replica.proc.kill()


@pytest.fixture(scope="module", params=[1, 2], ids=["one process", "2 workers"])
def cluster(tmp_path_factory, request):
    workers = request.param
    folder = tmp_path_factory.mktemp("nginx")
    repo = small_repo(folder / "exported")
    proxy_port, *ports = free_ports(4)
    replicas: list[RunningServer] = []
    nginx = None
    try:
        for port in ports:
            replicas.append(start_replica(repo, port, workers))
        (folder / "gen.conf").write_text(render(proxy_port, ports))
        # as root the master hands work to an unprivileged user, who could not enter pytest's private folders
        user = "user root root;" if os.geteuid() == 0 else ""
        (folder / "nginx.conf").write_text(MAIN_CONF.format(d=folder, user=user))
        args = [NGINX, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e", str(folder / "error.log")]
        check = subprocess.run([*args, "-t"], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"nginx rejects {CONF}:\n{check.stderr}"
        nginx = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(proxy_port, nginx)
        yield Cluster(repo, replicas, proxy_port, folder, workers)
    finally:
        if nginx is not None:
            nginx.terminate()
            try:
                nginx.wait(timeout=15)
            except subprocess.TimeoutExpired:
                nginx.kill()
        for r in replicas:
            if r.proc.poll() is None:
                stop_server(r, timeout=15)


def replica_of(metadata) -> int | None:
    """The port of the replica that answered, from nginx's x-gen-replica header (the last one nginx tried)."""
    for key, value in metadata or ():
        if key == "x-gen-replica":
            return int(value.split(",")[-1].strip().rsplit(":", 1)[1])
    return None


@dataclass
class Outcome:
    started: float
    ended: float
    code: grpc.StatusCode
    details: str = ""


class Load:
    """Threads calling Sample through the proxy back to back with gen's client (which retries UNAVAILABLE),
    each on its own connection, recording every outcome."""

    def __init__(self, target: str, threads: int = 3):
        self.target, self.threads = target, threads
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        with GenClient(self.target, timeout=CALL_TIMEOUT_S) as client:
            seed = i * 1_000_000
            while not self._stop.is_set():
                seed += 1
                started = time.monotonic()
                try:
                    images = client.sample(UNARY_MODEL, n=1, seed=seed)
                    assert images.pixels.shape == (1, 32, 32, 1)
                    outcome = Outcome(started, time.monotonic(), grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    outcome = Outcome(started, time.monotonic(), e.code(), e.details() or "")
                self.outcomes.append(outcome)

    def __enter__(self) -> Load:
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(timeout=CALL_TIMEOUT_S + 5)

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.code != grpc.StatusCode.OK]


def stream_on(target: str, port: int, tries: int = 30):
    """A Generate stream through the proxy that landed on the replica at `port`, and its first event.

    nginx picks the replica; streams that land elsewhere are cancelled and the call is made again.
    """
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.GeneratorStub(channel)
    for _ in range(tries):
        stream = stub.Generate(pb.GenerateRequest(model=STREAM_MODEL, n=1, seed=7, steps=STREAM_STEPS),
                               timeout=CALL_TIMEOUT_S)
        first = next(stream)
        if replica_of(stream.initial_metadata()) == port:
            return stream, first, channel
        stream.cancel()
    channel.close()
    raise AssertionError(f"no Generate stream landed on replica {port} in {tries} tries")


def back_in_rotation(cluster, timeout: float = 60) -> list[int]:
    """Wait (under load) until every replica has answered a call, or `timeout`; the calls each answered."""
    deadline = time.monotonic() + timeout
    while True:
        served = [successes(r.target, UNARY_MODEL) for r in cluster.replicas]
        if all(served) or time.monotonic() > deadline:
            return served
        time.sleep(0.25)


def test_calls_spread_over_every_replica(cluster):
    before = [successes(r.target, UNARY_MODEL) for r in cluster.replicas]
    answered_by = []
    with grpc.insecure_channel(cluster.target) as channel:  # one client connection: nginx balances per call
        stub = pb_grpc.GeneratorStub(channel)
        for seed in range(12):
            _, call = stub.Sample.with_call(pb.SampleRequest(model=UNARY_MODEL, n=1, seed=seed), timeout=30)
            answered_by.append(replica_of(call.initial_metadata()))
    gained = [successes(r.target, UNARY_MODEL) - b for r, b in zip(cluster.replicas, before)]
    assert sum(gained) == 12, gained
    assert all(g >= 1 for g in gained), f"every replica answers some of one connection's calls: {gained}"
    assert sorted(set(answered_by)) == sorted(r.port for r in cluster.replicas)
    assert [answered_by.count(r.port) for r in cluster.replicas] == gained, "the header names the replica"


def test_rolling_restart_fails_no_call(cluster, request):
    if cluster.workers > 1:  # measured on a clean CI run: 1 of 5,350 calls failed (below); the cause is open
        request.applymarker(pytest.mark.xfail(strict=False, reason=(
            "with --workers 2 a replica has two listeners on its port, closed one after the other: nginx's call "
            "reset in a closing worker's accept queue came back as HTTP 502 with headers, which gRPC does not "
            "retry (1 of 5,350 calls in one CI run)")))
    with Load(cluster.target) as load:
        time.sleep(0.5)
        for i in range(len(cluster.replicas)):
            old = cluster.replicas[i]
            stream, first, channel = stream_on(cluster.target, old.port)
            old.proc.send_signal(signal.SIGTERM)  # drains: closes its port, finishes what it runs
            events = [first, *stream]
            channel.close()
            assert events[-1].HasField("result") and len(events[-1].result.png) == 1, "the stream completed"
            assert [e.progress.step for e in events[:-1]] == list(range(1, STREAM_STEPS + 1))
            assert old.proc.wait(timeout=60) == 0, "".join(old.log[-20:])
            cluster.restart(i)
        served = back_in_rotation(cluster)
    failures = load.failures()
    assert not failures, \
        f"{len(failures)} of {len(load.outcomes)} calls failed: {failures[:5]}\n{cluster.error_log()[-4000:]}"
    assert len(load.outcomes) >= 30
    assert "Connection refused" in cluster.error_log(), "nginx met draining replicas and went elsewhere"
    assert all(s >= 1 for s in served), f"every restarted replica is back in rotation: {served}"


TEARDOWN_S = 0.25  # how long after SIGKILL a call sent to the dying replica still counts as in flight on it


def calls_after(load: Load, t: float) -> list[Outcome]:
    return [o for o in load.outcomes if o.started > t + TEARDOWN_S]


def test_sigkill_costs_only_the_calls_in_flight(cluster):
    victim = cluster.replicas[1]
    with Load(cluster.target) as load:
        time.sleep(0.5)
        stream, _, channel = stream_on(cluster.target, victim.port)
        killed_at = time.monotonic()
        kill_replica(victim)
        with pytest.raises(grpc.RpcError):  # the stream in flight on it is lost
            for _ in stream:
                pass
        channel.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (  # the rest go on, past the time nginx skips the dead replica
                time.monotonic() < killed_at + FAIL_TIMEOUT_S + 1 or len(calls_after(load, killed_at)) < 10):
            time.sleep(0.1)
    victim.proc.wait(timeout=10)
    after = calls_after(load, killed_at)
    failures = load.failures()
    # in flight = on the replica when it died; for a moment after SIGKILL the kernel still holds its sockets, and a
    # call nginx streamed there in that moment is lost with it (nginx cannot resend a gRPC request it has sent)
    assert all(o.started <= killed_at + TEARDOWN_S and o.ended >= killed_at for o in failures), \
        f"only calls in flight fail: {failures} (killed at {killed_at})"
    assert len(failures) <= load.threads
    assert len(after) >= 10 and all(o.code == grpc.StatusCode.OK for o in after)
    cluster.restart(1)
