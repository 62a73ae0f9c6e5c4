"""Blank glass: which tiles are not stored, and the grey they read back as.

A tile is *background* when every pixel of it inside the level is within CIELab Delta-E 76
`DELTA_E76` of the slide's fill colour (v, v, v). Such a tile is not stored: a missing chunk in
the Zarr view (the array's `fill_value` is v), an absent frame of a TILED_SPARSE DICOM instance
(Recommended Absent Pixel CIELab Value = v), and readers hand out v there. The fill is grey
because a Zarr v3 uint8 array has one scalar fill value for all three channels.

Why 4.2: a replaced pixel moves by at most one just-noticeable difference (Delta-E 76 2.3, for
uniform patches of about 2 degrees: roughly one 256-px tile at 1:1 on a desktop screen) beyond
the error the source's own JPEG coding already carries on glass (at most 1.9, measured: the
generated slide's glass decoded from its quality-80 tiles against the pixels before encoding,
`sample_data/generate.py`; that error is 3 to 5 levels per channel). Measured per-tile maxima
against the best grey: glass of the generated slide 3.05-3.23 (its tint, (243, 241, 245), is
2.22 from grey on its own), the flattest dark tiles of the two NDPI fluorescence samples 1.3-2.9.
Faint stain is kept: eosin at 5% opacity over that glass is 3.9 from it at the tile mean, and its
pixels spread further.

The decision never guesses. Copied JPEG tiles are first judged from their DCT coefficients, in
the one pass that also optimises them and decodes them at 1/2 scale (`jpegtran.copy_tile`, given
`Background.rule`): refused when some whole 8x8 block's mean luma lies below (or above) every
luma a pixel within tolerance can decode to, or when the rigorous bounds of some block's pixels
hold no colour within tolerance; accepted when every block's bounds lie within it. That settles
tissue and glass alike without a decode (on the generated 8000 x 6000 slide 762 of 768 tiles:
all 266 of glass, 496 of tissue; before, all the glass went to a full decode). What the bounds
cannot settle (pixels near the tolerance's edge, a few tissue borders) is decoded and checked
pixel by pixel against a table of the tolerance in one pass (`accepts_jpeg`). Tiles we encode
are checked on the pixels we hold.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from wsi.codecs import jpegtran
from wsi.codecs.colour import srgb_to_lab
from wsi.errors import InvalidArgument
from wsi.model import Level
from wsi.pyramid import _pixels
from wsi.sources.base import SlideSource

DELTA_E76 = 4.2
"""Largest CIELab Delta-E 76 of any pixel of a background tile from the fill colour (see the
module docstring for the figure)."""
DEFAULT_FILL = 255
"""Fill of slides where no uniform grey region is found: white, as before blank glass was
detected (and the fill of levels published without detection)."""
FILL_SAMPLE_PIXELS = 16_000_000
"""Largest smallest-level read when choosing the fill (a whole level that small is read)."""
_BLOCK = 8
"""Side of the blocks the fill is chosen from, in pixels of the smallest level."""
_UNIFORM_SPREAD = 8
"""A block is uniform when each channel spans at most this many levels..."""
_NEUTRAL = 6
"""...and each channel's mean is within this many levels of the block's grey (mean of R, G, B)."""
_MIN_UNIFORM_SHARE = 0.01
"""Fewer uniform blocks than this share of the sample: no blank glass, keep `DEFAULT_FILL`."""


@functools.cache
def _acceptance(fill: int, tolerance: float) -> tuple[int, np.ndarray]:
    """(lowest level of the box, flat table): which R, G, B within the box around (fill, fill,
    fill) that holds every colour within `tolerance`, are within it. The box side is at most 2 x
    24 + 1 levels (Delta-E 4.2 reaches at most 14 levels in one channel anywhere on the grey
    axis), so the table is at most 117,649 booleans."""
    reach = 24
    lo, hi = max(0, fill - reach), min(255, fill + reach)
    axis = np.arange(lo, hi + 1)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1)
    distance = np.sqrt(((srgb_to_lab(grid) - srgb_to_lab(np.array([fill] * 3))) ** 2).sum(-1))
    inside = distance <= tolerance
    for axis_index in range(3):
        faces = np.moveaxis(inside, axis_index, 0)
        if (lo > 0 and faces[0].any()) or (hi < 255 and faces[-1].any()):
            raise InvalidArgument(f"tolerance {tolerance} reaches past {reach} levels")
    used = np.nonzero(inside)
    low = min(int(u.min()) for u in used)
    high = max(int(u.max()) for u in used)
    table = np.ascontiguousarray(inside[low : high + 1, low : high + 1, low : high + 1])
    return lo + low, table


@dataclass(frozen=True)
class Background:
    """The blank-glass rule of one slide: its fill grey and the tolerance around it."""

    fill: int
    """Grey level v of the fill colour (v, v, v), 0..255."""
    tolerance: float = DELTA_E76
    _low: int = field(init=False, repr=False, compare=False)
    _table: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.fill <= 255:
            raise InvalidArgument(f"fill must be 0..255, got {self.fill}")
        if not 0 <= self.tolerance <= 6:
            raise InvalidArgument(f"tolerance must be 0..6 Delta-E, got {self.tolerance}")
        low, table = _acceptance(self.fill, self.tolerance)
        object.__setattr__(self, "_low", low)
        object.__setattr__(self, "_table", table)

    @property
    def box(self) -> tuple[int, int]:
        """[low, high] levels, in every channel, of the smallest box holding every colour within
        tolerance: a pixel outside it is never background."""
        return self._low, self._low + self._table.shape[0] - 1

    def accepts_pixels(self, pixels: np.ndarray) -> bool:
        """Whether every pixel of `pixels` ((h, w, 3) uint8: the part of a tile inside its
        level) is within tolerance of the fill: in C without the GIL (`_pixels.within`), which
        stops at the first pixel outside it, as `accepts_jpeg` does while decoding."""
        if pixels.size == 0:
            return True
        if pixels.strides[1:] != (3, 1):
            pixels = np.ascontiguousarray(pixels)
        return _pixels.within(pixels, _blues(self.fill, self.tolerance))

    @property
    def rule(self) -> jpegtran.ColourRule:
        """The colours within tolerance, as `jpegtran.copy_tile` judges a copied tile against
        them from its DCT coefficients."""
        return _rule(self.fill, self.tolerance)

    def accepts_jpeg(self, data: bytes, level: Level, col: int, row: int) -> bool:
        """Whether the JPEG tile (col, row) of `level` is background, from its decoded pixels
        inside the level (`accepts_pixels` on them, in one pass with the decoding)."""
        return jpegtran.within(data, visible(level, col, row), _blues(self.fill, self.tolerance))


@functools.cache
def _rule(fill: int, tolerance: float) -> jpegtran.ColourRule:
    """The colours within `tolerance` of (fill, fill, fill), with their summed-volume table."""
    low, table = _acceptance(fill, tolerance)
    return jpegtran.ColourRule.of(low, table)


@functools.cache
def _blues(fill: int, tolerance: float) -> np.ndarray:
    """The tolerance as `jpegtran.within` takes it: for each (r, g), the lowest and highest b of
    the colours within it, which are all the b between them (checked: the Delta-E ball is
    convex in CIELab, and no fill at any tolerance up to 6 makes a gap)."""
    low, table = _acceptance(fill, tolerance)
    n = table.shape[0]
    blues = np.zeros((256, 256, 2), np.uint8)
    blues[..., 0] = 255
    count = table.sum(2)
    first = table.argmax(2)
    last = n - 1 - table[:, :, ::-1].argmax(2)
    present = count > 0
    if not (last - first + 1 == count)[present].all():
        raise InvalidArgument(f"the colours within {tolerance} of {fill} are not b-intervals")
    window = blues[low : low + n, low : low + n]
    window[..., 0] = np.where(present, first + low, 255)
    window[..., 1] = np.where(present, last + low, 0)
    return blues


def visible(level: Level, col: int, row: int) -> tuple[int, int]:
    """(width, height) of the part of tile (col, row) that lies inside `level`, in pixels."""
    w = min(level.tile_width, level.width - col * level.tile_width)
    h = min(level.tile_height, level.height - row * level.tile_height)
    return w, h


def inside(pixels: np.ndarray, level: Level, col: int, row: int) -> np.ndarray:
    """The part of tile (col, row)'s pixels (a full tile) that lies inside `level`."""
    w, h = visible(level, col, row)
    return pixels[:h, :w]


