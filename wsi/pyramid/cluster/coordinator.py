"""The coordinator of a distributed build: bands on a Dask cluster, level objects joined here.

The coordinator plans the pyramid exactly as `PyramidBuilder` does (same plans, same blank-glass
fill), starts one object in parts per band level (`wsi.pyramid.cluster.parts`), and submits the
bands (`wsi.pyramid.cluster.bands`) a bounded number at a time. It takes their results in band
order: each share's index entries are shifted into the level's index, its head bytes are gathered
into parts of at least `min_part_bytes` (part 1, which also gets the DICOM header, is uploaded
last: the header describes the frames actually stored, known at the end; on a local folder
bands write whole shares and heads are empty), and the bands' halves of level k+1 are joined
into its tiles here, which feed the builder's cascade for the levels below. Segments that start
at level k or below run here too. Each level object is then completed from its parts, its index
and DICOM header written from the sizes the tasks returned, and its CRC32C combined from the
parts'.

A task that fails, or whose worker dies, runs again (Dask reschedules it; `retries` more for
exceptions): it writes the same parts under the same numbers. The coordinator failing aborts the
uploads; killed, it leaves unfinished uploads and part files that are never a slide (no manifest;
they carry the store's temporary mark) and that the next conversion of the slide removes.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import re
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from wsi.errors import InvalidArgument, WsiError
from wsi.model import Level
from wsi.published.layout import EMPTY_CHUNK, ChunkFormat, SlideKeys, StoredObject, empty_index
from wsi.pyramid.builder import (
    LevelPlan,
    Progress,
    PyramidBuilder,
    PyramidSettings,
    _Cascade,
)
from wsi.pyramid.cluster.bands import (
    BandJob,
    BandLayout,
    BandResult,
    LevelShare,
    band_layout,
    build_band,
    head_part,
)
from wsi.pyramid.cluster.parts import MIN_PART_BYTES, ObjectParts, PartRef, crc32c_combine
from wsi.pyramid.tiles import white_tile
from wsi.sources.base import SlideSource
from wsi.store.objects import Store, StoreSettings
from wsi.writers.base import BlankTiles, PyramidWriter
from wsi.writers.dicom import DicomSlide
from wsi.writers.omezarr import OmeZarrWriter
from wsi.writers.shard import HeaderFactory, frame_chunks, shard_tail, stored_tiles

if TYPE_CHECKING:
    from distributed import Client, Future

LOCAL = re.compile(r"local:(\d+)")
_SCHEDULER = re.compile(r"(tcp|tls|inproc|ucx)://\S+")
BANDS_PER_SLOT = 8
"""Bands per worker slot that `auto_band_rows` aims at."""


@dataclass(frozen=True)
class ClusterOptions:
    """Where and how one slide's pyramid is built across processes."""

    address: str
    """The Dask scheduler, e.g. `tcp://scheduler:8786` (`cluster_address` starts a local one)."""
    band_rows: int = 0
    """Base tile rows per band (a power of two >= 2); 0 chooses (`auto_band_rows`). Bands of
    2^k rows leave the coordinator the levels below k: 1/(3 * 4^k) of the pixel work (k = 3:
    1/192; k = 1: 1/12)."""
    min_part_bytes: int | None = None
    """Smallest part of an object but its last; None: S3's minimum on S3 (tests lower it on
    SeaweedFS), none on a local folder, where every band then writes all its bytes as parts
    and the coordinator receives only their sizes and index entries, not their bytes."""
    threads: int = 0
    """Threads per band task; 0: each worker's cores shared among its task slots."""
    retries: int = 2
    """Runs of a task that raised, beyond its first (a lost worker's tasks are rescheduled by
    Dask anyway)."""
    on_band: Callable[[BandResult], None] | None = field(default=None, compare=False)
    """Told of every band's result, in band order (the scale benchmark reads the durations)."""


def check_address(spec: str) -> str:
    """`local:N` or a scheduler URL; InvalidArgument otherwise."""
    match = LOCAL.fullmatch(spec)
    if match and int(match.group(1)) >= 1:
        return spec
    if not match and _SCHEDULER.fullmatch(spec):
        return spec
    raise InvalidArgument(f"--dask takes tcp://HOST:PORT or local:N (N >= 1), not {spec!r}")


