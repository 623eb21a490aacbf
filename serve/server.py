"""The grpc.aio server: both services on one port, plus health, reflection and Prometheus metrics.

Status codes are mapped here, once: every servicer method raises serve.errors.ServeError subclasses and
the `rpc` decorator turns them into the matching grpc.StatusCode with the error's message.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import generator_pb2, generator_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc
from serve.errors import ServeError

log = logging.getLogger("gen.serve")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(kw_only=True)
class ServerConfig:
    repo: str = "exported"
    host: str = "127.0.0.1"  # loopback unless the operator opens it up
    port: int = 50051  # 0 picks a free port (printed at start)
    device: str = "auto"  # auto | cpu | cuda
    metrics_port: int | None = None  # Prometheus text format on http://host:PORT/metrics
    max_batch_size: int | None = None  # None: each model's manifest default
    max_queue_delay_ms: float | None = None
    max_queue_size: int = 1024  # per graph; beyond it requests get RESOURCE_EXHAUSTED
    allow_repository_control: bool = False  # RepositoryModelLoad/Unload refused unless set
    grace_s: float = 10.0  # on SIGTERM: stop accepting, let in-flight work finish this long
    max_message_bytes: int = MAX_MESSAGE_BYTES


def status_of(error: ServeError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


def rpc(method):
    """Map ServeError to its status code, for unary and server-streaming handlers alike."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except ServeError as e:
                await context.abort(status_of(e), str(e))
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except ServeError as e:
            await context.abort(status_of(e), str(e))
    return unary


class GenServer:
    """Owns the runtime and the grpc.aio server; `start()`, then `wait()` or `stop()`."""

    def __init__(self, config: ServerConfig):
        from serve.runtime import Runtime

        self.config = config
        self.runtime = Runtime(Path(config.repo), device=config.device, max_batch_size=config.max_batch_size,
                               max_queue_delay_ms=config.max_queue_delay_ms, max_queue_size=config.max_queue_size)
        self.server: grpc.aio.Server | None = None
        self.health = health.HealthServicer()
        self.port: int | None = None
        self.metrics = None

    async def start(self) -> int:
        from serve.generator import GeneratorServicer
        from serve.oip import InferenceServicer

        c = self.config
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", c.max_message_bytes),
                                               ("grpc.max_send_message_length", c.max_message_bytes)])
        await self.runtime.start()
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.runtime, allow_repository_control=c.allow_repository_control), self.server)
        generator_pb2_grpc.add_GeneratorServicer_to_server(GeneratorServicer(self.runtime), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        services = (grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
                    generator_pb2.DESCRIPTOR.services_by_name["Generator"].full_name,
                    health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, self.server)
        self.port = self.server.add_insecure_port(f"{c.host}:{c.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {c.host}:{c.port}")
        await self.server.start()
        for name in ("", *services[:2]):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if c.metrics_port is not None:
            from serve.metrics import start_metrics_server

            self.metrics = start_metrics_server(self.runtime, c.host, c.metrics_port)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, finish in-flight RPCs within `grace` seconds, then release the runtime."""
        self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(self.config.grace_s if grace is None else grace)
        await self.runtime.stop()
        if self.metrics is not None:
            self.metrics.shutdown()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def serve_forever(config: ServerConfig, ready=None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully. `ready(port)` is called once listening."""
    server = GenServer(config)
    port = await server.start()
    if ready is not None:
        ready(server, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing in-flight requests (grace %.1f s)", config.grace_s)
    await server.stop()
