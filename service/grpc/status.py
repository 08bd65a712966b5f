"""Service and image errors as gRPC status codes, and the per-request metrics of the gRPC side."""

from __future__ import annotations

import asyncio
import logging
import time
from types import TracebackType
from typing import NoReturn

import grpc
from grpc import aio

from service import metrics
from service.errors import REJECTION_BY_CODE, ServiceError
from service.imaging import ImageError

access_log = logging.getLogger("levit.access")
ERROR_CODE_KEY = "levit-error-code"  # trailing metadata: the HTTP API's machine-readable `error.code`

# By the machine code both protocols share (service.errors, service.imaging), so HTTP 413 "too many images"
# and 413 "too many pixels" both become RESOURCE_EXHAUSTED, and 415/422 both INVALID_ARGUMENT.
STATUS_BY_CODE: dict[str, grpc.StatusCode] = {
    "bad_request": grpc.StatusCode.INVALID_ARGUMENT,
    "unsupported_image": grpc.StatusCode.INVALID_ARGUMENT,
    "corrupt_image": grpc.StatusCode.INVALID_ARGUMENT,
    "payload_too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "image_too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "queue_full": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "request_timeout": grpc.StatusCode.DEADLINE_EXCEEDED,  # HTTP 408, a stalled upload: gRPC has none
    "draining": grpc.StatusCode.UNAVAILABLE,
    "not_ready": grpc.StatusCode.UNAVAILABLE,
    "model_error": grpc.StatusCode.INTERNAL,
}
# For a code added later without an entry above.
_STATUS_BY_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_of(error: ServiceError | ImageError) -> grpc.StatusCode:
    return STATUS_BY_CODE.get(error.code) or _STATUS_BY_HTTP.get(error.status, grpc.StatusCode.INTERNAL)


def reject(error: ServiceError | ImageError) -> grpc.StatusCode:
    """The status for `error`, counted in levit_rejections as HTTP counts it."""
    reason = REJECTION_BY_CODE.get(error.code)
    if reason:
        metrics.REJECTIONS.labels(reason).inc()
    return status_of(error)


# A client gives up at its deadline and cancels the call a network delay before the server's copy of the deadline
# (the grpc-timeout it received) runs out: a cancellation this close to the deadline is the deadline.
DEADLINE_SLACK_S = 0.05


def expired(context: aio.ServicerContext) -> bool:
    """True when the RPC's deadline has passed, or is about to (see DEADLINE_SLACK_S)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= DEADLINE_SLACK_S


def abandoned(context: aio.ServicerContext) -> grpc.StatusCode:
    """The status of an RPC whose handler was cancelled: the deadline passed, or the client went away."""
    if expired(context):
        metrics.REJECTIONS.labels("deadline").inc()
        return grpc.StatusCode.DEADLINE_EXCEEDED
    metrics.REJECTIONS.labels("cancelled").inc()
    return grpc.StatusCode.CANCELLED


class Observed:
    """levit_inflight_requests{protocol="grpc"} and levit_request_duration_seconds for one request.

    `status` is set by the code inside the block; when it stays None the outcome is read from the context and
    the exception: the code given to abort() if any, else OK without exception, DEADLINE_EXCEEDED or CANCELLED
    on cancellation, UNKNOWN (what grpc answers) for any other exception.
    """

    def __init__(self, method: str, context: aio.ServicerContext) -> None:
        self.method = method
        self.context = context
        self.status: grpc.StatusCode | None = None
        self._inflight = metrics.INFLIGHT.labels("grpc")

    def __enter__(self) -> Observed:
        self._start = time.perf_counter()
        self._inflight.inc()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        elapsed = time.perf_counter() - self._start
        self._inflight.dec()
        status = self.status or self._outcome(error)
        metrics.REQUEST_LATENCY.labels("grpc", self.method, status.name).observe(elapsed)
        access_log.info("gRPC %s -> %s in %.1f ms", self.method, status.name, elapsed * 1000)

    def _outcome(self, error: BaseException | None) -> grpc.StatusCode:
        code = self.context.code()
        if code is not None:  # set by abort(), even when the client was gone before the status could be sent
            return code
        if error is None:
            return grpc.StatusCode.OK
        if isinstance(error, asyncio.CancelledError):
            return grpc.StatusCode.DEADLINE_EXCEEDED if expired(self.context) else grpc.StatusCode.CANCELLED
        return grpc.StatusCode.UNKNOWN


async def abort(context: aio.ServicerContext, status: grpc.StatusCode, message: str, reason: str = "") -> NoReturn:
    """context.abort(), with HTTP's error code in the trailing metadata. When the call is already over (the
    client cancelled, or gave up at its deadline, while the server was answering) the status cannot be sent:
    that is a cancellation, not a server error to log."""
    if reason:
        context.set_trailing_metadata(((ERROR_CODE_KEY, reason),))
    try:
        await context.abort(status, message)
    except aio.InternalError:
        raise asyncio.CancelledError from None
    raise AssertionError("unreachable: context.abort raises")
