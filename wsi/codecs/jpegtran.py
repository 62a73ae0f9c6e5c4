"""Lossless JPEG work on DCT coefficients: optimal Huffman tables, pixel bounds without decoding,
and decoding only a rectangle of a tile.

Our TurboJPEG binding (`wsi.codecs.jpeg`) cannot optimise Huffman tables nor decode part of a
tile; the libjpeg API of the same libjpeg-turbo can, through the small C extension
`wsi.codecs._jpeglib` (built by `setup.py` against the system's `jpeglib.h`). Every libjpeg error
and every libjpeg *warning* (corrupt data, premature end) raises `CorruptSlide`, so nothing is
silently decoded differently; the GIL is released while libjpeg works. Inputs are bounded: at most
`MAX_INPUT_BYTES` bytes, sides of at most `MAX_SIDE` pixels, `MAX_TRANSCODE_PIXELS` pixels for
`transcode` (which holds every coefficient: 2 bytes per sample), `MAX_SCANS` scans, and libjpeg's
own memory at most `MAX_MEMORY` bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from wsi.codecs import _jpeglib
from wsi.errors import CorruptSlide, InvalidArgument

MAX_INPUT_BYTES: int = _jpeglib.MAX_INPUT_BYTES
"""Largest JPEG stream accepted (64 MiB)."""
MAX_SIDE: int = _jpeglib.MAX_SIDE
"""Largest width or height accepted, in pixels (16384)."""
MAX_TRANSCODE_PIXELS: int = _jpeglib.MAX_TRANSCODE_PIXELS
"""Largest width * height `transcode` accepts (4096 * 4096: at most 96 MiB of coefficients)."""
MAX_SCANS: int = _jpeglib.MAX_SCANS
"""Most scans of a progressive stream read (a crafted stream of many tiny scans costs time)."""
MAX_MEMORY: int = _jpeglib.MAX_MEMORY
"""libjpeg's memory budget for whole-image buffers, in bytes (256 MiB)."""

_SOF_BASELINE = 0xC0
_COLOUR_MARGIN = 0.51
"""Largest difference, in levels, between an accurate decoder's R, G or B and the exact JFIF
equations on its own (integer, clamped) Y, Cb, Cr: libjpeg's fixed-point tables (16 fractional
bits) round to nearest, 0.5 plus at most 128 * 2**-16 * 1.1 for the constants."""


@dataclass(frozen=True)
class Transcoded:
    """A tile after `transcode`, with a box that holds every pixel an accurate decoder makes of
    it (see `transcode`)."""

    data: bytes = field(repr=False)
    """The optimised baseline JPEG, or the input when that is baseline and optimising does not
    make it smaller (or when `optimize` was False)."""
    low: tuple[int, int, int]
    """A rigorous lower bound of every decoded R, G, B value (0..255)."""
    high: tuple[int, int, int]
    """A rigorous upper bound of every decoded R, G, B value (0..255)."""


