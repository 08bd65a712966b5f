"""What both clients return and raise: the HTTP API's shapes, whichever protocol carried them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# (filename, encoded bytes), the filename being what results and error messages name.
ImageFile = tuple[str, bytes]


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    wnid: str
    score: float


@dataclass(frozen=True)
class ImageResult:
    filename: str
    predictions: list[Prediction]


@dataclass(frozen=True)
class Classification:
    model: str
    weights: str  # starts with "random" when the server has no pretrained weights
    results: list[ImageResult]
    request_id: str = ""

    def to_json(self) -> dict[str, Any]:
        """The HTTP API's `POST /classify` body."""
        return {
            "model": {"name": self.model, "weights": self.weights},
            "results": [
                {"filename": r.filename, "predictions": [p.__dict__ for p in r.predictions]} for r in self.results
            ],
        }

    @classmethod
    def from_json(cls, body: dict[str, Any], request_id: str = "") -> Classification:
        results = [
            ImageResult(r["filename"], [Prediction(**p) for p in r["predictions"]]) for r in body.get("results", [])
        ]
        return cls(body["model"]["name"], body["model"]["weights"], results, request_id)


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
