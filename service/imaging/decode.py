"""Untrusted upload bytes to an RGB PIL image that `model.transforms.preprocess` accepts.

Everything a client can get wrong ends as an `ImageError` subclass carrying the HTTP status, a
machine code and a sentence naming the file, so the HTTP and gRPC layers only translate it.
No Pillow global (MAX_IMAGE_PIXELS, LOAD_TRUNCATED_IMAGES) is changed and nothing is shared between
calls, so the functions are safe to call concurrently from a thread pool (Pillow releases the GIL
while decoding and resizing).

Truncation: every pixel must come from the file, or the answer is CorruptImage (422). Pillow raises
when its input runs out, but some streams stop early inside an intact container and Pillow pads the
image with black or grey: `_load_complete` closes those holes (a PNG zlib stream that ends on a row
boundary, TIFF strips shorter than their rows, a baseline JPEG closed with EOI in the middle of its
scan). Bytes that carry no pixel may be missing: PNG IEND, CRC or zlib checksum, a GIF trailer, a JPEG
EOI marker (Pillow refuses that one; `_load_jpeg_without_eoi` accepts it once no pixel depends on what
is missing). docs/decode.md, "Truncated data", has the per-format table and what is not detected.
"""

from __future__ import annotations

import random
import re
import struct
import zlib
from io import BytesIO
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError

from model.transforms import RESIZE_SHORT_SIDE, crop_pixels, preprocess

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

# Truncation checks (see _load_complete).
# Stand-ins for the bytes after a JPEG's last scan byte (see _decode_with_fillers): eight pseudo-random
# byte strings whose first three bits run through all eight values (in an order that varies the first
# bits early), so a scan that still needed a few bits gets every variant of them; no 0xFF, which would
# start a marker. 16 KiB is hundreds of blocks: enough to reach visible pixels even when the blocks right
# after a cut are padding past the image edge.
_JPEG_FILLS = tuple(
    bytes([prefix << 5 | 0x0F]) + random.Random(prefix).randbytes(1 << 14).replace(b"\xff", b"\xfe")
    for prefix in (0, 7, 4, 3, 1, 6, 2, 5)
)
_JPEG_GREY_FILLS = _JPEG_FILLS[:3]  # first bits 000, 111, 100: every code of one or two bits
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})
_JPEG_GREY = frozenset({127, 128})  # what libjpeg paints where scan data is missing (127: inverted CMYK)
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # markers without a length field
_JPEG_NOT_SOF = frozenset({0xC4, 0xC8, 0xCC})  # DHT, JPG, DAC share the SOFn range
_JPEG_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_JPEG_LOSSLESS = frozenset({0xC3, 0xC7, 0xCB, 0xCF})
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
# Adam7 passes: first column, first row, column step, row step.
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_INFLATE_STEP = 1 << 20  # bytes of inflated PNG data held at once while counting
_TIFF_NONE, _TIFF_JPEG, _TIFF_YCBCR = 1, 7, 6  # Compression and PhotometricInterpretation values

_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_FULL_SCALES = {"F": (1.0, 255.0, 65535.0), "I": (255.0, 65535.0)}  # see _gray_range
_BACKGROUND = (255, 255, 255)  # transparent pixels become white, as a browser shows them on a page


class ImageError(Exception):
    """Client's fault; carries what the HTTP/gRPC layers need."""

    status: ClassVar[int]
    code: ClassVar[str]

    def __init__(self, filename: str, message: str) -> None:
        super().__init__(filename, message)  # both in args, so the error pickles and re-raises intact
        self.filename = filename
        self.message = message

    def __str__(self) -> str:
        return self.message


class ImageTooLarge(ImageError):
    """More pixels than the server is configured to decode."""

    status = 413
    code = "image_too_large"


class UnsupportedImage(ImageError):
    """Not an image, or a format outside SUPPORTED_FORMATS."""

    status = 415
    code = "unsupported_image"


