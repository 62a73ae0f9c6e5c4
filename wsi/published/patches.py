"""Many patches of one level at once, straight from the store: the reading path for training and
inference.

`read_patches` (the slides' `patches` method) returns one (n, h, w, 3) uint8 array. Coordinates
are the top-left corners of the patches in pixels of the level they are read from (the same
pixels as `region`); `coords_from_level0` converts level-0 coordinates. A patch that overhangs
the level is padded with the level's fill grey (`PublishedLevel.fill`: the slide's glass, or
white on slides published without blank-glass detection), like `region`, so every patch has the
requested size.

Why it is fast. Patches are sorted by the tile they start in and planned in batches: each batch
lists the tiles its patches touch, so a tile shared by several patches is read and decoded once.
The tiles a batch needs are read in coalesced range reads (tiles are stored row-major in the
level's shard, so neighbours along a row are adjacent bytes). From S3 the reads are awaited on the
loop, many at once; a local store's reads block, so each pool task reads and decodes a run of
them itself. Tiles are decoded on the store's thread pool (libjpeg-turbo and zstd release the
GIL); a JPEG tile decodes only the part its patches need, straight into the preallocated output
when it serves one patch (`_decode_pieces`). Planning runs on the pool too: the event loop only
schedules. On 2 cores, 1000 random 256-px patches of level 0 of a 40,000 x 30,000 JPEG slide
cost about 0.55 ms of CPU each (parts of 3.6 tiles), OpenSlide's `read_region` about 3 ms
(bench/patches.py).

Memory. Besides the returned array (n * h * w * 3 bytes, at most
`ReaderSettings.max_batch_bytes` when the call makes it: 1 GiB by default; an `out` array of the
caller's may be any size), a call holds the plan of one batch (about 100 bytes per patch and tile
it touches: under 2 MiB for 4096 patches of 256 px) and its
reads in flight: from S3 at most `PatchSettings.inflight_bytes` (32 MiB), from a local store one
read of at most 1 MiB per pool thread, with at most one decoded tile per pool thread.
Whatever the number of patches, that stays under 40 MiB with the defaults (tests measure 1.3 MB
for 2,000 patches of 64 px). Stored tiles read here bypass the store's tile cache, whose budget
is for what a viewer reads again; the shard index is cached as for any read.
"""

from __future__ import annotations

import asyncio
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi.codecs import jpegtran
from wsi.errors import CorruptSlide, InvalidArgument
from wsi.published import layout
from wsi.published.values import PublishedLevel

if TYPE_CHECKING:
    from wsi.published.slide import AsyncPublishedSlide

_MiB = 1024 * 1024
_TASKS_PER_THREAD = 4
"""Pool tasks per thread that read and decode one batch from a local store: few enough that
the hops to the pool cost nothing next to decoding, enough to even out the threads' work."""
_MIN_DECODES_PER_TASK = 8
"""Tiles of one S3 read decoded per pool task, at least (a hop costs about a tenth of a decode)."""


@dataclass(frozen=True)
class PatchSettings:
    """How `read_patches` batches and reads (the reader's `ReaderSettings` give the pool's
    threads and the most S3 reads in flight, `fetch_concurrency`)."""

    batch_patches: int = 4096
    """Patches planned together: a tile that several patches of one batch touch is read and
    decoded once. The plan takes about 100 bytes per patch and tile it touches."""
    read_bytes: int | None = None
    """Largest coalesced range read (a single larger tile is read alone). None: 8 MiB from S3,
    where fewer requests matter most, 1 MiB from local files, where each pool thread holds one
    read."""
    gap_bytes: int = 1 * _MiB
    """Bytes of tiles nobody asked for that a coalesced read may span between two wanted tiles.
    A request to an object store costs more than transferring a MiB more: on SeaweedFS, 1000
    random 256-px patches of a 40,000 x 30,000 level took 7-13 s with 32 KiB gaps (869 requests
    for 43 MB), 1.8 s with 256 KiB (160 for 120 MB) and 0.9 s with 1 MiB and 8 MiB reads (21 for
    171 MB), OpenSlide 2 s. Local reads do not mind either way (a memory copy from the page
    cache against a system call)."""
    inflight_bytes: int = 32 * _MiB
    """S3 reads in flight at once, counted at `read_bytes` each (and at most `fetch_concurrency`
    of `ReaderSettings`)."""

    def read_limit(self, s3: bool) -> int:
        """`read_bytes`, or its default for an S3 (`s3`) or local store."""
        if self.read_bytes is not None:
            return self.read_bytes
        return 8 * _MiB if s3 else 1 * _MiB

    def __post_init__(self) -> None:
        sizes = (self.batch_patches, self.inflight_bytes, self.read_bytes or 1)
        if min(sizes) < 1 or self.gap_bytes < 0:
            raise InvalidArgument(
                "batch_patches, read_bytes and inflight_bytes must be >= 1, gap_bytes >= 0"
            )


