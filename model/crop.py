"""The evaluation transform's geometry, without torch: resize the short side to 256, crop the central 224.

Front-end processes decode and crop every upload and never run the model, so this half of the transform is
kept free of torch (150 MB and most of a second per process to import); `model.transforms` adds the
normalisation the model needs and re-exports these names.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from model.configs import IMAGE_SIZE

RESIZE_SHORT_SIDE = 256


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


def crop_array(image: Image.Image) -> np.ndarray:
    """The resized centre crop of an RGB image as `[224, 224, 3]` uint8 (HWC, as Pillow stores it).

    Servers normalise these where the model runs (its process or thread), a whole batch at a time: 4x smaller
    in the queue, and one vectorised pass per batch instead of a float conversion per image in a decode thread.
    """
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
    return np.array(resize_and_crop(image))
