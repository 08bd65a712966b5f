"""Pure ASGI middleware: request ids, latency metrics, in-flight gauge and the upload size limit.

Pure ASGI (not BaseHTTPMiddleware) so the body streams through untouched and client disconnects
stay visible to the handlers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import PayloadTooLarge, RequestTimeout
from service.logs import request_id
from service.v2 import routes as v2

log = logging.getLogger("levit.access")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
MAX_HEADER_BYTES = 32 * 1024  # uvicorn's httptools parser sets no limit of its own


def error_body(code: str, message: str, v2_form: bool = False) -> bytes:
    """The API's error JSON; under /v2 the Open Inference Protocol's `{"error": message}`."""
    return json.dumps({"error": message} if v2_form else {"error": {"code": code, "message": message}}).encode()


class RequestContext:
    def __init__(
        self, app: ASGIApp, max_body_bytes: int, read_timeout_s: float, routes: frozenset[str], protocol: str = "http"
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s
        self.routes = routes
        self.protocol = protocol

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _VALID_ID.match(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        path = scope["path"]
        v2_form = v2.is_v2(path)
        protocol = v2.PROTOCOL if v2_form else self.protocol
        route = v2.route_label(path) if v2_form else path if path in self.routes else "other"
        status = 500
        start = time.perf_counter()
        inflight = metrics.INFLIGHT.labels(protocol)
        inflight.inc()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            header_bytes = sum(len(k) + len(v) for k, v in scope["headers"])
            if header_bytes > MAX_HEADER_BYTES:
                message = f"request headers of {header_bytes} bytes exceed the {MAX_HEADER_BYTES} byte limit"
                await self._reject(431, "headers_too_large", message, send_wrapper, v2_form)
                return
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                message = f"request body of {int(declared)} bytes exceeds the {self.max_body_bytes} byte limit"
                await self._discard(receive, int(declared))
                await self._reject(413, "payload_too_large", message, send_wrapper, v2_form)
                return
            await self.app(scope, self._limited(receive), send_wrapper)
        finally:
            elapsed = time.perf_counter() - start
            inflight.dec()
            metrics.REQUEST_LATENCY.labels(protocol, route, str(status)).observe(elapsed)
            log.info("%s %s -> %d in %.1f ms", scope["method"], path, status, elapsed * 1000)
            request_id.reset(token)

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
    async def _reject(status: int, code: str, message: str, send: Send, v2_form: bool = False) -> None:
        """Answer without reading the body, and close: the rest of the upload is never read."""
        metrics.REJECTIONS.labels("too_large").inc()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": error_body(code, message, v2_form)})

    def _limited(self, receive: Receive) -> Receive:
        """Count streamed bytes (chunked uploads declare no length) and time out stalled uploads."""
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
            return message

        return wrapped
