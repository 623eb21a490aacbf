"""Helpers for tests that run several real `gen serve` replicas on 127.0.0.1 over one small repository.

Statistics are read over OIP with tritonclient's messages: protobuf cannot hold ours and tritonclient's
`inference` descriptors in one interpreter, and other test modules import tritonclient's.
"""
from __future__ import annotations

import shutil
import socket
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from serve.launch import ROOT

UNARY_MODEL = "mnist-cgan"  # shipped models: real weights, fast to load
STREAM_MODEL = "mnist-diffusion"


def small_repo(dest: Path) -> Path:
    """A repository with the two shipped models the balancing tests call."""
    for name in (UNARY_MODEL, STREAM_MODEL):
        shutil.copytree(ROOT / "exported" / name, dest / name)
    return dest


def free_ports(n: int) -> list[int]:
    """n ports free right now (held open together, so they differ), for processes that need a fixed port."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def successes(target: str, model: str) -> int:
    """Successful requests this replica answered for `model` (all its graphs and schedulers), per ModelStatistics."""
    with grpc.insecure_channel(target) as channel:
        stats = oip_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(oip.ModelStatisticsRequest(), timeout=10)
    return sum(s.inference_stats.success.count for s in stats.model_stats
               if s.name == model or s.name.startswith(model + "."))
