"""Hypothesis strategies for the request messages of both services, and one way to send them.

Shared by tests/serve/test_fuzz.py (a few hundred requests in the suite) and bench/fuzz.py (10,000+).
Requests mix valid values (real model names, right shapes, finite floats) with hostile ones (names
that escape, huge and negative numbers, NaN, bytes that are not images, shapes that overflow, bytes
that are not protobuf), so that both the validation paths and the work paths are hit. The OIP
messages are tritonclient's (same field numbers as ours; both cannot load into one interpreter).

`send(channel, call)` returns the status code name ("OK" or the error's) and its details. A Generate
stream is read for two events at most and then cancelled, so a fuzzed 1000-step request costs little.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

import grpc
import numpy as np
from hypothesis import strategies as st
from PIL import Image
from tritonclient.grpc import service_pb2 as oip

from protos import generator_pb2 as pb
from serve.samplers import SAMPLERS

# what a request may get back: anything else (UNKNOWN, INTERNAL, a hang) is a bug
DOCUMENTED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "UNAVAILABLE", "RESOURCE_EXHAUSTED",
              "UNIMPLEMENTED"}
MODELS = ["tiny-gan", "tiny-vae", "tiny-pix2pix", "tiny-cyclegan", "tiny-diffusion"]
GRAPHS = ["tiny-gan.generator", "tiny-vae.encoder", "tiny-vae.decoder", "tiny-pix2pix.generator",
          "tiny-cyclegan.generator_ab", "tiny-diffusion.denoiser"]
BAD_NAMES = ["", "..", "../x", "a/b", "%2e%2e", "/etc/passwd", "tiny-gan\n", "Tiny-Gan", "x" * 300, "tiny-gan/../x",
             "\x00", "nope"]
INPUTS = ["z", "label", "image", "x_t", "t", "t_prev", "guidance", "eta", "noise", "sampler", "source"]
DATATYPES = ["FP32", "INT64", "FP16", "FP64", "INT32", "UINT8", "BOOL", "INT8", "BYTES", "", "fp32", "COMPLEX"]

i32 = st.integers(-(2**31), 2**31 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
small = st.integers(-3, 20)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


def _png(size: int, channels: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(buf, format="PNG")
    return buf.getvalue()


GOOD_IMAGES = [_png(32, 3, 0), _png(32, 1, 1), _png(31, 3, 2), _png(1, 3, 3)]
models = st.one_of(st.sampled_from(MODELS), st.sampled_from(BAD_NAMES), st.text(max_size=20))
graph_names = st.one_of(st.sampled_from(GRAPHS), st.sampled_from(MODELS + BAD_NAMES), st.text(max_size=20))
versions = st.one_of(st.just(0), st.just(1), i64)
images = st.lists(st.one_of(st.sampled_from(GOOD_IMAGES), st.binary(max_size=64),
                            st.sampled_from(GOOD_IMAGES).map(lambda b: b[:len(b) // 2])), max_size=4)
labels = st.lists(st.one_of(st.integers(-1, 11), i32), max_size=4)
seeds = st.one_of(st.none(), st.integers(0, 2**64 - 1))
formats = st.one_of(st.sampled_from([0, 1]), i32)
shapes = st.one_of(st.lists(st.integers(-2, 40), max_size=5), st.lists(i64, max_size=3),
                   st.lists(st.just(1), min_size=9, max_size=70))


@st.composite
def tensors(draw, shape=None) -> pb.Tensor:
    """A gen.v1 Tensor: usually float32 data of the shape's size (finite or not), sometimes of any size."""
    shape = draw(shape if shape is not None else st.one_of(shapes, st.sampled_from(
        [[1, 3, 32, 32], [2, 1, 32, 32], [1, 4], [2, 8], [1, 1, 32, 32]])))
    count = int(np.prod(shape, dtype=object)) if shape and all(0 <= s <= 4096 for s in shape) else 0
    if draw(st.booleans()) and 0 < count <= 4096:
        values = draw(st.one_of(st.just(None), floats))
        data = np.random.default_rng(count).uniform(-1, 1, count).astype("<f4")
        if values is not None:
            data[draw(st.integers(0, count - 1))] = values
        raw = data.tobytes()
    else:
        raw = draw(st.binary(max_size=64))
    return pb.Tensor(shape=shape, dtype=draw(st.sampled_from(["", "float32", "float16", "int64", "x"])), data=raw)


