"""A real `gen serve` on 127.0.0.1, port 0, over a copy of the session's tiny repository.

The server always runs in its own process: protobuf cannot hold tritonclient's `inference` descriptors
and ours in one interpreter, and a subprocess is what users run anyway.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from serve.launch import READY, ROOT, RunningServer, start_server, stop_server  # noqa: F401 - used by tests


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
