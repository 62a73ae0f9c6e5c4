"""The streaming pyramid builder: one pass over the source, every level written as it is made.

Plan: level 0 keeps the source's tile size when its tiles are JPEG (their DCT coefficients are
copied: the bytes rewritten with optimal Huffman tables, or as they are with `optimize_huffman`
off) and uses `tile_size` otherwise (decoded and re-encoded). Each further level is an exact 2x step
(sizes rounded down) until one tile holds the whole level. A level is either *passed through* from
a source level of exactly that size (same tiles, JPEG: no pixel re-encoded) or *derived* from the
level above it: from JPEG tiles by libjpeg-turbo's 1/2-scale DCT decoding, otherwise by a 2x2 area
mean. Tiles of blank glass are not stored (`wsi.pyramid.background`): the writer gets None.

Work runs in *segments*: a passed-through (or decoded) level followed by the levels derived from it.
A segment walks its top level two tile rows at a time, cut into column blocks; each (row pair,
block) is one task for the thread pool (codec calls release the GIL) and yields that level's tiles
plus the next level's tiles and pixels. Results are consumed in order, so each level's tiles reach
the writer in row-major order, and deeper levels are folded from two pixel rows at a time. Memory
holds a bounded number of tasks plus two pixel rows per level: it grows with slide width, never
with slide area.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from wsi.codecs import jpeg, jpeg2000, jpegtran
from wsi.errors import CorruptSlide, EncodedTileUnavailable, InvalidArgument
from wsi.model import Level, TileCodec, pyramid_levels
from wsi.published.layout import JPEG, JPEG2000, ZSTD, ChunkFormat, encode_chunk_zstd
from wsi.pyramid.background import Background, FillSample, fill_of, inside, sample_for_fill, visible
from wsi.pyramid.tiles import mean2x2_into, quadrant, quadrant_tile
from wsi.sources.base import SlideSource
from wsi.writers.base import ALL_STORED, BlankTiles, PyramidWriter

BLOCK_TILES = 32
"""Tiles across per task (even, so a block maps to whole tiles of the next level)."""

Progress = Callable[[int, int], None]
"""progress(done_tiles, total_tiles)"""


@dataclass(frozen=True)
class PyramidSettings:
    """How pixels are encoded and how much of the machine to use."""

    quality: int = 90
    """JPEG quality of tiles we encode (source JPEG tiles keep theirs)."""
    lossless: bool = False
    """Encode tiles we make with zstd (lossless) instead of JPEG."""
    workers: int = 0
    """Threads for decoding/encoding; 0 = one per CPU core."""
    tile_size: int = 256
    """Output tile size when the base level is re-encoded."""
    reuse_levels: bool = True
    """Pass through source levels that are exact 2x steps with JPEG tiles."""
    subsample_420: bool = True
    """Tiles we encode are YCbCr 4:2:0 (the default: what scanners write, DICOM YBR_FULL_422,
    smallest), or RGB-coded 4:4:4 when False (DICOM RGB): about 0.7 vs 0.28 bytes per pixel
    and 40.7 vs 33.1 dB PSNR at quality 90 on dense tissue (CMU-1 level 1)."""
    optimize_huffman: bool = True
    """Rewrite every stored JPEG tile, copied or ours, with optimal Huffman tables (what
    `jpegtran -optimize` does: the same DCT coefficients, so the same pixels in every decoder;
    ~10% smaller). False keeps the source's tiles byte for byte."""
    keep_background: bool = False
    """Store blank-glass tiles too. By default a tile whose every pixel is within the tolerance
    of `wsi.pyramid.background` of the slide's fill grey is not stored (a missing Zarr chunk, an
    absent TILED_SPARSE frame). Always kept with `lossless`."""

    keep_jpeg2000: bool = False
    """Keep a JPEG 2000 source's base level as its codestreams (no pixel re-encoded; DICOM's
    JPEG 2000 transfer syntax, the `wsistore.jpeg2000` Zarr codec), and with `reuse_levels`
    its exact 2x levels too, each level below a kept one from a 1/2 resolution decode.
    Otherwise such tiles are decoded and stored as JPEG, which viewers show."""

    def __post_init__(self) -> None:
        if not 1 <= self.quality <= 100:
            raise InvalidArgument(f"quality must be 1-100, got {self.quality}")
        if self.workers < 0:
            raise InvalidArgument("workers must be >= 0")
        if self.tile_size < 16 or self.tile_size % 16 or self.tile_size > 4096:
            raise InvalidArgument("tile size must be a multiple of 16 between 16 and 4096")

    @property
    def thread_count(self) -> int:
        return self.workers or os.cpu_count() or 1

    @property
    def encoded_format(self) -> ChunkFormat:
        return ChunkFormat(ZSTD) if self.lossless else ChunkFormat(JPEG, self.quality)


