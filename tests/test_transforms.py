"""The reference evaluation transform, pinned against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    batch_input,
    center_crop_box,
    crop_pixels,
    preprocess,
    resize_and_crop,
    resized_size,
)


@pytest.mark.parametrize(
    ("size", "expected"),
    [((451, 300), (384, 256)), ((300, 451), (256, 384)), ((256, 256), (256, 256)), ((1000, 999), (256, 256))],
)
def test_resize_follows_torchvision_truncation(size, expected) -> None:
    assert resized_size(*size) == expected


def test_center_crop_offsets_round_half_differences() -> None:
    assert center_crop_box(256, 256) == (16, 16, 240, 240)
    assert center_crop_box(384, 256) == (80, 16, 304, 240)
    assert center_crop_box(257, 256) == (16, 16, 240, 240)  # round(16.5) == 16 (banker's), as torchvision


def test_normalisation_and_crop_hand_computed() -> None:
    # 256x256 needs no resize; pixel (x, y) holds (x, y, 7). The crop starts at (16, 16).
    xs, ys = np.meshgrid(np.arange(256), np.arange(256))
    pixels = np.stack([xs, ys, np.full_like(xs, 7)], axis=-1).astype(np.uint8)
    out = preprocess(Image.fromarray(pixels, "RGB"))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    for c, (row, col), value in [(0, (0, 0), 16), (1, (0, 0), 16), (0, (5, 9), 25), (1, (5, 9), 21), (2, (100, 3), 7)]:
        expected = (value / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert out[c, row, col].item() == pytest.approx(expected, abs=1e-5)


def test_uniform_image_is_uniform_after_bicubic_resize() -> None:
    out = preprocess(Image.new("RGB", (600, 400), (124, 116, 104)))
    expected = [(v / 255 - m) / s for v, m, s in zip((124, 116, 104), IMAGENET_MEAN, IMAGENET_STD)]
    for c in range(3):
        assert torch.allclose(out[c], torch.full((224, 224), expected[c]), atol=1e-5)


def test_resize_uses_bicubic() -> None:
    """A bright stripe on grey: bicubic's negative lobes undershoot the grey; bilinear never does."""
    pixels = np.full((300, 600, 3), 100, np.uint8)
    pixels[:, 298:302] = 220
    out = preprocess(Image.fromarray(pixels, "RGB"))
    raw = (out[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
    assert raw.max() > 150
    assert raw.min() < 99.5


def test_batch_normalisation_equals_the_per_image_transform() -> None:
    """The server queues uint8 crops and normalises per batch; v2 clients may send normalised floats."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((300, 451), (256, 256))]
    crops = [crop_pixels(i) for i in images]
    assert crops[0].shape == (224, 224, 3) and crops[0].dtype == torch.uint8
    reference = torch.stack([preprocess(i) for i in images])
    assert torch.equal(batch_input(crops), reference)
    assert torch.equal(batch_input([crops[0], reference[1]]), reference)


def test_non_rgb_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="RGB"):
        preprocess(Image.new("L", (300, 300)))


def _full_resize_then_crop(image: Image.Image) -> np.ndarray:
    size = resized_size(*image.size)
    return np.asarray(image.resize(size, Image.Resampling.BICUBIC).crop(center_crop_box(*size)), dtype=np.int16)


def test_cropped_resample_equals_full_resize_then_crop() -> None:
    from tests.conftest import PHOTO_NAMES, PHOTOS

    for path in (PHOTOS / name for name in PHOTO_NAMES):
        image = Image.open(path).convert("RGB")
        reference = _full_resize_then_crop(image)
        assert np.abs(np.asarray(resize_and_crop(image), dtype=np.int16) - reference).max() <= 1, path.name


def test_extreme_aspect_ratio_stays_cheap() -> None:
    strip = Image.new("RGB", (1, 5000), (10, 200, 30))
    out = resize_and_crop(strip)
    assert out.size == (224, 224)
    assert np.asarray(out)[100, 100].tolist() == [10, 200, 30]
