"""inference over HTTP/REST: the KServe Open Inference Protocol v2 REST data plane, with Triton's extensions
(binary tensor data, model configuration, statistics, model repository) that tritonclient.http and
perf_analyzer use. Served by aiohttp on the same asyncio loop, Runtime, batchers and limits as gRPC.

Translation only, like serve/oip.py (whose builders it shares): JSON and binary tensor data <-> numpy, then
the Runtime does the work. ServeError codes map to HTTP status codes here, once (HTTP_STATUS); every error
answer has the protocol's body, {"error": "<message>"}.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time

import numpy as np
from aiohttp import web

from serve.auth import EXEMPT_HTTP_PREFIXES, UNAUTHENTICATED_MESSAGE, token_allowed
from serve.errors import InvalidArgument, ServeError
from serve.oip import (
    check_control,
    model_config,
    model_metadata,
    model_statistics,
    parse_version,
    repository_index,
    server_metadata,
)
from serve.wire import NUMPY_OF_OIP, OIP_DATATYPES, check_datatypes, check_shape, typed_array

log = logging.getLogger("gen.serve")
# ServeError.code (a grpc.StatusCode name) -> HTTP, as google.rpc.Code documents the pairs
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404,
               "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503,
               "DEADLINE_EXCEEDED": 504}
HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary data extension
MAX_ERROR_CHARS = 1024


def error_response(status: int, message: str, headers: dict | None = None) -> web.Response:
    brief = message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS - 16] + " ... (truncated)"
    return web.json_response({"error": brief}, status=status, headers=headers)


@web.middleware
async def error_bodies(request: web.Request, handler) -> web.StreamResponse:
    """ServeError -> its HTTP code; aiohttp's own errors (no route, body too large) get the same JSON body."""
    try:
        return await handler(request)
    except ServeError as e:
        return error_response(HTTP_STATUS.get(e.code, 500), e.message)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        reason = {404: f"{request.path}: no such endpoint of the OIP v2 REST API",
                  405: f"{request.method} {request.path}: method not allowed",
                  413: f"body: larger than the server's limit ({request.app['max_bytes']} bytes; "
                       "gen serve --max-message-mb)"}.get(e.status, e.text or e.reason)
        return error_response(e.status, reason)
    except Exception as e:  # noqa: BLE001 - a bug: logged with its traceback, answered 500, the server goes on
        log.error("%s %s failed unexpectedly", request.method, request.path, exc_info=e)
        return error_response(500, f"internal error: {type(e).__name__}: {e}")


def bearer_auth(tokens: list[str]):
    """Every path but /v2/health/* needs 'Authorization: Bearer <token>' (as gRPC exempts grpc.health.v1)."""
    encoded = [t.encode() for t in tokens]

    @web.middleware
    async def auth(request: web.Request, handler) -> web.StreamResponse:
        if request.path.startswith(EXEMPT_HTTP_PREFIXES) or token_allowed(request.headers.get("Authorization"),
                                                                          encoded):
            return await handler(request)
        return error_response(401, UNAUTHENTICATED_MESSAGE, {"WWW-Authenticate": 'Bearer realm="gen"'})
    return auth


def json_of(message) -> dict:
    """A protobuf message as Triton's REST JSON: .proto field names, 64-bit integers as numbers (json_format
    would quote them), enums by name, unset sub-messages left out."""
    out = {}
    for f in message.DESCRIPTOR.fields:
        value = getattr(message, f.name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            value_field = f.message_type.fields_by_name["value"]
            out[f.name] = {k: _json_value(value_field, v) for k, v in value.items()}
        elif f.label == f.LABEL_REPEATED:
            out[f.name] = [_json_value(f, v) for v in value]
        elif (f.message_type is None and f.containing_oneof is None) or message.HasField(f.name):
            out[f.name] = _json_value(f, value)
    return out


def _json_value(f, value):
    if f.type == f.TYPE_MESSAGE:
        return json_of(value)
    if f.type == f.TYPE_ENUM:
        return f.enum_type.values_by_number[value].name
    if f.type == f.TYPE_BYTES:
        return value.decode("latin-1")
    return value


def _json_body(data: bytes, what: str):
    try:
        return json.loads(data) if data.strip() else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"{what}: not valid JSON ({e})") from None


def _dict(value, field: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field}: expected a JSON object, got {type(value).__name__}")
    return value


