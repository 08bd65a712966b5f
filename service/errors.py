"""The one error vocabulary: every failure by its machine code, and how each protocol reports it.

`OUTCOMES` is the only table of it: code -> HTTP status (and the Open Inference Protocol's, where it
differs), gRPC status, the `reason` label of `levit_rejections_total`, and whether `Retry-After` goes with
it. The protocol adapters render an `Outcome` (HTTP JSON body, gRPC status + `levit-error-code` trailing
metadata); none of them maps errors on its own. `refuse` is the one exception ladder they all go through.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from service import metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    code: str  # the HTTP API's `error.code`, gRPC's `levit-error-code`
    http: int
    grpc: str  # a grpc.StatusCode name: this module imports no transport
    reason: str | None = None  # levit_rejections_total{reason}; None: not counted
    retry_after: bool = False  # HTTP answers carry `Retry-After: 1`
    v2_http: int | None = None  # the status under /v2 when it differs (the protocol has no 415/422)

    @property
    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": "1"} if self.retry_after else None

    def count(self) -> None:
        if self.reason:
            metrics.REJECTIONS.labels(self.reason).inc()


OUTCOMES: dict[str, Outcome] = {
    outcome.code: outcome
    for outcome in (
        Outcome("bad_request", 400, "INVALID_ARGUMENT", "bad_input"),
        Outcome("invalid_parameter", 422, "INVALID_ARGUMENT", "bad_input", v2_http=400),
        Outcome("not_found", 404, "NOT_FOUND"),
        Outcome("model_not_found", 404, "NOT_FOUND"),
        Outcome("method_not_allowed", 405, "UNIMPLEMENTED"),
        Outcome("request_timeout", 408, "DEADLINE_EXCEEDED", "bad_input"),  # a stalled upload: gRPC has none
        Outcome("payload_too_large", 413, "RESOURCE_EXHAUSTED", "too_large"),
        Outcome("image_too_large", 413, "RESOURCE_EXHAUSTED", "too_large"),
        Outcome("unsupported_image", 415, "INVALID_ARGUMENT", "bad_input", v2_http=400),
        Outcome("corrupt_image", 422, "INVALID_ARGUMENT", "bad_input", v2_http=400),
        Outcome("headers_too_large", 431, "RESOURCE_EXHAUSTED", "too_large"),
        Outcome("cancelled", 499, "CANCELLED", "cancelled"),  # the client went away (nginx's 499)
        Outcome("model_error", 500, "INTERNAL", "model_error"),
        Outcome("internal", 500, "INTERNAL"),
        Outcome("queue_full", 503, "RESOURCE_EXHAUSTED", "queue_full", retry_after=True),
        Outcome("not_ready", 503, "UNAVAILABLE", "draining", retry_after=True),
        Outcome("draining", 503, "UNAVAILABLE", "draining", retry_after=True),
        Outcome("deadline_exceeded", 504, "DEADLINE_EXCEEDED", "deadline"),
    )
}


class ServiceError(Exception):
    """A failure with a code of OUTCOMES; `status` is its HTTP status, read from the table."""

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.status = OUTCOMES[cls.code].http  # a code missing from the table fails at import

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def outcome(self) -> Outcome:
        return OUTCOMES[self.code]


class BadRequest(ServiceError):
    code = "bad_request"


class InvalidParameter(ServiceError):
    code = "invalid_parameter"


class RequestTimeout(ServiceError):
    code = "request_timeout"


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"


class QueueFull(ServiceError):
    code = "queue_full"


class Draining(ServiceError):
    code = "draining"


class NotReady(ServiceError):
    code = "not_ready"


class DeadlineExceeded(ServiceError):
    code = "deadline_exceeded"


class ModelFailure(ServiceError):
    code = "model_error"


class Cancelled(ServiceError):
    code = "cancelled"


@dataclass(frozen=True)
class Refusal:
    outcome: Outcome
    message: str


def refuse(error: Exception) -> Refusal:
    """The one exception ladder: a ServiceError (image errors are ServiceErrors too) answers with its own
    code; anything else is a bug, logged with its traceback, and a 500 `internal`. Counted in
    levit_rejections_total by the outcome's reason."""
    if isinstance(error, ServiceError):
        refusal = Refusal(error.outcome, error.message)
    else:
        log.error("unhandled error", exc_info=error)
        refusal = Refusal(OUTCOMES["internal"], f"internal error: {type(error).__name__}")
    refusal.outcome.count()
    return refusal
