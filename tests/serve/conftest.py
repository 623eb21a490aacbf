"""A real `gen serve` on 127.0.0.1, port 0, over a copy of the session's tiny repository.

The server always runs in its own process: protobuf cannot hold tritonclient's `inference` descriptors
and ours in one interpreter, and a subprocess is what users run anyway.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"serving \d+ models .* on 127\.0\.0\.1:(\d+)(?:.*metrics on http://[\d.]+:(\d+)/metrics)?")


@dataclass
class RunningServer:
    proc: subprocess.Popen
    port: int
    metrics_port: int | None
    repo: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_server(repo: Path, *args: str, timeout: float = 120) -> RunningServer:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gen", "serve", "--repo", str(repo), "--port", "0", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{''.join(seen)}")
            continue
        seen.append(line)
        match = READY.search(line)
        if match:
            # keep draining the log so the server never blocks on a full pipe
            import threading

            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return RunningServer(proc, int(match.group(1)), int(match.group(2)) if match.group(2) else None, repo)
    proc.kill()
    raise RuntimeError(f"server did not start in {timeout}s:\n{''.join(seen)}")


def stop_server(server: RunningServer) -> int:
    server.proc.send_signal(signal.SIGTERM)
    try:
        return server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        return -9


@pytest.fixture(scope="session")
def served_repo(tiny_repo, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("served") / "exported"
    shutil.copytree(tiny_repo / "exported", repo)
    return repo


@pytest.fixture(scope="session")
def server(served_repo):
    srv = start_server(served_repo, "--metrics-port", "0", "--allow-repository-control",
                       "--max-queue-delay-ms", "20")
    yield srv
    stop_server(srv)
