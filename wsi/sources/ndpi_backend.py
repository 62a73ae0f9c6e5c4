"""Hamamatsu NDPI backend: each pyramid level's JPEG stream cut into tiles at its restart markers.

An NDPI level is one TIFF strip holding one baseline JPEG stream, written with a restart marker
every N MCUs so that an interval never crosses a row of MCUs; the private TIFF tag 65426
(McuStarts, with 65432 holding the high 32 bits in files over 4 GB) gives the offset of every
interval. A tile is a rectangle of whole intervals given its own header (`wsi.codecs.restart`):
no pixel is decoded. The tile size comes from level 0's interval width. Up to
`_MAX_WHOLE_WIDTH` (2048 px, NanoZoomer's brightfield interval) a tile is whole intervals: one
interval across, or as many narrow ones as reach 256 px, and as many rows of them as make about
`_TILE_AREA` pixels (2048 x 128, 1024 x 256, 512 x 512; never taller than wide). Such a tile is
the stored entropy-coded bytes under a new header, which costs a read and a join (0.07 ms of CPU
a 2048 x 128 tile): cropping 512 px tiles out of the intervals on DCT blocks (libjpeg-turbo's
`tjTransform`, what opentile does) costs 3.2 ms a tile, more than decoding it (1.7 ms; measured
on the generated 20,480 px NDPI). The price of wide tiles is coarser blank-glass detection: 2.7%
more bytes stored there. Wider intervals (some files have one interval per row of MCUs)
are cropped losslessly into the divisor of their width nearest to 512 that is a whole number of
MCUs (512 px tiles across two intervals when there is none), as tall as wide. Tiles past the
level's edge are padded with white intervals. The other stored levels are cut into tiles of the
same size (a scanner writes the same number of intervals across every level, so theirs are
joined), so that the pyramid builder copies each one whose size is an exact 2x step.

A level is decoded through OpenSlide instead, and the reason logged in one line, when it has no
restart markers (a single JPEG), when its intervals span rows or their offsets are inconsistent,
when its MCU does not divide the slide's tile size, or when its intervals are wider than
`_MAX_CROP_WIDTH` and would have to be cropped. When level 0 cannot be cut, no level is (the
output's tile size is then the converter's, not ours). OpenSlide's levels that are not stored
(it adds scaled decodes: the halves between levels stored 4x apart, and 1/2 .. 1/8 of the
smallest one) are decoded too. `NdpiSource.decoded`
says why, per level.

Pixels: with 4:4:4 (unsubsampled) streams every tile decodes to exactly OpenSlide's pixels.
Subsampled chroma is upsampled by decoders from neighbouring chroma samples inside the stream
they decode, and OpenSlide decodes one interval at a time, so where a tile joins intervals
side by side, is cropped out of one, or is padded, a decoder's output can differ by a few levels
between the two (the coefficients are the same). A 4:2:2 tile one interval wide is identical:
4:2:2 is subsampled across only, and the tile's rows are the intervals OpenSlide decodes.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from wsi.codecs import jpeg, restart
from wsi.errors import CorruptSlide, EncodedTileUnavailable, UnsupportedSlide
from wsi.model import Level, SlideProperties, TileCodec
from wsi.sources.copied_levels import CopiedLevels
from wsi.sources.openslide_backend import OpenSlideSource, openslide

log = logging.getLogger(__name__)

_JPEG = 7
_STRIP_OFFSETS, _STRIP_BYTES = 273, 279
_SOURCE_LENS, _FOCAL_PLANE = 65421, 65424
_MCU_STARTS, _MCU_STARTS_HIGH = 65426, 65432
_MIN_TILE, _MAX_TILE, _PREFERRED_TILE = 256, 1024, 512
_MAX_WHOLE_WIDTH = 2048
"""Widest restart interval that is a tile's width as it is (see the module docstring)."""
_TILE_AREA = 512 * 512
"""Pixels a tile of whole intervals aims at: the area of the 512 px tiles viewers fetch."""
_MAX_CROP_WIDTH = 8192
"""Widest restart interval cropped into tiles, in pixels: libjpeg holds a frame's coefficients
while it crops (2 bytes a sample: 48 MB for 8192 x 1024 pixels in 4:4:4), and a slide whose
intervals are whole rows of a 100,000 px level would otherwise need 600 MB a thread."""
_BAND_BYTES = 16 * 1024 * 1024
"""Most bytes of a tile row's intervals read at once and held, per thread (a 2048 x 128 tile
row of a 100,000 px wide level is about 4 MB)."""
_CACHE_TILES = 1024
"""Cropped tiles kept for the other tiles of their frame (a frame is read once for all the tiles
cut from it); about 100 MB at most."""

