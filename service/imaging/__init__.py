"""Turning untrusted upload bytes into model input."""

from service.imaging.decode import (
    SUPPORTED_FORMATS,
    CorruptImage,
    ImageError,
    ImageTooLarge,
    UnsupportedImage,
    decode_image,
    load_image_array,
    load_image_pixels,
    load_image_tensor,
    to_rgb,
)

__all__ = [
    "SUPPORTED_FORMATS",
    "CorruptImage",
    "ImageError",
    "ImageTooLarge",
    "UnsupportedImage",
    "decode_image",
    "load_image_array",
    "load_image_pixels",
    "load_image_tensor",
    "to_rgb",
]
