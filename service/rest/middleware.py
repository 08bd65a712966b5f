"""Pure ASGI middleware: request ids, latency metrics, in-flight gauge and the upload size limit; and the
HTTP side of the error vocabulary (`error_json`) and of the client-disconnect race (`unless_disconnected`).

Pure ASGI (not BaseHTTPMiddleware) so the body streams through untouched and client disconnects
stay visible to the handlers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs, metrics
from service.errors import OUTCOMES, Cancelled, Outcome, PayloadTooLarge, RequestTimeout
from service.rest import v2_routes as v2

MAX_HEADER_BYTES = 32 * 1024  # uvicorn's httptools parser sets no limit of its own
T = TypeVar("T")


def error_json(outcome: Outcome, message: str, v2_form: bool = False) -> tuple[int, dict]:
    """An outcome as HTTP renders it: the status, and the API's error JSON `{"error": {"code", "message"}}`;
    under /v2 the Open Inference Protocol's status and `{"error": message}`."""
    if v2_form:
        return outcome.v2_http or outcome.http, {"error": message}
    return outcome.http, {"error": {"code": outcome.code, "message": message}}


def error_response(outcome: Outcome, message: str, status: int | None = None) -> JSONResponse:
    """`error_json` as a response, with the outcome's headers (`Retry-After`)."""
    status_code, body = error_json(outcome, message)
    return JSONResponse(body, status_code=status or status_code, headers=outcome.headers)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, unless the client goes away first: then `work` is cancelled (its queued images are
    dropped before compute) and the request ends as 499 `cancelled`."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_until_disconnect(request))
    await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        raise Cancelled("client closed the request")
    gone.cancel()
    return task.result()


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class RequestContext:
    """Every HTTP request's id, metrics, header and body limits; then `endpoints[path]` if there is one (hot
    routes that skip the app's router), else the app."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        read_timeout_s: float,
        routes: frozenset[str],
        protocol: str = "http",
        endpoints: dict[str, ASGIApp] | None = None,
    ) -> None:
        self.app = app
        self.endpoints = endpoints or {}
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s
        self.routes = routes
        self.protocol = protocol

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        rid = logs.request_id_for(headers.get(b"x-request-id", b"").decode("latin-1"))
        path = scope["path"]
        v2_form = v2.is_v2(path)
        protocol = v2.PROTOCOL if v2_form else self.protocol
        route = v2.route_label(path) if v2_form else path if path in self.routes else "other"
        status = 500
        observation = metrics.Observation(protocol, route, f"{scope['method']} {path}")

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # Server-Timing: the server's own time to the answer, which browsers show next to the round trip.
                timing = f"app;dur={observation.elapsed_ms():.1f}".encode()
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", rid.encode()),
                    (b"server-timing", timing),
                ]
            await send(message)

        with logs.bound(rid):
            try:
                header_bytes = sum(len(k) + len(v) for k, v in scope["headers"])
                if header_bytes > MAX_HEADER_BYTES:
                    message = f"request headers of {header_bytes} bytes exceed the {MAX_HEADER_BYTES} byte limit"
                    await self._reject(OUTCOMES["headers_too_large"], message, send_wrapper, v2_form)
                    return
                declared = headers.get(b"content-length")
                if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                    message = f"request body of {int(declared)} bytes exceeds the {self.max_body_bytes} byte limit"
                    await self._discard(receive, int(declared))
                    await self._reject(OUTCOMES["payload_too_large"], message, send_wrapper, v2_form)
                    return
                app = self.endpoints.get(path, self.app)
                await app(scope, self._limited(receive), send_wrapper)
            finally:
                observation.finish(str(status))

    async def _discard(self, receive: Receive, declared: int) -> None:
        """Read and drop a refused body (up to twice the limit) so the client gets to read our answer.

        Closing on unread data makes the kernel reset the connection and most clients lose the 413.
        """
        budget = min(declared, 2 * self.max_body_bytes)
        while budget > 0:
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except TimeoutError:
                return
            if message["type"] != "http.request":
                return
            budget -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    @staticmethod
    async def _reject(outcome: Outcome, message: str, send: Send, v2_form: bool) -> None:
        """Answer without reading the body, and close: the rest of the upload is never read."""
        outcome.count()
        status, body = error_json(outcome, message, v2_form)
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    def _limited(self, receive: Receive) -> Receive:
        """Count streamed bytes (chunked uploads declare no length), time out stalled uploads, and end a request
        whose client went away mid-upload as 499 `cancelled`."""
        seen = 0
        body_done = False

        async def wrapped() -> Message:
            nonlocal seen, body_done
            if body_done:  # afterwards receive() only reports a disconnect: no timeout
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except TimeoutError:
                raise RequestTimeout(f"request body stalled for more than {self.read_timeout_s:g} s") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > self.max_body_bytes:
                    raise PayloadTooLarge(f"request body exceeds the {self.max_body_bytes} byte limit")
            elif message["type"] == "http.disconnect":  # mid-upload: the client's doing (Starlette would raise
                # ClientDisconnect, which the error ladder can only call a 500 internal)
                raise Cancelled(f"client closed the request after {seen} bytes of its body")
            return message

        return wrapped
