"""The evaluation transform the official LeViT checkpoints were measured with (no torchvision)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from model.configs import IMAGE_SIZE

RESIZE_SHORT_SIDE = 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# x_norm = (x/255 - mean) / std, folded into one multiply and one add per value.
_SCALE = (1.0 / (255.0 * torch.tensor(IMAGENET_STD))).view(1, 3, 1, 1)
_OFFSET = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)


def resized_size(width: int, height: int, short_side: int = RESIZE_SHORT_SIDE) -> tuple[int, int]:
    """torchvision's Resize(int): the short side becomes `short_side`, the long one is truncated."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def center_crop_box(width: int, height: int, size: int = IMAGE_SIZE) -> tuple[int, int, int, int]:
    """torchvision's CenterCrop offsets (rounded half-differences)."""
    left = round((width - size) / 2.0)
    top = round((height - size) / 2.0)
    return left, top, left + size, top + size


def resize_and_crop(image: Image.Image) -> Image.Image:
    """Bicubic resize of the short side to 256, then the central 224x224 crop of an RGB image.

    Only the crop is resampled (Pillow's `box`): same pixels as resizing everything and cropping
    (within one 8-bit level), but the cost no longer grows with the long side, so a 1x5000 strip
    cannot make the server allocate a 256x1280000 image.
    """
    width, height = image.size
    new_w, new_h = resized_size(width, height)
    left, top, right, bottom = center_crop_box(new_w, new_h)
    if (new_w, new_h) == (width, height):
        return image.crop((left, top, right, bottom))
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, right * sx, bottom * sy)
    return image.resize((right - left, bottom - top), Image.Resampling.BICUBIC, box=box)


def crop_pixels(image: Image.Image) -> torch.Tensor:
    """The resized centre crop of an RGB image as `[224, 224, 3]` uint8 (HWC, as Pillow stores it).

    Servers normalise these in the model thread, a whole batch at a time: 4x smaller in the queue,
    and one vectorised pass per batch instead of a float conversion per image in a decode thread.
    """
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
    return torch.from_numpy(np.array(resize_and_crop(image)))


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
