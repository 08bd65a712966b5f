"""The evaluation transform the official LeViT checkpoints were measured with (no torchvision)."""

from __future__ import annotations

import torch
from PIL import Image

from model.crop import RESIZE_SHORT_SIDE, center_crop_box, crop_array, resize_and_crop, resized_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# x_norm = (x/255 - mean) / std, folded into one multiply and one add per value.
_SCALE = (1.0 / (255.0 * torch.tensor(IMAGENET_STD))).view(1, 3, 1, 1)
_OFFSET = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "RESIZE_SHORT_SIDE", "batch_input", "center_crop_box", "crop_array",
    "crop_pixels", "normalize", "preprocess", "resize_and_crop", "resized_size",
]  # fmt: skip


def crop_pixels(image: Image.Image) -> torch.Tensor:
    """`model.crop.crop_array` as a tensor (sharing its memory): `[224, 224, 3]` uint8."""
    return torch.from_numpy(crop_array(image))


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 `[B, H, W, 3]` to the model's float32 `[B, 3, H, W]` with ImageNet normalisation."""
    batch = pixels.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    return batch.mul_(_SCALE).add_(_OFFSET)


def batch_input(images: list[torch.Tensor]) -> torch.Tensor:
    """One model batch from `crop_pixels` outputs (uint8) and already normalised `[3, H, W]` float tensors."""
    if all(image.dtype == torch.uint8 for image in images):
        return normalize(torch.stack(images))
    return torch.stack([normalize(i[None])[0] if i.dtype == torch.uint8 else i for i in images])


def preprocess(image: Image.Image) -> torch.Tensor:
    """The reference transform: RGB PIL image in, `[3, 224, 224]` float32 tensor out."""
    return normalize(crop_pixels(image)[None])[0]
