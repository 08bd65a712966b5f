"""A corpus of hostile, broken and merely odd image uploads, generated in memory.

Each case names the HTTP status the server documents for it; odd-but-valid images (1x1, 16-bit,
CMYK, every EXIF orientation...) must be classified (200), broken ones refused with a 4xx.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from dataclasses import dataclass
from functools import cache

from PIL import Image

from tests.conftest import photo


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    status: int  # HTTP status /classify answers
    code: str | None = None  # error code, for refusals


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def gif_declaring(width: int, height: int) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return b"GIF89a" + screen + descriptor + b"\x02\x02\x44\x01\x00\x3b"


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF header is rewritten to claim a huge size."""
    data = bytearray(_save(Image.new("RGB", (16, 16), (90, 120, 30)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _exif_jpeg(orientation: int) -> bytes:
    image = Image.new("RGB", (320, 240), (200, 40, 40))
    image.paste((20, 40, 220), (0, 0, 160, 60))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(image, "JPEG", exif=exif.tobytes())


def _ycck_jpeg() -> bytes:
    """Pillow writes Adobe CMYK; flipping the APP14 transform flag to 2 makes libjpeg read it as YCCK."""
    data = bytearray(_save(Image.new("CMYK", (64, 64), (10, 200, 30, 5)), "JPEG"))
    adobe = data.index(b"Adobe")
    data[adobe + 11] = 2
    return bytes(data)


def _animated_gif() -> bytes:
    frames = [Image.new("P", (64, 64), i * 40) for i in range(4)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _multipage_tiff() -> bytes:
    pages = [Image.new("RGB", (64, 48), (i * 60, 10, 10)) for i in range(3)]
    return _save(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def _palette_transparent() -> bytes:
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (0, 0, 32, 64))
    return _save(image, "PNG", transparency=0)


def _corrupt_markers(jpeg: bytes) -> bytes:
    """Remove the frame header (SOF0): the decoder meets scan data with no frame."""
    sof = jpeg.index(b"\xff\xc0")
    length = struct.unpack(">H", jpeg[sof + 2 : sof + 4])[0]
    return jpeg[:sof] + jpeg[sof + 2 + length :]


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cat.jpg", photo("cat.jpg"))
    return buffer.getvalue()


@cache
def cases() -> tuple[Case, ...]:
    cat = photo("cat.jpg")
    png = _save(Image.open(io.BytesIO(cat)), "PNG")
    rgb = Image.open(io.BytesIO(cat)).convert("RGB")
    refused = [
        Case("empty.jpg", b"", 415, "unsupported_image"),
        Case("one-byte.jpg", b"\xff", 415, "unsupported_image"),
        Case("notes.txt", b"just some text, not an image\n" * 20, 415, "unsupported_image"),
        Case("page.html", b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>", 415),
        Case("doc.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF", 415),
        Case("archive.zip", _zip(), 415, "unsupported_image"),
        Case("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', 415),
        Case("script.sh", b"#!/bin/sh\nrm -rf /\n", 415, "unsupported_image"),
        *(Case(f"cut-{n}.jpg", cat[:n], 422, "corrupt_image") for n in (2, 20, 300, 2000, len(cat) // 2)),
        *(Case(f"cut-{n}.png", png[:n], 422, "corrupt_image") for n in (8, 33, 200, len(png) // 2)),
        Case("no-frame.jpg", _corrupt_markers(cat), 422, "corrupt_image"),
        Case("huge-declared.jpg", jpeg_declaring(60000, 60000), 413, "image_too_large"),
        Case("bomb-30k.png", png_declaring(30000, 30000), 413, "image_too_large"),
        Case("bomb-64k.png", png_declaring(65535, 65535), 413, "image_too_large"),
        Case("bomb-30k.gif", gif_declaring(30000, 30000), 413, "image_too_large"),
        Case("bomb-65k.gif", gif_declaring(65535, 65535), 413, "image_too_large"),
        Case("zero-size.png", png_declaring(0, 10), 422, "corrupt_image"),
    ]
    odd_but_valid = [
        Case("1x1.png", _save(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"), 200),
        Case("1x3000.png", _save(Image.new("RGB", (1, 3000), (0, 255, 0)), "PNG"), 200),
        Case("3000x1.png", _save(Image.new("RGB", (3000, 1), (0, 0, 255)), "PNG"), 200),
        Case("gray16.png", _save(Image.new("I;16", (300, 200), 40000), "PNG"), 200),
        Case("cmyk.jpg", _save(rgb.convert("CMYK"), "JPEG"), 200),
        Case("ycck.jpg", _ycck_jpeg(), 200),
        Case("palette-transparent.png", _palette_transparent(), 200),
        Case("gray-alpha.png", _save(rgb.convert("LA"), "PNG"), 200),
        Case("animated.gif", _animated_gif(), 200),
        Case("multipage.tiff", _multipage_tiff(), 200),
        Case("trailing-garbage.jpg", cat + b"\0GARBAGE" * 100, 200),
        Case("cat.webp", _save(rgb, "WEBP"), 200),
        Case("cat.bmp", _save(rgb, "BMP"), 200),
        *(Case(f"exif-{o}.jpg", _exif_jpeg(o), 200) for o in range(1, 9)),
    ]
    return (*refused, *odd_but_valid)
