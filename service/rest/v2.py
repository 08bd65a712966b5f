"""The `/v2` HTTP routes of the Open Inference Protocol (service.v2): health, metadata, Triton's model
configuration and inference, JSON or binary tensors.

Errors take the protocol's form, `{"error": "<message>"}`, with the status of service.errors.OUTCOMES: the
one /classify has, except that an image that cannot be decoded is a 400 here (the HTTP body itself is fine,
one tensor element is not). The routes are left out of /openapi.json: the contract is the protocol's
(docs/v2.md).
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from service.core import TIMEOUT_HEADER, Service, timeout_header
from service.errors import OUTCOMES, BadRequest, Outcome, PayloadTooLarge, refuse
from service.rest.middleware import error_json, unless_disconnected
from service.rest.v2_routes import template_of
from service.v2 import protocol
from service.v2.protocol import InputTensor, OutputRequest, OutputTensor, ProtocolError

HEADER_LENGTH = "inference-header-content-length"


def failure(outcome: Outcome, message: str) -> JSONResponse:
    """`outcome` in the protocol's form."""
    status, body = error_json(outcome, message, v2_form=True)
    return JSONResponse(body, status_code=status, headers=outcome.headers)


# --- request decoding -------------------------------------------------------------------------------------------


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{where} must be a string, got {json.dumps(value)[:40]}")
    return value


def _integer(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{where} must be an integer, got {json.dumps(value)[:40]}")
    return value


def _flatten(data: Any, where: str) -> list[Any]:
    """A JSON tensor's `data`: flat, or nested row-major, as the protocol allows."""
    if not isinstance(data, list):
        raise ProtocolError(f"{where} must be an array, got {type(data).__name__}")
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _json_bytes(data: Any, name: str) -> list[bytes]:
    """BYTES elements in JSON are strings; images are binary, so here each string is their base64 encoding."""
    elements = []
    for i, item in enumerate(_flatten(data, f"input '{name}' data")):
        if not isinstance(item, str):
            raise ProtocolError(f"input '{name}' element {i} must be a base64 string, got {type(item).__name__}")
        try:
            elements.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise ProtocolError(f"input '{name}' element {i} is not valid base64") from None
    return elements


def _json_fp32(data: Any, name: str) -> np.ndarray:
    flat = _flatten(data, f"input '{name}' data")
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in flat):
        raise ProtocolError(f"input '{name}' data must hold numbers only")
    try:
        return np.array(flat, dtype=np.float32)
    except (OverflowError, ValueError):
        raise ProtocolError(f"input '{name}' data holds a number outside the FP32 range") from None


def _parameters(value: Any, where: str) -> dict[str, Any]:
    parameters = _object({} if value is None else value, f"{where} parameters")
    protocol.check_parameters(where, parameters)
    return parameters


def _inputs(header: dict[str, Any], binary: memoryview) -> list[InputTensor]:
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError(
            "missing input: 'inputs' must be a non-empty array; give 'image' (BYTES) or 'pixels' (FP32)"
        )
    tensors = []
    offset = 0
    for i, raw in enumerate(raw_inputs):
        item = _object(raw, f"inputs[{i}]")
        name = _string(item.get("name"), f"inputs[{i}].name")
        datatype = _string(item.get("datatype"), f"input '{name}' datatype")
        shape_value = item.get("shape")
        if not isinstance(shape_value, list):
            raise ProtocolError(f"input '{name}' shape must be an array of integers")
        shape = [_integer(d, f"input '{name}' shape") for d in shape_value]
        parameters = _parameters(item.get("parameters"), f"input '{name}'")
        protocol.check_input(name, datatype, shape)
        size = parameters.get("binary_data_size")
        if size is not None:
            size = _integer(size, f"input '{name}' parameter binary_data_size")
            if "data" in item:
                raise ProtocolError(f"input '{name}' has both 'data' and binary_data_size")
            if size < 0 or offset + size > len(binary):
                raise ProtocolError(
                    f"binary data length mismatch: input '{name}' declares {size} bytes at offset {offset}, "
                    f"the body holds {len(binary)} bytes after the JSON header"
                )
            chunk = binary[offset : offset + size]
            offset += size
            values = (
                protocol.deserialize_bytes(chunk, name) if datatype == "BYTES" else protocol.fp32_from_raw(chunk, name)
            )
        elif "data" in item:
            data = item["data"]
            values = _json_bytes(data, name) if datatype == "BYTES" else _json_fp32(data, name)
        else:
            raise ProtocolError(f"input '{name}' has no 'data' and no binary_data_size parameter")
        tensor = InputTensor(name, datatype, shape, values)
        protocol.check_count(tensor)
        tensors.append(tensor)
    if offset != len(binary):
        raise ProtocolError(
            f"binary data length mismatch: the inputs declare {offset} bytes, the body holds {len(binary)} "
            "after the JSON header"
        )
    return tensors


