"""Async gRPC client for `levit.v1.Classifier`: unary calls and a pipelined stream.

async with GrpcClient("localhost:50051") as client:
    result = await client.classify(read_images(["cat.jpg"]), k=3, timeout=2.0)
    async with client.stream(k=3) as stream:          # one HTTP/2 stream, many requests in flight
        futures = [await stream.submit([("cat.jpg", data)]) for _ in range(100)]
        results = await asyncio.gather(*futures)         # ClientError raised per failed request
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import json_format
from grpc import aio

from service.client.api import ClientError, ImageFile
from service.grpc.gen.levit.v1 import classifier_pb2 as pb
from service.grpc.gen.levit.v1 import classifier_pb2_grpc as pb_grpc
from service.results import Classification, ImageResult, Prediction

ERROR_CODE_KEY = "levit-error-code"  # trailing metadata set by the server: the HTTP API's error.code
_STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_UINT64_FIELDS = ("parameters", "macs_per_image")  # proto3 JSON writes 64-bit integers as strings


def request(images: Sequence[ImageFile], k: int | None = None, request_id: str = "") -> pb.ClassifyRequest:
    message = pb.ClassifyRequest(
        images=[pb.Image(filename=name, data=data) for name, data in images], request_id=request_id
    )
    if k is not None:
        message.top_k = k
    return message


def classification(response: pb.ClassifyResponse) -> Classification:
    results = [
        ImageResult(r.filename, [Prediction(p.index, p.label, p.wnid, p.score) for p in r.predictions])
        for r in response.results
    ]
    return Classification(response.model.name, response.model.weights, results, response.request_id)


def client_error(error: aio.AioRpcError, request_id: str = "") -> ClientError:
    trailing = dict(error.trailing_metadata() or ())
    reason = trailing.get(ERROR_CODE_KEY, "")
    return ClientError(error.code().name, error.details() or "", reason if isinstance(reason, str) else "", request_id)


class GrpcClient:
    def __init__(self, target: str, *, options: Sequence[tuple[str, Any]] = ()) -> None:
        """`target`: "host:port". The server bounds request size; the client does not."""
        self.target = target
        self.channel = aio.insecure_channel(
            target,
            options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1), *options],
        )
        self.stub = pb_grpc.ClassifierStub(self.channel)

    async def __aenter__(self) -> GrpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def classify(
        self,
        images: Sequence[ImageFile],
        k: int | None = None,
        *,
        timeout: float | None = None,
        request_id: str = "",
    ) -> Classification:
        """`timeout` (seconds) becomes the gRPC deadline; None: the server's default request timeout."""
        try:
            response = await self.stub.Classify(request(images, k, request_id), timeout=timeout)
        except aio.AioRpcError as error:
            raise client_error(error, request_id) from None
        return classification(response)

    async def model(self, *, timeout: float | None = 10.0) -> dict[str, Any]:
        """The model metadata, shaped like HTTP `GET /v1/model`."""
        try:
            info = await self.stub.GetModel(pb.GetModelRequest(), timeout=timeout)
        except aio.AioRpcError as error:
            raise client_error(error) from None
        body = json_format.MessageToDict(
            info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        for name in _UINT64_FIELDS:
            body[name] = int(body[name])
        body["weights"]["sha256"] = body["weights"]["sha256"] or None
        body.setdefault("engine_artifact", None)  # an unset message field: HTTP writes null
        return body

    def stream(self, k: int | None = None, *, timeout: float | None = None) -> ClassifyStream:
        """A ClassifyStream; `timeout` bounds the whole stream (None: open until closed)."""
        return ClassifyStream(self.stub, k, timeout)


class ClassifyStream:
    """Requests written as they come, responses matched to them by request id (they may come back out of order).

    Use as `async with`: leaving the block half-closes the stream and waits for the outstanding responses.
    If the stream itself ends with an error (server draining: UNAVAILABLE), every unanswered request fails
    with that error.
    """

    def __init__(self, stub: pb_grpc.ClassifierStub, k: int | None, timeout: float | None) -> None:
        self._stub = stub
        self._k = k
        self._timeout = timeout
        self._call: Any = None
        self._pending: dict[str, asyncio.Future[Classification]] = {}
        self._ids = itertools.count()
        self._write_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._closed: ClientError | None = None

    async def __aenter__(self) -> ClassifyStream:
        self._call = self._stub.ClassifyStream(timeout=self._timeout)
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            await self.aclose()
        else:
            self.cancel()

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    async def submit(
        self, images: Sequence[ImageFile], k: int | None = None, request_id: str | None = None
    ) -> asyncio.Future[Classification]:
        """Send one request; the returned future resolves to its Classification or raises ClientError.

        Returns once the request is written: when the server's window is full, flow control makes this wait.
        """
        if self._call is None:
            raise RuntimeError("use `async with client.stream() as stream`")
        if self._closed is not None:
            raise self._closed
        rid = request_id or f"r{next(self._ids)}"
        if rid in self._pending:
            raise ValueError(f"request id {rid!r} is already in flight on this stream")
        future: asyncio.Future[Classification] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            async with self._write_lock:
                await self._call.write(request(images, self._k if k is None else k, rid))
        except (aio.AioRpcError, asyncio.InvalidStateError) as error:
            self._pending.pop(rid, None)
            raise self._closed or ClientError("UNAVAILABLE", f"stream closed: {error}") from None
        return future

    async def classify(self, images: Sequence[ImageFile], k: int | None = None) -> Classification:
        return await (await self.submit(images, k))

    async def _read(self) -> None:
        try:
            while (response := await self._call.read()) is not aio.EOF:
                future = self._pending.pop(response.request_id, None)
                if future is None or future.done():
                    continue
                if response.HasField("error"):
                    status = _STATUS_NAMES.get(response.error.code, "UNKNOWN")
                    future.set_exception(
                        ClientError(status, response.error.message, response.error.reason, response.request_id)
                    )
                else:
                    future.set_result(classification(response))
            self._closed = ClientError("CANCELLED", "stream ended")
        except aio.AioRpcError as error:
            self._closed = client_error(error)
        except asyncio.CancelledError:
            self._closed = ClientError("CANCELLED", "stream cancelled by the client")
            raise
        finally:
            closed = self._closed or ClientError("CANCELLED", "stream ended")
            for rid, future in self._pending.items():
                if not future.done():
                    future.set_exception(ClientError(closed.status, closed.message, closed.reason, rid))
            self._pending.clear()

    async def aclose(self) -> None:
        """Half-close and wait for every outstanding response."""
        if self._call is None:
            return
        with contextlib.suppress(aio.AioRpcError, asyncio.InvalidStateError):
            async with self._write_lock:
                await self._call.done_writing()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    def cancel(self) -> None:
        """Abandon the stream: the server drops the queued work of every outstanding request."""
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
