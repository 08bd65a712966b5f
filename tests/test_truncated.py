"""Truncated images are 422 corrupt_image in every format; complete ones still decode, pixel for pixel.

Every file is built here with Pillow (or by hand where Pillow cannot write the damage), then cut:
inside the first frame's pixel data, just before its end, or with the container kept intact around a
compressed stream that stops early (the case Pillow decodes "successfully", padding with black/grey).
"""

from __future__ import annotations

import itertools
import random
import struct
import zlib
from io import BytesIO

import httpx
import numpy as np
import pytest
from PIL import Image

from service.imaging import CorruptImage, decode_image
from tests.conftest import PHOTOS, ServerThread

LIMIT = 50_000_000


# --- building files -------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def decode(data: bytes, *, exact: bool = False) -> np.ndarray:
    return np.asarray(decode_image(data, filename="cut.img", max_pixels=LIMIT, exact=exact))


def pillow_rgb(data: bytes) -> np.ndarray:
    """What Pillow itself makes of a complete file (first frame), for the images built here."""
    with Image.open(BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def noise(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """No flat areas, no black rows: every missing byte shows."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def two_tone(width: int = 100, height: int = 70) -> Image.Image:
    """Flat areas: tiny Huffman tables and long end-of-block runs, where few bits carry few pixels."""
    pixels = np.zeros((height, width), np.uint8)
    pixels[:, : width // 2] = 200
    pixels[height // 2 :, : width // 3] = 90
    return Image.fromarray(pixels)


def photo(width: int, height: int) -> Image.Image:
    with Image.open(PHOTOS / "coffee.jpg") as image:
        return image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_from_rows(
    width: int,
    height: int,
    rows: bytes,
    *,
    depth: int = 8,
    colour: int = 2,
    interlace: int = 0,
    idat_size: int = 0,
    palette: bytes = b"",
) -> bytes:
    """A PNG whose IDAT zlib stream is exactly `rows` (filtered scanlines), optionally split into chunks."""
    stream = zlib.compress(rows)
    size = idat_size or len(stream)
    idats = b"".join(chunk(b"IDAT", stream[i : i + size]) for i in range(0, len(stream), size))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    plte = chunk(b"PLTE", palette) if palette else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + plte + idats + chunk(b"IEND", b"")


def scanlines(pixels: np.ndarray) -> bytes:
    """Filter type 0 before each row of a [h, w, c] (or [h, w]) uint8/uint16-big-endian array."""
    return b"".join(b"\0" + row.tobytes() for row in pixels)


def adam7_scanlines(pixels: np.ndarray) -> bytes:
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    return b"".join(scanlines(pixels[y0::dy, x0::dx]) for x0, y0, dx, dy in passes if pixels[y0::dy, x0::dx].size)


def gif_frame_start(data: bytes) -> int:
    """Offset of the first image descriptor (','), skipping the colour table and extensions."""
    position = 13 + (3 * (2 << (data[10] & 7)) if data[10] & 0x80 else 0)
    while data[position] == 0x21:
        position += 2
        while data[position]:
            position += 1 + data[position]
        position += 1
    assert data[position] == 0x2C
    return position


def gif_lzw_span(data: bytes) -> tuple[int, int]:
    """(first sub-block length byte, block terminator) of the first frame's LZW data."""
    frame = gif_frame_start(data)
    flags = data[frame + 9]
    position = frame + 10 + (3 * (2 << (flags & 7)) if flags & 0x80 else 0) + 1  # + LZW minimum code size
    start = position
    while data[position]:
        position += 1 + data[position]
    return start, position


def lzw_literals(indices: list[int], stop: int | None = None) -> bytes:
    """8-bit GIF LZW made of literal codes (a clear code every 254 keeps codes 9 bits); EOI after `stop`."""
    codes: list[int] = []
    for i, index in enumerate(indices[:stop]):
        if i % 254 == 0:
            codes.append(256)
        codes.append(index)
    codes.append(257)
    bits = sum(code << (9 * i) for i, code in enumerate(codes))
    return bits.to_bytes(-(-9 * len(codes) // 8), "little")


def gif_from_lzw(width: int, height: int, stream: bytes) -> bytes:
    """A GIF with a 256-grey palette whose only frame holds `stream` in proper sub-blocks."""
    screen = (
        b"GIF89a"
        + struct.pack("<HHBBB", width, height, 0xF7, 0, 0)
        + bytes(np.repeat(np.arange(256, dtype=np.uint8), 3))
    )
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x08"
    blocks = b"".join(bytes([len(stream[i : i + 255])]) + stream[i : i + 255] for i in range(0, len(stream), 255))
    return screen + frame + blocks + b"\0;"


def tiff_strip_span(data: bytes) -> tuple[int, int]:
    with Image.open(BytesIO(data)) as image:
        offsets, counts = image.tag_v2[273], image.tag_v2[279]
    return min(offsets), max(o + c for o, c in zip(offsets, counts, strict=True))


def tiff_with_strip_count(data: bytes, count: int) -> bytes:
    """Re-declare the single strip's byte count (tag 279) of the first IFD; every byte stays in place."""
    (ifd,) = struct.unpack_from("<I", data, 4)
    (entries,) = struct.unpack_from("<H", data, ifd)
    out = bytearray(data)
    for entry in range(ifd + 2, ifd + 2 + 12 * entries, 12):
        tag, kind, number = struct.unpack_from("<HHI", data, entry)
        if tag == 279:
            assert number == 1
            struct.pack_into("<I" if kind == 4 else "<H", out, entry + 8, count)
            return bytes(out)
    raise AssertionError("no StripByteCounts")


def jpeg_scan_span(data: bytes) -> tuple[int, int]:
    """(first byte after the first SOS header, the first EOI marker) for the files Pillow writes here."""
    sos = data.index(b"\xff\xda")
    return sos + 2 + struct.unpack_from(">H", data, sos + 2)[0], data.index(b"\xff\xd9", sos)


def webp_frame_span(data: bytes) -> tuple[int, int]:
    """The VP8/VP8L bitstream of the first frame (simple or inside the first ANMF chunk)."""
    starts = [p for p in (data.find(b"VP8 "), data.find(b"VP8L")) if p > 0]
    start = min(starts)
    return start + 8, start + 8 + struct.unpack_from("<I", data, start + 4)[0]


def png_idat_span(data: bytes) -> tuple[int, int]:
    """The IDAT data up to zlib's 4-byte checksum and the byte before it, which may hold nothing but the
    end-of-block code: without them every row has arrived, so the image decodes (as it should)."""
    last = data.rindex(b"IDAT")
    return data.index(b"IDAT") + 4, last + 4 + struct.unpack_from(">I", data, last - 4)[0] - 5


def bmp_pixel_span(data: bytes) -> tuple[int, int]:
    return struct.unpack_from("<I", data, 10)[0], len(data)


def _formats() -> dict[str, bytes]:
    image = noise()
    return {
        "jpeg": encode(image, "JPEG", quality=90),
        "jpeg-progressive": encode(image, "JPEG", progressive=True),
        "jpeg-restart": encode(image, "JPEG", restart_marker_blocks=3),
        "jpeg-gray": encode(image.convert("L"), "JPEG"),
        "jpeg-progressive-restart": encode(image, "JPEG", progressive=True, restart_marker_blocks=2),
        "jpeg-two-tone": encode(two_tone(), "JPEG", quality=95, progressive=True, restart_marker_blocks=7),
        "mpo": encode(image, "MPO", save_all=True, append_images=[noise(seed=1)]),
        "png": encode(image, "PNG"),
        "png-interlaced": png_from_rows(64, 48, adam7_scanlines(np.asarray(image)), interlace=1),
        "png-palette": encode(image.convert("P"), "PNG"),
        "png-multi-idat": png_from_rows(64, 48, scanlines(np.asarray(image)), idat_size=1000),
        "webp": encode(image, "WEBP", quality=80),
        "webp-lossless": encode(image, "WEBP", lossless=True),
        "webp-animated": encode(image, "WEBP", save_all=True, append_images=[noise(seed=1)], lossless=True),
        "gif": encode(image.convert("P"), "GIF"),
        "gif-animated": encode(image.convert("P"), "GIF", save_all=True, append_images=[noise(seed=1).convert("P")]),
        "bmp": encode(image, "BMP"),
        "bmp-palette": encode(image.convert("P"), "BMP"),
        "tiff": encode(image, "TIFF"),
        "tiff-lzw": encode(image, "TIFF", compression="tiff_lzw"),
        "tiff-deflate": encode(image, "TIFF", compression="tiff_adobe_deflate"),
        "tiff-packbits": encode(image, "TIFF", compression="packbits"),
        "tiff-jpeg": encode(image, "TIFF", compression="jpeg"),
        "tiff-pages": encode(image, "TIFF", save_all=True, append_images=[noise(seed=1)]),
    }


FILES = _formats()
SPANS = {
    "jpeg": jpeg_scan_span,
    "mpo": jpeg_scan_span,
    "png": png_idat_span,
    "webp": webp_frame_span,
    "gif": gif_lzw_span,
    "bmp": bmp_pixel_span,
    "tiff": tiff_strip_span,
}


def pixel_span(name: str) -> tuple[int, int]:
    start, end = SPANS[name.split("-")[0]](FILES[name])
    assert 0 < start < end <= len(FILES[name]), (name, start, end)
    return start, end


# --- cut files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FILES))
def test_complete_file_decodes_as_pillow_does(name: str) -> None:
    assert np.array_equal(decode(FILES[name], exact=True), pillow_rgb(FILES[name]))
    assert np.array_equal(decode(FILES[name]), pillow_rgb(FILES[name]))  # small: no draft


@pytest.mark.parametrize("where", ["first byte", "quarter", "middle", "three quarters", "last byte"])
@pytest.mark.parametrize("name", sorted(FILES))
def test_cut_inside_the_first_frame_is_corrupt(name: str, where: str) -> None:
    start, end = pixel_span(name)
    cut = {
        "first byte": start + 1,
        "quarter": start + (end - start) // 4,
        "middle": (start + end) // 2,
        "three quarters": start + 3 * (end - start) // 4,
        "last byte": end - 1,
    }[where]
    with pytest.raises(CorruptImage) as caught:
        decode(FILES[name][:cut])
    assert caught.value.status == 422 and caught.value.code == "corrupt_image"
    assert "'cut.img'" in caught.value.message


@pytest.mark.parametrize("name", sorted(FILES))
def test_every_cut_in_the_last_hundred_bytes_of_pixel_data_is_corrupt(name: str) -> None:
    data = FILES[name]
    start, end = pixel_span(name)
    for cut in range(max(start + 1, end - 100), end):
        with pytest.raises(CorruptImage):
            decode(data[:cut])


@pytest.mark.parametrize("name", ["gif-animated", "tiff-pages", "mpo"])
def test_a_cut_in_a_later_frame_keeps_the_first_frame(name: str) -> None:
    """Only the first frame is decoded (docs/decode.md), so a later frame cut short does not matter."""
    data = FILES[name]
    _, end = pixel_span(name)
    assert np.array_equal(decode(data[: (end + len(data)) // 2]), decode(data))


# --- intact containers around short streams -------------------------------------------------------


@pytest.mark.parametrize("kept_rows", [1, 10, 47])
def test_png_zlib_stream_ending_on_a_row_boundary_is_corrupt(kept_rows: int) -> None:
    """The issue's case: Pillow decodes it "successfully" with the missing rows black."""
    pixels = np.asarray(noise())
    data = png_from_rows(64, 48, scanlines(pixels[:kept_rows]))
    with Image.open(BytesIO(data)) as image:
        image.load()  # Pillow alone does not notice
    with pytest.raises(CorruptImage, match=r"pixel data ends early \(the zlib stream holds"):
        decode(data)


@pytest.mark.parametrize("kept_passes", [1, 4, 6])
def test_interlaced_png_stream_ending_after_a_pass_is_corrupt(kept_passes: int) -> None:
    pixels = np.asarray(noise())
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    rows = b"".join(scanlines(pixels[y0::dy, x0::dx]) for x0, y0, dx, dy in passes[:kept_passes])
    with pytest.raises(CorruptImage):
        decode(png_from_rows(64, 48, rows, interlace=1))


@pytest.mark.parametrize(("depth", "colour", "channels"), [(1, 0, 1), (16, 0, 1), (8, 3, 1), (16, 6, 4), (8, 4, 2)])
def test_short_png_stream_is_corrupt_for_every_pixel_format(depth: int, colour: int, channels: int) -> None:
    row = b"\0" + bytes([0x5A]) * ((64 * depth * channels + 7) // 8)
    palette = bytes(range(256)) * 3 if colour == 3 else b""
    complete = png_from_rows(64, 48, row * 48, depth=depth, colour=colour, palette=palette)
    assert decode(complete).shape == (48, 64, 3)
    with pytest.raises(CorruptImage):
        decode(png_from_rows(64, 48, row * 20, depth=depth, colour=colour, palette=palette))


def test_png_with_black_last_rows_still_decodes() -> None:
    """The all-zero last row sends a healthy file through the inflate count, which must pass it."""
    pixels = np.asarray(noise()).copy()
    pixels[-5:] = 0
    for data in (encode(Image.fromarray(pixels), "PNG"), png_from_rows(64, 48, adam7_scanlines(pixels), interlace=1)):
        assert np.array_equal(decode(data), pixels)


def test_gif_lzw_ending_early_is_corrupt() -> None:
    indices = np.random.default_rng(3).integers(0, 256, 64 * 48).tolist()
    complete = gif_from_lzw(64, 48, lzw_literals(indices))
    assert np.array_equal(decode(complete)[..., 0].ravel(), indices)  # the builder is right
    stream = lzw_literals(indices)
    for damaged in (
        gif_from_lzw(64, 48, lzw_literals(indices, stop=64 * 24)),  # EOI code after half the pixels
        gif_from_lzw(64, 48, lzw_literals(indices, stop=64 * 48 - 1)),  # ... one pixel short
        gif_from_lzw(64, 48, stream[: len(stream) // 2]),  # sub-blocks end early, terminator and trailer kept
    ):
        with pytest.raises(CorruptImage):
            decode(damaged)


@pytest.mark.parametrize("compression", ["raw", "tiff_lzw", "tiff_adobe_deflate", "packbits", "jpeg"])
@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_tiff_strip_shorter_than_its_rows_is_corrupt(compression: str, fraction: float) -> None:
    """The bytes stay in the file; only the declared strip size shrinks (uncompressed and JPEG strips
    would otherwise decode: Pillow reads on past the strip, libtiff pads a JPEG strip with grey)."""
    data = encode(noise(), "TIFF", compression=compression)
    with Image.open(BytesIO(data)) as image:
        (count,) = image.tag_v2[279]
    with pytest.raises(CorruptImage):
        decode(tiff_with_strip_count(data, int(count * fraction)))


@pytest.mark.parametrize("lossless", [False, True])
def test_webp_chunk_cut_with_sizes_rewritten_is_corrupt(lossless: bool) -> None:
    data = encode(noise(), "WEBP", lossless=lossless)
    size = struct.unpack_from("<I", data, 16)[0]
    for kept in (size // 2, size - 16):  # not the last few bytes: see docs/decode.md, "Truncated data"
        body = data[12:16] + struct.pack("<I", kept) + data[20 : 20 + kept] + b"\0" * (kept % 2)
        with pytest.raises(CorruptImage):
            decode(b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body)


def test_bmp_rle_ending_early_is_corrupt() -> None:
    """An RLE8 bitmap whose end-of-bitmap code comes after 10 of its 48 rows."""
    rows = b"".join(bytes([64, y]) + b"\0\0" for y in range(10)) + b"\0\1"  # run of 64, end of line; end of bitmap
    header = struct.pack("<IiiHHIIiiII", 40, 64, 48, 1, 8, 1, len(rows), 2835, 2835, 256, 0)
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    offset = 14 + len(header) + len(palette)
    data = b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset) + header + palette + rows
    with pytest.raises(CorruptImage):
        decode(data)


def test_bmp_missing_rows_is_corrupt() -> None:
    data = encode(noise(), "BMP")
    with pytest.raises(CorruptImage):
        decode(data[: len(data) - 64 * 3])  # exactly one (bottom-up: the top) row missing


@pytest.mark.parametrize("options", [{}, {"subsampling": 0}, {"restart_marker_blocks": 2}])
def test_jpeg_cut_then_closed_with_eoi_is_corrupt(options: dict[str, object]) -> None:
    """libjpeg paints the blocks it never got grey and only warns; the grey last pixel gives it away."""
    data = encode(photo(160, 120), "JPEG", **options)
    start, end = jpeg_scan_span(data)
    for cut in (start + 10, (start + end) // 2, end - 300):
        with pytest.raises(CorruptImage, match=r"stops? before the image is complete"):
            decode(data[:cut].rstrip(b"\xff") + b"\xff\xd9")


def test_progressive_jpeg_cut_between_scans_is_corrupt() -> None:
    """Every scan that arrived is complete, so only the scan headers show what is missing."""
    data = encode(photo(160, 120), "JPEG", progressive=True)
    scans = [i for i in range(len(data)) if data.startswith(b"\xff\xda", i)]
    assert len(scans) > 4
    for previous, sos in itertools.pairwise(scans):
        table = data.rfind(b"\xff\xc4", previous, sos)  # the Huffman table sent for this scan, if any
        for cut in {sos, table if table > 0 else sos}:
            with pytest.raises(CorruptImage, match=r"ends before the last scan \(component"):
                decode(data[:cut])


def test_jpeg_cut_at_the_end_of_a_restart_interval_is_corrupt() -> None:
    """There libjpeg skips any filler while it looks for the restart marker: the marker count tells."""
    data = encode(photo(160, 120), "JPEG", restart_marker_blocks=4)
    markers = [i for i in range(len(data) - 1) if data[i] == 0xFF and 0xD0 <= data[i + 1] <= 0xD7]
    assert len(markers) > 10
    for marker in markers[:: len(markers) // 5]:
        for cut in (marker, marker + 1, marker + 2):  # before it, inside it, after it
            with pytest.raises(CorruptImage):
                decode(data[:cut])
    with pytest.raises(CorruptImage, match=r"restart intervals of the last scan missing"):
        decode(data[: markers[3]])


# --- what is not truncation -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FILES))
def test_trailing_garbage_after_a_complete_image_is_ignored(name: str) -> None:
    data = FILES[name]
    for tail in (b"\0" * 100, bytes(range(256)) * 4, b"\xff\xd8\xff\xe0 not another image"):
        assert np.array_equal(decode(data + tail), decode(data))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"progressive": True},
        {"restart_marker_blocks": 1},
        {"progressive": True, "restart_marker_blocks": 3},
        {"subsampling": 0, "quality": 95},
        {"optimize": True},
    ],
)
@pytest.mark.parametrize("exact", [False, True])
def test_jpeg_missing_only_its_eoi_marker_decodes(options: dict[str, object], exact: bool) -> None:
    """All scan data is there, so every pixel is: decoded, not refused (also with only 0xD9 missing)."""
    for image in (noise(), photo(600, 520)):  # the large one takes the draft path when exact=False
        data = encode(image, "JPEG", **options)
        assert data.endswith(b"\xff\xd9")
        expected = decode(data, exact=exact)
        assert np.array_equal(decode(data[:-2], exact=exact), expected)
        assert np.array_equal(decode(data[:-1], exact=exact), expected)


@pytest.mark.parametrize("exact", [False, True])
def test_large_jpeg_cut_anywhere_is_corrupt_on_both_paths(exact: bool) -> None:
    data = encode(photo(600, 520), "JPEG", progressive=not exact)
    start, end = jpeg_scan_span(data)
    for cut in [*random.Random(5).sample(range(start + 1, end - 1), 12), end - 3, end - 2]:
        with pytest.raises(CorruptImage):
            decode(data[:cut], exact=exact)


def test_jpeg_whose_last_pixel_is_grey_still_decodes() -> None:
    """A healthy file that trips the grey check: the filler comparison must pass it."""
    pixels = np.asarray(photo(160, 120)).copy()
    pixels[-40:, -60:] = 128
    for options in ({}, {"progressive": True}, {"restart_marker_blocks": 2}):
        data = encode(Image.fromarray(pixels), "JPEG", **options)
        assert decode(data)[-1, -1].tolist() == [128, 128, 128]
        assert np.array_equal(decode(data), pillow_rgb(data))


@pytest.mark.parametrize("name", ["png", "gif"])
def test_missing_bookkeeping_after_the_last_pixel_is_ignored(name: str) -> None:
    """PNG without IEND (and the last IDAT CRC), GIF without its trailer: every pixel arrived."""
    data = FILES[name]
    cut = {"png": len(data) - 16, "gif": len(data) - 1}[name]
    assert np.array_equal(decode(data[:cut]), decode(data))


# --- through HTTP ---------------------------------------------------------------------------------


def test_truncated_png_gets_422_corrupt_image_over_http(server: ServerThread) -> None:
    short_stream = png_from_rows(64, 48, scanlines(np.asarray(noise())[:20]))
    cut_file = FILES["png"][: len(FILES["png"]) // 2]
    for name, data in (("short-stream.png", short_stream), ("cut.png", cut_file)):
        response = httpx.post(server.url + "/classify", files=[("img", (name, data, "image/png"))], timeout=60)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "corrupt_image" and name in error["message"]
    complete = httpx.post(server.url + "/classify", files=[("img", ("ok.png", FILES["png"], "image/png"))], timeout=60)
    assert complete.status_code == 200, complete.text
