"""Async HTTP client for `POST /classify` and `GET /v1/model` (httpx), with the gRPC client's interface."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import httpx

from service.client.api import ClientError, ImageFile
from service.results import Classification

IMAGE_FIELD = "img"
_SLACK_S = 5.0  # the server answers 504 at the deadline; the socket timeout only catches a dead server


class HttpClient:
    def __init__(self, base_url: str, *, timeout: float = 60.0, **client_options: Any) -> None:
        """`timeout` (seconds): socket timeout when a call sets no deadline of its own."""
        self.base_url = base_url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, **client_options)

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def classify(
        self,
        images: Sequence[ImageFile],
        k: int | None = None,
        *,
        timeout: float | None = None,
        request_id: str = "",
    ) -> Classification:
        """`timeout` (seconds) is sent as X-Request-Timeout-Ms; None: the server's default request timeout."""
        headers = {}
        extra: dict[str, Any] = {}
        if timeout is not None:
            headers["X-Request-Timeout-Ms"] = str(max(1, math.ceil(timeout * 1000)))
            extra["timeout"] = timeout + _SLACK_S
        if request_id:
            headers["X-Request-Id"] = request_id
        files = [(IMAGE_FIELD, (name, data, "application/octet-stream")) for name, data in images]
        params = {"k": k} if k is not None else {}
        response = await self._send("POST", "/classify", files=files, params=params, headers=headers, **extra)
        return Classification.from_json(response.json(), response.headers.get("x-request-id", request_id))

    async def model(self) -> dict[str, Any]:
        return (await self._send("GET", "/v1/model")).json()

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.TimeoutException as error:
            raise ClientError("DEADLINE_EXCEEDED", f"no answer from {self.base_url}: {error!r}") from None
        except httpx.TransportError as error:
            raise ClientError("UNAVAILABLE", f"cannot reach {self.base_url}: {error}") from None
        if response.is_success:
            return response
        try:
            detail = response.json()["error"]
            reason, message = str(detail["code"]), str(detail["message"])
        except (ValueError, KeyError, TypeError):
            reason, message = "", response.text.strip() or response.reason_phrase
        raise ClientError(str(response.status_code), message, reason, response.headers.get("x-request-id", ""))
