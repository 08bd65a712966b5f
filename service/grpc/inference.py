"""`inference.GRPCInferenceService`: the Open Inference Protocol over gRPC, in the same grpc.aio server as
levit.v1.Classifier, on the same Service.

Inputs come as `raw_input_contents` (what tritonclient and perf_analyzer send) or typed `contents`; outputs
always go out as `raw_output_contents`, as Triton answers. Errors are gRPC statuses: INVALID_ARGUMENT (bad
request or image), NOT_FOUND (unknown model or version), RESOURCE_EXHAUSTED (queue full, too many images or
pixels), DEADLINE_EXCEEDED, UNAVAILABLE (loading, draining), INTERNAL (model failure); the trailing metadata
`levit-error-code` carries the HTTP API's machine code, as on levit.v1.Classifier.
Statuses and codes come from service.errors.OUTCOMES. Requests are observed in the metrics with
protocol="v2-grpc" (by the server's interceptor; a stream per request, here).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format
from grpc import aio

from service.core import Service
from service.grpc.gen.inference import grpc_service_pb2 as pb
from service.grpc.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.grpc.gen.inference import model_config_pb2 as config_pb
from service.grpc.status import Observed, answer, timeout_ms
from service.grpc.streams import Write, respond, serve_stream, stream_window
from service.v2 import protocol
from service.v2.protocol import InputTensor, OutputRequest, OutputTensor, ProtocolError

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # "inference.GRPCInferenceService"
METHODS = frozenset(f"/{SERVICE_NAME}/{m.name}" for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods)
STREAM_METHOD = f"/{SERVICE_NAME}/ModelStreamInfer"
PROTOCOL = "v2-grpc"
Request = TypeVar("Request")
Response = TypeVar("Response")


def unary(
    behavior: Callable[[Any, Request, aio.ServicerContext], Awaitable[Response]],
) -> Callable[[Any, Request, aio.ServicerContext], Awaitable[Response]]:
    """Service and image errors become their status (service.grpc.status.answer)."""

    @functools.wraps(behavior)
    async def call(self: Any, request: Request, context: aio.ServicerContext) -> Response:
        return await answer(context, lambda: behavior(self, request, context))

    return call


# --- translations ----------------------------------------------------------------------------------------------


def value_of(parameter: pb.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def parameters_of(where: str, parameters: Any) -> dict[str, Any]:
    values = {key: value_of(parameter) for key, parameter in parameters.items()}
    protocol.check_parameters(where, values)
    return values


def inputs_of(request: pb.ModelInferRequest) -> list[InputTensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; give one per input"
        )
    tensors = []
    for i, item in enumerate(request.inputs):
        shape = list(item.shape)
        parameters_of(f"input '{item.name}'", item.parameters)
        protocol.check_input(item.name, item.datatype, shape)
        values: list[bytes] | np.ndarray
        if raw:
            if item.HasField("contents"):
                raise ProtocolError(f"input '{item.name}' has both contents and raw_input_contents")
            if item.datatype == "BYTES":
                values = protocol.deserialize_bytes(raw[i], item.name)
            else:
                values = protocol.fp32_from_raw(raw[i], item.name)
        else:
            contents = item.contents
            others = [f.name for f, _ in contents.ListFields() if f.name not in ("bytes_contents", "fp32_contents")]
            if others:
                raise ProtocolError(f"input '{item.name}' ({item.datatype}) cannot carry {others[0]}")
            if item.datatype == "BYTES":
                values = list(contents.bytes_contents)
            else:
                values = np.array(contents.fp32_contents, dtype=np.float32)
        tensor = InputTensor(item.name, item.datatype, shape, values)
        protocol.check_count(tensor)
        tensors.append(tensor)
    return tensors


def outputs_of(request: pb.ModelInferRequest) -> list[OutputRequest]:
    requested = []
    for item in request.outputs:
        parameters = parameters_of(f"output '{item.name}'", item.parameters)
        k = parameters.get("classification")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool)):
            raise ProtocolError(f"output '{item.name}' parameter classification must be an integer, got {k!r}")
        requested.append(OutputRequest(item.name, k))
    return requested


def response_of(model: str, request_id: str, tensors: list[OutputTensor]) -> pb.ModelInferResponse:
    return pb.ModelInferResponse(
        model_name=model,
        model_version=protocol.VERSION,
        id=request_id,
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in tensors
        ],
        raw_output_contents=[t.raw() for t in tensors],
    )


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: Service, draining: asyncio.Event, window: int | None = None) -> None:
        self.service = service
        self.settings = service.settings
        self._draining = draining  # set when the service stops accepting work: streams then end
        self.window = window or stream_window(self.settings.max_batch_size)

    async def _infer(
        self, request: pb.ModelInferRequest, context: aio.ServicerContext, streamed: bool = False
    ) -> pb.ModelInferResponse:
        model = protocol.resolve(self.settings, request.model_name, request.model_version)
        with self.service.admission() as admission:
            parameters = parameters_of("the request", request.parameters)
            deadline = self.service.deadline(timeout_ms(context), protocol.timeout_ms(parameters), stream=streamed)
            job = protocol.Infer(self.service, model, inputs_of(request), outputs_of(request), request.id)
            return response_of(model, job.id, await job.run(deadline, admission))

    # --- RPCs ------------------------------------------------------------------------------------------------------

    @unary
    async def ServerLive(self, request: pb.ServerLiveRequest, context: aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @unary
    async def ServerReady(self, request: pb.ServerReadyRequest, context: aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.service.ready)

    @unary
    async def ModelReady(self, request: pb.ModelReadyRequest, context: aio.ServicerContext) -> pb.ModelReadyResponse:
        protocol.resolve(self.settings, request.name, request.version)
        return pb.ModelReadyResponse(ready=self.service.ready)

    @unary
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return json_format.ParseDict(protocol.server_metadata(), pb.ServerMetadataResponse())

    @unary
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        protocol.resolve(self.settings, request.name, request.version)
        return json_format.ParseDict(protocol.model_metadata(self.settings), pb.ModelMetadataResponse())

    @unary
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: aio.ServicerContext) -> pb.ModelConfigResponse:
        protocol.resolve(self.settings, request.name, request.version)
        config = json_format.ParseDict(protocol.model_config(self.service), config_pb.ModelConfig())
        return pb.ModelConfigResponse(config=config)

    @unary
    async def ModelInfer(self, request: pb.ModelInferRequest, context: aio.ServicerContext) -> pb.ModelInferResponse:
        return await self._infer(request, context)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: aio.ServicerContext
    ) -> None:
        """Reads while fewer than `window` requests are in progress; answers each as soon as it is done."""
        await serve_stream(request_iterator, context, self._draining, self.window, self._stream_one)

    async def _stream_one(self, request: pb.ModelInferRequest, context: aio.ServicerContext, write: Write) -> None:
        """One request of a stream, observed in the metrics as one request of route STREAM_METHOD."""

        async def compute() -> pb.ModelStreamInferResponse:
            return pb.ModelStreamInferResponse(infer_response=await self._infer(request, context, True))

        def failed(status: grpc.StatusCode, message: str, reason: str) -> pb.ModelStreamInferResponse:
            return pb.ModelStreamInferResponse(
                error_message=message, infer_response=pb.ModelInferResponse(id=request.id)
            )

        with Observed(STREAM_METHOD, context, PROTOCOL) as observed:
            await respond(observed, context, compute, failed, write)
