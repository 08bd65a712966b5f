"""Response shapes of the HTTP API (they also document it in OpenAPI)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class PredictionOut(BaseModel):
    index: int = Field(description="ImageNet-1k class index (0..999)")
    label: str = Field(description="short class name (first WordNet lemma)")
    wnid: str = Field(description="WordNet id, e.g. n02123045")
    score: float = Field(description="softmax probability")


class ImageOut(BaseModel):
    filename: str
    predictions: list[PredictionOut] = Field(description="sorted by score, highest first")


class ModelRef(BaseModel):
    name: str = Field(description="LeViT variant")
    weights: str = Field(description="weights id; starts with 'random' when no pretrained weights were loaded")


class ClassifyOut(BaseModel):
    model: ModelRef
    results: list[ImageOut] = Field(description="one entry per uploaded image, in upload order")


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable, e.g. corrupt_image, queue_full, deadline_exceeded")
    message: str = Field(description="what went wrong, naming the file when there is one")


class ErrorOut(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str
