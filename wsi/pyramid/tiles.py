"""The pixels of the tiles the pyramid builder makes: the 2x2 means every derived pixel is
(`mean2x2[_into]`, in C: `wsi.pyramid._pixels`), and the tiles the level above's tiles are
halved into, a quadrant each."""

from __future__ import annotations

import numpy as np

from wsi.model import Level
from wsi.pyramid import _pixels


def mean2x2(pixels: np.ndarray) -> np.ndarray:
    """Exact 2x2 area mean, rounded half up ((a+b+c+d+2) >> 2), of an (h, w, 3) uint8 array;
    odd edges dropped."""
    out = np.empty((pixels.shape[0] // 2, pixels.shape[1] // 2, 3), np.uint8)
    mean2x2_into(pixels, out)
    return out


def mean2x2_into(pixels: np.ndarray, out: np.ndarray) -> None:
    """`mean2x2` written into `out` (e.g. a quadrant of the tile below, any row stride).

    In C without the GIL (`wsi.pyramid._pixels`): every derived pixel is one of these means, and
    done with numpy or Pillow the unpacking and copying around the arithmetic held the GIL the
    pool's other threads were waiting for (Pillow's `reduce(2)`, the same rounding, was 16% of
    the GIL's time in a base-only conversion)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.strides[1:] != (3, 1):
        pixels = np.ascontiguousarray(pixels, np.uint8)
    _pixels.mean2x2_into(pixels, out)


def white_tile(level: Level) -> np.ndarray:
    return np.full((level.tile_height, level.tile_width, 3), 255, np.uint8)


def quadrant_tile(level: Level, covered: bool) -> np.ndarray:
    """A tile of `level` to be filled by its four quadrants: white where they do not reach
    (past the level above's end), left unset when all four will be written (filling 192 KB
    that is overwritten at once cost 3% of the workers' time)."""
    if covered:
        return np.empty((level.tile_height, level.tile_width, 3), np.uint8)
    return white_tile(level)


def quadrant(tile: np.ndarray, qy: int, qx: int) -> np.ndarray:
    """View of quadrant (qy, qx) of a tile: where a tile of the level above lands, halved."""
    sh, sw = tile.shape[0] // 2, tile.shape[1] // 2
    return tile[qy * sh : (qy + 1) * sh, qx * sw : (qx + 1) * sw]
