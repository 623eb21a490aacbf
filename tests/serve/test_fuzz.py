"""Property-based fuzzing of both services' request messages, and of OIP v2 over REST, against the real server.

Every request, valid or hostile, gets a documented status (never UNKNOWN or INTERNAL) within its
timeout; an error's message names what was wrong; the server stays healthy. bench/fuzz.py runs the
same strategies for 10,000+ requests.
"""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from tritonclient.grpc import service_pb2 as oip

from protos import generator_pb2 as pb
from tests.serve.strategies import (
    DOCUMENTED,
    DOCUMENTED_HTTP,
    garbage,
    generator_calls,
    oip_calls,
    rest_calls,
    send,
    send_rest,
)

FUZZ = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def channel(server):
    ch = grpc.insecure_channel(server.target)
    yield ch
    ch.close()


def _check(outcome, method, request):
    assert outcome.code in DOCUMENTED, f"{method}({request!r:.300}) -> {outcome.code}: {outcome.details}"
    if outcome.code != "OK":
        assert outcome.details.strip(), f"{method} -> {outcome.code} without a message"
    if outcome.code == "INVALID_ARGUMENT":
        assert ":" in outcome.details, f"the message should start with the field: {outcome.details}"


@FUZZ
@given(call=generator_calls())
def test_generator_requests(channel, call):
    method, request = call
    _check(send(channel, "gen", method, request, timeout=60), method, request)


@FUZZ
@given(call=oip_calls())
def test_inference_requests(channel, call):
    method, request = call
    _check(send(channel, "oip", method, request, timeout=60), method, request)


@settings(FUZZ, max_examples=40)
@given(call=garbage())
def test_bytes_that_are_not_messages(channel, call):
    service, method, payload = call
    _check(send(channel, service, method, payload, timeout=60), method, payload)


@FUZZ
@given(call=rest_calls())
def test_rest_requests(server, call):
    outcome = send_rest(server.http_target, call)
    assert int(outcome.code) in DOCUMENTED_HTTP, f"{call!r:.400} -> {outcome.code}: {outcome.details}"
    if outcome.code != "200":
        assert outcome.details.strip(), f"{call!r:.300} -> {outcome.code} without the protocol's error body"


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "%2e%2e", "/etc/passwd", "tiny-gan\n", "tiny-gan/../tiny-vae"])
def test_names_that_could_escape_the_repository_are_refused_by_both_services(channel, name):
    calls = [("gen", "Sample", pb.SampleRequest(model=name, n=1)),
             ("gen", "ListModels", pb.ListModelsRequest(model=name)),
             ("oip", "ModelMetadata", oip.ModelMetadataRequest(name=name)),
             ("oip", "ModelInfer", oip.ModelInferRequest(model_name=name)),
             ("oip", "RepositoryModelLoad", oip.RepositoryModelLoadRequest(model_name=name))]
    for service, method, request in calls:
        outcome = send(channel, service, method, request)
        assert outcome.code == "INVALID_ARGUMENT" and "is not a model name" in outcome.details, (method, outcome)


def test_server_is_healthy_after_fuzzing(channel):
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
