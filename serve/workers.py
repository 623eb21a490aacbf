"""gen serve --workers N: N server processes on the same ports, so that requests use more than the one core a
Python process's GIL gives them.

The supervisor (the `gen serve` process) reserves the ports, starts N workers (fresh interpreters), each with its
own repository, sessions, batchers and schedulers, listening on the same gRPC and REST ports with SO_REUSEPORT:
the kernel spreads new connections over them (a connection, and every call on it, stays with one worker). It
prints the ready line once every worker is ready. SIGTERM or SIGINT goes to every worker, which drains as a single
server does (in-flight calls finish within --grace); a worker that exits on its own stops the rest, and the
supervisor exits non-zero (an orchestrator restarts the whole). ModelStatistics and /metrics, from whichever
worker answers, add up every worker's counters (serve/peers.py); health is the answering worker's own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable

from serve.server import ServerConfig

log = logging.getLogger("gen.serve")
START_TIMEOUT_S = 600  # a worker loads every model before it is ready


def run_workers(config: ServerConfig, workers: int, ready: Callable[[dict], None]) -> int:
    """Serve with `workers` processes until SIGTERM or SIGINT; `ready(info)` once all are ready: the ports
    ("grpc", "http", "metrics"; None where not served) and the first worker's "device". Returns the exit status."""
    held = []  # the reserved ports stay bound (not listening) until the workers listen on them too
    worker_dir = tempfile.mkdtemp(prefix=f"gen-workers-{os.getpid()}-")  # the workers' ports (serve/peers.py)
    procs: list[multiprocessing.Process] = []
    try:
        ports = {"grpc": _reserve(config.host, config.port, held),
                 "http": _reserve(config.host, config.http_port, held) if config.http_port is not None else None,
                 "metrics": _reserve(config.host, config.metrics_port, held) if config.metrics_port is not None
                 else None}
        shared = dataclasses.replace(config, port=ports["grpc"], http_port=ports["http"],
                                     metrics_port=ports["metrics"], worker_dir=worker_dir)
        stop = _StopSignals()
        context = multiprocessing.get_context("spawn")  # no forked onnxruntime or gRPC state
        pipes = []
        for index in range(workers):
            parent, child = context.Pipe(duplex=False)
            proc = context.Process(target=_worker, args=(shared, index, child), name=f"gen-worker-{index}")
            proc.start()
            child.close()
            procs.append(proc)
            pipes.append(parent)
        device = _wait_ready(procs, pipes, stop)
        if device is None:
            return 1
        for sock in held:
            sock.close()
        held = []
        ready({**ports, "device": device})
        while not stop.requested:
            if any(not p.is_alive() for p in procs):
                dead = [p for p in procs if not p.is_alive()]
                log.error("worker %s exited with %s: stopping the others", dead[0].name, dead[0].exitcode)
                _stop_all(procs, config.grace_s)
                return 1
            stop.wait(0.5)
        log.info("shutting down %d workers: finishing in-flight requests (grace %.1f s)", workers, config.grace_s)
        return 0 if _stop_all(procs, config.drain_delay_s + config.grace_s) else 1
    finally:
        for sock in held:
            sock.close()
        for p in procs:
            if p.is_alive():
                p.kill()
        shutil.rmtree(worker_dir, ignore_errors=True)


def _reserve(host: str, port: int, held: list[socket.socket]) -> int:
    """Bind host:port (0: a free one) with SO_REUSEPORT and hold it, so the workers can share the number and no
    other program takes it in between; OSError when it is taken."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    held.append(sock)
    return sock.getsockname()[1]


def _worker(config: ServerConfig, index: int, conn: multiprocessing.connection.Connection) -> None:
    """One worker: a whole server (serve.server.serve_forever) that reports ready through `conn`."""
    import asyncio
    import sys

    from serve.server import serve_forever

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s[{index}]: %(message)s")
    _follow_parent()

    def ready(server, port):
        conn.send({"device": server.runtime.device})
        conn.close()

    try:
        asyncio.run(serve_forever(config, ready))
    except Exception as e:  # noqa: BLE001 - the supervisor reports one line per worker
        log.error("worker %d: %s", index, e)
        sys.exit(1)


def _follow_parent() -> None:
    """A supervisor killed outright (SIGKILL, the OOM killer) must not leave its workers serving as orphans on its
    ports: the kernel sends this worker SIGTERM when its parent dies (Linux's PR_SET_PDEATHSIG), and it drains as
    on any SIGTERM."""
    import ctypes
    import ctypes.util

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the supervisor's own stop is the only stop
        return
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _wait_ready(procs, pipes, stop: _StopSignals) -> str | None:
    """The first worker's device once every worker said it is ready; None when one exited first, a signal came
    or START_TIMEOUT_S passed."""
    deadline = time.monotonic() + START_TIMEOUT_S
    waiting = dict(zip(pipes, procs))
    devices = {}
    while waiting:
        if stop.requested or time.monotonic() > deadline:
            log.error("workers did not start: %s", "stopped" if stop.requested else f"not ready in {START_TIMEOUT_S} s")
            return None
        for conn in multiprocessing.connection.wait(list(waiting), timeout=0.5):
            proc = waiting.pop(conn)
            try:
                devices[proc.name] = conn.recv()["device"]
            except EOFError:  # it exited before it was ready; it said why on stderr
                proc.join(5)
                log.error("%s exited with %s before it was ready", proc.name, proc.exitcode)
                return None
    return devices[procs[0].name]


def _stop_all(procs: list[multiprocessing.Process], grace_s: float) -> bool:
    """SIGTERM to every worker, then wait for them to drain; True when all exited cleanly in time."""
    for p in procs:
        if p.is_alive():
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
    deadline = time.monotonic() + grace_s + 30  # the drain delay and the grace, then the runtime's own stop
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    return all(p.exitcode == 0 for p in procs)


class _StopSignals:
    """SIGTERM and SIGINT set a flag the supervisor's loop reads."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._set)

    def _set(self, signum, frame) -> None:
        self.requested = True

    def wait(self, seconds: float) -> None:
        time.sleep(seconds)
