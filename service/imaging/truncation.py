"""Did every pixel come from the file? The truncation checks behind `decode.decode_image`.

Pillow raises when its input runs out, but some streams stop early inside an intact container and Pillow
pads the image with black or grey: `load_complete` closes those holes (a PNG zlib stream that ends on a
row boundary, TIFF strips shorter than their rows, a baseline JPEG closed with EOI in the middle of its
scan). Bytes that carry no pixel may be missing: PNG IEND, CRC or zlib checksum, a GIF trailer, a JPEG
EOI marker (Pillow refuses that one; `_load_jpeg_without_eoi` accepts it once no pixel depends on what
is missing). Every check raises OSError, which decode.py turns into CorruptImage (422). docs/decode.md,
"Truncated data", has the per-format table and what is not detected.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Callable
from io import BytesIO
from typing import NamedTuple

from PIL import Image

# What decode.py does to a JPEG before loading it (a DCT-scale draft), or None for an exact decode: the
# filler decodes below must see what the model would see.
Draft = Callable[[Image.Image], None]

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


def load_complete(image: Image.Image, data: bytes, *, draft: Draft | None) -> Image.Image:
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
            return _load_jpeg_without_eoi(data, draft=draft)
        raise
    if image.format in _JPEG_FORMATS:
        if _ends_grey(image):
            _check_jpeg_scans(data, draft=draft)
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


def _check_jpeg_scans(data: bytes, *, draft: Draft | None) -> None:
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
    if _decode_with_fillers(scans, _JPEG_GREY_FILLS, draft=draft) is None:
        raise OSError("its scan data stops before the image is complete")


def _jpeg_lacks_eoi(data: bytes) -> bool:
    """Does the data end inside the last scan (no EOI and no further image after the last SOS marker)?

    Inside entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so these byte pairs
    are real markers.
    """
    sos = data.rfind(b"\xff\xda")
    return sos > 0 and data.find(b"\xff\xd9", sos) < 0 and data.find(b"\xff\xd8", sos) < 0


def _load_jpeg_without_eoi(data: bytes, *, draft: Draft | None) -> Image.Image:
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
    image = _decode_with_fillers(scans, _JPEG_FILLS, draft=draft)
    if image is None:
        raise OSError("its data ends inside the scan data")
    return image


def _decode_with_fillers(scans: bytes, fillers: tuple[bytes, ...], *, draft: Draft | None) -> Image.Image | None:
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
        if draft is not None:
            draft(candidate)
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
