"""Clients for levit-serve: `GrpcClient` and `HttpClient` (async, same interface) and the `levit-client` CLI.

`GrpcClient` is imported lazily so that HTTP-only users need not load the gRPC stubs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service.client.api import ClientError, ImageFile, read_images
from service.client.http_client import HttpClient
from service.results import Classification, ImageResult, Prediction

if TYPE_CHECKING:
    from service.client.grpc_client import ClassifyStream, GrpcClient

__all__ = [
    "Classification",
    "ClassifyStream",
    "ClientError",
    "GrpcClient",
    "HttpClient",
    "ImageFile",
    "ImageResult",
    "Prediction",
    "read_images",
]


def __getattr__(name: str) -> Any:
    if name in ("GrpcClient", "ClassifyStream"):
        from service.client import grpc_client

        return getattr(grpc_client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