def _outputs(header: dict[str, Any]) -> list[OutputRequest]:
    raw_outputs = header.get("outputs", [])
    if not isinstance(raw_outputs, list):
        raise ProtocolError("'outputs' must be an array")
    requested = []
    for i, raw in enumerate(raw_outputs):
        item = _object(raw, f"outputs[{i}]")
        name = _string(item.get("name"), f"outputs[{i}].name")
        parameters = _parameters(item.get("parameters"), f"output '{name}'")
        k = parameters.get("classification")
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise ProtocolError(f"output '{name}' parameter binary_data must be true or false")
        requested.append(
            OutputRequest(name, None if k is None else _integer(k, f"output '{name}' classification"), binary)
        )
    return requested


def parse(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header and the binary tensor data after it (binary tensor data extension)."""
    view = memoryview(body)
    if header_length is None:
        size = len(body)
    else:
        if not header_length.strip().isdigit():
            raise ProtocolError(f"Inference-Header-Content-Length must be a byte count, got {header_length!r}")
        size = int(header_length)
        if size > len(body):
            raise ProtocolError(
                f"binary data length mismatch: Inference-Header-Content-Length is {size}, "
                f"the body has {len(body)} bytes"
            )
    try:
        header = json.loads(bytes(view[:size]))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ProtocolError(f"malformed JSON in the request: {str(exc)[:200]}") from None
    return _object(header, "the request"), view[size:]


async def read_body(request: Request, limit: int) -> bytes:
    body = await request.body()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
    decompressor = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = decompressor.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"body is not valid {encoding}: {exc}") from None
    if len(out) > limit or decompressor.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed request body exceeds the {limit} byte limit")
    return out


def encode(model: str, request_id: str, tensors: list[OutputTensor], binary_default: bool) -> Response:
    header: dict[str, Any] = {"model_name": model, "model_version": protocol.VERSION}
    if request_id:
        header["id"] = request_id
    blobs = []
    outputs = []
    for tensor in tensors:
        item: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary_default if tensor.binary is None else tensor.binary:
            blob = tensor.raw()
            blobs.append(blob)
            item["parameters"] = {"binary_data_size": len(blob)}
        else:
            item["data"] = tensor.json_data()
        outputs.append(item)
    header["outputs"] = outputs
    text = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return Response(text, media_type="application/json")
    return Response(
        b"".join([text, *blobs]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(text))},
    )


class V2Route(APIRoute):
    """Every /v2 route answers in the protocol's error form, whatever goes wrong."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                refusal = refuse(exc)
                return failure(refusal.outcome, refusal.message)

        return guarded


# --- routes ------------------------------------------------------------------------------------------------------


def create_router(service: Service) -> APIRouter:
    settings = service.settings
    router = APIRouter(include_in_schema=False, route_class=V2Route)

    @router.get("/v2")
    async def server_metadata() -> Response:
        return JSONResponse(protocol.server_metadata())

    @router.get("/v2/health/live")
    async def live() -> Response:
        return JSONResponse({"live": True})

    @router.get("/v2/health/ready")
    async def ready() -> Response:
        if service.ready:
            return JSONResponse({"ready": True})
        return failure(OUTCOMES["bad_request"], f"server is {service.phase.value}, not ready")  # "4xx: false"

    @router.get("/v2/models/{name}")
    @router.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str = "") -> Response:
        protocol.resolve(settings, name, version)
        return JSONResponse(protocol.model_metadata(settings))

    @router.get("/v2/models/{name}/ready")
    @router.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str = "") -> Response:
        model = protocol.resolve(settings, name, version)
        if service.ready:
            return JSONResponse({"name": model, "ready": True})
        return failure(OUTCOMES["bad_request"], f"model '{model}' is not ready: the server is {service.phase.value}")

    @router.get("/v2/models/{name}/config")
    @router.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, version: str = "") -> Response:
        protocol.resolve(settings, name, version)
        return JSONResponse(protocol.model_config(service))

    @router.post("/v2/models/{name}/infer")
    @router.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(request: Request, name: str, version: str = "") -> Response:
        model = protocol.resolve(settings, name, version)
        with service.admission() as admission:  # overload is refused before the body is read
            header_ms = timeout_header(request.headers.get(TIMEOUT_HEADER))
            body = await read_body(request, settings.max_upload_bytes)
            header, binary = parse(body, request.headers.get(HEADER_LENGTH))
            request_id = header.get("id", "")
            request_id = _string(request_id, "'id'")
            parameters = _parameters(header.get("parameters"), "the request")
            binary_default = parameters.get("binary_data_output", False)
            if not isinstance(binary_default, bool):
                raise ProtocolError("parameter binary_data_output must be true or false")
            deadline = service.deadline(header_ms, protocol.timeout_ms(parameters))
            job = protocol.Infer(service, model, _inputs(header, binary), _outputs(header), request_id)
            outputs = await unless_disconnected(request, job.run(deadline, admission))
        return encode(model, job.id, outputs, binary_default)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]

    @router.api_route("/v2", methods=methods)
    @router.api_route("/v2/{rest:path}", methods=methods)
    async def unknown(request: Request) -> Response:
        """After every route above: a path no route has (404), or a method its route does not take (405)."""
        found = template_of(request.url.path)
        if found is not None:
            message = f"{request.method} is not allowed on {found[1]}; use {found[0]}"
            return failure(OUTCOMES["method_not_allowed"], message)
        return failure(OUTCOMES["not_found"], f"no such endpoint: {request.method} {request.url.path}")

    return router