def _with_tensor(draw, req):
    if draw(st.integers(0, 3)) == 0:
        req.tensor.CopyFrom(draw(tensors()))
    return req


def _valid_labels(draw, n: int) -> list[int]:
    return draw(st.sampled_from([[], [draw(st.integers(0, 9))], [i % 10 for i in range(n)]]))


def _mutate(draw, fields: dict, hostile: dict) -> dict:
    """A valid request's fields with one or two replaced by hostile values (or none: a valid request)."""
    if draw(st.integers(0, 2)) == 0:
        return fields
    for key in draw(st.lists(st.sampled_from(sorted(hostile)), min_size=1, max_size=2, unique=True)):
        fields[key] = draw(hostile[key])
    return fields


@st.composite
def generator_calls(draw) -> tuple[str, object]:
    """(method name, request) of gen.v1.Generator: a valid request, then maybe one or two fields mutated."""
    method = draw(st.sampled_from(["ListModels", "Sample", "Translate", "Encode", "Decode", "Generate"]))
    common = {"model": models, "version": versions}
    if method == "ListModels":
        fields = _mutate(draw, {"model": draw(st.sampled_from(["", *MODELS]))}, {"model": models})
        return method, pb.ListModelsRequest(**fields, ready_only=draw(st.booleans()))
    n = draw(st.integers(1, 6))
    if method == "Sample":
        fields = {"model": draw(st.sampled_from(["tiny-gan", "tiny-vae"])), "n": n, "seed": draw(seeds),
                  "labels": _valid_labels(draw, n), "format": draw(st.sampled_from([0, 1]))}
        hostile = {**common, "n": st.one_of(small, i32), "labels": labels, "format": formats}
        return method, pb.SampleRequest(**_mutate(draw, fields, hostile))
    if method == "Translate":
        model = draw(st.sampled_from(["tiny-pix2pix", "tiny-cyclegan"]))
        fields = {"model": model, "images": [GOOD_IMAGES[0]] * n, "format": draw(st.sampled_from([0, 1])),
                  "direction": draw(st.sampled_from(["", "AtoB"] + (["BtoA"] if "cycle" in model else [])))}
        hostile = {**common, "images": images, "format": formats,
                   "direction": st.one_of(st.sampled_from(["BtoA", "atob"]), st.text(max_size=8))}
        return method, _with_tensor(draw, pb.TranslateRequest(**_mutate(draw, fields, hostile)))
    if method == "Encode":
        fields = {"model": "tiny-vae", "images": [GOOD_IMAGES[1]] * n, "labels": _valid_labels(draw, n)}
        hostile = {**common, "images": images, "labels": labels}
        return method, _with_tensor(draw, pb.EncodeRequest(**_mutate(draw, fields, hostile)))
    if method == "Decode":
        z = np.random.default_rng(n).standard_normal((n, 4)).astype("<f4")
        fields = {"model": "tiny-vae", "labels": _valid_labels(draw, n), "format": draw(st.sampled_from([0, 1])),
                  "z": pb.Tensor(shape=[n, 4], dtype="float32", data=z.tobytes())}
        hostile = {**common, "labels": labels, "format": formats, "z": tensors()}
        return method, pb.DecodeRequest(**_mutate(draw, fields, hostile))
    fields = {"model": "tiny-diffusion", "n": n, "seed": draw(seeds), "labels": _valid_labels(draw, n),
              "guidance": draw(st.one_of(st.none(), st.floats(0, 10))),
              "eta": draw(st.one_of(st.none(), st.floats(0, 1))),
              "sampler": draw(st.sampled_from(["", *SAMPLERS])), "steps": draw(st.integers(0, 20)),
              "preview_every": draw(st.integers(0, 3)), "format": draw(st.sampled_from([0, 1]))}
    hostile = {**common, "n": st.one_of(small, i32), "labels": labels, "guidance": floats, "eta": floats,
               "sampler": st.one_of(st.sampled_from(["heun", "DDIM"]), st.text(max_size=8)),
               "steps": st.one_of(st.integers(-2, 1002), i32), "preview_every": st.one_of(small, i32),
               "format": formats, "init_images": images, "strength": floats, "mask_images": images}
    edit = draw(st.integers(0, 3))  # image-to-image (1), inpainting (2), or plain generation
    if edit:
        fields.update(init_images=[GOOD_IMAGES[1]] * draw(st.sampled_from([1, n])),
                      strength=draw(st.floats(0.05, 1.0)))
    if edit == 2:
        fields["mask_images"] = [GOOD_IMAGES[1]]
    req = pb.GenerateRequest(**_mutate(draw, fields, hostile))
    if draw(st.integers(0, 5)) == 0:  # raw init or mask tensors, beside or instead of the files
        getattr(req, draw(st.sampled_from(["init_tensor", "mask_tensor"]))).CopyFrom(draw(tensors()))
    return method, req