class CorruptImage(ImageError):
    """A supported format whose data is truncated, damaged or empty of pixels."""

    status = 422
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
            return to_rgb(_upright(_load_complete(image, data, exact=exact)))
    except UnidentifiedImageError:
        if _has_signature(data):
            raise CorruptImage(filename, f"{name} starts like an image but its header is unreadable") from None
        raise UnsupportedImage(filename, f"{name} is not a JPEG, PNG, WebP, GIF, BMP or TIFF image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLarge(filename, _bomb_message(name, error, max_pixels)) from None
    except _DECODE_ERRORS as error:
        raise CorruptImage(filename, f"{name} is truncated or corrupt: {error}") from None


def load_image_pixels(data: bytes, *, filename: str, max_pixels: int, exact: bool = False) -> torch.Tensor:
    """decode_image + model.transforms.crop_pixels -> [224,224,3] uint8, what the server queues."""
    return crop_pixels(decode_image(data, filename=filename, max_pixels=max_pixels, exact=exact))


def load_image_tensor(data: bytes, *, filename: str, max_pixels: int, exact: bool = False) -> torch.Tensor:
    """decode_image + model.transforms.preprocess -> [3,224,224] float32, the model's input."""
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

    Only worth it from twice the target up; the bicubic resize in model.transforms finishes the job.
    Pillow picks the largest scale whose result still covers the requested size on both axes, and
    `draft` is a no-op for every format but JPEG and MPO.
    """
    width, height = image.size
    short = min(width, height)
    if short >= 2 * RESIZE_SHORT_SIDE:
        target = RESIZE_SHORT_SIDE
        image.draft("RGB", (-(-width * target // short), -(-height * target // short)))


def _load_complete(image: Image.Image, data: bytes, *, exact: bool) -> Image.Image:
    """Decode the pixels; raise OSError (-> CorruptImage) when some of them never came from the file.

    Pillow raises by itself when the bytes run out in the middle of JPEG, WebP, GIF, BMP and TIFF data,
    and in the middle of a PNG row. The gaps it leaves are closed here, each behind a test that costs
    nothing measurable on a healthy file:

    * PNG: a zlib stream that ends on a row boundary stops the decoder "successfully" with the remaining
      rows black. Only an image whose last written row is all zero pays for counting the inflated bytes
      (`_check_png_rows`).
    * TIFF: Pillow's reader for uncompressed strips ignores their byte counts, and libtiff pads a JPEG
      strip that stops short of its EOI marker with grey; `_check_tiff_strips` compares the declared
      counts with what the pixels need.
    * JPEG cut inside its scan data and then closed with an EOI marker: libjpeg turns the missing blocks
      grey and only warns, which Pillow ignores. Only an image whose last pixel is that grey pays for
      the check (`_check_jpeg_scans`).
    * JPEG that lacks only its EOI marker: Pillow refuses it although every pixel may be there. A cut
      file always lacks its EOI, so only such failures pay for `_load_jpeg_without_eoi`, which accepts
      the file if no pixel depends on the missing bytes.
    """
    try:
        image.load()
    except OSError:
        if image.format in _JPEG_FORMATS and _jpeg_lacks_eoi(data):
            return _load_jpeg_without_eoi(data, exact=exact)
        raise
    if image.format in _JPEG_FORMATS:
        if _ends_grey(image):
            _check_jpeg_scans(data, exact=exact)
    elif image.format == "PNG":
        _check_png_rows(image, data)
    elif image.format == "TIFF":
        _check_tiff_strips(image, data)
    return image


def _check_png_rows(image: Image.Image, data: bytes) -> None:
    """Raise if the IDAT zlib stream ends before the rows that IHDR declares.

    Pillow's zlib decoder treats the end of the stream as the end of the image; rows that never arrived
    stay zero. Rows are written in file order, so if any byte of the last one written is set (the last
    row, or the last odd row of an interlaced image), every row arrived and nothing is inflated twice.
    """
    width, height = image.size
    interlaced = bool(image.info.get("interlace"))
    last = height - 1 if not interlaced else height - 1 - (height % 2) if height > 1 else -1
    if last >= 0:
        row = image.crop((0, last, width, last + 1)).tobytes()
        if row.count(0) != len(row):
            return
    header, bodies = _png_chunks(data)
    if len(header) < 13:
        raise OSError("its IHDR chunk is cut short")
    depth, colour, interlaced = header[8], header[9], bool(header[12])
    bits = depth * _PNG_CHANNELS.get(colour, 1)
    expected = _png_stream_size(width, height, bits, interlaced=interlaced)
    delivered = _inflated_size(bodies, expected)
    if delivered < expected:
        raise OSError(f"its pixel data ends early (the zlib stream holds {delivered:,} of {expected:,} bytes)")


def _png_stream_size(width: int, height: int, bits: int, *, interlaced: bool) -> int:
    """Bytes of filtered scanlines (one filter byte per row) that IHDR's size and pixel format need."""
    if not interlaced:
        return height * (1 + (width * bits + 7) // 8)
    total = 0
    for x0, y0, dx, dy in _ADAM7:
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns > 0 and rows > 0:
            total += rows * (1 + (columns * bits + 7) // 8)
    return total


def _png_chunks(data: bytes) -> tuple[memoryview, list[memoryview]]:
    """IHDR's body and the bodies of the first run of IDAT chunks (the image Pillow shows first)."""
    view, header, bodies, position = memoryview(data), memoryview(b""), [], 8
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        body = view[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            bodies.append(body)
        elif bodies:
            break
        position += 12 + length
    return header, bodies


def _inflated_size(bodies: list[memoryview], enough: int) -> int:
    """Inflate until `enough` bytes come out or the stream ends; keep at most _INFLATE_STEP at a time."""
    inflater, total = zlib.decompressobj(), 0
    try:
        for body in bodies:
            pending: bytes | memoryview = body
            while pending and total < enough and not inflater.eof:
                total += len(inflater.decompress(pending, _INFLATE_STEP))
                pending = inflater.unconsumed_tail
            if total >= enough or inflater.eof:
                break
    except zlib.error as error:
        raise OSError(f"its zlib stream is corrupt: {error}") from None
    return total


def _check_tiff_strips(image: Image.Image, data: bytes) -> None:
    """Raise if a strip or tile of the first page declares fewer bytes than its pixels need.

    Uncompressed: the rows' size (libtiff refuses such strips; Pillow's own raw reader would read on into
    whatever follows). JPEG: each strip is a whole JPEG stream, which must reach its EOI marker within the
    declared count (libtiff would fill the rest of the strip with grey). Other compressions fail in libtiff.
    """
    tags = image.tag_v2  # type: ignore[attr-defined]
    compression = _tiff_number(tags.get(259), _TIFF_NONE)
    tiled = 324 in tags
    offsets, counts = (tags.get(324), tags.get(325)) if tiled else (tags.get(273), tags.get(279))
    offsets, counts = _tiff_numbers(offsets), _tiff_numbers(counts)
    if not offsets or not counts or len(offsets) != len(counts):
        return  # nothing to compare: Pillow and libtiff decide alone
    if compression == _TIFF_JPEG:
        for offset, count in zip(offsets, counts, strict=True):
            tail = data[max(offset, offset + count - 1024) : offset + count].rstrip(b"\0")
            if not tail.endswith(b"\xff\xd9"):
                raise OSError(f"a JPEG strip at byte {offset:,} ends before its EOI marker")
    elif compression == _TIFF_NONE and _tiff_number(tags.get(262), 0) != _TIFF_YCBCR:
        needed = _tiff_raw_sizes(tags, image.size, len(counts), tiled=tiled)
        for index, (count, need) in enumerate(zip(counts, needed, strict=False)):
            if count < need:
                kind = "tile" if tiled else "strip"
                raise OSError(f"{kind} {index} declares {count:,} bytes but its pixels need {need:,}")


def _tiff_numbers(value: object) -> tuple[int, ...]:
    """A tag's value as a tuple of non-negative ints; () if it is anything else (then no check is made)."""
    values = value if isinstance(value, tuple) else (value,)
    return values if all(isinstance(item, int) and item >= 0 for item in values) else ()  # type: ignore[return-value]


def _tiff_number(value: object, default: int) -> int:
    """A single-valued numeric tag as an int, or `default` when absent or malformed."""
    values = _tiff_numbers(value)
    return values[0] if len(values) == 1 else default


def _tiff_raw_sizes(tags: dict, size: tuple[int, int], chunks: int, *, tiled: bool) -> list[int]:
    """Bytes each uncompressed strip or tile needs, in file order (planar images: plane after plane)."""
    width, height = size
    samples = _tiff_number(tags.get(277), 1) or 1
    depths = _tiff_numbers(tags.get(258)) or (1,)
    planar = _tiff_number(tags.get(284), 1) == 2
    bits = depths[0] if planar else (sum(depths) if len(depths) == samples else depths[0] * samples)
    if tiled:
        tile_width, tile_length = _tiff_number(tags.get(322), width), _tiff_number(tags.get(323), height)
        return [tile_length * ((tile_width * bits + 7) // 8)] * chunks
    rows_per_strip = min(_tiff_number(tags.get(278), height), height) or height
    per_plane = _ceil(height, rows_per_strip)
    row_bytes = (width * bits + 7) // 8
    return [min(rows_per_strip, height - (index % per_plane) * rows_per_strip) * row_bytes for index in range(chunks)]


def _ends_grey(image: Image.Image) -> bool:
    """Is the last pixel the grey that libjpeg paints where scan data is missing (all samples 128)?"""
    pixel = image.getpixel((image.width - 1, image.height - 1))
    samples = pixel if isinstance(pixel, tuple) else (pixel,)
    return all(sample in _JPEG_GREY for sample in samples)


def _check_jpeg_scans(data: bytes, *, exact: bool) -> None:
    """Raise if the scans before the first image's EOI marker stop short of the frame.

    Missing scans and missing restart intervals show in the markers (`_jpeg_scans_missing`); a scan cut
    short shows when filler bytes put in front of the EOI marker change the pixels
    (`_decode_with_fillers`).
    """
    frame = _jpeg_frame(data)
    if frame is None:
        return  # Pillow decoded it, so this is only our simple marker walk giving up
    end = data.find(b"\xff\xd9", frame.first_scan)
    if end < 0:
        return
    scans = data[:end].rstrip(b"\xff")
    missing = _jpeg_scans_missing(scans, frame)
    if missing:
        raise OSError(f"its scans stop before the image is complete ({missing})")
    if _decode_with_fillers(scans, _JPEG_GREY_FILLS, exact=exact) is None:
        raise OSError("its scan data stops before the image is complete")


def _jpeg_lacks_eoi(data: bytes) -> bool:
    """Does the data end inside the last scan (no EOI and no further image after the last SOS marker)?

    Inside entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so these byte pairs
    are real markers.
    """
    sos = data.rfind(b"\xff\xda")
    return sos > 0 and data.find(b"\xff\xd9", sos) < 0 and data.find(b"\xff\xd8", sos) < 0


def _load_jpeg_without_eoi(data: bytes, *, exact: bool) -> Image.Image:
    """Accept a JPEG that lacks only its EOI marker; raise OSError if scan data is missing too.

    The markers present must account for the whole frame (`_jpeg_scans_missing`), and the last scan
    must not depend on what would have followed its last byte (`_decode_with_fillers`). Trailing 0xFF
    bytes are dropped first: they can only start a marker or a stuffed 0xFF 0x00 pair.
    """
    frame = _jpeg_frame(data)
    if frame is None:
        raise OSError("its data ends and its markers cannot be followed to the first scan")
    scans = data.rstrip(b"\xff")
    missing = _jpeg_scans_missing(scans, frame)
    if missing:
        raise OSError(f"its data ends before the last scan ({missing})")
    image = _decode_with_fillers(scans, _JPEG_FILLS, exact=exact)
    if image is None:
        raise OSError("its data ends inside the scan data")
    return image


def _decode_with_fillers(scans: bytes, fillers: tuple[bytes, ...], *, exact: bool) -> Image.Image | None:
    """Decode `scans` + filler + EOI for each filler: the first image if all agree, None if pixels differ.

    After a complete scan libjpeg skips anything before the next marker, so every filler gives the same
    pixels. Inside an incomplete scan it decodes the filler, and fillers that differ in the bits it takes
    give different pixels. Where few bits are missing, or the Huffman tables are tiny (a flat image has
    one- and two-bit codes, and unused codes decode as zero), different bits can still decode to the same
    pixels, hence fillers that start with every 3-bit value on the missing-EOI path. (A cut at the end of
    a restart interval would make libjpeg skip the filler while it looks for the restart marker; those
    cuts are caught by counting the markers first.) Every decode uses the draft scale of the first
    attempt: what is compared is what the model would see. Stops at the first difference, so a healthy
    file costs len(fillers) decodes.
    """
    first, pixels = None, b""
    for filler in fillers:
        candidate = Image.open(BytesIO(scans + filler + b"\xff\xd9"), formats=("JPEG",))
        if not exact:
            _draft_for_model(candidate)
        candidate.load()
        if first is None:
            first, pixels = candidate, candidate.tobytes()
        elif (candidate.mode, candidate.size) != (first.mode, first.size) or candidate.tobytes() != pixels:
            return None
    return first


class _JpegFrame(NamedTuple):
    """What the markers before the first scan say, as far as the truncation checks need it."""

    first_scan: int  # offset of the first SOS marker
    size: tuple[int, int]
    sampling: dict[int, tuple[int, int]]  # component id -> horizontal, vertical sampling factor
    progressive: bool
    lossless: bool
    restart: int  # restart interval in MCUs (DRI) before the first scan; 0: none


def _jpeg_frame(data: bytes) -> _JpegFrame | None:
    """Walk the marker segments by their lengths up to the first scan; None if that fails or finds no SOF.

    Walking matters: an EXIF thumbnail inside APP1 has SOS and EOI markers of its own.
    """
    sof, restart, position = -1, 0, 2
    while True:
        if position + 4 > len(data) or data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _JPEG_STANDALONE:
            position += 2
            continue
        if marker == 0xDA:
            break
        if 0xC0 <= marker <= 0xCF and marker not in _JPEG_NOT_SOF:
            sof = position
        elif marker == 0xDD:
            restart = int.from_bytes(data[position + 4 : position + 6], "big")
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    header = data[sof + 5 : sof + 10 + 3 * data[sof + 9]] if sof >= 0 and sof + 10 <= len(data) else b""
    if len(header) < 5 or len(header) != 5 + 3 * header[4] or header[4] == 0:
        return None
    height, width = struct.unpack_from(">HH", header)
    sampling = {header[i]: (header[i + 1] >> 4 or 1, header[i + 1] & 15 or 1) for i in range(5, len(header), 3)}
    marker = data[sof + 1]
    return _JpegFrame(
        position, (width, height), sampling, marker in _JPEG_PROGRESSIVE, marker in _JPEG_LOSSLESS, restart
    )


def _jpeg_scans_missing(scans: bytes, frame: _JpegFrame) -> str | None:
    """Say what the markers show to be missing, or None: whole scans, or restart intervals of the last.

    Sequential: every component must appear in a scan. Progressive: every coefficient of every component
    must appear in a scan that sends its last bit (Al = 0), as a complete progression does. With restart
    intervals, the last scan must hold one restart marker fewer than it has intervals; a cut that falls
    exactly at an interval's end shows only in that count.
    """
    covered = {component: bytearray(64) for component in frame.sampling}  # 1 = coefficient complete
    position = last = frame.first_scan
    while position >= 0:
        last = position
        length = int.from_bytes(scans[position + 2 : position + 4], "big")
        header = scans[position + 4 : position + 2 + length]  # Ns, Ns x (Cs, Td/Ta), Ss, Se, Ah/Al
        count = header[0] if header else 0
        if len(header) >= 1 + 2 * count + 3:
            start, end, low = header[1 + 2 * count], min(header[2 + 2 * count], 63), header[3 + 2 * count] & 0x0F
            if not frame.progressive:
                start, end, low = 0, 63, 0
            for component in header[1 : 1 + 2 * count : 2]:
                if low == 0 and component in covered and start <= end:
                    covered[component][start : end + 1] = b"\x01" * (end + 1 - start)
        position = scans.find(b"\xff\xda", position + 2)
    short = [str(component) for component, seen in covered.items() if seen.count(1) != 64]
    if short:
        return f"component {', '.join(short)} incomplete"
    intervals = _jpeg_restart_intervals(scans, frame, last)
    markers = sum(scans.count(bytes((0xFF, number)), last) for number in range(0xD0, 0xD8))
    if markers < intervals - 1:
        return f"{intervals - 1 - markers} restart intervals of the last scan missing"
    return None


def _jpeg_restart_intervals(scans: bytes, frame: _JpegFrame, last: int) -> int:
    """How many restart intervals the scan at offset `last` has (0: it has no restart markers)."""
    dri = scans.rfind(b"\xff\xdd", frame.first_scan, last)  # a DRI between scans replaces the first one
    interval = int.from_bytes(scans[dri + 4 : dri + 6], "big") if dri >= 0 else frame.restart
    components = scans[last + 5 : last + 5 + 2 * scans[last + 4] : 2] if last + 4 < len(scans) else b""
    if not interval or frame.lossless or not components:
        return 0
    width, height = frame.size
    wide = max(h for h, _ in frame.sampling.values())
    tall = max(v for _, v in frame.sampling.values())
    if len(components) == 1 and components[0] in frame.sampling:  # non-interleaved: one block per MCU
        h, v = frame.sampling[components[0]]
        columns, rows = _ceil(_ceil(width * h, wide), 8), _ceil(_ceil(height * v, tall), 8)
    else:
        columns, rows = _ceil(width, 8 * wide), _ceil(height, 8 * tall)
    return _ceil(columns * rows, interval)


def _ceil(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


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
