"""A Python client for the gen.v1.Generator task API; the `gen sample|translate|generate|encode` commands use it.

    from serve.client import GenClient
    with GenClient("127.0.0.1:50051") as client:
        images = client.sample("mnist-cgan", n=10, seed=0, labels=range(10))   # uint8 NHWC
        for event in client.generate("mnist-diffusion", n=4, steps=50, labels=[3]):
            ...  # Progress events, then the result

Several replicas: `GenClient("10.0.0.1:50051,10.0.0.2:50051")` or `GenClient("dns:///gen.default.svc:50051")`
(every address the name resolves to, e.g. a headless Kubernetes Service) spreads calls over them one call
at a time (gRPC's round_robin); a Generate stream stays on the replica it started on.
"""
from __future__ import annotations

import io
import ipaddress
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
from PIL import Image

from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc
from serve.images import grid
from serve.wire import tensor_from_pb, tensor_to_pb

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],  # per call over every address, not one pinned connection
    # A call a replica could not take (it was draining or went away before answering) is UNAVAILABLE; the
    # next attempt goes to another replica. Safe: every call of the API can run twice (a seeded call returns
    # the same images, an unseeded one other valid images; loading or unloading twice is loading once).
    # A stream is not retried once its first event has arrived. CANCELLED from the server is retried too: a
    # replica that stops cuts the calls its closing port took but never ran (serve.server.ActiveCalls); a cancel
    # by this client ends the call and is never retried.
    # Five attempts (gRPC's most), backoff up to 0.2, 0.4, 0.8, 1.6 s (each drawn at random below that): with
    # three attempts, one call of 4,631 in the nginx rolling-restart drill failed on a loaded machine (502 from
    # nginx: both upstreams refused within the shorter window).
    "methodConfig": [{"name": [{}], "retryPolicy": {
        "maxAttempts": 5, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]}}],
})


@dataclass
class Images:
    """Images as uint8 NHWC (C = 1 or 3), with what produced them."""

    pixels: np.ndarray
    labels: list[int]
    seed: int
    model: str
    version: int