DTYPE_OF = {"FP32": "<f4", "INT64": "<i8", "FP16": "<f2", "FP64": "<f8", "INT32": "<i4", "UINT8": "u1", "BOOL": "?",
            "INT8": "i1"}
TYPED = {"FP32": "fp32_contents", "INT64": "int64_contents", "FP64": "fp64_contents", "INT32": "int_contents",
         "UINT8": "uint_contents", "BOOL": "bool_contents", "INT8": "int_contents"}


LATENT = {"tiny-gan.generator": 8, "tiny-vae.decoder": 4}  # the tiny configs' z sizes


@st.composite
def infer_requests(draw) -> oip.ModelInferRequest:
    if draw(st.integers(0, 2)) == 0:  # a valid request (maybe with one raw value replaced)
        name, n = draw(st.sampled_from(sorted(LATENT))), draw(st.integers(1, 8))
        z = np.random.default_rng(n).standard_normal((n, LATENT[name])).astype("<f4")
        if draw(st.booleans()):
            z[0, 0] = draw(floats)
        label = np.array(draw(st.lists(st.integers(0, 9) if draw(st.integers(0, 3)) else i64, min_size=n,
                                       max_size=n)), "<i8")
        req = oip.ModelInferRequest(model_name=name, raw_input_contents=[z.tobytes(), label.tobytes()])
        req.inputs.add(name="z", datatype="FP32", shape=[n, LATENT[name]])
        req.inputs.add(name="label", datatype="INT64", shape=[n])
        return req
    version = draw(st.one_of(st.sampled_from(["", "1", "2", "0", "-1", "²", "1e3"]), st.text(max_size=6)))
    req = oip.ModelInferRequest(model_name=draw(graph_names), model_version=version, id=draw(st.text(max_size=8)))
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 4))):
        name, datatype = draw(st.one_of(st.sampled_from(INPUTS), st.text(max_size=6))), draw(st.sampled_from(DATATYPES))
        shape = draw(st.one_of(shapes, st.sampled_from([[1, 8], [2, 8], [1], [2], [1, 3, 32, 32], [1, 1, 32, 32]])))
        tensor = req.inputs.add(name=name, datatype=datatype, shape=shape)
        count = int(np.prod(shape, dtype=object)) if shape and all(0 <= s <= 4096 for s in shape) else 1
        kind = DTYPE_OF.get(datatype, "<f4")
        if raw:
            if draw(st.booleans()) and count <= 4096:
                values = np.random.default_rng(count).uniform(-2, 12, count)
                if count and draw(st.booleans()):
                    values[0] = draw(st.floats(allow_nan=True, allow_infinity=True))
                with np.errstate(all="ignore"):
                    req.raw_input_contents.append(values.astype(kind).tobytes())
            else:
                req.raw_input_contents.append(draw(st.binary(max_size=64)))
        elif datatype in TYPED and count <= 64:
            field = TYPED[datatype]
            values = draw(st.lists(st.booleans() if datatype == "BOOL" else st.integers(0, 2**31 - 1)
                                   if datatype == "UINT8" else i32 if "INT" in datatype else floats,
                                   min_size=count, max_size=count))
            getattr(tensor.contents, field).extend(values)
    for _ in range(draw(st.integers(0, 2))):
        req.outputs.add(name=draw(st.one_of(st.sampled_from(["image", "mean", "x_prev", "nope"]), st.text(max_size=4))))
    return req


