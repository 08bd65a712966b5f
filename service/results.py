"""What a classification is, in the HTTP API's shapes: what the server answers and both clients return.

Torch-free, so the clients import it without the model's dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