def choose_fill(source: SlideSource, threads: int = 1) -> int:
    """The grey of the slide's blank glass, from the pixels of its smallest level: the most
    common grey among uniform, near-neutral 8x8 blocks (glass is the largest flat region of a
    slide; on fluorescence slides it is dark). `DEFAULT_FILL` when under 1% of the blocks are
    uniform (tissue edge to edge: nothing will be dropped unless it is white). The tiles are
    decoded on `threads` threads: this runs before the conversion's first tile. Where the
    codec gives a tile at 1/2 resolution natively (JPEG 2000), that is the sample: up to 64
    such tiles took 0.2 CPU-s decoded whole, the largest share of converting a small JPEG
    2000 slide, and glass is as flat at half the resolution."""
    return fill_of(sample_for_fill(source, threads))


@dataclass(frozen=True)
class Census:
    """What `choose_fill` judges: how many whole 8x8 blocks were looked at, and how many of the
    uniform, near-neutral ones had each rounded grey."""

    blocks: int
    counts: np.ndarray = field(repr=False)
    """(256,) int64: uniform near-neutral blocks by their grey (the mean of R, G, B means)."""

    @classmethod
    def of(cls, image: np.ndarray) -> Census:
        """The census of the whole 8x8 blocks of an (h, w, 3) uint8 image (rows may be
        strided), counted in C without the GIL (`_pixels.glass_census`)."""
        blocks, counts = _pixels.glass_census(image, _UNIFORM_SPREAD, float(_NEUTRAL))
        return cls(blocks, np.frombuffer(counts, np.int64))

    @classmethod
    def total(cls, parts: Sequence[Census]) -> Census:
        counts = np.zeros(256, np.int64)
        for part in parts:
            counts += part.counts
        return cls(sum(part.blocks for part in parts), counts)


