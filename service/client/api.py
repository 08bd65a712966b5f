"""What both clients take and raise; what they return is `service.results`, whichever protocol carried it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

# (filename, encoded bytes), the filename being what results and error messages name.
ImageFile = tuple[str, bytes]


class ClientError(Exception):
    """A refused or failed request.

    `status`: the gRPC status name (e.g. "INVALID_ARGUMENT") or the HTTP status code as a string ("415").
    `reason`: the server's machine-readable code shared by both protocols (e.g. "corrupt_image",
    "queue_full"); empty when the server did not give one (e.g. it could not be reached).
    `message`: the server's sentence, naming the file when there is one.
    """

    def __init__(self, status: str, message: str, reason: str = "", request_id: str = "") -> None:
        super().__init__(status, message, reason, request_id)
        self.status = status
        self.message = message
        self.reason = reason
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"

    @property
    def retryable(self) -> bool:
        """Worth retrying later or on another replica: queue full, loading, draining, unreachable."""
        return self.status in ("UNAVAILABLE", "503") or self.reason == "queue_full"


def read_images(paths: Iterable[str | Path]) -> list[ImageFile]:
    return [(Path(p).name, Path(p).read_bytes()) for p in paths]
