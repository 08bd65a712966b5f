"""Untrusted upload bytes to an RGB PIL image that `model.transforms.preprocess` accepts.

Everything a client can get wrong ends as an `ImageError` subclass (a `service.errors.ServiceError`)
carrying a machine code and a sentence naming the file, so the HTTP and gRPC layers only translate it.
No Pillow global (MAX_IMAGE_PIXELS, LOAD_TRUNCATED_IMAGES) is changed and nothing is shared between
calls, so the functions are safe to call concurrently from a thread pool (Pillow releases the GIL
while decoding and resizing).

Truncation: every pixel must come from the file, or the answer is CorruptImage (422); the checks
that close the holes Pillow leaves live in `service/imaging/truncation.py`.
"""

from __future__ import annotations

import re
import struct
from io import BytesIO
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from model.crop import RESIZE_SHORT_SIDE, crop_array
from service.errors import ServiceError
from service.imaging.truncation import load_complete

if TYPE_CHECKING:
    import torch

SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})  # MPO: multi-picture JPEG
# Pillow has no MPO opener: its JPEG plugin recognises multi-picture files and returns them as "MPO".
_OPEN_FORMATS = tuple(sorted(SUPPORTED_FORMATS - {"MPO"}))

# What Pillow's decoders raise on damaged input (its fuzz tests' list); anything else, MemoryError
# included, is the server's problem and propagates.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)