@contextlib.contextmanager
def cluster_address(spec: str) -> Iterator[tuple[str, int]]:
    """(scheduler address, threads per band) for `spec`: a scheduler URL as it is (0: the
    workers decide), or for `local:N` a `distributed.LocalCluster` of N single-threaded worker
    processes on this machine, stopped on exit (bands then get this machine's cores / N)."""
    check_address(spec)
    match = LOCAL.fullmatch(spec)
    if match is None:
        yield spec, 0
        return
    from distributed import LocalCluster

    workers = int(match.group(1))
    with LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address="127.0.0.1:0",
        host="127.0.0.1",
    ) as cluster:
        yield cluster.scheduler_address, max(1, (os.cpu_count() or 1) // workers)


class ClusterWriter(OmeZarrWriter):
    """The slide writer of a distributed build: the levels the bands build are objects joined
    from parts (`add_level_object`); the others are streamed here as usual."""

    def __init__(
        self,
        store: Store,
        keys: SlideKeys,
        dicom: DicomSlide | None = None,
        zarr_metadata: bool = True,
    ) -> None:
        super().__init__(store, keys, dicom, zarr_metadata)
        self._joined: dict[int, StoredObject | None] = {}
        self._parts: list[ObjectParts] = []

    def begin_joined_level(
        self, index: int, level: Level, chunk_format: ChunkFormat, blank: BlankTiles, run: str
    ) -> tuple[ObjectParts, HeaderFactory | None, Callable[[], bytes]]:
        """Register a level built in parts; its object is begun in the store."""
        key, header, placeholder = self._register_level(index, level, chunk_format, blank)
        parts = ObjectParts.begin(self.store, key, run)
        self._parts.append(parts)
        self._joined[index] = None
        return parts, header, placeholder

    def add_level_object(self, index: int, stored: StoredObject) -> None:
        self._joined[index] = stored

    end_levels = PyramidWriter.end_levels
    """One by one, as `end_level` decides for each: a joined level's object is complete."""

    def end_level(self, index: int) -> None:
        if index not in self._joined:
            super().end_level(index)
            return
        stored = self._joined.pop(index)
        if stored is None:
            raise WsiError(f"level {index} was never completed")
        self._objects.append(stored)

    def abort(self) -> None:
        for parts in self._parts:
            parts.abort(self.store)
        super().abort()


class _LevelJoin:
    """One band level's object, assembled from the bands' shares in band order."""

    def __init__(
        self,
        store: Store,
        parts: ObjectParts,
        level: Level,
        header: HeaderFactory | None,
        placeholder: Callable[[], bytes],
        dicom: bool,
        min_part: int,
    ) -> None:
        self.store = store
        self.object = parts
        self.header = header
        self.placeholder = placeholder
        self.dicom = dicom
        self.min_part = min_part
        self.index = empty_index(level.tile_count)
        self.offset = 0
        """Bytes of the shares so far, counted from the first chunk's position."""
        self.first: bytes | None = None
        self.opening = bytearray()
        """Part 1 after the header: held until the end, closed at `min_part` bytes."""
        self.opening_closed = False
        self.group = bytearray()
        self.group_number = 0
        self.parts: list[PartRef] = []
        """Parts after part 1, in order."""

    def add(self, band: int, share: LevelShare, tiles: range) -> None:
        entries = share.entries.copy()
        entries[entries[:, 1] != EMPTY_CHUNK, 0] += self.offset
        self.index[tiles.start : tiles.stop] = entries
        self.offset += share.size
        if self.first is None:
            self.first = share.first
        self._append(band, share.head)
        if share.tail is not None:
            self._flush()  # holds this share's head: at least min_part bytes
            self.parts.append(share.tail)

    def _append(self, band: int, data: bytes) -> None:
        if not self.opening_closed:
            self.opening += data
            self.opening_closed = len(self.opening) >= self.min_part
            return
        if not self.group:
            self.group_number = head_part(band)
        self.group += data
        if len(self.group) >= self.min_part:
            self._flush()

    def _flush(self) -> None:
        if self.group:
            self.parts.append(self.object.put(self.store, self.group_number, bytes(self.group)))
            self.group = bytearray()

    def finish(self, bands: int) -> StoredObject:
        """Complete the object: header and part 1, the last part with the index."""
        if self.first is None and self.dicom:  # every tile absent: an instance needs a frame
            self.first = self.placeholder()
            block, entries = frame_chunks([self.first], True)
            self.opening, self.index[0] = bytearray(block), entries[0]
        header = b""
        if self.header is not None:
            assert self.first is not None
            header = self.header([self.first], stored_tiles(self.index), self.offset)
            self.index[self.index[:, 1] != EMPTY_CHUNK, 0] += len(header)
        end = shard_tail(self.index, self.dicom)
        if not self.opening_closed:  # one part holds it all
            parts = [self.object.put(self.store, 1, header + bytes(self.opening) + end)]
        else:
            number = self.group_number if self.group else head_part(bands)
            last = self.object.put(self.store, number, bytes(self.group) + end)
            first = self.object.put(self.store, 1, header + bytes(self.opening))
            parts = [first, *self.parts, last]
        self.object.complete(self.store, parts)
        crc = 0
        for part in parts:
            crc = crc32c_combine(crc, part.crc, part.size)
        return StoredObject(self.object.key, sum(p.size for p in parts), f"{crc:08x}")


def build_on_cluster(
    path: str,
    source: SlideSource,
    writer: ClusterWriter,
    settings: PyramidSettings,
    options: ClusterOptions,
    progress: Progress | None = None,
) -> list[LevelPlan]:
    """Build the pyramid of the slide at `path` (open as `source` here, opened again by every
    worker) into `writer`, its bands on the cluster; returns the plans, as `PyramidBuilder`
    made them."""
    from distributed import Client

    builder = PyramidBuilder(source, writer, settings, progress)
    segments = builder.segments()
    with Client(options.address, set_as_default=False) as client:
        slots = sum(client.nthreads().values()) or 1
        rows = options.band_rows or auto_band_rows(builder.plans[0].level.rows, slots)
        layout = band_layout(segments, rows)
        run = uuid.uuid4().hex[:12]
        min_part = _min_part_bytes(options, writer.store)
        joins = _begin_levels(builder, writer, layout, run, min_part)
        job = BandJob(
            os.path.abspath(path),
            source.name,
            settings,
            builder.background.fill if builder.background else None,
            layout,
            writer.dicom is not None,
            _worker_store(writer.store),
            tuple(joins[i].object for i in layout.levels),
            min_part,
            options.threads,
        )
        with (
            cf.ThreadPoolExecutor(settings.thread_count, "wsi-pyramid") as pool,
            contextlib.closing(_band_results(client, job, options, run, slots)) as results,
        ):
            cascade = _tail_cascade(builder, segments, layout, pool)
            _take_bands(results, builder, layout, joins, cascade, options.on_band)
            for segment in segments:
                if segment[0].index >= layout.log2_rows:
                    builder._run_segment(pool, segment)
    for index, join in joins.items():
        writer.add_level_object(index, join.finish(layout.bands))
    for plan in builder.plans:
        writer.end_level(plan.index)
    return builder.plans


def _min_part_bytes(options: ClusterOptions, store: Store) -> int:
    """`options.min_part_bytes`, or by default S3's minimum part on S3 and none on a folder."""
    if options.min_part_bytes is not None:
        return options.min_part_bytes
    return MIN_PART_BYTES if store.settings.is_s3 else 0


def _take_bands(
    results: Iterator[BandResult],
    builder: PyramidBuilder,
    layout: BandLayout,
    joins: dict[int, _LevelJoin],
    cascade: _JoinedCascade | None,
    on_band: Callable[[BandResult], None] | None,
) -> None:
    """Take every band's result in band order: its shares into their levels' objects (and the
    progress), and its half of a level k+1 row, paired with the next band's, into the tail
    cascade (`_tail_cascade`), which is finished once the last band is in."""
    held: np.ndarray | None = None  # an even band's half, until the odd band's comes
    for result in results:
        for share in result.shares:
            tiles = layout.tiles(share.level, result.band)
            joins[share.level].add(result.band, share, tiles)
            builder._tick(len(tiles))
        if on_band is not None:
            on_band(result)
        if cascade is None:
            continue
        if result.band % 2 == 0:
            held = result.half
        elif held is not None:
            cascade.push_halves([held] if result.half is None else [held, result.half])
            held = None
        cascade.drain(block=False)
    if cascade is not None:
        if held is not None:  # level k has an odd number of rows
            cascade.push_halves([held])
        cascade.finish()


def auto_band_rows(base_rows: int, slots: int) -> int:
    """The largest band (8, 4 or 2 base tile rows) that still gives every worker slot
    `BANDS_PER_SLOT` bands: the last round of bands leaves slots idle, and with more, smaller
    bands that idle share of a run shrinks (measured: 15 bands of 8 rows on 2 workers left one
    idle for the last of them, a tenth of the run)."""
    for rows in (8, 4):
        if -(-base_rows // rows) >= BANDS_PER_SLOT * slots:
            return rows
    return 2


def _begin_levels(
    builder: PyramidBuilder, writer: ClusterWriter, layout: BandLayout, run: str, min_part: int
) -> dict[int, _LevelJoin]:
    """Begin every level: the bands' as objects in parts, the others as streams here."""
    joins = {}
    for plan in builder.plans:
        if plan.index not in layout.levels:
            writer.begin_level(plan.index, plan.level, plan.chunk_format, builder.blank)
            continue
        parts, header, placeholder = writer.begin_joined_level(
            plan.index, plan.level, plan.chunk_format, builder.blank, run
        )
        dicom = writer.dicom is not None
        joins[plan.index] = _LevelJoin(
            writer.store, parts, plan.level, header, placeholder, dicom, min_part
        )
    return joins


def _tail_cascade(
    builder: PyramidBuilder,
    segments: list[list[LevelPlan]],
    layout: BandLayout,
    pool: cf.ThreadPoolExecutor,
) -> _JoinedCascade | None:
    """The levels derived from level k, built here as the bands' halves arrive."""
    if not layout.bottom_pixels:
        return None
    segment = next(s for s in segments if s[0].index <= layout.bottom <= s[-1].index)
    below = [p for p in segment if p.index > layout.bottom]
    return _JoinedCascade(builder, below, pool)


class _JoinedCascade(_Cascade):
    """The builder's cascade over levels k+1 and below, whose first level's rows are joined
    from the halves bands made (`wsi.pyramid.cluster.bands.halve_row`) instead of derived
    from level k's rows: the same pixels, so the same tiles."""

    def push_halves(self, halves: list[np.ndarray]) -> None:
        """Queue level k+1's next row from its top half and, unless level k ends first, its
        bottom half (`_Cascade._emit` with the 2x2 means already taken)."""
        plan = self.plans[0]
        row = self.row[0]
        if row >= plan.level.rows:
            return  # level k's last row only covers pixels past this level's edge
        self.row[0] += 1
        futures = [
            self.pool.submit(self._join, plan, halves, col, row) for col in range(plan.level.cols)
        ]
        self.queue.append((0, futures))

    def _join(
        self, plan: LevelPlan, halves: list[np.ndarray], col: int, row: int
    ) -> tuple[bytes | None, np.ndarray]:
        """Task: tile (col, row) of level k+1 from its halves (None when blank)."""
        tile = white_tile(plan.level)
        width, height = plan.level.tile_width, plan.level.tile_height // 2
        for qy, half in enumerate(halves):
            tile[qy * height : (qy + 1) * height] = half[:, col * width : (col + 1) * width]
        return self.builder._store_made(plan.chunk_format, tile, plan.level, col, row), tile


def _band_results(
    client: Client, job: BandJob, options: ClusterOptions, run: str, slots: int
) -> Generator[BandResult, None, None]:
    """Every band's result, in band order, with a bounded number of bands submitted ahead
    (results wait on the workers until taken: memory stays bounded)."""
    window = 2 * slots + 1
    futures: dict[int, Future] = {}
    submitted = 0
    try:
        for band in range(job.layout.bands):
            while submitted < job.layout.bands and submitted < band + window:
                futures[submitted] = client.submit(
                    build_band,
                    job,
                    submitted,
                    key=f"wsi-band-{run}-{submitted}",
                    retries=options.retries,
                    pure=False,
                )
                submitted += 1
            result: BandResult = futures.pop(band).result()
            yield result
    finally:
        if futures:
            client.cancel(list(futures.values()))


def _worker_store(store: Store) -> StoreSettings:
    """The store as workers reach it: the local folder's absolute path (a path they share), or
    the S3 endpoint this process resolved (credentials come from each worker's environment)."""
    if store.settings.is_s3:
        return replace(store.settings, endpoint_url=store.storage_options.get("endpoint_url"))
    return replace(store.settings, url=store.root)
