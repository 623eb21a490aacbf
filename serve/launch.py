"""Run `gen serve` as a child process and wait until it listens: for `make demo`, the tests and bench/.

A separate process is what users run, and it keeps protobuf's `inference` descriptors (ours and
tritonclient's cannot share one interpreter) out of the caller's.
"""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"serving \d+ models .* on [\d.]+:(\d+)")  # the ready line; its other ports:
REST_PORT = re.compile(r"REST on https?://[\d.]+:(\d+)")
METRICS_PORT = re.compile(r"metrics on https?://[\d.]+:(\d+)/metrics")


@dataclass
class RunningServer:
    proc: subprocess.Popen
    port: int
    metrics_port: int | None
    repo: Path
    http_port: int | None = None  # REST (OIP v2 over HTTP, /metrics); None with --no-http
    log: list[str] = field(default_factory=list, repr=False)  # everything it printed, kept up to date

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_target(self) -> str:
        return f"127.0.0.1:{self.http_port}"


def wait_for_line(proc: subprocess.Popen, is_ready, timeout: float) -> tuple[str | None, list[str]]:
    """Read proc's stdout (text) until a line makes is_ready(line) true, the process exits, or `timeout` seconds
    pass, whichever comes first: the deadline holds while the process prints nothing. A reader thread keeps
    draining stdout afterwards (a full pipe would block the process) into the returned list.
    (the ready line or None, everything printed so far and later)."""
    lines: queue.Queue[str | None] = queue.Queue()
    seen: list[str] = []

    def read():
        for line in proc.stdout:
            seen.append(line)
            lines.put(line)
        lines.put(None)  # end of output

    threading.Thread(target=read, name=f"stdout-of-{proc.pid}", daemon=True).start()
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            proc.wait(timeout=5)
            return None, seen
        if is_ready(line):
            return line, seen
    return None, seen


def start_server(repo: str | Path, *args: str, port: int = 0, timeout: float = 120,
                 env: dict | None = None, gen: list[str] | None = None) -> RunningServer:
    """`python -m gen serve --repo REPO --port PORT --http-port 0 ARGS` on 127.0.0.1 (port 0: a free one);
    returns once it is ready.

    ARGS may give --http-port or --no-http instead of the free port; the ports it got are in the result.
    `gen` is the command that runs gen (default: this interpreter's `python -m gen`), e.g. another
    environment's `gen` script.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    http = [] if {"--http-port", "--no-http"} & set(args) else ["--http-port", "0"]
    gen = gen or [sys.executable, "-m", "gen"]
    proc = subprocess.Popen([*gen, "serve", "--repo", str(repo), "--port", str(port), *http, *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line, seen = wait_for_line(proc, READY.search, timeout)
    if line is None:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{''.join(seen)}")
        proc.kill()
        proc.wait()
        raise RuntimeError(f"server did not start in {timeout}s:\n{''.join(seen)}")
    port_of = lambda pattern: int(m.group(1)) if (m := pattern.search(line)) else None  # noqa: E731
    return RunningServer(proc, int(READY.search(line).group(1)), port_of(METRICS_PORT), Path(repo), log=seen,
                         http_port=port_of(REST_PORT))


def stop_server(server: RunningServer, timeout: float = 60) -> int:
    """SIGTERM (graceful: in-flight work finishes), then SIGKILL after `timeout`; the exit status."""
    server.proc.send_signal(signal.SIGTERM)
    try:
        return server.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        return -9
