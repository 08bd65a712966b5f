"""The served model as the Open Inference Protocol sees it, independent of the transport.

One model (the loaded LeViT variant, also reachable as `levit`), version "1":
  inputs   `image`          BYTES [N] or [N,1]    encoded images, decoded and preprocessed like /classify
           `pixels`         FP32  [N,3,224,224]   images already preprocessed (normalised RGB, NCHW)
  output   `probabilities`  FP32  [N,1000]        softmax; with the output parameter `classification` = k:
                                                  BYTES [N,k] of "score:index:label", best first
A request carries exactly one of the two inputs. Both transports (service.rest.v2, service.grpc.inference) parse
their wire form into `InputTensor`s and `OutputRequest`s, and everything past that is here: validation (every
client mistake is a 400 `ProtocolError` or a 404 `ModelNotFound`, never a 500), the hand-over to the shared
`Service` (same batcher, limits, deadlines and errors as /classify) and the results.
"""

from __future__ import annotations

import math
import struct
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from model.configs import IMAGE_SIZE
from service.core import Admission, Service, Upload
from service.errors import BadRequest, NotReady, ServiceError
from service.logs import MAX_REQUEST_ID
from service.ranking import top_k
from service.settings import Settings

SERVER_NAME = "levit-serve"
ALIAS = "levit"  # a stable model name that survives a change of LEVIT_MODEL
VERSION = "1"  # one model, one version
PLATFORM = "pytorch"
IMAGE, PIXELS, PROBABILITIES = "image", "pixels", "probabilities"
NUM_CLASSES = 1000
# Only what this server really implements: clients (perf_analyzer) call the APIs of every listed extension.
EXTENSIONS = ("classification", "binary_tensor_data", "model_configuration")
# Parameters naming shared-memory regions: the data would not be in the request, and this server has none.
SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def server_version() -> str:
    """The installed distribution's version; from a source tree that was never installed, pyproject.toml's."""
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


class ProtocolError(BadRequest):
    """A v2 request this model cannot take (wrong name, datatype, shape, size, parameter): 400."""


class ModelNotFound(ServiceError):
    """A model name or version this server does not serve: HTTP 404, gRPC NOT_FOUND."""

    code = "model_not_found"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    dims: tuple[int, ...]  # without the batch dimension

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.dims]}


INPUTS = {
    IMAGE: TensorSpec(IMAGE, "BYTES", (1,)),
    PIXELS: TensorSpec(PIXELS, "FP32", (3, IMAGE_SIZE, IMAGE_SIZE)),
}
OUTPUTS = {PROBABILITIES: TensorSpec(PROBABILITIES, "FP32", (NUM_CLASSES,))}
_CONFIG_TYPES = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32"}


@dataclass
class InputTensor:
    """An input as a transport received it; `values` is list[bytes] for BYTES, a flat float32 array for FP32."""

    name: str
    datatype: str
    shape: list[int]
    values: list[bytes] | np.ndarray


@dataclass(frozen=True)
class OutputRequest:
    name: str
    classification: int | None = None  # k: top-k "score:index:label" strings instead of probabilities
    binary: bool | None = None  # HTTP only: None = the request's default


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray | None = None  # FP32 results
    strings: list[bytes] | None = None  # BYTES results, row-major
    binary: bool | None = None

    def raw(self) -> bytes:
        """The binary tensor form: little-endian values, or length-prefixed BYTES elements."""
        if self.strings is not None:
            return serialize_bytes(self.strings)
        assert self.array is not None
        return np.ascontiguousarray(self.array, dtype="<f4").tobytes()

    def json_data(self) -> list[Any]:
        if self.strings is not None:
            return [s.decode() for s in self.strings]
        assert self.array is not None
        return self.array.reshape(-1).tolist()


# --- names, metadata, configuration ---------------------------------------------------------------------------


def resolve(settings: Settings, name: str, version: str = "") -> str:
    """The served model's name for `name` (the variant, or the alias); "" or "1" as version."""
    if name not in (settings.model, ALIAS):
        raise ModelNotFound(f"unknown model '{name}': this server serves '{settings.model}' (also as '{ALIAS}')")
    if version not in ("", VERSION):
        raise ModelNotFound(f"model '{name}' has no version '{version}'; its only version is {VERSION}")
    return settings.model


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}