@st.composite
def oip_calls(draw) -> tuple[str, object]:
    """(method name, request) of inference.GRPCInferenceService (repository load/unload left out: they
    would change what the shared test server serves; bench/fuzz.py sends them to a server without control)."""
    method = draw(st.sampled_from(["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
                                   "ModelConfig", "ModelStatistics", "RepositoryIndex", "ModelInfer", "ModelInfer",
                                   "ModelInfer"]))
    name, version = draw(graph_names), draw(st.sampled_from(["", "1", "99", "x", "²", "-1"]))
    if method == "ModelInfer":
        return method, draw(infer_requests())
    request_of = {"ServerLive": oip.ServerLiveRequest, "ServerReady": oip.ServerReadyRequest,
                  "ServerMetadata": oip.ServerMetadataRequest, "RepositoryIndex": oip.RepositoryIndexRequest}
    if method in request_of:
        return method, request_of[method]()
    cls = {"ModelReady": oip.ModelReadyRequest, "ModelMetadata": oip.ModelMetadataRequest,
           "ModelConfig": oip.ModelConfigRequest, "ModelStatistics": oip.ModelStatisticsRequest}[method]
    return method, cls(name=name, version=version)


SERVICES = {"gen": "/gen.v1.Generator/", "oip": "/inference.GRPCInferenceService/"}
STREAMING = {"Generate"}


@dataclass
class Outcome:
    code: str
    details: str


def send(channel: grpc.Channel, service: str, method: str, request, timeout: float = 60,
         metadata=None) -> Outcome:
    """One call with the message serialized as is (or raw bytes); Generate: two events, then cancel."""
    path = SERVICES[service] + method
    payload = request if isinstance(request, bytes) else request.SerializeToString()
    try:
        if method in STREAMING:
            stream = channel.unary_stream(path)(payload, timeout=timeout, metadata=metadata)
            for i, _ in enumerate(stream):
                if i == 1:
                    stream.cancel()
                    break
        else:
            channel.unary_unary(path)(payload, timeout=timeout, metadata=metadata)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.CANCELLED and method in STREAMING:
            return Outcome("OK", "cancelled by the client after two events")
        return Outcome(e.code().name, e.details() or "")
    return Outcome("OK", "")


def garbage() -> st.SearchStrategy[tuple[str, str, bytes]]:
    """Bytes that are rarely a valid message, for any method of either service."""
    methods = [("gen", m) for m in ["Sample", "Translate", "Encode", "Decode", "ListModels", "Generate"]] + \
        [("oip", m) for m in ["ModelInfer", "ModelMetadata", "ModelConfig", "ModelStatistics"]]
    return st.tuples(st.sampled_from(methods), st.binary(min_size=1, max_size=64)).map(lambda t: (*t[0], t[1]))


# --- OIP v2 over REST ----------------------------------------------------------------------------------

# HTTP codes a REST request may get back (serve/rest.py HTTP_STATUS, plus aiohttp's 405 and 413); 500 is a bug
DOCUMENTED_HTTP = {200, 400, 401, 404, 405, 413, 429, 503, 504}
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=4), max_leaves=12)


