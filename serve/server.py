"""The grpc.aio server: both services on one port, plus health, reflection; OIP v2 over REST (serve/rest.py)
and Prometheus metrics (serve/metrics.py) from aiohttp on the same event loop.

Status codes are mapped in serve/status.py (the `rpc` decorator every servicer method wears). Bytes that
do not parse as the method's request message are answered INVALID_ARGUMENT here, by an interceptor
(grpc's own answer would be UNKNOWN).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import generator_pb2, generator_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc
from serve.auth import BearerTokenAuth

log = logging.getLogger("gen.serve")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(kw_only=True)
class ServerConfig:
    repo: str = "exported"
    host: str = "127.0.0.1"  # loopback unless the operator opens it up
    port: int = 50051  # 0 picks a free port (printed at start)
    http_port: int | None = 8000  # OIP v2 over REST (and /metrics), as Triton's; 0 picks one; None: no REST
    device: str = "auto"  # auto | cpu | cuda
    metrics_port: int | None = None  # /metrics also on a port of its own
    max_batch_size: int | None = None  # None: each model's manifest default
    max_queue_delay_ms: float | None = None
    max_queue_size: int = 1024  # per graph; beyond it requests get RESOURCE_EXHAUSTED
    allow_repository_control: bool = False  # RepositoryModelLoad/Unload refused unless set
    grace_s: float = 10.0  # on SIGTERM: stop accepting, let in-flight work finish this long
    drain_delay_s: float = 0.0  # on SIGTERM, first: not ready (health, ServerReady) but serving, this long
    max_message_bytes: int = MAX_MESSAGE_BYTES  # larger requests are refused with RESOURCE_EXHAUSTED
    max_images: int = 256  # images (n, or rows of a tensor) per request
    max_steps: int = 1000  # diffusion steps per Generate request
    threads: int | None = None  # onnxruntime intra-op threads per session; None: the cores this process may use
    spin: bool = True  # idle onnxruntime worker threads spin (fastest when the server has the cores to itself)
    precision: str = "fp32"  # "int8": each graph's int8 variant on the CPU where its manifest has one
    freeze_heap: bool = False  # the server owns its process (gen serve): loads end with runtime.settle_heap()
    worker_dir: str | None = None  # one of gen serve --workers' processes: the ports are shared (SO_REUSEPORT)
    # and each worker's own metrics port is written here, for whichever worker a scrape reaches to add them up
    tls_cert: str | None = None  # PEM files; with both set the port speaks TLS only
    tls_key: str | None = None
    tls_client_ca: str | None = None  # set: clients must present a certificate signed by it (mTLS)
    auth_tokens: list[str] = field(default_factory=list, repr=False)  # non-empty: bearer tokens required


class _Malformed:
    """What the lenient deserializer returns for bytes that are not the request message."""


MALFORMED = _Malformed()
OUR_SERVICES = ("/gen.v1.Generator/", "/inference.GRPCInferenceService/")


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Unparseable request bytes -> INVALID_ARGUMENT naming the method, for our two services."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(OUR_SERVICES):
            return handler
        parse = handler.request_deserializer
        message = f"request: the bytes are not a valid request message of {details.method}"

        def lenient(data: bytes):
            try:
                return parse(data)
            except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
                return MALFORMED

        async def check(request, context):
            if request is MALFORMED:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

        if handler.unary_unary:
            async def unary_unary(request, context):
                await check(request, context)
                return await handler.unary_unary(request, context)
            return handler._replace(request_deserializer=lenient, unary_unary=unary_unary)
        if handler.unary_stream:
            async def unary_stream(request, context):
                await check(request, context)
                async for item in handler.unary_stream(request, context):
                    yield item
            return handler._replace(request_deserializer=lenient, unary_stream=unary_stream)
        if handler.stream_stream:
            async def requests(iterator, context):
                async for request in iterator:
                    await check(request, context)
                    yield request

            async def stream_stream(iterator, context):
                async for item in handler.stream_stream(requests(iterator, context), context):
                    yield item
            return handler._replace(request_deserializer=lenient, stream_stream=stream_stream)
        return handler


class ActiveCalls(grpc.aio.ServerInterceptor):
    """Counts the calls our handlers are running, for shutdown to wait on.

    grpc's own graceful stop also waits for calls it accepted while the port was closing and never handed to
    a handler (seen: about one SIGTERM in ten under load left a call hanging until its deadline, and the
    server with it); without a deadline they would hold the server for the whole grace, then end CANCELLED.
    Waiting for the calls that really run, then cutting the rest, ends a drain when its work does.
    """

    def __init__(self):
        self.running = 0
        self.last_change = time.monotonic()

    def _count(self, delta: int) -> None:
        self.running += delta
        self.last_change = time.monotonic()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.stream_unary or not details.method.startswith(OUR_SERVICES):
            return handler  # our services have no client-streaming method
        if handler.unary_unary:
            behavior = handler.unary_unary

            async def unary_unary(request, context):
                self._count(1)
                try:
                    return await behavior(request, context)
                finally:
                    self._count(-1)
            return handler._replace(unary_unary=unary_unary)
        kind = "unary_stream" if handler.unary_stream else "stream_stream"
        behavior = getattr(handler, kind)

        async def streaming(request_or_iterator, context):
            self._count(1)
            try:
                async for item in behavior(request_or_iterator, context):
                    yield item
            finally:
                self._count(-1)
        return handler._replace(**{kind: streaming})

    async def drained(self, timeout: float, settle: float = 0.2) -> bool:
        """Wait until no call has run for `settle` seconds (calls grpc handed over just before closing have
        reached a handler by then); False if `timeout` came first."""
        deadline = time.monotonic() + timeout
        while self.running or time.monotonic() - self.last_change < settle:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True


def tls_credentials(c: ServerConfig) -> grpc.ServerCredentials | None:
    """grpc.ssl_server_credentials from the PEM files, or None without TLS; ValueError names the flag."""
    if not (c.tls_cert or c.tls_key):
        if c.tls_client_ca:
            raise ValueError("--tls-client-ca: needs --tls-cert and --tls-key (mTLS runs over TLS)")
        return None
    if not (c.tls_cert and c.tls_key):
        raise ValueError("--tls-cert and --tls-key: give both, the certificate chain and its private key")

    def read(flag: str, path: str) -> bytes:
        try:
            data = open(path, "rb").read()
        except OSError as e:
            raise ValueError(f"{flag} {path}: cannot read it ({e.strerror})") from None
        if b"-----BEGIN" not in data:
            raise ValueError(f"{flag} {path}: not a PEM file")
        return data

    key, cert = read("--tls-key", c.tls_key), read("--tls-cert", c.tls_cert)
    ca = read("--tls-client-ca", c.tls_client_ca) if c.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def tls_context(c: ServerConfig) -> ssl.SSLContext | None:
    """The same certificate, key and client CA as gRPC's, for the HTTP ports (tls_credentials checked them)."""
    if not c.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(c.tls_cert, c.tls_key)
    if c.tls_client_ca:
        context.load_verify_locations(c.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def _listen(app, host: str, port: int, context: ssl.SSLContext | None, grace_s: float,
                  reuse_port: bool = False):
    """Start an aiohttp app on host:port (reuse_port: shared with the other workers); (runner, the port it got).
    runner.cleanup() lets in-flight requests finish for up to grace_s."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=grace_s)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=context, reuse_address=True, reuse_port=reuse_port).start()
    return runner, runner.addresses[0][1]


class GenServer:
    """Owns the runtime and the grpc.aio server; `start()`, then `wait()` or `stop()`."""

    def __init__(self, config: ServerConfig):
        from serve.runtime import Runtime

        self.config = config
        self.runtime = Runtime(Path(config.repo), device=config.device, max_batch_size=config.max_batch_size,
                               max_queue_delay_ms=config.max_queue_delay_ms, max_queue_size=config.max_queue_size,
                               max_n=config.max_images, max_steps=config.max_steps, threads=config.threads,
                               spin=config.spin, freeze_heap=config.freeze_heap, int8=config.precision == "int8")
        self.server: grpc.aio.Server | None = None
        # the asyncio servicer: the thread-based one's Watch blocks a thread for ever, and a client that watches
        # health (gRPC client-side health checking) then kept gen serve from exiting on SIGTERM
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self._http_runners = []
        self.active = ActiveCalls()
        self._services: tuple[str, ...] = ()  # the services health reports on (set by start)

    async def start(self) -> int:
        from serve.generator import GeneratorServicer
        from serve.oip import InferenceServicer
        from serve.runtime import settle_heap

        c = self.config
        credentials = tls_credentials(c)
        interceptors = [BearerTokenAuth(c.auth_tokens)] if c.auth_tokens else []
        self.server = grpc.aio.server(interceptors=[*interceptors, MalformedRequests(), self.active],
                                      options=[("grpc.max_receive_message_length", c.max_message_bytes),
                                               ("grpc.max_send_message_length", c.max_message_bytes),
                                               # shared only among workers: a second server on a taken port
                                               # is an error, not a silent split of the traffic
                                               ("grpc.so_reuseport", int(c.worker_dir is not None))])
        await self.runtime.start()
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.runtime, allow_repository_control=c.allow_repository_control), self.server)
        generator_pb2_grpc.add_GeneratorServicer_to_server(GeneratorServicer(self.runtime), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        services = (grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
                    generator_pb2.DESCRIPTOR.services_by_name["Generator"].full_name,
                    health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, self.server)
        address = f"{c.host}:{c.port}"
        try:
            self.port = self.server.add_secure_port(address, credentials) if credentials else \
                self.server.add_insecure_port(address)
        except RuntimeError:  # grpc's "Failed to bind": the port is taken or the address is not this machine's
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {c.host}:{c.port}: the port is in use or the address is not this "
                          "machine's")
        await self.server.start()
        await self._start_http()
        if c.freeze_heap:  # what start() imported and built lives as long as the server, as the models do
            settle_heap()
        self._services = services[:2]
        for name in ("", *self._services):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def _start_http(self) -> None:
        """REST on http_port and /metrics on metrics_port: the same auth and TLS as the gRPC port."""
        from serve.metrics import MetricsEndpoint
        from serve.peers import Peers, own_app
        from serve.rest import make_app, metrics_app

        c = self.config
        context = tls_context(c)
        shared = c.worker_dir is not None
        if shared:  # this worker's own counters, for the others to add up: loopback, plain HTTP
            self.runtime.peers = Peers(Path(c.worker_dir))
        metrics = MetricsEndpoint(self.runtime, self.runtime.peers)
        if shared:
            runner, own = await _listen(own_app(self.runtime, metrics.process), "127.0.0.1", 0, None, c.grace_s)
            self._http_runners.append(runner)
            self.runtime.peers.publish(own)
        if c.http_port is not None:
            app = make_app(self.runtime, tokens=c.auth_tokens, max_bytes=c.max_message_bytes,
                           allow_repository_control=c.allow_repository_control, metrics=metrics)
            runner, self.http_port = await _listen(app, c.host, c.http_port, context, c.grace_s, shared)
            self._http_runners.append(runner)
        if c.metrics_port is not None:
            app = metrics_app(metrics, tokens=c.auth_tokens)
            runner, self.metrics_port = await _listen(app, c.host, c.metrics_port, context, c.grace_s, shared)
            self._http_runners.append(runner)

    async def lame_duck(self, seconds: float) -> None:
        """Report not ready (gRPC health NOT_SERVING, ServerReady and /v2/health/ready false) while serving every
        call as before, for `seconds`: the time a balancer that follows readiness (a Kubernetes Service, a gRPC
        client with health checking) takes to send new calls elsewhere before the port closes."""
        self.runtime.draining = True
        for name in ("", *self._services):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("not ready: serving %.1f s more before the drain (--drain-delay)", seconds)
        await asyncio.sleep(seconds)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, finish in-flight calls within `grace` seconds (REST: within config.grace_s), then
        release the runtime."""
        grace = self.config.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        # REST and gRPC drain together: stop listening, let in-flight requests finish within the grace
        rest = asyncio.gather(*(r.cleanup() for r in self._http_runners))
        if self.server is not None:
            self.active.last_change = time.monotonic()  # count the settle time from the start of the stop
            stopping = asyncio.create_task(self.server.stop(grace))  # closes the port; running calls go on
            await self.active.drained(grace)
            await self.server.stop(0)  # what is left never reached a handler (or outlived the grace)
            await stopping
        await rest
        await self.runtime.stop()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def serve_forever(config: ServerConfig, ready=None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully. `ready(server, port)` is called once listening."""
    server = GenServer(config)
    port = await server.start()
    if ready is not None:
        ready(server, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if config.drain_delay_s > 0:
        await server.lame_duck(config.drain_delay_s)
    log.info("shutting down: finishing in-flight requests (grace %.1f s)", config.grace_s)
    await server.stop()
