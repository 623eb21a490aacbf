"""gen.v1.Generator: the task API. Each method converts the request, awaits the runtime, converts back."""
from __future__ import annotations

import numpy as np

from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc
from serve.errors import InvalidArgument
from serve.images import decode_for, decode_images, encode_pngs
from serve.status import deadline_of, rpc
from serve.wire import tensor_from_pb, tensor_to_pb


def _optional(request, field: str):
    return getattr(request, field) if request.HasField(field) else None


def _images_in(request, manifest, max_images: int, field: str = "images") -> np.ndarray:
    """PNG/JPEG bytes or a raw tensor -> float32 NCHW in the model's range."""
    blobs = list(getattr(request, field))
    if len(blobs) > max_images:  # before decoding any of them
        raise InvalidArgument(f"{field}: at most {max_images} images per request, got {len(blobs)}")
    if blobs and request.HasField("tensor"):
        raise InvalidArgument(f"{field}: give either {field} or tensor, not both")
    if request.HasField("tensor"):
        return tensor_from_pb(request.tensor, "tensor")
    if not blobs:
        raise InvalidArgument(f"{field}: no images given")
    return decode_for(manifest, blobs)


def _known_in(request, runtime) -> dict:
    """Generate's image-to-image and inpainting fields as the runtime takes them (float32 NCHW): init images in the
    model's range, masks 1 = regenerate."""
    out, manifest = {}, None
    fields = {"init": ("init_images", "init_tensor"), "mask": ("mask_images", "mask_tensor")}
    for key, (blobs_field, tensor_field) in fields.items():
        blobs = list(getattr(request, blobs_field))
        if blobs and request.HasField(tensor_field):
            raise InvalidArgument(f"{blobs_field}: give either {blobs_field} or {tensor_field}, not both")
        if len(blobs) > runtime.max_n:  # before decoding any of them
            raise InvalidArgument(f"{blobs_field}: at most {runtime.max_n} images per request, got {len(blobs)}")
        if request.HasField(tensor_field):
            out[key] = tensor_from_pb(getattr(request, tensor_field), tensor_field)
        elif blobs:
            manifest = manifest or runtime.manifest(request.model, _version(request))
            if key == "mask":  # one channel, white = regenerate
                image = manifest.image
                pixels = decode_images(blobs, 1, image["height"], image["width"], (0.0, 1.0), field=blobs_field)
                out[key] = (pixels >= 0.5).astype(np.float32)
            else:
                out[key] = decode_for(manifest, blobs, field=blobs_field)
    if request.HasField("strength"):
        out["strength"] = request.strength
    return out


def _images_out(result, fmt: int, model: str) -> pb.ImagesResponse:
    resp = pb.ImagesResponse(model=model, version=result.version, labels=[int(v) for v in result.labels],
                             seed=result.seed or 0)
    if fmt == pb.RAW:
        resp.tensor.CopyFrom(tensor_to_pb(result.images))
    else:
        resp.png.extend(encode_pngs(result.images))
    return resp


def _format(request) -> int:
    if request.format not in (pb.PNG, pb.RAW):
        raise InvalidArgument(f"format: {request.format} is not PNG (0) or RAW (1)")
    return request.format


def _n(request) -> int:
    """The proto's rule: n = 0 means len(labels) when more than one label is given, else 1."""
    return request.n or (len(request.labels) if len(request.labels) > 1 else 1)


def _version(request) -> int | None:
    if request.version < 0:
        raise InvalidArgument(f"version: {request.version} is negative; 0 means the latest")
    return request.version or None


class GeneratorServicer(pb_grpc.GeneratorServicer):
    def __init__(self, runtime):
        self.runtime = runtime

    @rpc
    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[pb.ModelInfo(**info) for info in self.runtime.models(request.model)
                                             if not request.ready_only or info["state"] == "READY"])

    @rpc
    async def Sample(self, request, context):
        fmt = _format(request)
        result = await self.runtime.sample(request.model, _n(request), seed=_optional(request, "seed"),
                                           labels=list(request.labels) or None, version=_version(request),
                                           deadline=deadline_of(context))
        return _images_out(result, fmt, request.model)

    @rpc
    async def Translate(self, request, context):
        fmt = _format(request)
        manifest = self.runtime.manifest(request.model, _version(request))
        images = _images_in(request, manifest, self.runtime.max_n)
        result = await self.runtime.translate(request.model, images, direction=request.direction or "AtoB",
                                              version=manifest.version, deadline=deadline_of(context))
        return _images_out(result, fmt, request.model)

    @rpc
    async def Encode(self, request, context):
        manifest = self.runtime.manifest(request.model, _version(request))
        images = _images_in(request, manifest, self.runtime.max_n)
        result = await self.runtime.encode(request.model, images, labels=list(request.labels) or None,
                                           version=manifest.version, deadline=deadline_of(context))
        return pb.EncodeResponse(model=request.model, version=result.version, mean=tensor_to_pb(result.mean),
                                 logvar=tensor_to_pb(result.logvar), labels=[int(v) for v in result.labels])

    @rpc
    async def Decode(self, request, context):
        fmt = _format(request)
        if not request.HasField("z"):
            raise InvalidArgument("z: missing; give the latent codes as a float32 tensor [n, latent_size]")
        z = tensor_from_pb(request.z, "z")
        result = await self.runtime.decode(request.model, z, labels=list(request.labels) or None,
                                           version=_version(request), deadline=deadline_of(context))
        return _images_out(result, fmt, request.model)

    @rpc
    async def Generate(self, request, context):
        fmt = _format(request)
        events = self.runtime.generate(
            request.model, _n(request), seed=_optional(request, "seed"), labels=list(request.labels) or None,
            guidance=_optional(request, "guidance"), sampler=request.sampler or None, steps=request.steps or None,
            eta=_optional(request, "eta"), preview_every=request.preview_every, version=_version(request),
            deadline=deadline_of(context), **_known_in(request, self.runtime))
        async for event in events:
            if event.kind == "progress":
                progress = pb.Progress(step=event.step, total=event.total)
                if event.preview is not None:
                    if fmt == pb.RAW:
                        progress.tensor.CopyFrom(tensor_to_pb(event.preview))
                    else:
                        progress.png.extend(encode_pngs(event.preview))
                yield pb.GenerateEvent(progress=progress)
            else:
                yield pb.GenerateEvent(result=_images_out(event.result, fmt, request.model))
