"""The Kubernetes way of draining, without Kubernetes: replicas started with --drain-delay turn NOT_SERVING on
SIGTERM and go on serving; a client that follows readiness (gRPC's client-side health checking over every
replica's address, round robin, no retries) moves away before the port closes, so a rolling restart under its
load loses no call. (It also guards the health Watch: a replica that a watching client kept from exiting on
SIGTERM would fail the restart's wait.)
"""
from __future__ import annotations

import json
import signal
import threading
import time

import grpc

from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc
from serve.launch import start_server, stop_server
from tests.replicas import UNARY_MODEL, free_ports, small_repo

NO_RETRIES = ("grpc.enable_retries", 0)


def rolling_restart_under_load(repo, drain_delay: str, health_checking: bool, rounds: int = 1) -> dict:
    ports = free_ports(3)

    def start(port):
        return start_server(repo, "--no-http", "--grace", "30", "--drain-delay", drain_delay, port=port)

    replicas = [start(p) for p in ports]
    config = {"loadBalancingConfig": [{"round_robin": {}}]}
    if health_checking:
        config["healthCheckConfig"] = {"serviceName": ""}  # follow grpc.health.v1 Watch
    target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
    outcomes: dict[str, int] = {}
    stop = threading.Event()

    def load(channel):
        stub, seed = pb_grpc.GeneratorStub(channel), 0
        while not stop.is_set():
            seed += 1
            try:
                stub.Sample(pb.SampleRequest(model=UNARY_MODEL, n=1, seed=seed), timeout=30)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            outcomes[code] = outcomes.get(code, 0) + 1

    channel = grpc.insecure_channel(target, [("grpc.service_config", json.dumps(config)), NO_RETRIES])
    threads = [threading.Thread(target=load, args=(channel,)) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        time.sleep(1)
        for _ in range(rounds):
            for i, port in enumerate(ports):
                replicas[i].proc.send_signal(signal.SIGTERM)
                assert replicas[i].proc.wait(timeout=120) == 0
                replicas[i] = start(port)
                time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        channel.close()
        for r in replicas:
            if r.proc.poll() is None:
                stop_server(r, timeout=30)
    return outcomes


def test_readiness_first_then_drain_loses_no_call(tmp_path):
    repo = small_repo(tmp_path / "exported")
    outcomes = rolling_restart_under_load(repo, drain_delay="1", health_checking=True, rounds=2)
    assert set(outcomes) == {"OK"} and outcomes["OK"] > 100, outcomes