CUT = "cut at restart markers"
CUT_AND_CROPPED = "cut at restart markers, cropped on DCT blocks"


@dataclass(frozen=True)
class _Stripes:
    """One level's JPEG stream as a grid of restart intervals ("stripes")."""

    header: restart.RestartHeader
    offsets: np.ndarray
    """Absolute file offset of each interval, in scan order, then the end of the stream."""
    across: int
    down: int
    white: bytes
    """Entropy-coded data of one white interval (padding past the level's edge)."""

    @property
    def width(self) -> int:
        return self.header.interval_width

    @property
    def height(self) -> int:
        return self.header.mcu_height


def _tag(page: tifffile.TiffPage, code: int) -> object:
    tag = page.tags.get(code)
    return None if tag is None else tag.value


def _first(value: object) -> int:
    if isinstance(value, tuple | list | np.ndarray):
        return int(value[0])
    return int(value)  # type: ignore[call-overload]


def _stripes(fd: int, page: tifffile.TiffPage, file_size: int) -> _Stripes | str:
    """The level's interval grid, or why it cannot be cut. CorruptSlide when the level's data
    lies past the end of the file."""
    start, size = _first(_tag(page, _STRIP_OFFSETS)), _first(_tag(page, _STRIP_BYTES))
    if start + size > file_size:
        raise CorruptSlide("an NDPI level's data runs past the end of the file (truncated?)")
    low = _tag(page, _MCU_STARTS)
    if low is None:
        return "no restart marker offsets (one JPEG stream)"
    starts = np.asarray(low, np.int64).ravel()
    high = _tag(page, _MCU_STARTS_HIGH)
    if high is not None:
        high_bits = np.asarray(high, np.int64).ravel()
        if high_bits.shape != starts.shape:
            return "restart marker offsets disagree in count"
        starts = starts + (high_bits << 32)
    if starts.size < 2 or starts[0] < 4 or np.any(np.diff(starts) < 2) or starts[-1] >= size:
        return "restart marker offsets are inconsistent"
    header = restart.parse_header(os.pread(fd, int(starts[0]), start))
    if header.restart_interval == 0:
        return "the JPEG stream has no restart interval"
    mcus_across = -(-page.imagewidth // header.mcu_width)
    across, rest = divmod(mcus_across, header.restart_interval)
    down = -(-page.imagelength // header.mcu_height)
    if rest:
        return "restart intervals span rows of MCUs"
    if across * down != starts.size:
        return "the number of restart marker offsets does not match the image size"
    offsets = np.append(starts + start, start + size)
    return _Stripes(header, offsets, across, down, restart.white_interval(header))


def _tile_size(stripes: _Stripes) -> tuple[int, int]:
    """Output tile size (width, height) in pixels for a slide whose level 0 has `stripes`."""
    sw, mw, mh = stripes.width, stripes.header.mcu_width, stripes.header.mcu_height
    if sw <= _MAX_WHOLE_WIDTH:
        tw = sw * -(-_MIN_TILE // sw) if sw < _MIN_TILE else sw
        th = min(tw - tw % mh, max(mh, round(_TILE_AREA / tw / mh) * mh))
        return tw, max(mh, th)
    divisors = [d for d in range(_MIN_TILE, _MAX_TILE + 1, mw) if sw % d == 0]
    tw = min(divisors, key=lambda d: abs(d - _PREFERRED_TILE), default=_PREFERRED_TILE)
    tw -= tw % mw
    return tw, max(mh, round(tw / mh) * mh)


class _Band(threading.local):
    """Per thread: the stored bytes of the stripe rows of the last tile row read."""

    def __init__(self) -> None:
        self.rows = (0, 0)
        """Stripe rows held: first, end (exclusive)."""
        self.base = 0
        """File offset of `data[0]`."""
        self.data: bytes | None = None


class _Frames:
    """Cuts one level's tiles from its intervals; crops are shared by the tiles of a frame."""

    def __init__(self, fd: int, stripes: _Stripes, tile_width: int, tile_height: int) -> None:
        self.fd = fd
        self.s = stripes
        self.tw, self.th = tile_width, tile_height
        self.cropped = tile_width % stripes.width != 0
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[tuple[int, int, int], cf.Future[dict[int, bytes]]]
        self._cache = collections.OrderedDict()
        self._sizes: dict[tuple[int, int, int], int] = {}
        """Tiles held by each finished cache entry (what eviction frees)."""
        self._bands = _Band()

    def _span(self, col: int) -> tuple[int, int]:
        """First and last stripe column (inclusive; past `across` = white) under tile `col`."""
        x0 = col * self.tw
        return x0 // self.s.width, (x0 + self.tw - 1) // self.s.width

    def _frame(self, row: int, s0: int, s1: int) -> bytes:
        """The JPEG of stripe columns s0..s1 over tile row `row`, padded with white."""
        s = self.s
        rows = self.th // s.height
        band = self._band(row * rows, min((row + 1) * rows, s.down))
        intervals: list[bytes] = []
        for r in range(row * rows, (row + 1) * rows):
            real = min(s1, s.across - 1) - s0 + 1 if r < s.down else 0
            if real > 0:
                first = r * s.across + s0
                bounds = s.offsets[first : first + real + 1].tolist()
                base, data = band or (bounds[0], self._read(bounds[0], bounds[-1]))
                for k in range(real):
                    piece = data[bounds[k] - base : bounds[k + 1] - base]
                    intervals.append(_interval(piece, first + k, s.across * s.down))
            intervals.extend([s.white] * (s1 - s0 + 1 - max(real, 0)))
        return restart.assemble(s.header, (s1 - s0 + 1) * s.width, self.th, intervals)

    def _read(self, start: int, end: int) -> bytes:
        data = os.pread(self.fd, end - start, start)
        if len(data) != end - start:
            raise CorruptSlide("NDPI level data is truncated")
        return data

    def _band(self, r0: int, r1: int) -> tuple[int, bytes] | None:
        """(file offset, bytes) of stripe rows r0 .. r1 - 1, every column: the intervals of a
        whole tile row lie together in the file, and the builder asks for a row's tiles in
        order on one thread, so they are read in one call and kept for the thread's next
        tiles (a read per interval row took 16 calls for a 2048 x 128 tile of 4:4:4, each
        giving up the GIL and waiting to take it back). None for a band over `_BAND_BYTES`
        (each row's intervals are then read apart) or past the level's end."""
        s = self.s
        if r0 >= r1:
            return None
        held = self._bands
        if held.rows == (r0, r1) and held.data is not None:
            return held.base, held.data
        base, end = int(s.offsets[r0 * s.across]), int(s.offsets[r1 * s.across])
        if end - base > _BAND_BYTES:
            return None
        data = self._read(base, end)
        held.rows, held.base, held.data = (r0, r1), base, data
        return base, data

    def tile(self, col: int, row: int) -> bytes:
        s0, s1 = self._span(col)
        if not self.cropped:
            return self._frame(row, s0, s1)
        key = (row, s0, s1)
        with self._lock:
            future = self._cache.get(key)
            owner = future is None
            if future is None:
                future = self._cache[key] = cf.Future()
        if owner:
            try:
                future.set_result(self._crop_group(row, s0, s1))
            except BaseException as exc:
                with self._lock:
                    self._cache.pop(key, None)
                future.set_exception(exc)
                raise
            self._remember(key, future)
        return future.result()[col]

    def _crop_group(self, row: int, s0: int, s1: int) -> dict[int, bytes]:
        """Every tile of row `row` whose stripes are s0..s1, cropped from one frame."""
        x0 = s0 * self.s.width
        last = min((s1 + 1) * self.s.width // self.tw, -(-self.s.across * self.s.width // self.tw))
        cols = [c for c in range(x0 // self.tw, last + 1) if self._span(c) == (s0, s1)]
        frame = self._frame(row, s0, s1)
        regions = [(c * self.tw - x0, 0, self.tw, self.th) for c in cols]
        return dict(zip(cols, restart.crop(frame, regions), strict=True))

    def _remember(self, key: tuple[int, int, int], future: cf.Future[dict[int, bytes]]) -> None:
        """Count a finished entry, and forget the oldest ones beyond `_CACHE_TILES` tiles."""
        with self._lock:
            if self._cache.get(key) is not future:
                return
            self._sizes[key] = len(future.result())
            while sum(self._sizes.values()) > _CACHE_TILES and len(self._cache) > 1:
                old_key, _ = self._cache.popitem(last=False)
                self._sizes.pop(old_key, None)


def _interval(data: bytes, index: int, count: int) -> bytes:
    """Interval `index` as stored, checked to end with the marker its place calls for (RSTn,
    or EOI for the last), without it."""
    expected = 0xD9 if index == count - 1 else 0xD0 + index % 8
    if len(data) < 2 or data[-2] != 0xFF or data[-1] != expected:
        raise CorruptSlide("NDPI restart marker offsets do not point at restart intervals")
    return data[:-2]


class NdpiSource(CopiedLevels):
    """Hamamatsu NDPI slides, their JPEG levels cut into tiles without decoding."""

    name = "ndpi"

    @classmethod
    def can_open(cls, path: Path) -> bool:
        if path.suffix.lower() != ".ndpi" or not path.is_file():
            return False
        try:
            return openslide.OpenSlide.detect_format(str(path)) == "hamamatsu"
        except Exception:
            return False

    def __init__(self, path: Path) -> None:
        # Asked for by name (`--backend ndpi`), the probe has not run: another TIFF would be read
        # with NDPI's rules, its levels decoded through OpenSlide under the name "ndpi".
        if not self.can_open(path):
            raise UnsupportedSlide("not a Hamamatsu NDPI file")
        self._os = OpenSlideSource(path)
        self._fd: int | None = None
        self._tif: tifffile.TiffFile | None = None
        try:
            self._tif = tifffile.TiffFile(path)
            self._fd = os.open(path, os.O_RDONLY)
            self._frames, self.decoded = self._cut_levels(os.fstat(self._fd).st_size)
        except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError) as exc:
            self.close()
            if isinstance(exc, CorruptSlide | UnsupportedSlide):
                raise
            raise CorruptSlide(f"cannot parse NDPI structure: {exc}") from exc
        except BaseException:
            self.close()
            raise
        first = next(iter(self._frames.values()), None)
        tw, th = (first.tw, first.th) if first else (_PREFERRED_TILE, _PREFERRED_TILE)
        self._levels = tuple(
            Level(lv.width, lv.height, tw, th, lv.downsample) for lv in self._os.levels
        )

    def _pages(self) -> list[tifffile.TiffPage | None]:
        """The TIFF page behind each OpenSlide level (focal plane 0), None for levels OpenSlide
        makes by scaled decoding."""
        assert self._tif is not None
        pages: dict[tuple[int, int], tifffile.TiffPage] = {}
        for page in self._tif.pages:
            if not isinstance(page, tifffile.TiffPage) or page.compression != _JPEG:
                continue
            lens, plane = _tag(page, _SOURCE_LENS), _tag(page, _FOCAL_PLANE)
            if isinstance(lens, int | float) and lens > 0 and plane in (None, 0):
                pages.setdefault((page.imagewidth, page.imagelength), page)
        return [pages.get((lv.width, lv.height)) for lv in self._os.levels]

    def _cut_levels(self, file_size: int) -> tuple[dict[int, _Frames], dict[int, str]]:
        """Which levels are cut (with their tile size, from level 0) and why the others are
        decoded."""
        assert self._fd is not None
        frames: dict[int, _Frames] = {}
        decoded: dict[int, str] = {}
        size: tuple[int, int] | None = None
        for index, page in enumerate(self._pages()):
            found = _stripes(self._fd, page, file_size) if page is not None else "not stored"
            if isinstance(found, str):
                decoded[index] = found
                continue
            if size is None:
                size = _tile_size(found) if index == 0 else None
            if size is None:
                decoded[index] = "level 0 cannot be cut, so no level is"
            elif size[0] % found.header.mcu_width or size[1] % found.header.mcu_height:
                decoded[index] = f"its MCU does not divide the {size[0]}x{size[1]} tiles"
            elif size[0] % found.width and found.width > _MAX_CROP_WIDTH:
                decoded[index] = f"its {found.width} px restart intervals are too wide to crop"
            else:
                frames[index] = _Frames(self._fd, found, *size)
        for index, reason in decoded.items():
            if reason != "not stored":
                log.info("NDPI level %d is decoded through OpenSlide: %s", index, reason)
        return frames, decoded

    @property
    def levels(self) -> tuple[Level, ...]:
        return self._levels

    @property
    def properties(self) -> SlideProperties:
        return self._os.properties

    def tile_codec(self, level: int) -> TileCodec:
        self.level(level)
        return TileCodec.JPEG if level in self._frames else TileCodec.OTHER

    def encoded_tile_method(self, level: int) -> str:
        frames = self._frames.get(level)
        if frames is None:
            return super().encoded_tile_method(level)
        return CUT_AND_CROPPED if frames.cropped else CUT

    def read_encoded_tile(self, level: int, col: int, row: int) -> bytes:
        lv = self.level(level)
        lv.check_tile(col, row)
        frames = self._frames.get(level)
        if frames is None:
            raise EncodedTileUnavailable(f"NDPI level {level} is decoded, not cut")
        tile = frames.tile(col, row)
        jpeg.check_size(tile, lv.tile_height, lv.tile_width)
        return tile

    def is_copied(self, level: int) -> bool:
        return level in self._frames

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tif is not None:
            self._tif.close()
            self._tif = None
        self._os.close()