@dataclass(frozen=True)
class FillSample:
    """The census `choose_fill` judges, and the tiles it came from when those are worth
    keeping for the build."""

    level: int
    """The source level sampled: the smallest."""
    census: Census
    """Of whole tiles or the whole level, cropped to the level; at 1/2 resolution where the
    codec decodes so natively."""
    halves: dict[tuple[int, int], np.ndarray]
    """`source.read_tile_half(level, col, row)` of every tile of the level, by (col, row), when
    the whole level was sampled so (else empty): a build that keeps this level's JPEG 2000
    codestreams makes the level below from exactly these, and need not decode them again."""


def fill_of(sample: FillSample) -> int:
    """`choose_fill`'s grey of `sample`: the peak of the uniform blocks' greys (smoothed over
    5 levels), then the median of the greys within 2 of it."""
    census = sample.census
    counts = census.counts
    if census.blocks == 0 or counts.sum() < max(1, _MIN_UNIFORM_SHARE * census.blocks):
        return DEFAULT_FILL
    peak = int(np.argmax(np.convolve(counts, np.ones(5), mode="same")))
    lo, hi = max(0, peak - 2), min(256, peak + 3)
    near = np.repeat(np.arange(lo, hi), counts[lo:hi])
    return int(np.rint(np.median(near)))


def sample_for_fill(source: SlideSource, threads: int = 1) -> FillSample:
    """The smallest level whole when it has at most `FILL_SAMPLE_PIXELS`, else an 8 x 8 grid
    of its tiles, each cropped to the level (a single-level slide costs at most 64 tiles). A
    whole level is given tile by tile when its tiles are whole 8 x 8 blocks: the same blocks
    as the level in one piece, and its tiles can be decoded and counted side by side."""
    index = len(source.levels) - 1
    lv = source.levels[index]
    whole = lv.width * lv.height <= FILL_SAMPLE_PIXELS
    if whole:
        if lv.tile_width % _BLOCK or lv.tile_height % _BLOCK:
            image = source.read_region(index, 0, 0, lv.width, lv.height)
            return FillSample(index, Census.of(image), {})
        cells = sorted({(c, r) for c in range(lv.cols) for r in range(lv.rows)})
    else:
        cells = sorted(
            {(c * (lv.cols - 1) // 7, r * (lv.rows - 1) // 7) for c in range(8) for r in range(8)}
        )

    def read(cell: tuple[int, int]) -> tuple[Census, np.ndarray | None]:
        half = source.read_tile_half(index, *cell)
        if half is None:
            return Census.of(inside(source.read_tile(index, *cell), lv, *cell)), None
        w, h = visible(lv, *cell)
        return Census.of(half[: h // 2, : w // 2]), half

    if threads <= 1 or len(cells) == 1:
        read_cells = [read(cell) for cell in cells]
    else:
        with cf.ThreadPoolExecutor(threads, "wsi-fill") as pool:
            read_cells = list(pool.map(read, cells))
    halves = {}
    if whole:
        halves = {
            cell: half
            for cell, (_, half) in zip(cells, read_cells, strict=True)
            if half is not None
        }
    return FillSample(index, Census.total([census for census, _ in read_cells]), halves)
