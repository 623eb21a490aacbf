"""protobuf <-> numpy for both services; shared by the servicers and the client."""
from __future__ import annotations

import numpy as np

from protos import generator_pb2 as gen_pb
from serve.errors import InvalidArgument

# KServe v2 / Triton datatypes for the dtypes our graphs use
OIP_DATATYPES = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32", "uint8": "UINT8",
                 "float64": "FP64", "bool": "BOOL", "int8": "INT8", "int16": "INT16"}
NUMPY_OF_OIP = {v: np.dtype(k) for k, v in OIP_DATATYPES.items()}
# the typed `contents` field of InferTensorContents that carries each datatype
CONTENTS_FIELD = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents",
                  "INT32": "int_contents", "INT16": "int_contents", "INT8": "int_contents",
                  "UINT8": "uint_contents", "BOOL": "bool_contents"}
TENSOR_DTYPES = ("float32",)


def tensor_to_pb(array: np.ndarray) -> gen_pb.Tensor:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return gen_pb.Tensor(shape=list(array.shape), dtype="float32", data=array.astype("<f4").tobytes())


def tensor_from_pb(t: gen_pb.Tensor, field: str) -> np.ndarray:
    """A raw tensor from a request; InvalidArgument names `field` when it is malformed."""
    dtype = t.dtype or "float32"
    if dtype not in TENSOR_DTYPES:
        raise InvalidArgument(f"{field}.dtype: {dtype!r} is not supported; use float32")
    shape = tuple(int(s) for s in t.shape)
    if not shape or any(s < 0 for s in shape):
        raise InvalidArgument(f"{field}.shape: {list(shape)} is not a valid shape")
    expected = int(np.prod(shape)) * 4
    if len(t.data) != expected:
        raise InvalidArgument(f"{field}.data: {len(t.data)} bytes, but shape {list(shape)} of float32 needs "
                              f"{expected}")
    return np.frombuffer(t.data, dtype="<f4").reshape(shape).astype(np.float32)
