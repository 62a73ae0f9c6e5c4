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

Why the pixel bounds of `transcode` and `copy_tile` hold (`Transcoded.outside` rests on them).
A block's samples are f(x,y) = 128 + 1/4 sum_uv C(u)C(v) F(u,v) cos(..)cos(..), F the
dequantised coefficients, C(0) = 1/sqrt2, C(k>0) = 1. The DC term is
128 + F(0,0)/8 and each AC term is at most |F(u,v)| C(u)C(v)/4 m(u) m(v) in magnitude, m(k)
the largest |cos((2x+1)k pi/16)| over the 8 sample positions (1 for k = 0, cos(pi/16) for
odd k, cos(pi/8) for k = 2 or 6, cos(pi/4) for k = 4; their product with C is at most 1, so
each term is at most |F(u,v)|/4), so f lies within 128 + F(0,0)/8 +- W, W the sum of those
weighted |AC| (rounded up), and W <= S/4, S the sum of |AC|. An accurate decoder's integer
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

Block means: the exact mean of a block's 64 samples is its DC term, 128 + F(0,0)/8 (each AC
basis function sums to 0 over the block), and the decoder's unclamped samples are each
within the rounding allowance above (1 + S/128, or 1/2 without AC) of the exact ones, so
their mean is within it of the DC term. Only full-resolution components count (a subsampled
component's samples are mixed by the upsampler); one of their blocks covers 8x8 pixels.

"Accurate" is libjpeg's default `islow` (and `float`) IDCT: what Pillow, OpenSlide, browsers
and TurboJPEG use unless told otherwise. The fast IDCT (`JDCT_IFAST`, TurboJPEG's
TJFLAG_FASTDCT) is off by one level on blocks without AC, and by more at high qualities; a
bound for it would be several levels wide even for a uniform tile.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from wsi.codecs import _jpeglib, jpeg
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
_COLOUR_MARGIN: float = _jpeglib.COLOUR_MARGIN
"""Largest difference, in levels, between an accurate decoder's R, G or B and the exact JFIF
equations on its own (integer, clamped) Y, Cb, Cr: libjpeg's fixed-point tables (16 fractional
bits) round to nearest, 0.5 plus at most 128 * 2**-16 * 1.1 for the constants (0.51, defined
once in the C extension, whose per-block verdict uses it too)."""


_LUMA_MARGIN = _COLOUR_MARGIN + 0.01
"""Largest difference between a decoded luma sample Y and 0.299 R + 0.587 G + 0.114 B of the
pixel's unclamped R, G, B: the weighted sum of three conversion errors of at most
`_COLOUR_MARGIN` each, plus what the JFIF constants leave of Cb and Cr (under 0.001)."""

SampleRanges = tuple[tuple[float, float], ...]
"""Per component, [low, high]: every decoded sample of it lies there (see `sample_ranges`)."""
SPACES = ("gray", "ycc", "rgb")
"""The colour spaces of the streams `transcode` reads."""


@dataclass(frozen=True)
class Transcoded:
    """A tile after `transcode`, with a box that holds every pixel an accurate decoder makes of
    it, and bounds of its blocks' means (see `transcode`)."""

    data: bytes = field(repr=False)
    """The optimised baseline JPEG, or the input when that is baseline and optimising does not
    make it smaller (or when `optimize` was False)."""
    low: tuple[int, int, int]
    """A rigorous lower bound of every decoded R, G, B value (0..255)."""
    high: tuple[int, int, int]
    """A rigorous upper bound of every decoded R, G, B value (0..255)."""
    space: str = "ycc"
    """The components' colour space: "ycc", "rgb" (RGB-coded) or "gray"."""
    darkest: tuple[float, ...] = ()
    """Per component: an upper bound of the mean decoded sample of its darkest whole 8x8 block
    inside the region given to `transcode` (+inf when no block counts: a subsampled component,
    or a region under 8 pixels)."""
    lightest: tuple[float, ...] = ()
    """Per component: a lower bound of the mean decoded sample of its lightest such block."""

    def outside(self, ranges: SampleRanges) -> bool:
        """Whether some whole block's mean proves that one of its samples lies outside
        `ranges`: then some pixel of the region is not one of the colours the ranges were made
        from (`sample_ranges`). A block whose decoded samples all lie in [low, high] has its
        mean there too, and `darkest`/`lightest` bound the mean of the samples before they are
        clamped to 0..255; a sample below `low` >= 1 stays below it when clamped (to 0 or to
        itself), one above `high` <= 254 stays above it (to 255 or itself)."""
        return any(
            dark < low or light > high
            for dark, light, (low, high) in zip(self.darkest, self.lightest, ranges, strict=False)
        )


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


def sample_ranges(space: str, colours: np.ndarray) -> SampleRanges:
    """For each component of a stream in colour `space`, a range [low, high] that holds every
    decoded sample of it wherever the decoded pixel is one of `colours` ((n, 3) uint8 R, G, B):
    the contrapositive of `Transcoded.outside`. A side is left open (-inf or +inf) where clamping
    hides what lies beyond it (a colour with a channel at 0, or at 255), and for components that
    do not follow from one pixel's colour (chroma: the ranges are for rejecting tissue, which
    luma does).

    Luma: an accurate decoder makes R = Y + 1.402 Cr', G = Y - 0.344136 Cb' - 0.714136 Cr',
    B = Y + 1.772 Cb' (Cb' = Cb - 128, whatever the upsampler made of the chroma), each within
    `_COLOUR_MARGIN` before clamping, and 0.299 R + 0.587 G + 0.114 B of those is Y exactly (the
    Cb' and Cr' terms cancel), so Y is within `_LUMA_MARGIN` of the weighted sum of the pixel's
    unclamped channels. Those are >= the clamped ones when no channel is 0, and <= when none is
    255. An RGB-coded or grey stream's samples are the channels themselves."""
    colours = np.asarray(colours, np.int64).reshape(-1, 3)
    if len(colours) == 0:
        return ((math.inf, -math.inf),) * (1 if space == "gray" else 3)
    open_range = (-math.inf, math.inf)
    if space == "rgb":
        return tuple(_closed(colours[:, c], colours[:, c], 0.0) for c in range(3))
    if space == "gray":
        greys = colours[(colours[:, 0] == colours[:, 1]) & (colours[:, 1] == colours[:, 2]), 0]
        if len(greys) == 0:
            return ((math.inf, -math.inf),)
        return (_closed(greys, greys, 0.0),)
    luma = colours @ np.array([0.299, 0.587, 0.114])
    return (_closed(colours, luma, _LUMA_MARGIN), open_range, open_range)


@dataclass(frozen=True)
class SampleLimits:
    """`sample_ranges` of one set of colours for each of `SPACES`, as `transcode` takes them."""

    ranges: dict[str, SampleRanges]
    packed: bytes = field(repr=False)
    """18 float64: [low, high] of 3 components (open past a space's own) for each space."""

    @classmethod
    def of(cls, colours: np.ndarray) -> SampleLimits:
        ranges = {space: sample_ranges(space, colours) for space in SPACES}
        table = np.tile(np.array([-math.inf, math.inf]), (3, 3, 1))
        for i, space in enumerate(SPACES):
            table[i, : len(ranges[space])] = ranges[space]
        return cls(ranges, table.astype("<f8").tobytes())


def _closed(channels: np.ndarray, values: np.ndarray, margin: float) -> tuple[float, float]:
    """[low, high] of integer samples within `margin` of `values`; a side is open where some
    colour has a channel clamped at that end (0 or 255)."""
    low = -math.inf if int(channels.min()) <= 0 else float(math.ceil(values.min() - margin))
    high = math.inf if int(channels.max()) >= 255 else float(math.floor(values.max() + margin))
    return low, high


def transcode(
    data: bytes,
    optimize: bool = True,
    region: tuple[int, int] | None = None,
) -> Transcoded:
    """Rewrite a JPEG losslessly with optimal Huffman tables, and bound its pixels.

    The output has the same DCT coefficients, quantisation tables, sampling and restart interval,
    is baseline sequential (SOF0, as DICOM's baseline transfer syntax requires), says its colour
    space with a JFIF marker (YCbCr, grey) or an Adobe marker with transform 0 (RGB-coded), and
    carries no other marker (no EXIF, no comment: patient data can hide there). When that is not
    smaller than `data` and `data` is baseline already, `data` itself is returned; with
    `optimize` False, always (then only the bounds are computed). A stream that cannot be
    baseline (12-bit samples, quantisation tables over 255) raises `CorruptSlide` when
    `optimize` is set. `region` (width, height) limits the blocks whose means are bounded
    (`Transcoded.darkest`, `lightest`) to those wholly inside the top-left width x height
    pixels: the part of an edge tile inside its level. A copied tile of a pyramid goes through
    `copy_tile` instead, which also judges it and decodes it at 1/2 scale in the same pass.

    The Huffman tables are the ones libjpeg's `optimize_coding` makes (same statistics, same
    algorithm and tie-breaking, so the same bytes), but their statistics are gathered in the walk
    over the blocks that computes the bounds, and libjpeg entropy-codes once instead of twice:
    about 280 us per 240x240 tile instead of 520, less than a full decode with TurboJPEG.

    Why the bounds hold, and for which decoders: the module docstring.
    """
    width, height = region or (0, 0)
    if min(width, height) < 0:
        raise InvalidArgument(f"bad region {width}x{height}")
    space, low, high, out, darkest, lightest = _jpeglib.transcode(
        data, optimize, False, width, height
    )
    rgb_low, rgb_high = _rgb_box(space, low, high)
    return Transcoded(_kept_stream(data, out), rgb_low, rgb_high, space, darkest, lightest)


def _kept_stream(data: bytes, out: bytes | None) -> bytes:
    """What is stored of a tile given its rewritten stream `out` (None: not rewritten): the
    rewrite when it is shorter or the source is not baseline, else the source's bytes without
    their comments and EXIF/XMP blocks (`jpeg.without_text`: an encoder may have written a
    patient's name there, and the rewrite carries none either). A rewrite that is not baseline
    (12-bit samples, 16-bit tables) is refused: viewers expect baseline."""
    if out is None:
        return jpeg.without_text(bytes(data))
    if _frame_marker(out) != _SOF_BASELINE:
        raise CorruptSlide("JPEG cannot be rewritten as baseline (12-bit samples or 16-bit tables)")
    if len(out) < len(data) or _frame_marker(data) != _SOF_BASELINE:
        return bytes(out)
    return jpeg.without_text(bytes(data))


def within(data: bytes, region: tuple[int, int], blues: np.ndarray) -> bool:
    """Whether every pixel of the top-left `region` (width, height) of a JPEG tile, decoded to
    the RGB that `wsi.codecs.jpeg.decode` makes (libjpeg's islow IDCT, fancy upsampling), is a
    colour of a set given by `blues`: a (256, 256, 2) uint8 array, at [r, g] the lowest and
    highest b of the set's colours (r, g, b), every b between them in the set too ((255, 0)
    when there is none). One pass without an image buffer: decoding stops at the first pixel
    outside the set, and a pixel costs one look-up and two compares (on glass the check adds
    about a third to a decode, where numpy's took 1.4 decodes)."""
    width, height = region
    if min(width, height) <= 0 or blues.shape != (256, 256, 2) or blues.dtype != np.uint8:
        raise InvalidArgument("within: a region of pixels and a (256, 256, 2) uint8 table")
    return _jpeglib.within(data, width, height, np.ascontiguousarray(blues))


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


@dataclass(frozen=True)
class ColourRule:
    """A set of colours, as `copy_tile` judges tiles against it: all of them lie in the cube of
    `side` levels from `low` in each channel, and `counts` is the summed-volume table of their
    membership there, so the members of any box of colours are counted with 8 look-ups."""

    low: int
    side: int
    counts: np.ndarray = field(repr=False)
    """(side + 1)**3 int32: at [r, g, b] how many members have R - low < r, G - low < g and
    B - low < b."""
    limits: SampleLimits = field(repr=False)
    """Each component's range in a tile of members only (`sample_ranges`): a whole block's
    mean outside it refuses a tile without looking at its pixels' boxes."""

    @classmethod
    def of(cls, low: int, members: np.ndarray) -> ColourRule:
        """The rule of the colours (low + r, low + g, low + b) where `members` (a cube of
        booleans indexed [r, g, b]) is set."""
        side = members.shape[0]
        if members.shape != (side,) * 3 or not 0 <= low <= low + side <= 256:
            raise InvalidArgument("a colour rule is a cube of booleans inside 0..255")
        counts = np.zeros((side + 1,) * 3, np.int32)
        counts[1:, 1:, 1:] = members.astype(np.int32).cumsum(0).cumsum(1).cumsum(2)
        limits = SampleLimits.of(np.argwhere(members) + low)
        return cls(low, side, np.ascontiguousarray(counts), limits)


@dataclass(frozen=True)
class CopiedTile:
    """What `copy_tile` made of a source tile."""

    data: bytes = field(repr=False)
    """The tile as stored: optimised as `transcode` optimises it, or the input (not optimising,
    or a tile proven to be all colours of the rule, which is not stored)."""
    all_in_rule: bool | None
    """Whether every pixel of the tile's region is a colour of the rule: decided from the DCT
    coefficients, None when they cannot tell (or no rule was given)."""


def copy_tile(
    data: bytes,
    optimize: bool,
    region: tuple[int, int],
    rule: ColourRule | None = None,
    half: np.ndarray | None = None,
    blank_fill: int | None = None,
) -> CopiedTile:
    """Everything a copied tile needs, from one entropy decode of its coefficients: the stream
    as `transcode` optimises it (when `optimize`), whether every pixel of its top-left
    `region` (width, height) is a colour of `rule`, and, into `half` (an (h, w, 3) uint8 view
    whose rows may be strided, h and w half the tile's sides rounded up), the tile decoded at
    1/2 scale exactly as `wsi.codecs.jpeg.decode_into(..., half=True)` decodes it (the same
    libjpeg-turbo, its buffered-image mode: the output pass reads the coefficients already in
    memory). Before, each of the three read the whole stream again. With `blank_fill` (a grey
    level) and `rule`, a tile proven all in the rule's colours is not decoded into `half`:
    `half` is filled with that grey instead.

    The verdict, per 8x8 block of pixels reaching into the region: the bounds of `transcode`
    for every sample that makes those pixels (the block's own for full-resolution components;
    for subsampled ones, the hull of the block holding the nearest samples and the 8 around it,
    which holds whatever the upsampler mixes), through the JFIF equations by interval
    arithmetic with `_COLOUR_MARGIN`, give a box of colours that holds every decoded pixel of
    the block. A box with no colour of the rule proves the tile is not all in it (False); all
    boxes inside the rule prove it is (True); a whole block's mean outside `rule.limits` also
    proves False (see `Transcoded.outside`). Otherwise None: only the pixels can tell
    (`within`). The verdict never differs from what the decoded pixels show, as the bounds
    hold for any accurate (islow or float IDCT) decoder."""
    width, height = region
    if min(width, height) <= 0:
        raise InvalidArgument(f"bad region {width}x{height}")
    if half is not None and (half.dtype != np.uint8 or half.ndim != 3):
        raise InvalidArgument("copy_tile: the 1/2-scale target must be an (h, w, 3) uint8 view")
    fill = _blank_fill(blank_fill)
    if half is not None and not one_pass_works():
        return copy_then_decode(data, optimize, region, rule, half, fill)
    counts = rule.counts if rule is not None else b""
    limits = rule.limits.packed if rule is not None else b""
    low, side = (rule.low, rule.side) if rule is not None else (0, 0)
    verdict, _space, _low, _high, out, _dark, _light = _jpeglib.copy_tile(
        data, optimize, width, height, limits, counts, low, side, half, fill
    )
    return CopiedTile(_kept_stream(data, out), verdict)


def copy_tiles(
    tiles: Sequence[bytes],
    optimize: bool,
    regions: Sequence[tuple[int, int]],
    rule: ColourRule | None = None,
    halves: Sequence[np.ndarray | None] | None = None,
    blank_fill: int | None = None,
) -> list[CopiedTile | CorruptSlide]:
    """`copy_tile` of every tile of a list (a row of a pyramid's tiles) in one call: item i
    is what `copy_tile(tiles[i], optimize, regions[i], rule, halves[i])` returns, or the
    `CorruptSlide` it raises (not raised here: a damaged tile stops nothing, the caller decides
    what it means). The C extension walks the list with the GIL released once, where a call
    per tile released and re-took it for each (with two threads copying rows, each re-take
    could wait for the other thread's Python). Bad arguments raise `InvalidArgument`, as
    `copy_tile` does for any of them."""
    targets: list[np.ndarray | None] = list(halves) if halves is not None else [None] * len(tiles)
    if len(regions) != len(tiles) or len(targets) != len(tiles):
        raise InvalidArgument("copy_tiles: one region and one target (or None) per tile")
    for (width, height), half in zip(regions, targets, strict=True):
        if min(width, height) <= 0:
            raise InvalidArgument(f"bad region {width}x{height}")
        if half is not None and (half.dtype != np.uint8 or half.ndim != 3):
            raise InvalidArgument("copy_tiles: a 1/2-scale target must be an (h, w, 3) uint8 view")
    fill = _blank_fill(blank_fill)
    if any(half is not None for half in targets) and not one_pass_works():
        return [
            _one_by_one(data, optimize, region, rule, half, fill)
            for data, region, half in zip(tiles, regions, targets, strict=True)
        ]
    counts = rule.counts if rule is not None else b""
    limits = rule.limits.packed if rule is not None else b""
    low, side = (rule.low, rule.side) if rule is not None else (0, 0)
    sizes = [(int(width), int(height)) for width, height in regions]
    results = _jpeglib.copy_tiles(
        list(tiles),
        optimize,
        sizes,
        limits,
        counts,
        low,
        side,
        targets if halves is not None else None,
        fill,
    )
    out: list[CopiedTile | CorruptSlide] = []
    for data, result in zip(tiles, results, strict=True):
        if isinstance(result, CorruptSlide):
            out.append(result)
            continue
        try:
            out.append(CopiedTile(_kept_stream(data, result[4]), result[0]))
        except CorruptSlide as error:
            out.append(error)
    return out


def _one_by_one(
    data: bytes,
    optimize: bool,
    region: tuple[int, int],
    rule: ColourRule | None,
    half: np.ndarray | None,
    fill: int,
) -> CopiedTile | CorruptSlide:
    """`copy_tile`'s result or error for one tile of `copy_tiles`."""
    try:
        return copy_tile(data, optimize, region, rule, half, fill if fill >= 0 else None)
    except CorruptSlide as error:
        return error


def copy_then_decode(
    data: bytes,
    optimize: bool,
    region: tuple[int, int],
    rule: ColourRule | None,
    half: np.ndarray,
    blank_fill: int = -1,
) -> CopiedTile:
    """`copy_tile` in two entropy decodes, through libjpeg's public API only: the stream and
    the verdict, then TurboJPEG's DCT-scaled decode into `half` (or the fill, as `copy_tile`
    does). What `copy_tile` falls back to where its one pass does not work (`one_pass_works`)."""
    copied = copy_tile(data, optimize, region, rule)
    if copied.all_in_rule and rule is not None and blank_fill >= 0:
        half[...] = blank_fill
    else:
        jpeg.decode_into(data, half, half=True)
    return copied


def _blank_fill(fill: int | None) -> int:
    """`blank_fill` as the C extension takes it (-1: none)."""
    if fill is None:
        return -1
    if not 0 <= fill <= 255:
        raise InvalidArgument(f"blank fill must be a grey level 0..255, got {fill}")
    return fill


@functools.cache
def one_pass_works() -> bool:
    """Whether the 1/2-scale output pass of `copy_tile` works with the libjpeg loaded at run
    time. It reads the coefficient arrays of libjpeg's buffered-image mode through libjpeg's
    internal header (jpegint.h, the same layout since libjpeg 6b), so once per process a tile
    of each kind we encode (YCbCr 4:2:0, RGB-coded 4:4:4) is put through it
    and compared with `transcode` and TurboJPEG's 1/2-scale decode; on any difference or error
    `copy_tile` takes two passes instead (`copy_then_decode`)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for data in (_jpeglib.encode(pixels, 80, True), _jpeglib.encode(pixels, 80, False)):
        half = np.zeros((24, 32, 3), np.uint8)
        try:
            result = _jpeglib.copy_tile(data, True, 64, 48, b"", b"", 0, 0, half)
        except CorruptSlide:
            return False
        if result[0] is not None or result[4] != _jpeglib.transcode(data, True)[3]:
            return False
        if not np.array_equal(half, jpeg.decode(data, half=True)):
            return False
    return True
