"""inference.GRPCInferenceService: the KServe Open Inference Protocol v2 plus the Triton extensions that
tritonclient and perf_analyzer use. Every exported graph is a model here, named "<model>.<graph>"
(e.g. "mnist-cgan.generator"). Translation only: protobuf <-> numpy, then the runtime does the work.
"""
from __future__ import annotations

import asyncio
import re

import grpc
import numpy as np

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from protos import model_config_pb2 as mc
from serve.errors import FailedPrecondition, InvalidArgument, ServeError
from serve.status import deadline_of, rpc, status_of
from serve.triton_repository import tensor_config
from serve.wire import CONTENTS_FIELD, NUMPY_OF_OIP, OIP_DATATYPES, check_datatypes, check_shape, typed_array

SERVER_NAME = "gen"
EXTENSIONS = ["model_repository", "model_configuration", "statistics", "schedule_policy", "binary_tensor_data"]


def parse_version(text: str) -> int | None:
    if not text:
        return None
    if not re.fullmatch(r"[0-9]{1,18}", text) or int(text) < 1:  # not str.isdigit, which takes '²'
        raise InvalidArgument(f"model_version: {text!r} is not a positive integer")
    return int(text)


def request_arrays(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """Inputs of a ModelInferRequest as numpy arrays, from raw_input_contents or typed contents."""
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidArgument(f"raw_input_contents: {len(request.raw_input_contents)} buffers for "
                              f"{len(request.inputs)} inputs")
    arrays = {}
    for i, tensor in enumerate(request.inputs):
        field = f"inputs[{i}] ({tensor.name})"
        if tensor.datatype not in NUMPY_OF_OIP:
            raise InvalidArgument(f"{field}.datatype: {tensor.datatype!r} is not supported")
        dtype = NUMPY_OF_OIP[tensor.datatype]
        shape, count = check_shape(tensor.shape, field)
        if request.raw_input_contents:
            raw = request.raw_input_contents[i]
            if len(raw) != count * dtype.itemsize:
                raise InvalidArgument(f"{field}: {len(raw)} bytes of raw data, shape {list(shape)} of "
                                      f"{tensor.datatype} needs {count * dtype.itemsize}")
            array = np.frombuffer(raw, dtype=dtype).reshape(shape)
        else:
            values = getattr(tensor.contents, CONTENTS_FIELD.get(tensor.datatype, "fp32_contents"))
            if len(values) != count:
                raise InvalidArgument(f"{field}.contents: {len(values)} values, shape {list(shape)} needs {count}")
            array = typed_array(values, dtype, field).reshape(shape)
        if tensor.name in arrays:
            raise InvalidArgument(f"{field}.name: input {tensor.name!r} given twice")
        arrays[tensor.name] = array
    return arrays


def response_of(model: str, version: int, request: pb.ModelInferRequest,
                outputs: dict[str, np.ndarray]) -> pb.ModelInferResponse:
    wanted = [o.name for o in request.outputs] or list(outputs)
    unknown = [n for n in wanted if n not in outputs]
    if unknown:
        raise InvalidArgument(f"outputs: {unknown[0]!r} is not an output of {model}; it has {', '.join(outputs)}")
    resp = pb.ModelInferResponse(model_name=model, model_version=str(version), id=request.id)
    for name in wanted:
        array = np.ascontiguousarray(outputs[name])
        resp.outputs.add(name=name, datatype=OIP_DATATYPES[array.dtype.name], shape=list(array.shape))
        resp.raw_output_contents.append(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return resp


def _tensor_metadata(specs, row_scalars_as_column: bool = False) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    """Shapes as the manifest has them; with `row_scalars_as_column`, an input that is only the batch axis ([-1], a
    label per row) as [-1, 1], its config's dims [1] with the batch axis, as Triton reports such an input (the
    reshape to [] is the server's business): what a load generator (perf_analyzer) builds requests from. Requests
    may send it as [N] or [N, 1]."""
    return [pb.ModelMetadataResponse.TensorMetadata(
        name=t.name, datatype=OIP_DATATYPES[t.dtype],
        shape=[-1, 1] if row_scalars_as_column and list(t.shape) == [-1] else list(t.shape)) for t in specs]


def _duration(count: int, ns: int) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=int(count), ns=int(ns))


def server_metadata() -> pb.ServerMetadataResponse:
    from gen import __version__

    return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)


def model_metadata(runtime, name: str, version: str) -> pb.ModelMetadataResponse:
    handle = runtime.graph(name, parse_version(version))
    return pb.ModelMetadataResponse(
        name=name, versions=[str(v) for v in handle.versions], platform="onnxruntime_onnx",
        inputs=_tensor_metadata(handle.info.inputs, handle.manifest.batched),
        outputs=_tensor_metadata(handle.info.outputs))