def model_metadata(settings: Settings) -> dict[str, Any]:
    return {
        "name": settings.model,
        "versions": [VERSION],
        "platform": PLATFORM,
        "inputs": [spec.metadata() for spec in INPUTS.values()],
        "outputs": [spec.metadata() for spec in OUTPUTS.values()],
    }


def model_config(service: Service) -> dict[str, Any]:
    """Triton's model configuration (JSON names of model_config.proto), from the settings the server runs with."""
    info = service.model_info
    if info is None:
        raise NotReady("model is still loading")
    s = service.settings
    device = info["device"]
    gpu = device.startswith("cuda")
    count = info.get("instances", {}).get("count", 1)
    instance: dict[str, Any] = {"name": s.model, "kind": "KIND_GPU" if gpu else "KIND_CPU", "count": count}
    if gpu:
        instance["gpus"] = [int(device.partition(":")[2] or 0)]
    return {
        "name": s.model,
        "platform": PLATFORM,
        "backend": PLATFORM,
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": s.max_batch_size,
        "input": [
            {
                "name": IMAGE,
                "data_type": _CONFIG_TYPES[INPUTS[IMAGE].datatype],
                "format": "FORMAT_NONE",
                "dims": list(INPUTS[IMAGE].dims),
                "optional": True,
            },
            {
                "name": PIXELS,
                "data_type": _CONFIG_TYPES[INPUTS[PIXELS].datatype],
                "format": "FORMAT_NCHW",
                "dims": list(INPUTS[PIXELS].dims),
                "optional": True,
            },
        ],
        "output": [
            {"name": spec.name, "data_type": _CONFIG_TYPES[spec.datatype], "dims": list(spec.dims)}
            for spec in OUTPUTS.values()
        ],
        "dynamic_batching": {
            # The longest a batch stays open for more images: the thread kind while the model is busy, model
            # processes while front-ends are still decoding images (a lone request never waits).
            "max_queue_delay_microseconds": round(s.max_batch_delay_ms * 1000),
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": s.request_timeout_ms * 1000,
                "allow_timeout_override": True,
                "max_queue_size": s.max_queue,
            },
        },
        "instance_group": [instance],
        "parameters": {
            key: {"string_value": str(value)}
            for key, value in {
                "weights": info["weights"]["id"],
                "device": device,
                "dtype": s.dtype,
                "engine": info["engine"],
                "max_images_per_request": s.max_images_per_request,
                "max_top_k": s.max_top_k,
            }.items()
        },
        "model_transaction_policy": {"decoupled": False},
    }


# --- requests ---------------------------------------------------------------------------------------------------


def check_input(name: str, datatype: str, shape: Sequence[int]) -> int:
    """Validate an input's header before its data is decoded; returns the element count its shape declares."""
    spec = INPUTS.get(name)
    if spec is None:
        raise ProtocolError(f"unknown input '{name}': this model takes 'image' (BYTES) or 'pixels' (FP32)")
    if datatype != spec.datatype:
        raise ProtocolError(f"input '{name}' must be {spec.datatype}, got {datatype!r}")
    if any(d < 0 for d in shape):
        raise ProtocolError(f"input '{name}': negative dimension in shape {list(shape)}")
    expected = "[N] or [N,1]" if name == IMAGE else f"[N,{','.join(map(str, spec.dims))}]"
    tail = list(shape[1:])
    fits = len(shape) >= 1 and (tail in ([], [1]) if name == IMAGE else tuple(tail) == spec.dims)
    if not fits:
        raise ProtocolError(f"input '{name}' must have shape {expected}, got {list(shape)}")
    return math.prod(shape)


def check_count(tensor: InputTensor) -> None:
    count = len(tensor.values)
    expected = math.prod(tensor.shape)
    if count != expected:
        raise ProtocolError(f"input '{tensor.name}' has {count} elements; its shape {tensor.shape} declares {expected}")


def images(inputs: Sequence[InputTensor]) -> list[Upload] | list[np.ndarray]:
    """The request's images, for `Service.probabilities`: encoded uploads, or preprocessed [3,224,224] arrays."""
    names = [t.name for t in inputs]
    if len(set(names)) != len(names):
        raise ProtocolError(f"an input is given more than once: {names}")
    if not inputs:
        raise ProtocolError("missing input: give 'image' (BYTES, encoded images) or 'pixels' (FP32 [N,3,224,224])")
    if len(inputs) > 1:
        raise ProtocolError(f"give one input, 'image' or 'pixels', not both: {names}")
    tensor = inputs[0]
    check_input(tensor.name, tensor.datatype, tensor.shape)
    check_count(tensor)
    if tensor.name == IMAGE:
        assert isinstance(tensor.values, list)
        return [Upload(f"image[{i}]", data) for i, data in enumerate(tensor.values)]
    assert isinstance(tensor.values, np.ndarray)
    if not np.isfinite(tensor.values).all():
        raise ProtocolError("input 'pixels' contains NaN or infinite values")
    batch = np.array(tensor.values, dtype=np.float32).reshape(tensor.shape)
    return list(batch)


