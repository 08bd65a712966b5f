from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Image(_message.Message):
    __slots__ = ("data", "filename")
    DATA_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    filename: str
    def __init__(self, data: _Optional[bytes] = ..., filename: _Optional[str] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("images", "top_k", "request_id")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    top_k: int
    request_id: str
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., top_k: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("request_id", "model", "results", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: ModelRef
    results: _containers.RepeatedCompositeFieldContainer[ImageResult]
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., results: _Optional[_Iterable[_Union[ImageResult, _Mapping]]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "weights")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    weights: str
    def __init__(self, name: _Optional[str] = ..., weights: _Optional[str] = ...) -> None: ...

class ImageResult(_message.Message):
    __slots__ = ("filename", "predictions")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    filename: str
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    def __init__(self, filename: _Optional[str] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("index", "label", "wnid", "score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    WNID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    wnid: str
    score: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., wnid: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "reason")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    reason: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "weights", "parameters", "macs_per_image", "input_size", "num_classes", "device", "dtype", "engine", "batching", "instances", "linears", "engine_artifact", "engine_fallback")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MACS_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    LINEARS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    name: str
    weights: Weights
    parameters: int
    macs_per_image: int
    input_size: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    device: str
    dtype: str
    engine: str
    batching: Batching
    instances: Instances
    linears: str
    engine_artifact: EngineArtifact
    engine_fallback: str
    def __init__(self, name: _Optional[str] = ..., weights: _Optional[_Union[Weights, _Mapping]] = ..., parameters: _Optional[int] = ..., macs_per_image: _Optional[int] = ..., input_size: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., engine: _Optional[str] = ..., batching: _Optional[_Union[Batching, _Mapping]] = ..., instances: _Optional[_Union[Instances, _Mapping]] = ..., linears: _Optional[str] = ..., engine_artifact: _Optional[_Union[EngineArtifact, _Mapping]] = ..., engine_fallback: _Optional[str] = ...) -> None: ...

class EngineArtifact(_message.Message):
    __slots__ = ("origin", "path", "isa", "key", "build_s", "batch_sizes")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ISA_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    BUILD_S_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    origin: str
    path: str
    isa: str
    key: str
    build_s: float
    batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, origin: _Optional[str] = ..., path: _Optional[str] = ..., isa: _Optional[str] = ..., key: _Optional[str] = ..., build_s: _Optional[float] = ..., batch_sizes: _Optional[_Iterable[int]] = ...) -> None: ...

class Instances(_message.Message):
    __slots__ = ("kind", "count", "threads", "workers", "policy", "threads_by_batch", "spin_count", "split_batches")
    class ThreadsByBatchEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    THREADS_BY_BATCH_FIELD_NUMBER: _ClassVar[int]
    SPIN_COUNT_FIELD_NUMBER: _ClassVar[int]
    SPLIT_BATCHES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    count: int
    threads: int
    workers: int
    policy: str
    threads_by_batch: _containers.ScalarMap[str, int]
    spin_count: int
    split_batches: bool
    def __init__(self, kind: _Optional[str] = ..., count: _Optional[int] = ..., threads: _Optional[int] = ..., workers: _Optional[int] = ..., policy: _Optional[str] = ..., threads_by_batch: _Optional[_Mapping[str, int]] = ..., spin_count: _Optional[int] = ..., split_batches: _Optional[bool] = ...) -> None: ...

class Weights(_message.Message):
    __slots__ = ("id", "source", "sha256", "pretrained")
    ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PRETRAINED_FIELD_NUMBER: _ClassVar[int]
    id: str
    source: str
    sha256: str
    pretrained: bool
    def __init__(self, id: _Optional[str] = ..., source: _Optional[str] = ..., sha256: _Optional[str] = ..., pretrained: _Optional[bool] = ...) -> None: ...

class Batching(_message.Message):
    __slots__ = ("max_batch_size", "max_batch_delay_ms", "max_queue", "request_timeout_ms")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_batch_delay_ms: float
    max_queue: int
    request_timeout_ms: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_batch_delay_ms: _Optional[float] = ..., max_queue: _Optional[int] = ..., request_timeout_ms: _Optional[int] = ...) -> None: ...
