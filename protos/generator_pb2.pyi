from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PNG: _ClassVar[ImageFormat]
    RAW: _ClassVar[ImageFormat]
PNG: ImageFormat
RAW: ImageFormat

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("model", "ready_only")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    READY_ONLY_FIELD_NUMBER: _ClassVar[int]
    model: str
    ready_only: bool
    def __init__(self, model: _Optional[str] = ..., ready_only: _Optional[bool] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "versions", "family", "task", "classes", "channels", "height", "width", "graphs", "latent_size", "state", "reason", "max_batch_size", "samplers", "num_train_timesteps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    GRAPHS_FIELD_NUMBER: _ClassVar[int]
    LATENT_SIZE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SAMPLERS_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAIN_TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    versions: _containers.RepeatedScalarFieldContainer[int]
    family: str
    task: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    channels: int
    height: int
    width: int
    graphs: _containers.RepeatedScalarFieldContainer[str]
    latent_size: int
    state: str
    reason: str
    max_batch_size: int
    samplers: _containers.RepeatedScalarFieldContainer[str]
    num_train_timesteps: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., versions: _Optional[_Iterable[int]] = ..., family: _Optional[str] = ..., task: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., channels: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., graphs: _Optional[_Iterable[str]] = ..., latent_size: _Optional[int] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., samplers: _Optional[_Iterable[str]] = ..., num_train_timesteps: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("model", "version", "n", "seed", "labels", "format")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    n: int
    seed: int
    labels: _containers.RepeatedScalarFieldContainer[int]
    format: ImageFormat
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., n: _Optional[int] = ..., seed: _Optional[int] = ..., labels: _Optional[_Iterable[int]] = ..., format: _Optional[_Union[ImageFormat, str]] = ...) -> None: ...

class TranslateRequest(_message.Message):
    __slots__ = ("model", "version", "images", "tensor", "direction", "format")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    images: _containers.RepeatedScalarFieldContainer[bytes]
    tensor: Tensor
    direction: str
    format: ImageFormat
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., images: _Optional[_Iterable[bytes]] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., direction: _Optional[str] = ..., format: _Optional[_Union[ImageFormat, str]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("model", "version", "images", "tensor", "labels")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    images: _containers.RepeatedScalarFieldContainer[bytes]
    tensor: Tensor
    labels: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., images: _Optional[_Iterable[bytes]] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[int]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("model", "version", "mean", "logvar", "labels")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    LOGVAR_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    mean: Tensor
    logvar: Tensor
    labels: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., mean: _Optional[_Union[Tensor, _Mapping]] = ..., logvar: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[int]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("model", "version", "z", "labels", "seed", "format")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    z: Tensor
    labels: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    format: ImageFormat
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., z: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ..., format: _Optional[_Union[ImageFormat, str]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "version", "n", "seed", "labels", "guidance", "sampler", "steps", "eta", "preview_every", "format", "init_images", "init_tensor", "strength", "mask_images", "mask_tensor")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGES_FIELD_NUMBER: _ClassVar[int]
    INIT_TENSOR_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    MASK_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MASK_TENSOR_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    n: int
    seed: int
    labels: _containers.RepeatedScalarFieldContainer[int]
    guidance: float
    sampler: str
    steps: int
    eta: float
    preview_every: int
    format: ImageFormat
    init_images: _containers.RepeatedScalarFieldContainer[bytes]
    init_tensor: Tensor
    strength: float
    mask_images: _containers.RepeatedScalarFieldContainer[bytes]
    mask_tensor: Tensor
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., n: _Optional[int] = ..., seed: _Optional[int] = ..., labels: _Optional[_Iterable[int]] = ..., guidance: _Optional[float] = ..., sampler: _Optional[str] = ..., steps: _Optional[int] = ..., eta: _Optional[float] = ..., preview_every: _Optional[int] = ..., format: _Optional[_Union[ImageFormat, str]] = ..., init_images: _Optional[_Iterable[bytes]] = ..., init_tensor: _Optional[_Union[Tensor, _Mapping]] = ..., strength: _Optional[float] = ..., mask_images: _Optional[_Iterable[bytes]] = ..., mask_tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total", "png", "tensor")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    png: _containers.RepeatedScalarFieldContainer[bytes]
    tensor: Tensor
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ..., png: _Optional[_Iterable[bytes]] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    result: ImagesResponse
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[ImagesResponse, _Mapping]] = ...) -> None: ...

class ImagesResponse(_message.Message):
    __slots__ = ("model", "version", "png", "tensor", "labels", "seed")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    png: _containers.RepeatedScalarFieldContainer[bytes]
    tensor: Tensor
    labels: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., png: _Optional[_Iterable[bytes]] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ...) -> None: ...