def outputs(requested: Sequence[OutputRequest], max_top_k: int) -> list[OutputRequest]:
    """Validated output requests; none requested means every output of the model, as probabilities."""
    if not requested:
        return [OutputRequest(name) for name in OUTPUTS]
    seen: set[str] = set()
    for output in requested:
        if output.name not in OUTPUTS:
            raise ProtocolError(f"unknown output '{output.name}': this model's output is '{PROBABILITIES}'")
        if output.name in seen:
            raise ProtocolError(f"output '{output.name}' is requested more than once")
        seen.add(output.name)
        k = output.classification
        if k is not None and not 1 <= k <= max_top_k:
            raise ProtocolError(f"output '{output.name}': classification must be between 1 and {max_top_k}, got {k}")
    return list(requested)


def check_parameters(where: str, parameters: dict[str, Any]) -> None:
    used = [key for key in SHARED_MEMORY if key in parameters]
    if used:
        raise ProtocolError(f"{where}: shared memory ({used[0]}) is not supported by this server; send the data")


def timeout_ms(parameters: dict[str, Any]) -> float | None:
    """The request parameter `timeout` (microseconds, as Triton defines it); 0 or absent: none."""
    value = parameters.get("timeout")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"parameter 'timeout' must be a non-negative integer (microseconds), got {value!r}")
    return value / 1000 if value else None


# --- inference and results --------------------------------------------------------------------------------------


def _score(value: float) -> str:
    return str(np.float32(value))  # the shortest text that reads back as the same float32


def results(probabilities: list[np.ndarray], requested: Sequence[OutputRequest]) -> list[OutputTensor]:
    batch = np.stack([np.asarray(p, dtype=np.float32) for p in probabilities])
    tensors = []
    for output in requested:
        k = output.classification
        if k is None:
            tensors.append(OutputTensor(output.name, "FP32", list(batch.shape), array=batch, binary=output.binary))
            continue
        strings = [f"{_score(p.score)}:{p.index}:{p.label}".encode() for probs in batch for p in top_k(probs, k)]
        tensors.append(
            OutputTensor(output.name, "BYTES", [len(probabilities), k], strings=strings, binary=output.binary)
        )
    return tensors


class Infer:
    """One parsed inference request, ready to run."""

    def __init__(
        self,
        service: Service,
        model: str,
        inputs: Sequence[InputTensor],
        requested: Sequence[OutputRequest],
        request_id: str = "",
    ) -> None:
        self.service = service
        self.model = model
        self.id = request_id[:MAX_REQUEST_ID]
        self.requested = outputs(requested, service.settings.max_top_k)  # cheap checks before decoding work
        self.images = images(inputs)

    async def run(self, deadline: float, admission: Admission | None = None) -> list[OutputTensor]:
        """Decode, batch and compute; `admission`: the request's place in the queue bound (`Service.admission`)."""
        probabilities = await self.service.probabilities(self.images, deadline, admission)
        return results(probabilities, self.requested)


# --- BYTES elements in the binary form -----------------------------------------------------------------------


def serialize_bytes(elements: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def deserialize_bytes(buffer: bytes | memoryview, name: str) -> list[bytes]:
    """Length-prefixed elements (uint32 little-endian length, then the bytes), exactly filling `buffer`."""
    view = memoryview(buffer)
    elements = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise ProtocolError(f"input '{name}': truncated BYTES element length at byte {offset}")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise ProtocolError(
                f"input '{name}': BYTES element {len(elements)} declares {length} bytes, {len(view) - offset} remain"
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    return elements


def fp32_from_raw(buffer: bytes | memoryview, name: str) -> np.ndarray:
    if len(buffer) % 4:
        raise ProtocolError(f"input '{name}': {len(buffer)} bytes of FP32 data is not a whole number of values")
    return np.frombuffer(buffer, dtype="<f4")
