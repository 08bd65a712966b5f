"""ImageNet-1k class list in the official label order, shipped inside the package."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources


@dataclass(frozen=True)
class ImageNetClass:
    index: int
    wnid: str
    label: str  # first WordNet lemma, the usual short name
    lemmas: tuple[str, ...]


@cache
def imagenet_classes() -> tuple[ImageNetClass, ...]:
    text = resources.files("model").joinpath("imagenet1k_classes.tsv").read_text(encoding="utf-8")
    classes = []
    for line in text.splitlines()[1:]:
        index, wnid, description = line.split("\t")
        lemmas = tuple(s.strip() for s in description.split(","))
        classes.append(ImageNetClass(int(index), wnid, lemmas[0], lemmas))
    if [c.index for c in classes] != list(range(1000)):
        raise RuntimeError("imagenet1k_classes.tsv must list indices 0..999 in order")
    return tuple(classes)
