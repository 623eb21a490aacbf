"""Run `gen serve` as a child process and wait until it listens: for `make demo`, the tests and bench/.

A separate process is what users run, and it keeps protobuf's `inference` descriptors (ours and
tritonclient's cannot share one interpreter) out of the caller's.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"serving \d+ models .* on [\d.]+:(\d+)(?:.*metrics on http://[\d.]+:(\d+)/metrics)?")


@dataclass
class RunningServer:
    proc: subprocess.Popen
    port: int
    metrics_port: int | None
    repo: Path
    log: list[str] = field(default_factory=list, repr=False)  # everything it printed, kept up to date

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_server(repo: str | Path, *args: str, port: int = 0, timeout: float = 120,
                 env: dict | None = None) -> RunningServer:
    """`python -m gen serve --repo REPO --port PORT ARGS` on 127.0.0.1 (port 0: a free one); returns once ready."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "gen", "serve", "--repo", str(repo), "--port", str(port), *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    seen: list[str] = []
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
            threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True).start()
            return RunningServer(proc, int(match.group(1)), int(match.group(2)) if match.group(2) else None,
                                 Path(repo), seen)
    proc.kill()
    raise RuntimeError(f"server did not start in {timeout}s:\n{''.join(seen)}")


def stop_server(server: RunningServer, timeout: float = 60) -> int:
    """SIGTERM (graceful: in-flight work finishes), then SIGKILL after `timeout`; the exit status."""
    server.proc.send_signal(signal.SIGTERM)
    try:
        return server.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        return -9
