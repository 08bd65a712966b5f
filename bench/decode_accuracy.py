"""How far the JPEG draft (DCT-downscaled) decode moves the model input, and what it saves.

For every test photo (tests/data/images), as shipped and blown up to a 12-megapixel phone-sized JPEG, compare the
preprocessed tensors of the fast path (`exact=False`) and the full decode (`exact=True`):
max and mean absolute difference in normalised units and in 8-bit pixel levels, plus the median
decode+preprocess time of each path. The mosaic row tiles the photos at native resolution, so it
has real pixel-level detail (the upscaled photos are smooth): the hard case for a 1/8 DCT decode.

    python -m bench.decode_accuracy [--images DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.transforms import IMAGENET_STD
from service.imaging import decode_image, load_image_tensor

DEFAULT_IMAGES = Path(__file__).resolve().parents[1] / "tests" / "data" / "images"
PHONE_SIZE = (4032, 3024)
MAX_PIXELS = 50_000_000
# One normalised unit is std * 255 pixel levels in each channel.
_LEVELS_PER_UNIT = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255.0


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def cover(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Bicubic upscale until `size` is covered, then centre-crop to it (no aspect distortion)."""
    scale = max(size[0] / image.width, size[1] / image.height)
    scaled = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    left, top = (scaled.width - size[0]) // 2, (scaled.height - size[1]) // 2
    return scaled.crop((left, top, left + size[0], top + size[1]))


def mosaic(photos: list[Image.Image], size: tuple[int, int]) -> Image.Image:
    """Tile the photos at native resolution over `size`: full-resolution detail everywhere."""
    canvas = Image.new("RGB", size)
    tile_w, tile_h = min(p.width for p in photos), min(p.height for p in photos)
    for index, (x, y) in enumerate((x, y) for y in range(0, size[1], tile_h) for x in range(0, size[0], tile_w)):
        canvas.paste(photos[index % len(photos)].crop((0, 0, tile_w, tile_h)), (x, y))
    return canvas


def cases(directory: Path) -> Iterator[tuple[str, bytes]]:
    paths = sorted(directory.glob("*.jpg"))
    if not paths:
        raise SystemExit(f"no .jpg photos in {directory}")
    photos = [Image.open(path).convert("RGB") for path in paths]
    for path, photo in zip(paths, photos, strict=True):
        yield f"{path.name} original", path.read_bytes()
        yield f"{path.name} {PHONE_SIZE[0]}x{PHONE_SIZE[1]}", jpeg_bytes(cover(photo, PHONE_SIZE))
    yield f"mosaic {PHONE_SIZE[0]}x{PHONE_SIZE[1]}", jpeg_bytes(mosaic(photos, PHONE_SIZE))


def median_ms(data: bytes, exact: bool, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        load_image_tensor(data, filename="bench", max_pixels=MAX_PIXELS, exact=exact)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def measure(name: str, data: bytes, repeat: int) -> str:
    size = Image.open(BytesIO(data)).size
    decoded = decode_image(data, filename=name, max_pixels=MAX_PIXELS).size
    fast = load_image_tensor(data, filename=name, max_pixels=MAX_PIXELS)
    exact = load_image_tensor(data, filename=name, max_pixels=MAX_PIXELS, exact=True)
    diff = (fast - exact).abs()
    levels = diff * _LEVELS_PER_UNIT
    fast_ms, exact_ms = median_ms(data, False, repeat), median_ms(data, True, repeat)
    return (
        f"| {name} | {size[0]}x{size[1]} | {decoded[0]}x{decoded[1]} | {diff.max():.4f} | {diff.mean():.5f} "
        f"| {levels.max():.2f} | {levels.mean():.3f} | {fast_ms:.1f} | {exact_ms:.1f} | {exact_ms / fast_ms:.1f}x |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of .jpg photos")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per path (median reported)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"Pillow {Image.__version__}, numpy {np.__version__}, torch {torch.__version__}, 1 thread")
    print(
        "| image | stored | draft decode | max abs (norm) | mean abs (norm) | max abs (levels) "
        "| mean abs (levels) | draft ms | exact ms | speedup |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, data in cases(args.images):
        print(measure(name, data, args.repeat), flush=True)


if __name__ == "__main__":
    main()
