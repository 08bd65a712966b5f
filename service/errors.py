"""Failures every protocol maps to its own status: HTTP code + JSON body, or a gRPC status."""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class RequestTimeout(ServiceError):
    status, code = 408, "request_timeout"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class QueueFull(ServiceError):
    status, code = 503, "queue_full"


class Draining(ServiceError):
    status, code = 503, "draining"


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class DeadlineExceeded(ServiceError):
    status, code = 504, "deadline_exceeded"


class ModelFailure(ServiceError):
    status, code = 500, "model_error"


REJECTION_BY_CODE = {
    "queue_full": "queue_full",
    "deadline_exceeded": "deadline",
    "draining": "draining",
    "not_ready": "draining",
    "payload_too_large": "too_large",
    "image_too_large": "too_large",
    "bad_request": "bad_input",
    "request_timeout": "bad_input",
    "unsupported_image": "bad_input",
    "corrupt_image": "bad_input",
    "model_error": "model_error",
}