# Magic numbers of the supported formats: data that starts like one of them but cannot be identified is a
# damaged image (422), not an unsupported one (415). WebP is checked separately (RIFF....WEBP).
_SIGNATURES = (b"\xff\xd8", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")

# EXIF orientation -> the transpose that shows the picture upright (ImageOps.exif_transpose's table).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_FULL_SCALES = {"F": (1.0, 255.0, 65535.0), "I": (255.0, 65535.0)}  # see _gray_range
_BACKGROUND = (255, 255, 255)  # transparent pixels become white, as a browser shows them on a page


class ImageError(ServiceError):
    """Client's fault: a code of service.errors.OUTCOMES (which gives the HTTP and gRPC statuses) and a sentence."""

    def __init__(self, filename: str, message: str) -> None:
        Exception.__init__(self, filename, message)  # both in args, so the error pickles and re-raises intact
        self.filename = filename
        self.message = message

    def __str__(self) -> str:
        return self.message


class ImageTooLarge(ImageError):
    """More pixels than the server is configured to decode (413)."""

    code = "image_too_large"


class UnsupportedImage(ImageError):
    """Not an image, or a format outside SUPPORTED_FORMATS (415)."""

    code = "unsupported_image"


class CorruptImage(ImageError):
    """A supported format whose data is truncated, damaged or empty of pixels (422)."""

    code = "corrupt_image"


def decode_image(data: bytes, *, filename: str, max_pixels: int, exact: bool = False) -> Image.Image:
    """Return an upright RGB image; raise only ImageError subclasses for bad input.

    `exact=False` lets large JPEGs decode at a reduced DCT scale that still covers the model's resize.
    """
    name = _quote(filename)
    if not data:
        raise UnsupportedImage(filename, f"{name} is empty (0 bytes)")
    try:
        with Image.open(BytesIO(data), formats=_OPEN_FORMATS) as image:
            _check_size(image, filename, max_pixels)
            if not exact:
                _draft_for_model(image)
            return to_rgb(_upright(load_complete(image, data, draft=None if exact else _draft_for_model)))
    except UnidentifiedImageError:
        if _has_signature(data):
            raise CorruptImage(filename, f"{name} starts like an image but its header is unreadable") from None
        raise UnsupportedImage(filename, f"{name} is not a JPEG, PNG, WebP, GIF, BMP or TIFF image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLarge(filename, _bomb_message(name, error, max_pixels)) from None
    except _DECODE_ERRORS as error:
        raise CorruptImage(filename, f"{name} is truncated or corrupt: {error}") from None


def load_image_array(data: bytes, *, filename: str, max_pixels: int, exact: bool = False) -> np.ndarray:
    """decode_image + model.crop.crop_array -> [224,224,3] uint8, what the server queues (no torch needed)."""
    return crop_array(decode_image(data, filename=filename, max_pixels=max_pixels, exact=exact))


def load_image_pixels(data: bytes, *, filename: str, max_pixels: int, exact: bool = False) -> torch.Tensor:
    """`load_image_array` as a tensor: [224,224,3] uint8 (imports torch: not for front-end processes)."""
    import torch

    return torch.from_numpy(load_image_array(data, filename=filename, max_pixels=max_pixels, exact=exact))


def load_image_tensor(data: bytes, *, filename: str, max_pixels: int, exact: bool = False) -> torch.Tensor:
    """decode_image + model.transforms.preprocess -> [3,224,224] float32, the model's input (imports torch)."""
    from model.transforms import preprocess

    return preprocess(decode_image(data, filename=filename, max_pixels=max_pixels, exact=exact))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: alpha composited over white, 16/32-bit and float gray rescaled to 8 bits.

    An RGB image without transparency comes back as itself: convert() would copy it (~20 ms at 12 MP).
    """
    if image.mode in _WIDE_GRAY_MODES:
        image = _wide_gray_to_l(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return _flatten(image)
    if image.mode == "RGB":
        return image
    return image.convert("RGB")  # 1, L, P, RGBX, CMYK, YCbCr, LAB and HSV have exact Pillow conversions


def _check_size(image: Image.Image, filename: str, max_pixels: int) -> None:
    """Reject by the header's dimensions, before a single pixel is decoded."""
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            filename,
            f"{_quote(filename)} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}",
        )
    if width == 0 or height == 0:
        raise CorruptImage(filename, f"{_quote(filename)} has no pixels ({width}x{height})")


def _draft_for_model(image: Image.Image) -> None:
    """Let libjpeg downscale in the DCT (1/2, 1/4, 1/8) while the short side stays >= the 256 resize.

    Only worth it from twice the target up; the bicubic resize in model.crop finishes the job.
    Pillow picks the largest scale whose result still covers the requested size on both axes, and
    `draft` is a no-op for every format but JPEG and MPO.
    """
    width, height = image.size
    short = min(width, height)
    if short >= 2 * RESIZE_SHORT_SIDE:
        target = RESIZE_SHORT_SIDE
        image.draft("RGB", (-(-width * target // short), -(-height * target // short)))


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; transposing after a draft decode is as correct as after a full one."""
    method = _ORIENTATION.get(image.getexif().get(ExifTags.Base.Orientation, 1))
    return image if method is None else image.transpose(method)


def _flatten(image: Image.Image) -> Image.Image:
    """Composite over white: the model never saw alpha, and black behind a transparent logo misleads it."""
    if image.mode == "La":
        image = image.convert("LA")  # Pillow has no La -> RGBA conversion
    rgba = image.convert("RGBA")  # also applies palette / tRNS transparency
    background = Image.new("RGB", rgba.size, _BACKGROUND)
    background.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return background


def _wide_gray_to_l(image: Image.Image) -> Image.Image:
    """Map 16-bit, 32-bit and float gray linearly onto 0..255 instead of letting Pillow clip at 255."""
    pixels = np.array(image, dtype=np.float32)  # a copy: it is scaled in place
    np.nan_to_num(pixels, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = _gray_range(image.mode, float(pixels.min()), float(pixels.max()))
    pixels -= low
    pixels *= 255.0 / (high - low or 1.0)
    return Image.fromarray(np.rint(np.clip(pixels, 0.0, 255.0, out=pixels)).astype(np.uint8))


def _gray_range(mode: str, low: float, high: float) -> tuple[float, float]:
    """The values that become black and white: the smallest conventional full scale holding the data.

    16-bit modes are always 0..65535. "I" (Pillow's 32-bit int) and "F" carry no scale of their own, so
    the data picks one: 0..1 (floats only), 0..255 (Pillow's own convention) or 0..65535 (16-bit samples
    in a wider container); negative or larger data is stretched from its min to its max.
    """
    if low >= 0:
        for full in _FULL_SCALES.get(mode, (65535.0,)):
            if high <= full:
                return 0.0, full
    return low, high


def _has_signature(data: bytes) -> bool:
    """Does the data start like a supported format (so an open failure means damage, not a wrong type)?"""
    head = bytes(data[:12])  # also right for a memoryview or bytearray body
    return head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _bomb_message(name: str, error: Exception, max_pixels: int) -> str:
    """Pillow's own bomb check fired first (far over any sane limit); recover its pixel count if it says."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    pixels = f"{int(found.group(1)):,} pixels" if found else "more pixels than Pillow accepts"
    return f"{name} is {pixels}, over the limit of {max_pixels:,}"


def _quote(filename: str) -> str:
    """The filename as it appears in messages: quoted, control characters escaped, length capped."""
    shown = filename if len(filename) <= 100 else filename[:97] + "..."
    return f"image {shown!r}" if shown else "the image"
