"""The gRPC side of the error vocabulary (service.errors.OUTCOMES) and of the per-request metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import NoReturn, TypeVar

import grpc
from grpc import aio

from service import metrics
from service.errors import OUTCOMES, Outcome, Refusal, refuse

ERROR_CODE_KEY = "levit-error-code"  # trailing metadata: the HTTP API's machine-readable `error.code`
Response = TypeVar("Response")

# A client gives up at its deadline and cancels the call a network delay before the server's copy of the deadline
# (the grpc-timeout it received) runs out: a cancellation this close to the deadline is the deadline.
DEADLINE_SLACK_S = 0.05


def status_of(outcome: Outcome) -> grpc.StatusCode:
    return grpc.StatusCode[outcome.grpc]


def timeout_ms(context: aio.ServicerContext) -> float | None:
    """What is left of the RPC's deadline, for `Service.deadline`; None when the client set none."""
    remaining = context.time_remaining()
    return None if remaining is None else remaining * 1000


def expired(context: aio.ServicerContext) -> bool:
    """True when the RPC's deadline has passed, or is about to (see DEADLINE_SLACK_S)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= DEADLINE_SLACK_S


def abandoned(context: aio.ServicerContext) -> grpc.StatusCode:
    """The status of an RPC whose handler was cancelled: the deadline passed, or the client went away."""
    outcome = OUTCOMES["deadline_exceeded" if expired(context) else "cancelled"]
    outcome.count()
    return status_of(outcome)


async def settle(context: aio.ServicerContext, compute: Callable[[], Awaitable[Response]]) -> Response | Refusal:
    """The response, or the refusal (service.errors.refuse: counted, unexpected errors logged) to send instead.

    A cancelled handler re-raises: grpc.aio cancels it when the client goes away or the deadline passes, and the
    cancellation reached the batcher, which drops the request's queued images before compute.
    """
    try:
        return await compute()
    except asyncio.CancelledError:
        abandoned(context)
        raise
    except Exception as error:
        return refuse(error)


async def answer(context: aio.ServicerContext, compute: Callable[[], Awaitable[Response]]) -> Response:
    """A unary RPC's response; a refusal aborts the RPC with its status and `levit-error-code`."""
    result = await settle(context, compute)
    if isinstance(result, Refusal):
        await abort(context, result.outcome, result.message)
    return result


class Observed:
    """levit_inflight_requests and levit_request_duration_seconds for one request (metrics.Observation).

    `status` is set by the code inside the block; when it stays None the outcome is read from the context and
    the exception: the code given to abort() if any, else OK without exception, DEADLINE_EXCEEDED or CANCELLED
    on cancellation, UNKNOWN (what grpc answers) for any other exception.
    """

    def __init__(self, method: str, context: aio.ServicerContext, protocol: str = "grpc") -> None:
        self.method = method
        self.context = context
        self.protocol = protocol
        self.status: grpc.StatusCode | None = None

    def __enter__(self) -> Observed:
        self._observation = metrics.Observation(self.protocol, self.method, f"gRPC {self.method}")
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._observation.finish((self.status or self._outcome(error)).name)

    def _outcome(self, error: BaseException | None) -> grpc.StatusCode:
        code = self.context.code()
        if code is not None:  # set by abort(), even when the client was gone before the status could be sent
            return code
        if error is None:
            return grpc.StatusCode.OK
        if isinstance(error, asyncio.CancelledError):
            return grpc.StatusCode.DEADLINE_EXCEEDED if expired(self.context) else grpc.StatusCode.CANCELLED
        return grpc.StatusCode.UNKNOWN


async def abort(context: aio.ServicerContext, outcome: Outcome, message: str) -> NoReturn:
    """context.abort() with the outcome's status, and its code in the trailing metadata. When the call is already
    over (the client cancelled, or gave up at its deadline, while the server was answering) the status cannot be
    sent: that is a cancellation, not a server error to log."""
    context.set_trailing_metadata(((ERROR_CODE_KEY, outcome.code),))
    try:
        await context.abort(status_of(outcome), message)
    except aio.InternalError:
        raise asyncio.CancelledError from None
    raise AssertionError("unreachable: context.abort raises")