def request_arrays(doc: dict, binary: memoryview) -> dict[str, np.ndarray]:
    """The inputs of an infer request body as numpy arrays, from JSON `data` or binary tensor data."""
    tensors = doc.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise InvalidArgument("inputs: expected a non-empty list of tensors")
    arrays, offset = {}, 0
    for i, tensor in enumerate(tensors):
        tensor = _dict(tensor, f"inputs[{i}]")
        name = tensor.get("name")
        field = f"inputs[{i}] ({name})"
        if not isinstance(name, str):
            raise InvalidArgument(f"inputs[{i}].name: expected a string, got {name!r}"[:200])
        datatype = tensor.get("datatype")
        if datatype not in NUMPY_OF_OIP:
            raise InvalidArgument(f"{field}.datatype: {datatype!r} is not supported; use one of "
                                  f"{', '.join(NUMPY_OF_OIP)}"[:300])
        dtype = NUMPY_OF_OIP[datatype]
        dims = tensor.get("shape")
        if not isinstance(dims, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
            raise InvalidArgument(f"{field}.shape: expected a list of integers")
        shape, count = check_shape(dims, field)
        size = _dict(tensor.get("parameters", {}), f"{field}.parameters").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size != count * dtype.itemsize:
                raise InvalidArgument(f"{field}.parameters.binary_data_size: {size!r} bytes, but shape "
                                      f"{list(shape)} of {datatype} needs {count * dtype.itemsize}")
            if offset + size > len(binary):
                raise InvalidArgument(f"{field}: the body holds {len(binary) - offset} more bytes of binary data, "
                                      f"binary_data_size says {size}")
            array = np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(shape)
            offset += size
        else:
            if "data" not in tensor:
                raise InvalidArgument(f"{field}.data: missing (give data, or binary data with binary_data_size)")
            try:
                array = typed_array(tensor["data"], dtype, field).reshape(-1)
            except (ValueError, TypeError, OverflowError) as e:
                raise InvalidArgument(f"{field}.data: not a list of {datatype} numbers ({e})"[:300]) from None
            if array.size != count:
                raise InvalidArgument(f"{field}.data: {array.size} values, shape {list(shape)} needs {count}")
            array = array.reshape(shape)
        if name in arrays:
            raise InvalidArgument(f"{field}.name: input {name!r} given twice")
        arrays[name] = array
    if offset != len(binary):
        raise InvalidArgument(f"body: {len(binary) - offset} bytes of binary data that no input claims")
    return arrays


def _wanted_outputs(doc: dict, outputs: dict[str, np.ndarray], model: str) -> list[tuple[str, bool]]:
    """(name, binary?) of each output to send back: those asked for, else all."""
    binary_default = bool(_dict(doc.get("parameters", {}), "parameters").get("binary_data_output", False))
    asked = doc.get("outputs")
    if asked is None:
        return [(name, binary_default) for name in outputs]
    if not isinstance(asked, list):
        raise InvalidArgument("outputs: expected a list of {\"name\": ...} objects")
    wanted = []
    for i, o in enumerate(asked):
        o = _dict(o, f"outputs[{i}]")
        name = o.get("name")
        if name not in outputs:
            raise InvalidArgument(f"outputs[{i}].name: {name!r} is not an output of {model}; it has "
                                  f"{', '.join(outputs)}"[:300])
        binary = _dict(o.get("parameters", {}), f"outputs[{i}].parameters").get("binary_data", binary_default)
        wanted.append((name, bool(binary)))
    return wanted


def infer_response(model: str, version: int, doc: dict, outputs: dict[str, np.ndarray]) -> web.Response:
    """JSON, or JSON then binary tensor data (with Inference-Header-Content-Length) when an output asks."""
    tensors, chunks = [], []
    for name, binary in _wanted_outputs(doc, outputs, model):
        array = np.ascontiguousarray(outputs[name])
        tensor = {"name": name, "datatype": OIP_DATATYPES[array.dtype.name], "shape": list(array.shape)}
        if binary:
            chunk = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            tensor["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            tensor["data"] = array.ravel().tolist()
        tensors.append(tensor)
    body = {"model_name": model, "model_version": str(version), "outputs": tensors}
    if doc.get("id"):
        body["id"] = doc["id"]
    header = json.dumps(body).encode()
    if not chunks:
        return web.Response(body=header, content_type="application/json")
    return web.Response(body=b"".join([header, *chunks]), content_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(len(header))})


def _deadline(doc: dict) -> float | None:
    """Triton's `timeout` request parameter (microseconds) as an absolute time.monotonic() deadline."""
    timeout = _dict(doc.get("parameters", {}), "parameters").get("timeout")
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not math.isfinite(timeout) or timeout <= 0:
        raise InvalidArgument(f"parameters.timeout: {timeout!r} is not a positive number of microseconds"[:200])
    return time.monotonic() + timeout / 1e6


def _json(data, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(data).encode(), status=status, content_type="application/json")


class RestHandlers:
    """One method per OIP v2 REST endpoint; `routes()` lists them (each model path with and without a version)."""

    def __init__(self, runtime, allow_repository_control: bool = False):
        self.runtime = runtime
        self.allow_repository_control = allow_repository_control

    def routes(self) -> list[web.RouteDef]:
        model_paths = ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")
        out = [web.get("/v2/health/live", self.live), web.get("/v2/health/ready", self.ready),
               web.get("/v2", self.server_metadata), web.get("/v2/models/stats", self.statistics),
               web.post("/v2/repository/index", self.repository_index),
               web.post("/v2/repository/models/{name}/load", self.load),
               web.post("/v2/repository/models/{name}/unload", self.unload)]
        for path in model_paths:
            out += [web.get(path, self.model_metadata), web.get(path + "/ready", self.model_ready),
                    web.get(path + "/config", self.model_config), web.get(path + "/stats", self.statistics),
                    web.post(path + "/infer", self.infer)]
        return out

    async def live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.runtime.ready  # the protocol: 200 when ready, a 4xx code when not
        return _json({"ready": ready}, 200 if ready else 400)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json(json_of(server_metadata()))

    async def model_metadata(self, request: web.Request) -> web.Response:
        return _json(json_of(model_metadata(self.runtime, *_model(request))))

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        try:
            self.runtime.graph(name, parse_version(version))
        except ServeError as e:
            if e.code == "NOT_FOUND":
                raise
            return _json({"name": name, "ready": False, "error": e.message}, 400)
        return _json({"name": name, "ready": True})

    async def model_config(self, request: web.Request) -> web.Response:
        return _json(json_of(model_config(self.runtime, *_model(request))))

    async def statistics(self, request: web.Request) -> web.Response:
        # off the event loop: with --workers it asks the other workers for their counters
        return _json(json_of(await asyncio.to_thread(model_statistics, self.runtime,
                                                     request.match_info.get("name", ""),
                                                     request.match_info.get("version", ""))))

    async def repository_index(self, request: web.Request) -> web.Response:
        doc = _dict(_json_body(await request.read(), "body"), "body")
        return _json([json_of(m) for m in repository_index(self.runtime, bool(doc.get("ready", False)))])

    async def load(self, request: web.Request) -> web.Response:
        check_control(self.allow_repository_control, "repository load")
        await self.runtime.load(request.match_info["name"])
        return _json({})

    async def unload(self, request: web.Request) -> web.Response:
        check_control(self.allow_repository_control, "repository unload")
        await self.runtime.unload(request.match_info["name"])
        return _json({})

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        body = await request.read()
        doc, binary = _split(body, request.headers.get(HEADER_LENGTH))
        handle = self.runtime.graph(name, parse_version(version))
        arrays = request_arrays(doc, binary)
        check_datatypes(arrays, handle.info.inputs)
        outputs = await self.runtime.infer(name, arrays, handle.version, deadline=_deadline(doc))
        return infer_response(name, handle.version, doc, outputs)


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info["name"], request.match_info.get("version", "")


def _split(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """The JSON header and the binary tensor data after it (Triton's binary data extension)."""
    if header_length is None:
        return _dict(_json_body(body, "body"), "body"), memoryview(b"")
    if not header_length.isascii() or not header_length.isdigit() or int(header_length) > len(body):
        raise InvalidArgument(f"{HEADER_LENGTH}: {header_length[:40]!r} is not a length within the "
                              f"{len(body)}-byte body")
    n = int(header_length)
    return _dict(_json_body(body[:n], "body"), "body"), memoryview(body)[n:]


def _middlewares(tokens: list[str]) -> list:
    return [error_bodies] + ([bearer_auth(tokens)] if tokens else [])


def make_app(runtime, *, tokens: list[str], max_bytes: int, allow_repository_control: bool,
             metrics=None) -> web.Application:
    """The REST application; `metrics` (serve.metrics.MetricsEndpoint) adds GET /metrics behind the same auth."""
    app = web.Application(middlewares=_middlewares(tokens), client_max_size=max_bytes)
    app["max_bytes"] = max_bytes
    app.add_routes(RestHandlers(runtime, allow_repository_control).routes())
    if metrics is not None:
        app.add_routes([web.get("/metrics", metrics.handle)])
    return app


def metrics_app(metrics, *, tokens: list[str]) -> web.Application:
    """GET /metrics alone (gen serve --metrics-port), behind the same auth as the REST port."""
    app = web.Application(middlewares=_middlewares(tokens), client_max_size=1024 ** 2)  # GETs only
    app["max_bytes"] = 1024 ** 2
    app.add_routes([web.get("/metrics", metrics.handle)])
    return app