@dataclass(frozen=True)
class LevelPlan:
    """One output level and where its tiles come from."""

    index: int
    level: Level
    source_level: int | None
    """Source level copied tile for tile, or None when this level is derived/encoded here."""
    chunk_format: ChunkFormat

    @property
    def passthrough(self) -> bool:
        return self.source_level is not None


def plan_pyramid(source: SlideSource, settings: PyramidSettings) -> list[LevelPlan]:
    """Decide every output level's geometry and origin."""
    base = source.levels[0]
    # Derived tiles are built from 2x2 quadrants of the tiles above, so tiles must have even
    # sides to be copied (TIFF tiles are multiples of 16; odd DICOM frames get re-encoded).
    even = base.tile_width % 2 == 0 and base.tile_height % 2 == 0
    base_jpeg = source.tile_codec(0) is TileCodec.JPEG and even
    base_j2k = settings.keep_jpeg2000 and source.tile_codec(0) is TileCodec.JPEG2000 and even
    base_copied = base_jpeg or base_j2k
    tw, th = (base.tile_width, base.tile_height) if base_copied else (settings.tile_size,) * 2
    plans = []
    for index, level in enumerate(pyramid_levels(base.width, base.height, tw, th)):
        source_level = None
        if index == 0 and base_copied:
            source_level = 0
        elif index > 0 and settings.reuse_levels:
            source_level = _matching_source_level(source, level, settings.keep_jpeg2000)
        fmt = None
        if source_level is not None:
            j2k = source.tile_codec(source_level) is TileCodec.JPEG2000
            fmt = ChunkFormat(JPEG2000 if j2k else JPEG, settings.quality)
        plans.append(LevelPlan(index, level, source_level, fmt or settings.encoded_format))
    return plans


def _matching_source_level(source: SlideSource, level: Level, keep_jpeg2000: bool) -> int | None:
    """The source level with exactly this level's size and tiles, stored as tiles we keep:
    JPEG, or JPEG 2000 when its codestreams are kept (an Aperio JPEG 2000 slide's 2x level
    then costs no decoding at all, and the level below it a 1/2 resolution decode of it)."""
    kept = (TileCodec.JPEG, TileCodec.JPEG2000) if keep_jpeg2000 else (TileCodec.JPEG,)
    for i, lv in enumerate(source.levels[1:], start=1):
        same_size = (lv.width, lv.height) == (level.width, level.height)
        same_tiles = (lv.tile_width, lv.tile_height) == (level.tile_width, level.tile_height)
        if same_size and same_tiles and source.tile_codec(i) in kept:
            return i
    return None


@dataclass
class _BlockResult:
    top_rows: list[list[bytes | None]]
    """Encoded tiles of the segment's top level (None: blank, not stored): one list per tile
    row (1 or 2 rows)."""
    next_row: list[bytes | None] | None
    """Encoded tiles of the next level's row in this block (None if there is no next level)."""
    next_pixels: list[np.ndarray] | None
    """The next level's tiles' pixels, for deeper levels."""


