"""timm's `levit_128s` with timm's own eval transform: the one model every peer serves.

Runs inside a peer's virtual environment (torch, torchvision, timm, Pillow only), imported by each
peer's handler/app, and as a script it is the in-process reference the benchmark checks every peer's
answers against (`python peer_model.py CHECKPOINT IMAGE...` prints one JSON line per image).
"""

from __future__ import annotations

import io
import json
import sys

import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

MODEL_NAME = "levit_128s"
TOP_K = 5


def load_model(checkpoint: str) -> torch.nn.Module:
    """The model the way timm's docs load local weights: `create_model(..., checkpoint_path=...)`, eval mode."""
    return timm.create_model(MODEL_NAME, pretrained=False, checkpoint_path=checkpoint).eval()


def eval_transform(model: torch.nn.Module):  # -> a torchvision Compose
    """timm's eval pipeline for the model's pretrained config: resize 248 bicubic, crop 224, ImageNet normalise."""
    return create_transform(**resolve_data_config({}, model=model))


def preprocess(data: bytes, transform) -> torch.Tensor:
    """Encoded image bytes -> a normalised 3x224x224 tensor (PIL decode, RGB, timm transform)."""
    with Image.open(io.BytesIO(data)) as image:
        return transform(image.convert("RGB"))


def forward(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Class probabilities for a batch (softmax over the 1000 ImageNet classes)."""
    with torch.inference_mode():
        return model(batch).softmax(dim=-1)


def top5(probabilities: torch.Tensor) -> dict[str, list]:
    """The answer every peer returns for one image: top-5 class indices and their probabilities."""
    scores, indices = probabilities.topk(TOP_K)
    return {"indices": indices.tolist(), "scores": scores.tolist()}


def main(argv: list[str]) -> None:
    """Reference answers: batch 1, in process, one JSON line per image file, plus the versions used."""
    model = load_model(argv[0])
    transform = eval_transform(model)
    import torchvision

    print(json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__}))
    for path in argv[1:]:
        with open(path, "rb") as file:
            x = preprocess(file.read(), transform)
        print(json.dumps(top5(forward(model, x.unsqueeze(0))[0])))


if __name__ == "__main__":
    main(sys.argv[1:])