def _frame_marker(stream: bytes) -> int | None:
    """The SOFn marker byte of a stream (0xC0 baseline, 0xC1 extended, 0xC2 progressive...)."""
    pos = 2
    while pos + 4 <= len(stream) and stream[pos] == 0xFF:
        marker = stream[pos + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        if marker == 0xDA:
            return None
        pos += 2 + int.from_bytes(stream[pos + 2 : pos + 4], "big")
    return None


def _rgb_box(
    space: str, low: tuple[int, ...], high: tuple[int, ...]
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Component bounds (integers the decoder's IDCT can output) -> R, G, B bounds.

    YCbCr goes through the JFIF equations by interval arithmetic (each output is monotonic in
    each input, so its extremes are at corners of the box), widened by `_COLOUR_MARGIN` for the
    decoder's rounding and clamped to 0..255 as decoders clamp."""
    if space == "gray":
        return (low[0], low[0], low[0]), (high[0], high[0], high[0])
    if space == "rgb":
        return (low[0], low[1], low[2]), (high[0], high[1], high[2])
    y0, cb0, cr0 = low[0], low[1] - 128, low[2] - 128
    y1, cb1, cr1 = high[0], high[1] - 128, high[2] - 128
    lows = (y0 + 1.402 * cr0, y0 - 0.344136 * cb1 - 0.714136 * cr1, y0 + 1.772 * cb0)
    highs = (y1 + 1.402 * cr1, y1 - 0.344136 * cb0 - 0.714136 * cr0, y1 + 1.772 * cb1)
    r0, g0, b0 = (min(255, max(0, math.ceil(v - _COLOUR_MARGIN))) for v in lows)
    r1, g1, b1 = (min(255, max(0, math.floor(v + _COLOUR_MARGIN))) for v in highs)
    return (r0, g0, b0), (r1, g1, b1)


def transcode(data: bytes, optimize: bool = True) -> Transcoded:
    """Rewrite a JPEG losslessly with optimal Huffman tables, and bound its pixels.

    The output has the same DCT coefficients, quantisation tables, sampling and restart interval,
    is baseline sequential (SOF0, as DICOM's baseline transfer syntax requires), says its colour
    space with a JFIF marker (YCbCr, grey) or an Adobe marker with transform 0 (RGB-coded), and
    carries no other marker (no EXIF, no comment: patient data can hide there). When that is not
    smaller than `data` and `data` is baseline already, `data` itself is returned; with
    `optimize` False, always (then only the bounds are computed). A stream that cannot be
    baseline (12-bit samples, quantisation tables over 255) raises `CorruptSlide` when
    `optimize` is set.

    The Huffman tables are the ones libjpeg's `optimize_coding` makes (same statistics, same
    algorithm and tie-breaking, so the same bytes), but their statistics are gathered in the walk
    over the blocks that computes the bounds, and libjpeg entropy-codes once instead of twice:
    about 280 us per 240x240 tile instead of 520, less than a full decode with TurboJPEG.

    Why the bounds hold. A block's samples are f(x,y) = 128 + 1/4 sum_uv C(u)C(v) F(u,v)
    cos(..)cos(..), F the dequantised coefficients, C(0) = 1/sqrt2, C(k>0) = 1. The DC term is
    128 + F(0,0)/8 and each AC term is at most |F(u,v)|/4 in magnitude (cosines and C are <= 1),
    so f lies within 128 + F(0,0)/8 +- S/4, S the sum of |AC|. An accurate decoder's integer
    IDCT is that value rounded, give or take its fixed-point error: without AC, the exact value
    is a multiple of 1/8 and libjpeg rounds it exactly (margin 1/2); otherwise we allow
    1 + S/128 (islow: final rounding 1/2, workspace rounding 1/8, 13-bit constants about S/2**12;
    the float IDCT less). Decoders clamp samples to 0..255. Chroma upsampling (replication, or
    libjpeg's triangle filters, whose weights are >= 0 and whose rounding stays inside the range
    of their inputs) never leaves the range of the chroma samples, so the min/max over blocks
    bounds every upsampled sample too. The JFIF equations are monotonic in each input, so the
    corners of the Y, Cb, Cr box bound R, G, B; `_COLOUR_MARGIN` covers the conversion's
    rounding. DCT-scaled decoding box-averages the full IDCT, so it stays inside (tested at 1/2,
    1/4 and 1/8).

    "Accurate" is libjpeg's default `islow` (and `float`) IDCT: what Pillow, OpenSlide, browsers
    and TurboJPEG use unless told otherwise. The fast IDCT (`JDCT_IFAST`, TurboJPEG's
    TJFLAG_FASTDCT) is off by one level on blocks without AC, and by more at high qualities; a
    bound for it would be several levels wide even for a uniform tile.
    """
    space, low, high, out = _jpeglib.transcode(data, optimize)
    rgb_low, rgb_high = _rgb_box(space, low, high)
    result = data
    if out is not None:
        if _frame_marker(out) != _SOF_BASELINE:
            raise CorruptSlide(
                "JPEG cannot be rewritten as baseline (12-bit samples or 16-bit tables)"
            )
        if len(out) < len(data) or _frame_marker(data) != _SOF_BASELINE:
            result = out
    return Transcoded(bytes(result), rgb_low, rgb_high)


def decode_region(data: bytes, x: int, y: int, width: int, height: int) -> np.ndarray:
    """Decode only the rectangle (x, y, width, height), in pixels of the tile, to a
    (height, width, 3) uint8 RGB array: identical to decoding the whole tile with
    `wsi.codecs.jpeg.decode` and slicing (see `decode_region_into`)."""
    if min(width, height) <= 0:
        raise InvalidArgument(f"bad JPEG region {width}x{height}+{x}+{y}")
    out = np.empty((height, width, 3), np.uint8)
    decode_region_into(data, x, y, out)
    return out


def decode_region_into(
    data: bytes, x: int, y: int, out: np.ndarray, tile_size: tuple[int, int] | None = None
) -> None:
    """Decode the rectangle of `out`'s size whose top-left pixel is (x, y) of the tile into
    `out`, an (h, w, 3) uint8 view whose rows may be strided (a slice of a batch of patches).
    With `tile_size` (height, width), a stream declaring another size is refused before
    anything is decoded, as `jpeg.check_size` does.

    Columns outside the rectangle's iMCU columns are not inverse-transformed, upsampled nor
    colour-converted; rows above it are skipped (entropy-decoded only) and decoding stops after
    its last row. With horizontal chroma subsampling the crop starts one pixel early and ends one
    late, so that the upsampler sees the same neighbours as in a whole decode."""
    if min(x, y) < 0:
        raise InvalidArgument(f"bad JPEG region offset ({x}, {y})")
    height, width = tile_size or (0, 0)
    _jpeglib.decode_region(data, x, y, out, width, height)