def as_int(value: Any, name: str) -> int:
    """`value` as a Python int: an int or a numpy integer (a coordinate taken from an array),
    never a bool, a float or a string, whose silent truncation or acceptance would read other
    pixels than those asked for (InvalidArgument). Python ints do not wrap, so sizes multiplied
    from them cannot overflow into a small number: numpy int32s did, and 65536 x 65536 passed
    the 64-Mpx region limit as 0, then asked for a 12 GiB array."""
    if isinstance(value, bool | np.bool_):
        raise InvalidArgument(f"{name} must be an integer, not a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise InvalidArgument(f"{name} must be an integer, not {type(value).__name__}") from None


def patch_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a patch from an int (square) or a (width, height) pair."""
    if isinstance(size, int | np.integer):
        width = height = as_int(size, "patch size")
    else:
        try:
            width, height = (as_int(v, "patch size") for v in size)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(
                f"patch size must be an int or (width, height): {size!r}"
            ) from exc
    if width <= 0 or height <= 0:
        raise InvalidArgument(f"patch size must be positive, got {width}x{height}")
    return width, height


def as_coords(coords: Any) -> np.ndarray:
    """(n, 2) int64 (x, y) from any array-like of pairs; float values must be whole numbers."""
    array = np.asarray(coords)
    if array.size == 0:
        return np.zeros((0, 2), np.int64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise InvalidArgument(f"coords must be (n, 2) pairs of (x, y), got shape {array.shape}")
    if np.issubdtype(array.dtype, np.integer):
        if np.issubdtype(array.dtype, np.unsignedinteger) and array.max() >= 2**62:
            # int64 would wrap 2**64 - 1 to -1, a real pixel
            raise InvalidArgument("coords must be whole numbers of pixels below 2**62")
        return array.astype(np.int64, copy=False)
    if np.issubdtype(array.dtype, np.floating) and np.isfinite(array).all():
        whole = np.floor(array)
        if (whole == array).all() and np.abs(whole).max() < 2**62:
            return whole.astype(np.int64)
    raise InvalidArgument("coords must be whole numbers of pixels")


def coords_from_level0(level: PublishedLevel, coords0: Any) -> np.ndarray:
    """Level-0 pixel coordinates -> pixels of `level` (divided by its downsample, rounded down):
    for annotations and masks made at full resolution."""
    array = np.asarray(coords0, dtype=np.float64).reshape(-1, 2)
    return np.floor(array / level.downsample).astype(np.int64)


# -- planning -------------------------------------------------------------------------------------
Piece = tuple[int, int, int, int, int, int, int]
"""(patch, tile_y0, tile_y1, tile_x0, tile_x1, patch_y, patch_x): the part of one tile that goes
into one patch, in pixels of the tile and of the patch."""


@dataclass(frozen=True)
class _Read:
    """One range read of a level's shard, and the chunks it holds."""

    start: int
    end: int
    chunks: tuple[tuple[int, int, int], ...]
    """(chunk, start, end) of each wanted chunk, in bytes of the shard."""


@dataclass(frozen=True)
class _Plan:
    """What one batch reads, and where each decoded tile's pixels go."""

    reads: tuple[_Read, ...]
    pieces: dict[int, list[Piece]]
    """Chunk (row-major tile number) -> its pieces."""


def _batches(coords: np.ndarray, level: PublishedLevel, batch: int) -> Iterator[np.ndarray]:
    """Patch numbers in batches of `batch`, ordered by the tile each patch starts in, so that
    patches sharing tiles fall into one batch."""
    col = np.clip(coords[:, 0] // level.tile_width, 0, level.cols - 1)
    row = np.clip(coords[:, 1] // level.tile_height, 0, level.rows - 1)
    order = np.lexsort((coords[:, 0], col, row))
    for start in range(0, len(order), batch):
        yield order[start : start + batch]


def _pieces(
    level: PublishedLevel,
    coords: np.ndarray,
    numbers: np.ndarray,
    width: int,
    height: int,
    out: np.ndarray,
) -> dict[int, list[Piece]]:
    """Tile -> pieces for the patches `numbers`; patches overhanging the level are filled with
    the fill value first (their pieces then overwrite the part inside)."""
    tw, th, cols = level.tile_width, level.tile_height, level.cols
    pieces: dict[int, list[Piece]] = {}
    for number in numbers.tolist():
        x, y = int(coords[number, 0]), int(coords[number, 1])
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, level.width), min(y + height, level.height)
        if (x0, y0, x1, y1) != (x, y, x + width, y + height):
            out[number] = level.fill
        if x0 >= x1 or y0 >= y1:
            continue
        for row in range(y0 // th, (y1 - 1) // th + 1):
            ty0, ty1 = max(y0 - row * th, 0), min(y1 - row * th, th)
            for col in range(x0 // tw, (x1 - 1) // tw + 1):
                tx0, tx1 = max(x0 - col * tw, 0), min(x1 - col * tw, tw)
                piece = (number, ty0, ty1, tx0, tx1, row * th + ty0 - y, col * tw + tx0 - x)
                pieces.setdefault(row * cols + col, []).append(piece)
    return pieces


def _reads(spans: list[tuple[int, int, int]], gap: int, limit: int) -> tuple[_Read, ...]:
    """(start, end, chunk) spans sorted by start -> coalesced reads: at most `gap` unwanted
    bytes between two wanted chunks, at most `limit` bytes in all."""
    reads: list[_Read] = []
    group: list[tuple[int, int, int]] = []
    group_end = 0
    for start, end, chunk in spans:
        if group and (start - group_end > gap or end - group[0][1] > limit):
            reads.append(_Read(group[0][1], group_end, tuple(group)))
            group = []
        group_end = max(group_end, end) if group else end
        group.append((chunk, start, end))
    if group:
        reads.append(_Read(group[0][1], group_end, tuple(group)))
    return tuple(reads)


def _plan(
    level: PublishedLevel,
    index: np.ndarray,
    coords: np.ndarray,
    numbers: np.ndarray,
    size: tuple[int, int],
    out: np.ndarray,
    gap: int,
    limit: int,
) -> _Plan:
    """Plan one batch (on the pool: it is CPU work). Pieces of tiles the shard does not hold
    are filled with the fill value, as zarr-python reads them."""
    pieces = _pieces(level, coords, numbers, *size, out)
    data_end = layout.index_range(level.size, level.tile_count, level.key)[0]
    spans = []
    for chunk, targets in pieces.items():
        span = layout.chunk_span(index, chunk, data_end, level.key)
        if span is None:
            _paste(out, None, targets, fill=level.fill)
        else:
            spans.append((span[0], span[1], chunk))
    spans.sort()
    return _Plan(_reads(spans, gap, limit), pieces)


# -- reading --------------------------------------------------------------------------------------
def _paste(
    out: np.ndarray,
    tile: np.ndarray | None,
    targets: list[Piece],
    top: int = 0,
    left: int = 0,
    fill: int = layout.FILL_VALUE,
) -> None:
    """Copy each piece from `tile`, the part of a tile whose top-left pixel is (left, top) of
    the tile (None: the level's fill grey)."""
    for number, ty0, ty1, tx0, tx1, py, px in targets:
        dest = out[number, py : py + ty1 - ty0, px : px + tx1 - tx0]
        if tile is None:
            dest[...] = fill
        else:
            dest[...] = tile[ty0 - top : ty1 - top, tx0 - left : tx1 - left]


def _decode_pieces(
    level: PublishedLevel, out: np.ndarray, stream: bytes, targets: list[Piece]
) -> None:
    """Decode a stored chunk's pieces into their patches.

    A JPEG chunk decodes only what its pieces need (`jpegtran.decode_region_into`): columns
    outside skip the IDCT, upsampling and colour conversion, rows above are only
    entropy-decoded, and decoding stops after the last needed row. A random patch spans 3-4
    tiles and needs about a quarter of each; most tiles serve one patch, and are decoded
    straight into it. On the 256-px tiles of a generated 40,000 x 30,000 slide, 1000 random
    256-px patches cost 0.54 ms of CPU each at level 0 (0.84 ms decoding whole tiles), 0.57 ms
    at level 1 (0.74 ms).
    A tile serving several patches decodes the box around their pieces once; other chunks, and
    JPEG tiles needed whole by several patches, are decoded whole."""
    th, tw = level.tile_height, level.tile_width
    if level.chunk_codec == layout.JPEG:
        if len(targets) == 1:
            number, ty0, ty1, tx0, tx1, py, px = targets[0]
            dest = out[number, py : py + ty1 - ty0, px : px + tx1 - tx0]
            jpegtran.decode_region_into(stream, tx0, ty0, dest, (th, tw))
            return
        y0, y1 = min(p[1] for p in targets), max(p[2] for p in targets)
        x0, x1 = min(p[3] for p in targets), max(p[4] for p in targets)
        if (y1 - y0, x1 - x0) != (th, tw):
            part = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
            jpegtran.decode_region_into(stream, x0, y0, part, (th, tw))
            _paste(out, part, targets, y0, x0)
            return
    _paste(out, layout.decode_chunk(level.chunk_codec, stream, th, tw), targets)


def _decode_and_paste(
    level: PublishedLevel,
    out: np.ndarray,
    read: _Read,
    data: bytes,
    plan: _Plan,
    chunks: range | None = None,
) -> None:
    """Decode the chunks of `read` (or those numbered `chunks` among them) from `data`, the
    read's bytes, into their patches."""
    if len(data) != read.end - read.start:
        raise CorruptSlide(f"{level.key} ends inside a tile")
    for k in chunks if chunks is not None else range(len(read.chunks)):
        chunk, start, end = read.chunks[k]
        stream = data[start - read.start : end - read.start]
        _decode_pieces(level, out, stream, plan.pieces[chunk])


def _read_local(
    slide: AsyncPublishedSlide, level: PublishedLevel, out: np.ndarray, plan: _Plan, reads: range
) -> None:
    """Read and decode `reads` of the plan, in this pool thread (a local store's reads block)."""
    store = slide.store.store
    for k in reads:
        read = plan.reads[k]
        _decode_and_paste(level, out, read, store.get_range(level.key, read.start, read.end), plan)


async def _read_batch(
    slide: AsyncPublishedSlide,
    level: PublishedLevel,
    plan: _Plan,
    out: np.ndarray,
    settings: PatchSettings,
) -> None:
    """Every read of the plan, decoded into `out`.

    A local store's reads block: each pool task reads and decodes a run of reads itself, one
    hop to the pool for many tiles (a hop per read and per decode cost more than decoding).
    S3 reads are awaited on the loop (at most `fetch_concurrency`, and `inflight_bytes`, at a
    time), and each read's tiles are decoded in a few pool tasks."""
    store = slide.store
    n = len(plan.reads)
    if not store.store.settings.is_s3:
        tasks = min(n, _TASKS_PER_THREAD * store.settings.threads)
        runs = [range(n * t // tasks, n * (t + 1) // tasks) for t in range(tasks)]
        await asyncio.gather(
            *(store.run_in_pool(_read_local, slide, level, out, plan, run) for run in runs)
        )
        return
    reads_at_once = settings.inflight_bytes // settings.read_limit(s3=True)
    gate = asyncio.Semaphore(max(1, min(store.settings.fetch_concurrency, reads_at_once)))
    threads = store.settings.threads

    async def one(read: _Read) -> None:
        async with gate:
            data = await store.io.get_range(level.key, read.start, read.end)
            count = len(read.chunks)
            step = max(_MIN_DECODES_PER_TASK, -(-count // threads))
            parts = [range(k, min(count, k + step)) for k in range(0, count, step)]
            await asyncio.gather(
                *(
                    store.run_in_pool(_decode_and_paste, level, out, read, data, plan, part)
                    for part in parts
                )
            )

    await asyncio.gather(*(one(read) for read in plan.reads))


async def read_patches(
    slide: AsyncPublishedSlide,
    level: int,
    coords: Any,
    size: int | tuple[int, int],
    settings: PatchSettings | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Patches of `level` whose top-left corners are `coords` ((n, 2) pairs of (x, y) in pixels
    of that level), each `size` pixels (an int, or (width, height)), as one (n, height, width, 3)
    uint8 RGB array in the order of `coords`. Parts outside the level are the level's fill grey.
    With `out` (a writable C-contiguous uint8 array of that shape, e.g. a training loop's batch
    buffer) the patches are decoded straight into it and it is returned: a batch of 1000 256-px
    patches is 197 MB, which a fresh array costs in page faults and a caller's copy in time."""
    settings = settings or PatchSettings()
    lv = slide.level(level)
    width, height = patch_size(size)
    if width * height > slide.store.settings.max_region_pixels:
        raise InvalidArgument(
            f"{width}x{height} exceeds the {slide.store.settings.max_region_pixels} pixel limit"
        )
    points = as_coords(coords)
    shape = (len(points), height, width, 3)
    if out is None:
        limit_bytes = slide.store.settings.max_batch_bytes
        if len(points) * height * width * 3 > limit_bytes:
            raise InvalidArgument(
                f"{len(points)} patches of {width}x{height} take over the {limit_bytes}-byte "
                "limit of one call's result (ReaderSettings.max_batch_bytes): read them in "
                "batches, or into an array of your own (`out`)"
            )
        out = np.empty(shape, np.uint8)
    elif (
        out.shape != shape
        or out.dtype != np.uint8
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        raise InvalidArgument(
            f"out must be a writable C-contiguous uint8 array of shape {shape}, got "
            f"{out.dtype} {out.shape}"
        )
    if not len(points):
        return out
    index = await slide._index(lv)
    limit = settings.read_limit(slide.store.store.settings.is_s3)
    for numbers in _batches(points, lv, settings.batch_patches):
        plan = await slide.store.run_in_pool(
            _plan, lv, index, points, numbers, (width, height), out, settings.gap_bytes, limit
        )
        await _read_batch(slide, lv, plan, out, settings)
    return out