def model_config(runtime, name: str, version: str) -> mc.ModelConfig:
    handle = runtime.graph(name, parse_version(version))
    # as `gen models --triton` writes it: no batch axis, and a per-row scalar ([B]) declared [1], reshaped to [];
    # an unbatched graph (max_batch_size 0): its whole shapes, and no dynamic batching
    batched = handle.manifest.batched
    config = mc.ModelConfig(
        name=name, platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=handle.max_batch_size,
        input=[tensor_config(t, mc.ModelInput(), batched) for t in handle.info.inputs],
        output=[tensor_config(t, mc.ModelOutput(), batched) for t in handle.info.outputs],
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)))
    if batched:
        config.dynamic_batching.CopyFrom(mc.ModelDynamicBatching(
            max_queue_delay_microseconds=int(handle.max_queue_delay_ms * 1000),
            default_queue_policy=mc.ModelQueuePolicy(max_queue_size=handle.max_queue_size)))
    return config


def model_statistics(runtime, name: str, version: str) -> pb.ModelStatisticsResponse:
    stats = []
    for s in runtime.statistics(name or None, parse_version(version)):
        stats.append(pb.ModelStatistics(
            name=s.name, version=str(s.version), last_inference=s.last_inference_ms,
            inference_count=s.inference_count, execution_count=s.execution_count,
            inference_stats=pb.InferStatistics(
                success=_duration(s.success_count, s.success_ns), fail=_duration(s.fail_count, s.fail_ns),
                queue=_duration(s.success_count, s.queue_ns),
                compute_input=_duration(s.success_count, 0),
                compute_infer=_duration(s.success_count, s.compute_ns),
                compute_output=_duration(s.success_count, 0)),
            batch_stats=[pb.InferBatchStatistics(batch_size=size, compute_infer=_duration(count, ns))
                         for size, (count, ns) in sorted(s.batches.items())]))
    return pb.ModelStatisticsResponse(model_stats=stats)


def repository_index(runtime, ready_only: bool) -> list[pb.RepositoryIndexResponse.ModelIndex]:
    return [pb.RepositoryIndexResponse.ModelIndex(name=e.name, version=str(e.version), state=e.state, reason=e.reason)
            for e in runtime.oip_index() if not ready_only or e.state == "READY"]


def check_control(allowed: bool, what: str) -> None:
    if not allowed:
        raise FailedPrecondition(f"{what}: repository control is off; start the server with "
                                 "--allow-repository-control to load and unload models")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Thin: the builders above (shared with serve/rest.py) and the runtime do the work."""

    def __init__(self, runtime, allow_repository_control: bool = False):
        self.runtime = runtime
        self.allow_repository_control = allow_repository_control

    @rpc
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.runtime.ready)

    @rpc
    async def ModelReady(self, request, context):
        try:
            self.runtime.graph(request.name, parse_version(request.version))
        except ServeError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @rpc
    async def ServerMetadata(self, request, context):
        return server_metadata()

    @rpc
    async def ModelMetadata(self, request, context):
        return model_metadata(self.runtime, request.name, request.version)

    @rpc
    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=model_config(self.runtime, request.name, request.version))

    @rpc
    async def ModelStatistics(self, request, context):
        # off the event loop: with --workers it asks the other workers for their counters
        return await asyncio.to_thread(model_statistics, self.runtime, request.name, request.version)

    @rpc
    async def RepositoryIndex(self, request, context):
        return pb.RepositoryIndexResponse(models=repository_index(self.runtime, request.ready))

    @rpc
    async def RepositoryModelLoad(self, request, context):
        check_control(self.allow_repository_control, "RepositoryModelLoad")
        await self.runtime.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(self, request, context):
        check_control(self.allow_repository_control, "RepositoryModelUnload")
        await self.runtime.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def _infer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        handle = self.runtime.graph(request.model_name, parse_version(request.model_version))
        arrays = request_arrays(request)
        check_datatypes(arrays, handle.info.inputs)
        deadline = deadline_of(context) if context is not None else None
        outputs = await self.runtime.infer(request.model_name, arrays, handle.version, deadline=deadline)
        return response_of(request.model_name, handle.version, request, outputs)

    @rpc
    async def ModelInfer(self, request, context):
        return await self._infer(request, context)

    @rpc  # an error outside one request (a broken stream, a bug) gets a status like every other call
    async def ModelStreamInfer(self, request_iterator, context):
        """Bidirectional: each request answered in order; an error goes in error_message, the stream lives on."""
        async for request in request_iterator:
            try:
                yield pb.ModelStreamInferResponse(infer_response=await self._infer(request, None))
            except ServeError as e:
                yield pb.ModelStreamInferResponse(
                    error_message=f"{status_of(e).name}: {e}",
                    infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id))

    # Triton RPCs this server does not offer: answered UNIMPLEMENTED with a reason, never a crash.
    async def _unimplemented(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not supported by the gen server")


for _name in ("SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
              "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister",
              "TraceSetting", "LogSettings"):
    setattr(InferenceServicer, _name, InferenceServicer._unimplemented)
