"""A slide's pyramid cut into bands of base tile rows: the unit of work of a distributed build.

A band is 2^k base tile rows. Every level is an exact 2x step with the same tile size, so band b
holds rows [b * 2^(k-j), (b+1) * 2^(k-j)) of each level j <= k, and every tile of those rows is
made from tiles of the same band alone: the band builds its share of levels 0..k with the
builder's own code (`PyramidBuilder._run_segment` on its rows), which is what makes the result
byte-identical to a build in one process. Levels below k have fewer than one row per band; the
coordinator builds them (1/4^(k+1) of the work). A tile of level k+1 is the 2x2 means of four
level-k tiles, two from band 2r and two from band 2r+1: each band halves its row of level k
itself (`halve_row`, the same means the builder takes) and returns a strip half a tile high,
which the coordinator joins with its neighbour's (a quarter of the level-k pixels cross between
processes: 59 instead of 236 MB on the 40,000 x 30,000 slide in bands of 4 rows). A segment
whose top level (a source level copied as it is) is k or below starts there: it is the
coordinator's.

A band task runs on a worker: it opens the source itself (a path the workers share), frames its
tiles as they will lie in each level's object (`wsi.writers.shard.frame_chunks`), writes all but
the first `min_part_bytes` of a large share itself as part 2b+2 of the object (on a local
folder, where parts have no minimum size: all of it), and returns the rest: those first bytes
(the coordinator puts them in a part with what precedes them, so that every part but the last
is big enough for S3), the index entries, and its half of level k+1.
Everything a task does is a function of (slide, band): run twice, it writes the same part.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import functools
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from wsi.errors import WsiError
from wsi.model import Level
from wsi.published.layout import ChunkFormat, StoredObject
from wsi.pyramid.builder import LevelPlan, PyramidBuilder, PyramidSettings
from wsi.pyramid.cluster.parts import ObjectParts, PartRef
from wsi.pyramid.tiles import mean2x2
from wsi.sources import open_slide
from wsi.store.objects import Store, StoreSettings
from wsi.writers.base import ALL_STORED, BlankTiles, PyramidWriter, SlideInfo
from wsi.writers.shard import frame_chunks


@dataclass(frozen=True)
class BandLayout:
    """How one slide's pyramid is cut into bands."""

    log2_rows: int
    """k: a band is 2^k base tile rows."""
    bands: int
    runs: tuple[tuple[int, int], ...]
    """(top, last) level of each segment the bands build, cut at level k."""
    bottom_pixels: bool
    """Whether bands return their halves of level k+1 (derived from level k, the coordinator's)."""
    columns: tuple[int, ...]
    """Tile columns of every level."""
    rows_per_level: tuple[int, ...]
    """Tile rows of every level."""
    tile: tuple[int, int]
    """(width, height) of every level's tiles (pixels)."""

    @property
    def levels(self) -> tuple[int, ...]:
        """The levels the bands build, in order."""
        return tuple(i for top, last in self.runs for i in range(top, last + 1))

    @property
    def bottom(self) -> int:
        return self.runs[-1][1]

    def rows(self, level: int, band: int) -> range:
        """Tile rows of `level` (<= k) that `band` makes."""
        step = 1 << (self.log2_rows - level)
        total = self.rows_per_level[level]
        return range(min(band * step, total), min((band + 1) * step, total))

    def tiles(self, level: int, band: int) -> range:
        """Row-major numbers of the tiles of `level` that `band` makes."""
        rows, cols = self.rows(level, band), self.columns[level]
        return range(rows.start * cols, rows.stop * cols)


