"""Turn `LEVIT_WEIGHTS` (auto | random | PATH | URL) into a training-form model and a weights record."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from model.checkpoint import load_checkpoint
from model.levit import LeViT, build_levit
from model.weights import WeightsError, download, fetch_official, sha256_file

log = logging.getLogger(__name__)
RANDOM_SEED = 0


@dataclass(frozen=True)
class WeightsInfo:
    source: str  # "official", "file", "url" or "random"
    path: str | None = None
    sha256: str | None = None

    @property
    def pretrained(self) -> bool:
        return self.source != "random"

    @property
    def id(self) -> str:
        """Short name carried by every response, so random weights can never pass unnoticed."""
        if self.source == "random":
            return f"random(seed={RANDOM_SEED})"
        return f"{self.source}:{Path(self.path or '').name}@{(self.sha256 or '')[:12]}"


def random_model(variant: str) -> LeViT:
    """Deterministic across runs and processes, without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return build_levit(variant).eval()


def _from_file(path: Path, variant: str, source: str) -> tuple[LeViT, WeightsInfo]:
    model = load_checkpoint(path, variant)
    return model, WeightsInfo(source, str(path), sha256_file(path))


def load_weights(
    variant: str, spec: str, cache_dir: Path, require_pretrained: bool = False, timeout: float = 10.0
) -> tuple[LeViT, WeightsInfo]:
    """Raises WeightsError/CheckpointError with a one-line reason when the weights cannot be used."""
    if spec == "random":
        if require_pretrained:
            raise WeightsError("LEVIT_WEIGHTS=random contradicts LEVIT_REQUIRE_PRETRAINED=true")
        return random_model(variant), WeightsInfo("random")
    if spec.startswith(("http://", "https://")):
        return _from_file(download(spec, cache_dir, timeout=timeout), variant, "url")
    if spec != "auto":
        return _from_file(Path(spec), variant, "file")
    try:
        return _from_file(fetch_official(variant, cache_dir, timeout=timeout), variant, "official")
    except WeightsError as error:
        if require_pretrained:
            raise
        log.warning("NO PRETRAINED WEIGHTS: %s; serving a RANDOM %s: predictions are meaningless", error, variant)
        return random_model(variant), WeightsInfo("random")