class PyramidBuilder:
    """Builds the planned pyramid from `source` into `writer`."""

    def __init__(
        self,
        source: SlideSource,
        writer: PyramidWriter,
        settings: PyramidSettings,
        progress: Progress | None = None,
        fill: int | None = None,
    ) -> None:
        """`fill`: the blank-glass grey when it is already known (the coordinator of a
        distributed build chose it once for all its bands); by default chosen from the source."""
        self.source = source
        self.writer = writer
        self.settings = settings
        self.plans = plan_pyramid(source, settings)
        self._progress = progress
        self._done = 0
        self._total = sum(p.level.tile_count for p in self.plans)
        keep = settings.keep_background or settings.lossless
        self._halves: dict[tuple[int, int, int], np.ndarray] = {}
        """Source tiles at 1/2 resolution already decoded, by (level, col, row): taken (and
        dropped) by the tile that needs them."""
        if fill is None and not keep:
            sample = sample_for_fill(source, settings.thread_count)
            fill = fill_of(sample)
            self._halves = self._kept_halves(sample)
        self.background = None if keep or fill is None else Background(fill)
        """The blank-glass rule (None: every tile is stored)."""
        self.blank = (
            BlankTiles(self.background.fill, self.background.tolerance)
            if self.background
            else ALL_STORED
        )

    def _kept_halves(self, sample: FillSample) -> dict[tuple[int, int, int], np.ndarray]:
        """The fill sample's half tiles, when the build will want them: their level is kept as
        its JPEG 2000 codestreams and the level below is made from their 1/2 decodes (a small
        JPEG 2000 slide's smallest level: 63 of the TCGA sample's tiles, decoded once, not
        twice). Bounded: `sample_for_fill` keeps halves only of a level it read whole."""
        for segment in self.segments():
            top = segment[0]
            kept = top.chunk_format.codec == JPEG2000 and top.source_level == sample.level
            if kept and len(segment) > 1:
                return {(sample.level, *cell): half for cell, half in sample.halves.items()}
        return {}

    # -- encoding helpers ------------------------------------------------------------------
    def _encode(self, fmt: ChunkFormat, tile: np.ndarray) -> bytes:
        """A tile we make, as stored: JPEG tiles with optimal Huffman tables unless
        `optimize_huffman` is off (encoded so in one pass: what transcoding would make)."""
        if fmt.codec != JPEG:
            return encode_chunk_zstd(tile, fmt.zstd_level)
        if self.settings.optimize_huffman:
            return jpeg.encode_optimized(tile, fmt.quality, self.settings.subsample_420)
        return jpeg.encode(tile, fmt.quality, self.settings.subsample_420)

    def _store_copied(
        self, level: Level, row: int, copied: list[tuple[int, bytes, np.ndarray | None]]
    ) -> list[bytes | None]:
        """Source JPEG tiles (column, stream, half) of one row as stored: None for blank glass,
        else with optimal Huffman tables (or as they are). With `half`, the tile decoded at 1/2
        scale is written there (its quadrant of the level below).

        One entropy decode does it all (`jpegtran.copy_tiles`, the row's tiles in one call):
        the coefficients read once give the optimised stream, the 1/2-scale pixels (libjpeg's
        buffered-image mode, the same pixels as TurboJPEG's DCT-scaled decode) and, from
        rigorous bounds of every block's pixels, the blank-glass verdict: on the generated
        slides every tile, tissue and glass, is settled so. Only a tile the bounds cannot settle
        (pixels at the tolerance's edge) is decoded and checked pixel by pixel
        (`Background.accepts_jpeg`). A tile of blank glass is not stored, and its quadrant of
        the level below is the fill grey, as a viewer shows the tile: one settled from its
        coefficients is never decoded (a third of the work of a glass tile, about half of a
        slide's tiles), and the levels below show the glass as level 0 does. Without a
        background rule nor optimisation the tiles are stored as they are (but their free-text
        segments) and only their 1/2-scale decodes are made. A damaged tile raises its
        `CorruptSlide` (the row's first)."""
        background = self.background
        optimize = self.settings.optimize_huffman
        if background is None and not optimize:
            for _, data, half in copied:
                if half is not None:
                    # TurboJPEG picks the 1/2 DCT scale to fit the view and never writes past it.
                    jpeg.decode_into(data, half, half=True)
            # As they are but for comments and EXIF/XMP blocks (`jpeg.without_text`).
            return [jpeg.without_text(data) for _, data, _ in copied]
        rule = background.rule if background is not None else None
        results = jpegtran.copy_tiles(
            [data for _, data, _ in copied],
            optimize,
            [visible(level, col, row) for col, _, _ in copied],
            rule,
            [half for _, _, half in copied],
            background.fill if background is not None else None,
        )
        stored: list[bytes | None] = []
        for (col, data, half), result in zip(copied, results, strict=True):
            if isinstance(result, CorruptSlide):
                raise result
            blank = result.all_in_rule
            if background is not None and blank is None:
                blank = background.accepts_jpeg(data, level, col, row)
                if blank and half is not None:
                    half[...] = background.fill
            stored.append(None if blank else result.data)
        return stored

    def _store_pixels(
        self, fmt: ChunkFormat, pixels: np.ndarray, level: Level, col: int, row: int
    ) -> bytes | None:
        """A tile we encode, from its (full tile) pixels: None when it is blank glass."""
        background = self.background
        if background is not None and background.accepts_pixels(inside(pixels, level, col, row)):
            return None
        return self._encode(fmt, pixels)

    def _store_made(
        self, fmt: ChunkFormat, tile: np.ndarray, level: Level, col: int, row: int
    ) -> bytes | None:
        """`_store_pixels` of a tile made here from the level above: when it is blank glass,
        its pixels become the fill grey, what a reader shows for it, hence what the levels made
        from it see (as a copied tile's quadrant: `_store_copied`)."""
        stored = self._store_pixels(fmt, tile, level, col, row)
        if stored is None and self.background is not None:
            tile[...] = self.background.fill
        return stored

    def _halve(self, pixels: np.ndarray, stored: bytes | None, target: np.ndarray) -> None:
        """Tile `pixels` of a segment's top level (the source's: never changed) into `target`,
        its quadrant of the level below: their 2x2 means, or the fill grey when the tile is
        blank glass (`stored` None)."""
        if stored is None and self.background is not None:
            target[...] = self.background.fill
        else:
            mean2x2_into(pixels, target)

    def _tick(self, tiles: int) -> None:
        self._done += tiles
        if self._progress:
            self._progress(self._done, self._total)

    # -- the top level of a segment ---------------------------------------------------------
    def _top_tiles(
        self, plan: LevelPlan, row: int, cols: range, below: list[np.ndarray] | None, qy: int
    ) -> list[bytes | None]:
        """Encoded tiles of one row span of a segment's top level. With `below` (the next
        level's tiles under this span), each tile is also halved into its quadrant there: by
        DCT-scaled decoding for JPEG tiles, by a 2x2 mean of decoded pixels otherwise."""
        if plan.chunk_format.codec == JPEG2000:
            return self._kept_jpeg2000_tiles(plan.source_level or 0, row, cols, below, qy)
        lv = plan.level
        tw, th = lv.tile_width, lv.tile_height
        region = None
        encoded: list[bytes | None] = []
        if plan.source_level is None:  # decoded base level: read pixels, encode tiles
            region = self.source.read_region(0, cols.start * tw, row * th, len(cols) * tw, th)
        else:  # copied: the span's stored tiles read at once (None: unavailable)
            encoded = self.source.read_encoded_tiles(plan.source_level, cols, row)
        tiles: list[bytes | None] = []
        copied: list[tuple[int, bytes, np.ndarray | None]] = []  # stored below, in one call
        for i, col in enumerate(cols):
            target = None
            if below is not None and i // 2 < len(below):
                target = quadrant(below[i // 2], qy, i % 2)
            pixels = None
            if region is not None:
                pixels = region[:, i * tw : (i + 1) * tw]
                tiles.append(self._store_pixels(plan.chunk_format, pixels, lv, col, row))
            else:
                data = encoded[i]
                if data is not None:
                    copied.append((col, data, target))
                    tiles.append(None)
                else:  # sparse tile: decode (white) and encode it
                    pixels = self.source.read_tile(plan.source_level or 0, col, row)
                    fmt = ChunkFormat(JPEG, plan.chunk_format.quality)
                    tiles.append(self._store_pixels(fmt, pixels, lv, col, row))
            if target is not None and pixels is not None:
                self._halve(pixels, tiles[-1], target)
        for (col, _, _), stored in zip(copied, self._store_copied(lv, row, copied), strict=True):
            tiles[col - cols.start] = stored
        return tiles

    def _kept_jpeg2000_tiles(
        self, level: int, row: int, cols: range, below: list[np.ndarray] | None, qy: int
    ) -> list[bytes | None]:
        """`_top_tiles` for a level kept as source `level`'s JPEG 2000 codestreams. Every
        tile is stored (telling blank glass would take the full decode this mode avoids);
        each quadrant below is the codestream decoded at 1/2 resolution straight into it
        (1.4 vs 3.3 ms a 256-px tile for a full decode, on the generated slide)."""
        tiles: list[bytes | None] = []
        for i, col in enumerate(cols):
            try:
                data: bytes | None = self.source.read_encoded_tile(level, col, row)
            except EncodedTileUnavailable:  # sparse: the reader gives the fill grey
                data = None
            # Stored without the comments an encoder or a site wrote (free text: names,
            # barcodes), as a copied JPEG tile is; decoded below as the source has it.
            tiles.append(None if data is None else jpeg2000.without_comments(data))
            if below is None or i // 2 >= len(below):
                continue
            target = quadrant(below[i // 2], qy, i % 2)
            decoded = self._halves.pop((level, col, row), None)
            if decoded is not None and data is not None and decoded.shape == target.shape:
                target[:] = decoded
                continue
            if data is not None:
                jpeg2000.decode_into(data, target, reduce=1)
                continue
            half = self.source.read_tile_half(level, col, row)
            if half is None:
                mean2x2_into(self.source.read_tile(level, col, row), target)
            else:
                target[:] = half
        return tiles

    def _block(self, top: LevelPlan, nxt: LevelPlan | None, pair: int, cols: range) -> _BlockResult:
        """Task: tiles of rows 2*pair, 2*pair+1 of `top` in `cols`, and the next level's row."""
        rows = [r for r in (2 * pair, 2 * pair + 1) if r < top.level.rows]
        if nxt is None or pair >= nxt.level.rows:
            return _BlockResult([self._top_tiles(top, r, cols, None, 0) for r in rows], None, None)
        ncol0 = cols.start // 2
        ncols = max(0, min(nxt.level.cols, -(-cols.stop // 2)) - ncol0)
        # `_top_tiles` writes the quadrant of every tile of `cols` in `rows`.
        below = [
            quadrant_tile(nxt.level, len(rows) == 2 and 2 * (ncol0 + j) + 1 < cols.stop)
            for j in range(ncols)
        ]
        top_rows = [self._top_tiles(top, r, cols, below, qy) for qy, r in enumerate(rows)]
        encoded = [
            self._store_made(nxt.chunk_format, tile, nxt.level, ncol0 + j, pair)
            for j, tile in enumerate(below)
        ]
        return _BlockResult(top_rows, encoded, below)

    # -- driving ----------------------------------------------------------------------------
    def segments(self) -> list[list[LevelPlan]]:
        """Runs of levels: a passthrough/decoded level, then the levels derived from it."""
        out: list[list[LevelPlan]] = []
        for plan in self.plans:
            if plan.index == 0 or plan.passthrough:
                out.append([plan])
            else:
                out[-1].append(plan)
        return out

    def run(self) -> None:
        for plan in self.plans:
            self.writer.begin_level(plan.index, plan.level, plan.chunk_format, self.blank)
        pool = cf.ThreadPoolExecutor(self.settings.thread_count, "wsi-pyramid")
        try:
            for segment in self.segments():
                self._run_segment(pool, segment)
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM) or failed: the blocks under way end, the queued ones
            # (up to 64, seconds of JPEG 2000 decoding) are dropped, so that what was written is
            # removed before a supervisor's SIGKILL (5 s after its SIGTERM) can come.
            pool.shutdown(cancel_futures=True)
            raise
        pool.shutdown()
        self.writer.end_levels([plan.index for plan in self.plans])

    def _tasks(self, top: LevelPlan, pairs: range) -> Iterator[tuple[int, range]]:
        for pair in pairs:
            for c0 in range(0, top.level.cols, BLOCK_TILES):
                yield pair, range(c0, min(c0 + BLOCK_TILES, top.level.cols))

    def _run_segment(
        self,
        pool: cf.ThreadPoolExecutor,
        segment: list[LevelPlan],
        pairs: range | None = None,
        bottom: Callable[[list[np.ndarray]], None] | None = None,
    ) -> None:
        """Build `segment`, or only the row `pairs` of its top level and the rows under them
        (a band: `pairs` then starts at a multiple of 2^(len(segment) - 2)). `bottom` receives
        the last level's rows of tile pixels, for levels built later from them."""
        top = segment[0]
        nxt = segment[1] if len(segment) > 1 else None
        pairs = pairs if pairs is not None else range(-(-top.level.rows // 2))
        cascade = None
        if len(segment) > 2 or bottom is not None:
            first = [pairs.start >> (depth + 1) for depth in range(len(segment) - 2)]
            cascade = _Cascade(self, segment[2:], pool, first, bottom)
        blocks_per_pair = -(-top.level.cols // BLOCK_TILES)
        in_flight: collections.deque[cf.Future[_BlockResult]] = collections.deque()
        # Enough tasks queued that the pool never waits for the driving thread, few enough that
        # memory stays small (a task holds two tile rows of a 32-tile block).
        limit = max(4 * self.settings.thread_count, min(2 * blocks_per_pair, 64))
        tasks = self._tasks(top, pairs)
        pending: list[_BlockResult] = []

        def submit_next() -> bool:
            task = next(tasks, None)
            if task is None:
                return False
            in_flight.append(pool.submit(self._block, top, nxt, *task))
            return True

        while len(in_flight) < limit and submit_next():
            pass
        while in_flight:
            result = in_flight.popleft().result()
            submit_next()
            pending.append(result)
            if len(pending) < blocks_per_pair:
                continue
            self._write_pair(top, nxt, pending, cascade)
            pending = []
            if cascade:
                cascade.drain(block=False)
        if cascade:
            cascade.finish()

    def _write_pair(
        self,
        top: LevelPlan,
        nxt: LevelPlan | None,
        blocks: list[_BlockResult],
        cascade: _Cascade | None,
    ) -> None:
        for r in range(len(blocks[0].top_rows)):
            self.writer.write_tiles(top.index, [t for b in blocks for t in b.top_rows[r]])
            self._tick(top.level.cols)
        if nxt is None or blocks[0].next_row is None:
            return
        self.writer.write_tiles(nxt.index, [t for b in blocks for t in b.next_row or ()])
        self._tick(nxt.level.cols)
        if cascade:
            cascade.push([tile for b in blocks for tile in b.next_pixels or ()])


class _Cascade:
    """Deeper derived levels. Two tile rows of the level above make one row here; each tile of
    it (2x2 means of the four tiles above it, then encoding) is a task on the pool. Rows are
    written in the order they were queued, as soon as the oldest is done, and then feed the
    level below. A row is a list of (tile_height, tile_width, 3) arrays: nothing is ever
    concatenated across the slide's width."""

    def __init__(
        self,
        builder: PyramidBuilder,
        plans: list[LevelPlan],
        pool: cf.ThreadPoolExecutor,
        first_rows: list[int] | None = None,
        bottom: Callable[[list[np.ndarray]], None] | None = None,
    ) -> None:
        """`first_rows`: each level's first row to make (a band's); `bottom` receives the
        rows of the last level's tile pixels."""
        self.builder = builder
        self.pool = pool
        self.plans = plans
        self.bottom = bottom
        self.held: list[list[np.ndarray] | None] = [None] * len(plans)
        self.row = list(first_rows) if first_rows is not None else [0] * len(plans)
        self.queue: collections.deque[tuple[int, list[cf.Future[tuple[bytes | None, np.ndarray]]]]]
        self.queue = collections.deque()

    def push(self, tiles: list[np.ndarray], depth: int = 0) -> None:
        """Give the parent level's next row of tiles to level `plans[depth]`."""
        if depth >= len(self.plans):
            if self.bottom is not None:
                self.bottom(tiles)
            return
        held = self.held[depth]
        if held is None:
            self.held[depth] = tiles
            return
        self.held[depth] = None
        self._emit(depth, [held, tiles])

    def _emit(self, depth: int, upper: list[list[np.ndarray]]) -> None:
        plan = self.plans[depth]
        row = self.row[depth]
        if row >= plan.level.rows:
            return  # the parent's last row only covers pixels past this level's edge
        self.row[depth] += 1
        futures = []
        for col in range(plan.level.cols):
            quads = [tiles[2 * col : 2 * col + 2] for tiles in upper]
            futures.append(self.pool.submit(self._derive, plan, quads, col, row))
        self.queue.append((depth, futures))

    def _derive(
        self, plan: LevelPlan, quads: list[list[np.ndarray]], col: int, row: int
    ) -> tuple[bytes | None, np.ndarray]:
        """Task: tile (col, row) from the (up to) 2x2 tiles above it (None when blank)."""
        tile = quadrant_tile(plan.level, len(quads) == 2 and all(len(q) == 2 for q in quads))
        for qy, above_row in enumerate(quads):
            for qx, above in enumerate(above_row):
                mean2x2_into(above, quadrant(tile, qy, qx))
        return self.builder._store_made(plan.chunk_format, tile, plan.level, col, row), tile

    def drain(self, block: bool) -> None:
        """Write finished rows in order; `block` waits for all of them."""
        while self.queue:
            depth, futures = self.queue[0]
            if not block and not all(f.done() for f in futures):
                return
            self.queue.popleft()
            results = [f.result() for f in futures]
            plan = self.plans[depth]
            self.builder.writer.write_tiles(plan.index, [data for data, _ in results])
            self.builder._tick(len(results))
            self.push([tile for _, tile in results], depth + 1)

    def finish(self) -> None:
        """Emit rows whose lower half lies past the parent level's end (odd row counts)."""
        for depth in range(len(self.plans)):
            self.drain(block=True)
            held = self.held[depth]
            if held is not None:
                self.held[depth] = None
                self._emit(depth, [held])
        self.drain(block=True)
