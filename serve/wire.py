"""protobuf <-> numpy for both services; shared by the servicers and the client."""
from __future__ import annotations

import math

import numpy as np

from protos import generator_pb2 as gen_pb
from serve.errors import InvalidArgument

# KServe v2 / Triton datatypes for the dtypes our graphs use
OIP_DATATYPES = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32", "uint8": "UINT8",
                 "float64": "FP64", "bool": "BOOL", "int8": "INT8", "int16": "INT16"}
NUMPY_OF_OIP = {v: np.dtype(k).newbyteorder("<") for k, v in OIP_DATATYPES.items()}  # the wire is little-endian
# the typed `contents` field of InferTensorContents that carries each datatype
CONTENTS_FIELD = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents",
                  "INT32": "int_contents", "INT16": "int_contents", "INT8": "int_contents",
                  "UINT8": "uint_contents", "BOOL": "bool_contents"}
TENSOR_DTYPES = ("float32",)
MAX_DIMS = 8  # our graphs take at most 4; numpy itself stops at 64


def check_shape(dims, field: str) -> tuple[tuple[int, ...], int]:
    """A request's shape -> (shape, element count); InvalidArgument names `field` when it is not one.

    The count is a Python int (math.prod), so shapes such as [2^62, 2^62] cannot wrap around int64.
    """
    shape = tuple(map(int, dims))
    if len(shape) > MAX_DIMS or (shape and min(shape) < 0):
        raise InvalidArgument(f"{field}.shape: {list(shape)[:MAX_DIMS + 1]} is not a valid shape "
                              f"(at most {MAX_DIMS} dimensions, none negative)")
    return shape, math.prod(shape)


def typed_array(values, dtype: np.dtype, field: str) -> np.ndarray:
    """Values (a list or protobuf repeated field) as `dtype`; integers outside its range are an error, not a
    silent wrap-around."""
    if dtype.kind not in "iu":
        return np.asarray(values, dtype=dtype)
    wide = np.asarray(values, dtype=np.int64 if dtype.kind == "i" else np.uint64)
    info = np.iinfo(dtype)
    if wide.size and (wide.min() < info.min or wide.max() > info.max):
        raise InvalidArgument(f"{field}.contents: values must fit {dtype.name} ({info.min} to {info.max})")
    return wide.astype(dtype)


def tensor_to_pb(array: np.ndarray) -> gen_pb.Tensor:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return gen_pb.Tensor(shape=list(array.shape), dtype="float32", data=array.astype("<f4").tobytes())


def tensor_from_pb(t: gen_pb.Tensor, field: str) -> np.ndarray:
    """A raw tensor from a request; InvalidArgument names `field` when it is malformed."""
    dtype = t.dtype or "float32"
    if dtype not in TENSOR_DTYPES:
        raise InvalidArgument(f"{field}.dtype: {dtype!r} is not supported; use float32")
    shape, count = check_shape(t.shape, field)
    if not shape:
        raise InvalidArgument(f"{field}.shape: [] is not a valid shape; give the batch axis first")
    expected = count * 4
    if len(t.data) != expected:
        raise InvalidArgument(f"{field}.data: {len(t.data)} bytes, but shape {list(shape)} of float32 needs "
                              f"{expected}")
    return np.frombuffer(t.data, dtype="<f4").reshape(shape).astype(np.float32)


def check_datatypes(arrays: dict[str, np.ndarray], inputs) -> None:
    """OIP inputs must come in the model's own datatype, as Triton requires (no silent conversion, e.g. FP64 data
    for an FP32 input): InvalidArgument naming the input otherwise. `inputs`: the graph's TensorInfos."""
    for t in inputs:
        array = arrays.get(t.name)
        if array is not None and array.dtype != np.dtype(t.dtype):
            got = OIP_DATATYPES.get(array.dtype.newbyteorder("=").name, str(array.dtype))
            raise InvalidArgument(f"{t.name}: the model takes {OIP_DATATYPES[t.dtype]}, got {got}; send the "
                                  "model's datatype (ModelMetadata lists it)")
