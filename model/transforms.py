"""The evaluation transform the official LeViT checkpoints were measured with (no torchvision)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from model.configs import IMAGE_SIZE

RESIZE_SHORT_SIDE = 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# x_norm = (x/255 - mean) / std, folded into one multiply-add per pixel.
_SCALE = (1.0 / (255.0 * np.asarray(IMAGENET_STD, dtype=np.float32))).astype(np.float32)
_OFFSET = (-np.asarray(IMAGENET_MEAN, dtype=np.float32) / np.asarray(IMAGENET_STD, dtype=np.float32)).astype(np.float32)


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


def normalize(image: Image.Image) -> torch.Tensor:
    """A 224x224 RGB image to a float32 CHW tensor with ImageNet normalisation."""
    pixels = np.asarray(image, dtype=np.float32)
    chw = (pixels * _SCALE + _OFFSET).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(chw))


def preprocess(image: Image.Image) -> torch.Tensor:
    """The reference transform: RGB PIL image in, `[3, 224, 224]` float32 tensor out."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
    return normalize(resize_and_crop(image))