def _rest_tensors(draw, req: oip.ModelInferRequest) -> tuple[dict, list[bytes]]:
    """A ModelInferRequest as an OIP REST body: JSON `data`, or binary tensor data after the JSON."""
    binary = draw(st.booleans())
    tensors, chunks = [], []
    for i, t in enumerate(req.inputs):
        tensor = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        raw = req.raw_input_contents[i] if i < len(req.raw_input_contents) else None
        if raw is not None and binary:
            tensor["parameters"] = {"binary_data_size": draw(st.sampled_from([len(raw), len(raw), len(raw) + 1]))}
            chunks.append(raw)
        elif raw is not None:
            kind = np.dtype(DTYPE_OF.get(t.datatype, "<f4"))
            tensor["data"] = np.frombuffer(raw[:len(raw) // kind.itemsize * kind.itemsize], kind).tolist()
        else:
            tensor["data"] = list(getattr(t.contents, TYPED.get(t.datatype, "fp32_contents")))
        tensors.append(tensor)
    body = {"inputs": tensors, "id": req.id}
    if req.outputs:
        body["outputs"] = [{"name": o.name, "parameters": {"binary_data": draw(st.booleans())}} for o in req.outputs]
    return body, chunks


@st.composite
def rest_calls(draw) -> tuple[str, str, dict, bytes]:
    """(HTTP method, path, headers, body) of OIP v2 REST requests, valid and hostile (repository load and
    unload left out, as in oip_calls)."""
    from urllib.parse import quote

    name = quote(draw(graph_names), safe="")
    version = draw(st.sampled_from(["", "/versions/1", "/versions/99", "/versions/x", "/versions/%C2%B2"]))
    kind = draw(st.sampled_from(["infer", "infer", "infer", "get", "index", "json", "garbage"]))
    if kind == "get":
        path = draw(st.sampled_from(["/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/stats", "/metrics",
                                     f"/v2/models/{name}{version}", f"/v2/models/{name}{version}/ready",
                                     f"/v2/models/{name}{version}/config", f"/v2/models/{name}{version}/stats",
                                     "/v2/nothing", f"/v2/models/{name}/versions"]))
        return draw(st.sampled_from(["GET", "GET", "GET", "POST", "DELETE"])), path, {}, b""
    if kind == "index":
        body = draw(st.sampled_from([b"", b"{}", b'{"ready": true}', b"[]", b"{"]))
        return "POST", "/v2/repository/index", {}, body
    req = draw(infer_requests())
    path = f"/v2/models/{quote(req.model_name, safe='')}" + (f"/versions/{quote(req.model_version, safe='')}"
                                                             if req.model_version else "") + "/infer"
    if kind == "json":  # any JSON at all
        return "POST", path, {"Content-Type": "application/json"}, json.dumps(draw(json_values)).encode()
    if kind == "garbage":
        return "POST", path, {}, draw(st.binary(max_size=64))
    body, chunks = _rest_tensors(draw, req)
    header = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if chunks:
        length = draw(st.sampled_from([len(header)] * 4 + [len(header) + 5, 0, "x", -1]))
        headers = {"Inference-Header-Content-Length": str(length), "Content-Type": "application/octet-stream"}
    return "POST", path, headers, header + b"".join(chunks)


def send_rest(host_port: str, call: tuple[str, str, dict, bytes], timeout: float = 60) -> Outcome:
    """One REST call; the outcome's code is the HTTP status as text, its details the error body's message."""
    import http.client

    method, path, headers, body = call
    conn = http.client.HTTPConnection(host_port, timeout=timeout)
    try:
        conn.request(method, path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    if resp.status == 200:
        return Outcome("200", "")
    try:
        details = json.loads(data)["error"]
    except (ValueError, KeyError, TypeError):
        details = ""  # an error without the protocol's body: the caller flags it
    return Outcome(str(resp.status), details if isinstance(details, str) else "")
