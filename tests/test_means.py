"""The 2x2 means every derived level is made of (`wsi.pyramid.tiles.mean2x2[_into]`, in C)."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pytest
from PIL import Image

from wsi.pyramid.tiles import mean2x2, mean2x2_into, quadrant


def reference(pixels: np.ndarray) -> np.ndarray:
    """Independent: Pillow's box reduction, which rounds (a+b+c+d+2) >> 2 the same way, on
    the even part of the array."""
    h, w = pixels.shape[0] // 2 * 2, pixels.shape[1] // 2 * 2
    if h == 0 or w == 0:
        return np.zeros((h // 2, w // 2, 3), np.uint8)
    image = Image.fromarray(np.ascontiguousarray(pixels[:h, :w]), "RGB")
    return np.asarray(image.reduce(2))


@pytest.mark.parametrize(
    "shape", [(256, 256), (2, 2), (7, 9), (1, 5), (130, 66), (4, 1030), (6, 514), (2, 36)]
)
def test_means_match_pillow(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    assert np.array_equal(mean2x2(pixels), reference(pixels))


def test_rounding_is_half_up() -> None:
    pixels = np.zeros((2, 2, 3), np.uint8)
    pixels[0, 0] = (1, 2, 255)  # sums 1, 2, 255 + 3 * 254: means 0.25, 0.5, 254.25
    pixels[0, 1] = pixels[1, 0] = pixels[1, 1] = (0, 0, 254)
    assert mean2x2(pixels).tolist() == [[[0, 1, 254]]]


def test_into_a_quadrant_of_a_strided_source() -> None:
    """Written into a quadrant view (row stride of the whole tile) from a column slice of a
    wider region, as the builder does; the rest of the tile is untouched."""
    rng = np.random.default_rng(3)
    region = rng.integers(0, 256, (64, 3 * 64, 3), dtype=np.uint8)
    pixels = region[:, 64:128]
    tile = np.full((64, 64, 3), 7, np.uint8)
    mean2x2_into(pixels, quadrant(tile, 1, 0))
    assert np.array_equal(tile[32:, :32], reference(pixels))
    assert (tile[:32] == 7).all() and (tile[32:, 32:] == 7).all()


def test_non_packed_sources_are_copied_first() -> None:
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    flipped = pixels[:, :, ::-1]  # channels stride -1
    assert np.array_equal(mean2x2(flipped), reference(np.ascontiguousarray(flipped)))


def test_bad_destinations_are_refused() -> None:
    pixels = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="destination is 3 x 4"):
        mean2x2_into(pixels, np.zeros((3, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="packed pixels"):
        mean2x2_into(pixels, np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="overlap"):
        mean2x2_into(pixels, pixels[:4, :4])
    with pytest.raises(BufferError):  # read-only
        mean2x2_into(pixels, cast(Any, bytes(48)))  # deliberately not an array
