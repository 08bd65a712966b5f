"""`levit.v1.Classifier`: thin translations between protobuf messages and `Service`, like the HTTP routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from google.protobuf import json_format
from grpc import aio

from service import logs
from service.core import Service, Upload
from service.errors import NotReady
from service.grpc.gen.levit.v1 import classifier_pb2 as pb
from service.grpc.gen.levit.v1 import classifier_pb2_grpc as pb_grpc
from service.grpc.status import Observed, answer, timeout_ms
from service.grpc.streams import Write, respond, serve_stream, stream_window
from service.results import ImageResult

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name  # "levit.v1.Classifier"
STREAM_METHOD = f"/{SERVICE_NAME}/ClassifyStream"


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, service: Service, draining: asyncio.Event, window: int | None = None) -> None:
        self.service = service
        self.settings = service.settings
        self._draining = draining  # set when the service stops accepting work: streams then end
        self.window = window or stream_window(self.settings.max_batch_size)

    # --- translations -------------------------------------------------------------------------------------

    def _response(self, request: pb.ClassifyRequest, results: list[ImageResult]) -> pb.ClassifyResponse:
        return pb.ClassifyResponse(
            request_id=request.request_id[: logs.MAX_REQUEST_ID],
            model=pb.ModelRef(name=self.settings.model, weights=self.service.weights_id),
            results=[
                pb.ImageResult(
                    filename=r.filename,
                    predictions=[
                        pb.Prediction(index=p.index, label=p.label, wnid=p.wnid, score=p.score) for p in r.predictions
                    ],
                )
                for r in results
            ],
        )

    async def _classify(
        self, request: pb.ClassifyRequest, context: aio.ServicerContext, stream: bool = False
    ) -> pb.ClassifyResponse:
        with self.service.admission() as admission:
            deadline = self.service.deadline(timeout_ms(context), stream=stream)
            uploads = [Upload(image.filename or f"image {i}", image.data) for i, image in enumerate(request.images)]
            k = request.top_k if request.HasField("top_k") else None
            return self._response(request, await self.service.classify(uploads, k, deadline, admission))

    @staticmethod
    def _request_id(request: pb.ClassifyRequest, context: aio.ServicerContext) -> str:
        return logs.request_id_for(request.request_id, dict(context.invocation_metadata() or ()).get("x-request-id"))

    # --- RPCs ----------------------------------------------------------------------------------------------

    async def Classify(self, request: pb.ClassifyRequest, context: aio.ServicerContext) -> pb.ClassifyResponse:
        with logs.bound(self._request_id(request, context)):
            return await answer(context, lambda: self._classify(request, context))

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyRequest], context: aio.ServicerContext
    ) -> None:
        """Reads while fewer than `window` requests are in progress; answers each as soon as it is done."""
        await serve_stream(request_iterator, context, self._draining, self.window, self._stream_one)

    async def _stream_one(self, request: pb.ClassifyRequest, context: aio.ServicerContext, write: Write) -> None:
        """One request of a stream, observed in the metrics as one request of route STREAM_METHOD."""

        def failed(status: grpc.StatusCode, message: str, reason: str) -> pb.ClassifyResponse:
            error = pb.Error(code=status.value[0], message=message, reason=reason)
            return pb.ClassifyResponse(request_id=request.request_id[: logs.MAX_REQUEST_ID], error=error)

        with logs.bound(self._request_id(request, context)), Observed(STREAM_METHOD, context) as observed:
            await respond(observed, context, lambda: self._classify(request, context, stream=True), failed, write)

    async def GetModel(self, request: pb.GetModelRequest, context: aio.ServicerContext) -> pb.ModelInfo:
        return await answer(context, self._model_info)

    async def _model_info(self) -> pb.ModelInfo:
        if self.service.model_info is None:
            raise NotReady("model is still loading")
        return model_info(self.service.model_info)


def model_info(description: dict) -> pb.ModelInfo:
    """`ModelRuntime.describe()` (the `GET /v1/model` body) as a ModelInfo; None becomes the empty default.

    Keys the proto does not know yet are ignored here, and tests/test_grpc.py fails until the proto has them.
    """

    def drop_none(value: object) -> object:
        if isinstance(value, dict):
            return {k: drop_none(v) for k, v in value.items() if v is not None}
        return value

    return json_format.ParseDict(drop_none(description), pb.ModelInfo(), ignore_unknown_fields=True)
