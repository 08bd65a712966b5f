"""Pure ASGI middleware: request ids, latency metrics, in-flight gauge and the upload size limit.

Pure ASGI (not BaseHTTPMiddleware) so the body streams through untouched and client disconnects
stay visible to the handlers.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import PayloadTooLarge
from service.logs import request_id

log = logging.getLogger("levit.access")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


class RequestContext:
    def __init__(self, app: ASGIApp, max_body_bytes: int, routes: frozenset[str], protocol: str = "http") -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
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
        route = path if path in self.routes or path.startswith("/v2/") else "other"
        status = 500
        start = time.perf_counter()
        inflight = metrics.INFLIGHT.labels(self.protocol)
        inflight.inc()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                await self._reject_too_large(int(declared), send_wrapper)
                return
            await self.app(scope, self._limited(receive), send_wrapper)
        finally:
            elapsed = time.perf_counter() - start
            inflight.dec()
            metrics.REQUEST_LATENCY.labels(self.protocol, route, str(status)).observe(elapsed)
            log.info("%s %s -> %d in %.1f ms", scope["method"], path, status, elapsed * 1000)
            request_id.reset(token)

    async def _reject_too_large(self, size: int, send: Send) -> None:
        metrics.REJECTIONS.labels("too_large").inc()
        body = error_body("payload_too_large", f"request body of {size} bytes exceeds the {self.max_body_bytes} limit")
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _limited(self, receive: Receive) -> Receive:
        """Count streamed bytes too: chunked uploads declare no length."""
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise PayloadTooLarge(f"request body exceeds the {self.max_body_bytes} byte limit")
            return message

        return wrapped