def band_layout(segments: list[list[LevelPlan]], band_rows: int) -> BandLayout:
    """The bands of `band_rows` base tile rows (a power of two, at least 2) of a pyramid whose
    segments (`PyramidBuilder.segments`) are given."""
    if band_rows < 2 or band_rows & (band_rows - 1):
        raise WsiError(f"band rows must be a power of two >= 2, got {band_rows}")
    k = band_rows.bit_length() - 1
    plans = [plan for segment in segments for plan in segment]
    runs = tuple((s[0].index, min(s[-1].index, k)) for s in segments if s[0].index < k)
    bottom = runs[-1][1]
    pixels = bottom + 1 < len(plans) and not plans[bottom + 1].passthrough
    return BandLayout(
        k,
        -(-plans[0].level.rows // band_rows),
        runs,
        pixels,
        tuple(p.level.cols for p in plans),
        tuple(p.level.rows for p in plans),
        (plans[0].level.tile_width, plans[0].level.tile_height),
    )


@dataclass(frozen=True)
class BandJob:
    """What a worker needs to build any band of one slide (picklable: sent with each task)."""

    source: str
    """Absolute path of the slide, the same on every worker."""
    backend: str
    settings: PyramidSettings
    fill: int | None
    """The blank-glass grey the coordinator chose (None: every tile is stored)."""
    layout: BandLayout
    dicom: bool
    """Whether chunks are framed as DICOM items."""
    store: StoreSettings
    objects: tuple[ObjectParts, ...]
    """The object of each of `layout.levels`, in that order."""
    min_part_bytes: int
    threads: int
    """Threads per band; 0: the worker's cores shared among its task slots."""


@dataclass(frozen=True)
class LevelShare:
    """A band's rows of one level object."""

    level: int
    entries: np.ndarray
    """(tiles, 2) offsets, counted from the share's first byte, and lengths (absent: the
    sharding codec's empty marker)."""
    size: int
    """Bytes of the whole share."""
    first: bytes | None
    """The first chunk stored in the share (a DICOM header describes the level's first)."""
    head: bytes
    """The share's first bytes: all of it, or `min_part_bytes` when `tail` holds the rest."""
    tail: PartRef | None


@dataclass(frozen=True)
class BandResult:
    band: int
    shares: tuple[LevelShare, ...]
    half: np.ndarray | None
    """The band's half of level k+1's row band // 2 (`halve_row`: the top half for an even
    band), when that level is derived; None too when the band has no row of level k."""
    started: float
    finished: float
    """When the task ran on its worker (seconds since the epoch, the worker's clock)."""

    @property
    def seconds(self) -> float:
        return self.finished - self.started


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
"""glibc's `mallopt` parameters (malloc.h)."""


def head_part(band: int) -> int:
    """The part that holds band `band`'s head, with what precedes it (the coordinator's)."""
    return 2 * band + 1


def tail_part(band: int) -> int:
    """The part a worker writes with the rest of band `band`'s share."""
    return 2 * band + 2


def build_band(job: BandJob, band: int) -> BandResult:
    """Task: band `band`'s share of every band level; its large shares' tails written as parts."""
    started = time.time()
    _reuse_freed_memory()
    settings = replace(job.settings, workers=job.threads or _worker_threads())
    collector = _Collector()
    layout = job.layout
    halves: list[np.ndarray] = []

    def halve(row: list[np.ndarray]) -> None:
        halves.append(halve_row(row, layout.columns[layout.bottom + 1], layout.tile))

    with open_slide(job.source, job.backend) as source:
        builder = PyramidBuilder(source, collector, settings, fill=job.fill)
        with cf.ThreadPoolExecutor(settings.thread_count, "wsi-band") as pool:
            for top, last in layout.runs:
                rows = layout.rows(top, band)
                pairs = range(rows.start // 2, -(-rows.stop // 2))
                wants = layout.bottom_pixels and last == layout.bottom
                segment = builder.plans[top : last + 1]
                builder._run_segment(pool, segment, pairs, halve if wants else None)
    if len(halves) > 1:
        raise WsiError(f"band {band} made {len(halves)} rows of level {layout.bottom}")
    store = Store(job.store)
    shares = []
    for level, parts in zip(job.layout.levels, job.objects, strict=True):
        tiles = collector.tiles.get(level, [])
        if len(tiles) != len(job.layout.tiles(level, band)):
            raise WsiError(f"band {band} made {len(tiles)} tiles of level {level}")
        block, entries = frame_chunks(tiles, job.dicom)
        first = next((t for t in tiles if t is not None), None)
        head, tail = block, None
        if block and len(block) >= 2 * job.min_part_bytes:
            head = block[: job.min_part_bytes]
            tail = parts.put(store, tail_part(band), block[job.min_part_bytes :])
        shares.append(LevelShare(level, entries, len(block), first, head, tail))
    half = halves[0] if halves else None
    return BandResult(band, tuple(shares), half, started, time.time())


def halve_row(tiles: list[np.ndarray], columns: int, tile: tuple[int, int]) -> np.ndarray:
    """Half of a row of the next level down from one row of tile pixels: (height / 2,
    `columns` * width, 3), the 2x2 mean of tile i at columns [i * width / 2, (i + 1) * width /
    2), white where the row has no tile. These are the pixels `_Cascade._derive` puts in the
    quadrants of the next level's tiles (it drops the tiles past the next level's columns and
    leaves missing ones white), so a tile joined from two halves is the one it makes."""
    width, height = tile
    half = np.full((height // 2, columns * width, 3), 255, np.uint8)
    step = width // 2
    for i, pixels in enumerate(tiles[: 2 * columns]):
        half[:, i * step : (i + 1) * step] = mean2x2(pixels)
    return half


@functools.cache
def _reuse_freed_memory() -> bool:
    """Let this process's allocator keep freed memory for reuse (once per worker process).

    A Dask nanny starts its worker with `MALLOC_TRIM_THRESHOLD_=65536` (memory goes back to
    the system early), which also stops glibc from raising its mmap threshold as it does by
    default: every allocation over 128 KiB then gets a mapping of its own, faulted in and
    zeroed page by page and unmapped when freed, and a band allocates and frees thousands of
    tiles of 192 KiB. Measured on the 40,000 x 30,000 slide, 2 workers: 15.8 CPU-s of bands
    with it, 10.6 with the thresholds glibc's dynamic rule reaches by itself (allocations
    under 32 MiB from the heap, 64 MiB of free heap kept), which are set here; the same as
    workers started without the variable. Returns whether they were set (glibc only)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    mmap = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
    return bool(mmap and libc.mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024))


def _worker_threads() -> int:
    """The cores of this machine shared among the Dask worker's task slots."""
    from distributed import get_worker

    slots = get_worker().state.nthreads
    return max(1, (os.cpu_count() or 1) // max(1, slots))


class _Collector(PyramidWriter):
    """Keeps the tiles a band makes, per level, in the order the builder writes them."""

    def __init__(self) -> None:
        self.tiles: dict[int, list[bytes | None]] = {}

    def begin_level(
        self, index: int, level: Level, chunk_format: ChunkFormat, blank: BlankTiles = ALL_STORED
    ) -> None:
        self.tiles[index] = []

    def write_tile(self, index: int, data: bytes | None) -> None:
        self.tiles.setdefault(index, []).append(data)

    def write_tiles(self, index: int, tiles: Sequence[bytes | None]) -> None:
        self.tiles.setdefault(index, []).extend(tiles)

    def end_level(self, index: int) -> None:
        pass

    def write_associated(
        self, name: str, pixels: np.ndarray, fmt: ChunkFormat, shows_label: bool = True
    ) -> None:
        raise WsiError("a band has no associated images")

    def finish(self, info: SlideInfo) -> list[StoredObject]:
        return []

    def abort(self) -> None:
        pass