@dataclass
class ProgressEvent:
    step: int
    total: int
    preview: np.ndarray | None  # uint8 NHWC, when the request asked for previews


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 HWC."""
    arr = np.asarray(Image.open(io.BytesIO(data)))
    return arr[..., None] if arr.ndim == 2 else arr


def load_pixels(data: bytes, height: int, width: int, channels: int) -> np.ndarray:
    """Image bytes -> uint8 HWC at the given size and channel count (for showing inputs beside outputs)."""
    im = Image.open(io.BytesIO(data)).convert("L" if channels == 1 else "RGB").resize((width, height))
    arr = np.asarray(im)
    return arr[..., None] if arr.ndim == 2 else arr


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 HWC (C = 1 or 3) -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buf, format="PNG")
    return buf.getvalue()


def _images_from(resp: pb.ImagesResponse) -> Images:
    if resp.png:
        pixels = np.stack([decode_png(p) for p in resp.png])
    else:
        x = tensor_from_pb(resp.tensor, "tensor")  # NCHW in [-1, 1]
        pixels = np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return Images(pixels, list(resp.labels), resp.seed, resp.model, resp.version)


def _image_bytes(images: Iterable[bytes | np.ndarray]) -> list[bytes]:
    return [im if isinstance(im, (bytes, bytearray)) else encode_png(np.asarray(im, np.uint8)) for im in images]


def channel_target(server: str) -> str:
    """A gRPC target for `server`: HOST:PORT, several comma-separated IP:PORT (one channel over all of them),
    or a gRPC target name as it is (dns:///NAME:PORT, ipv4:..., unix:...). ValueError says what to write."""
    server = server.strip()
    if "," not in server or ":/" in server or server.startswith(("ipv4:", "ipv6:")):
        return server
    parts = [p.strip() for p in server.split(",") if p.strip()]
    families = set()
    for part in parts:
        host, sep, port = part.rpartition(":")
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            raise ValueError(f"{part}: several servers must be IP:PORT each (for a host name that resolves to "
                             "every replica use dns:///NAME:PORT)") from None
        if not (sep and port.isdigit()):
            raise ValueError(f"{part}: give the port, IP:PORT")
        families.add(f"ipv{address.version}")
    if len(families) > 1:
        raise ValueError(f"{server}: use only IPv4 or only IPv6 addresses in one list")
    return f"{families.pop()}:{','.join(parts)}"


class GenClient:
    """Blocking client. `target` is HOST:PORT, several comma-separated IP:PORT or a gRPC target name such as
    dns:///NAME:PORT (calls go round-robin over every address); `token` adds a bearer token;
    `root_certificates` enables TLS."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = None, token: str | None = None,
                 root_certificates: bytes | None = None):
        target = channel_target(target)
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.service_config", SERVICE_CONFIG)]
        if root_certificates is not None:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.stub = pb_grpc.GeneratorStub(self.channel)
        self.timeout = timeout
        self.metadata = [("authorization", f"Bearer {token}")] if token else None

    def __enter__(self) -> GenClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request):
        return method(request, timeout=self.timeout, metadata=self.metadata)

    def list_models(self, model: str = "") -> list[pb.ModelInfo]:
        return list(self._call(self.stub.ListModels, pb.ListModelsRequest(model=model)).models)

    def sample(self, model: str, n: int = 8, seed: int | None = None, labels: Iterable[int] = (),
               version: int = 0) -> Images:
        req = pb.SampleRequest(model=model, version=version, n=n, labels=list(labels), seed=seed)
        return _images_from(self._call(self.stub.Sample, req))

    def translate(self, model: str, images: Iterable[bytes | np.ndarray], direction: str = "",
                  version: int = 0) -> Images:
        req = pb.TranslateRequest(model=model, version=version, images=_image_bytes(images), direction=direction)
        return _images_from(self._call(self.stub.Translate, req))

    def encode(self, model: str, images: Iterable[bytes | np.ndarray], labels: Iterable[int] = (),
               version: int = 0) -> tuple[np.ndarray, np.ndarray]:
        req = pb.EncodeRequest(model=model, version=version, images=_image_bytes(images), labels=list(labels))
        resp = self._call(self.stub.Encode, req)
        return tensor_from_pb(resp.mean, "mean"), tensor_from_pb(resp.logvar, "logvar")

    def decode(self, model: str, z: np.ndarray, labels: Iterable[int] = (), version: int = 0) -> Images:
        req = pb.DecodeRequest(model=model, version=version, z=tensor_to_pb(z), labels=list(labels))
        return _images_from(self._call(self.stub.Decode, req))

    def generate(self, model: str, n: int = 4, seed: int | None = None, labels: Iterable[int] = (),
                 guidance: float | None = None, sampler: str | None = None, steps: int | None = None,
                 eta: float | None = None,
                 preview_every: int = 0, version: int = 0, init: Iterable[bytes | np.ndarray] | None = None,
                 strength: float | None = None,
                 mask: Iterable[bytes | np.ndarray] | None = None) -> Iterator[ProgressEvent | Images]:
        """Streams ProgressEvent per step, then the final Images. Closing the iterator cancels the request.

        Image-to-image: `init`, one image for all or one per image (PNG bytes or uint8 HWC arrays), and `strength`
        in (0, 1]; inpainting: also `mask` (one-channel PNG bytes or uint8 HW arrays, white = regenerate)."""
        req = pb.GenerateRequest(model=model, version=version, n=n, seed=seed, labels=list(labels),
                                 guidance=guidance, sampler=sampler, steps=steps, eta=eta,
                                 preview_every=preview_every, strength=strength,
                                 init_images=_image_bytes(init or []), mask_images=_image_bytes(mask or []))
        stream = self.stub.Generate(req, timeout=self.timeout, metadata=self.metadata)
        try:
            for event in stream:
                if event.HasField("progress"):
                    p = event.progress
                    preview = np.stack([decode_png(b) for b in p.png]) if p.png else None
                    yield ProgressEvent(p.step, p.total, preview)
                else:
                    yield _images_from(event.result)
        finally:
            stream.cancel()  # a no-op once the stream has finished


def save_grid(pixels: np.ndarray, path: str, nrow: int | None = None) -> None:
    """uint8 NHWC -> one PNG grid with a 2-pixel white gutter, `nrow` images per row."""
    out = grid(pixels.transpose(0, 3, 1, 2), nrow, pad_value=255).transpose(1, 2, 0)
    Image.fromarray(out[..., 0] if out.shape[-1] == 1 else out).save(path)
