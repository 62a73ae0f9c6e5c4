"""The values a published-slide reader hands out: its settings, levels, associated images and
DICOM instances. Frozen; they describe one published version of a slide."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from wsi.errors import InvalidArgument, SlideNotFound
from wsi.model import ASSOCIATED_KINDS, TileGrid
from wsi.published import layout
from wsi.published.layout import JPEG as JPEG
from wsi.published.layout import JPEG2000 as JPEG2000
from wsi.published.layout import JPEGXL as JPEGXL
from wsi.published.layout import ZSTD as ZSTD
from wsi.published.layout import CodecId as CodecId
from wsi.published.layout import Flavor

_MiB = 1024 * 1024


@dataclass(frozen=True)
class ReaderSettings:
    """How a `PublishedStore` reads: what it may read, and how much memory its caches take."""

    allow_associated: frozenset[str] = frozenset()
    """Associated images whose bytes or pixels may be read (of label, macro, thumbnail). None by
    default: labels and macros show patient names and barcodes, and many thumbnails are made
    from the macro. A thumbnail whose source says it may show the label
    (`PublishedAssociated.shows_label`) needs "label" allowed too. Their names and sizes are
    always visible."""
    tile_cache_bytes: int = 64 * _MiB
    """Stored tile bytes kept in memory, over all slides of the store."""
    index_cache_bytes: int = 16 * _MiB
    """Shard indexes kept in memory (16 bytes per tile of a level)."""
    slide_cache_entries: int = 256
    """Opened slides kept (their metadata: a few KB each)."""
    recheck_seconds: float = 0.0
    """How long an opened slide is trusted before opening it again reads its manifest (0: every
    time). A service sets a few seconds so that tile requests do not each cost a round trip."""
    recheck_in_background: bool = False
    """Once `recheck_seconds` have passed, answer with the slide as opened and re-read its
    manifest in the background, one re-read per slide at a time, instead of making the caller
    wait. A busy service sets it: otherwise every request open at that moment re-reads the
    manifest at once and all of them wait for it. A re-published slide then shows up one
    request later."""
    threads: int = 8
    """Threads for local reads and decoding, when the store makes its own pool."""
    fetch_concurrency: int = 32
    """Tiles a region read fetches at once."""
    max_region_pixels: int = 64 * 1024 * 1024
    """Largest region one call returns (3 bytes per pixel)."""
    max_batch_bytes: int = 1 << 30
    """Largest array of patches one `patches` call makes (a caller's `out` may be larger):
    200,000 patches of 256 px asked for 37 GiB at once."""

    def __post_init__(self) -> None:
        allowed = frozenset(self.allow_associated)
        unknown = allowed - set(ASSOCIATED_KINDS)
        if unknown:
            raise InvalidArgument(
                f"unknown associated images {sorted(unknown)}; known: {', '.join(ASSOCIATED_KINDS)}"
            )
        object.__setattr__(self, "allow_associated", allowed)
        if min(self.tile_cache_bytes, self.index_cache_bytes, self.slide_cache_entries) < 0:
            raise InvalidArgument("cache budgets must be >= 0")
        if min(self.threads, self.fetch_concurrency, self.max_region_pixels) < 1:
            raise InvalidArgument("threads, fetch_concurrency and max_region_pixels must be >= 1")
        if self.max_batch_bytes < 3:
            raise InvalidArgument("max_batch_bytes must hold a pixel (>= 3)")
        if self.recheck_seconds < 0:
            raise InvalidArgument("recheck_seconds must be >= 0")


@dataclass(frozen=True)
class PublishedLevel(TileGrid):
    """One pyramid level of a published slide, in pixels of that level."""

    index: int
    width: int
    height: int
    tile_width: int
    tile_height: int
    downsample: float
    """Level-0 pixels per pixel of this level, as the slide's metadata says."""
    codec: CodecId
    """How `tile_bytes` hands tiles out: 'jpeg' (a complete JPEG stream; archived levels too)
    or 'zstd'."""
    key: str
    """The level's object (its shard, and its DICOM instance when there is one)."""
    size: int
    """Bytes of that object."""
    stored_codec: CodecId | None = None
    """How the chunks are stored when that differs from `codec`: 'jpegxl' for a level of the
    archive tier, whose JPEG is rebuilt exactly to hand it out or decode it."""
    fill: int = layout.FILL_VALUE
    """Grey level v: tiles the shard does not hold (blank glass) are (v, v, v)."""

    @property
    def chunk_codec(self) -> CodecId:
        """The codec of the stored chunks (for readers of the object's bytes)."""
        return self.stored_codec or self.codec

    @property
    def grid_name(self) -> str:
        return f"level {self.index}"

    def tile_shape(self, col: int, row: int) -> tuple[int, int]:
        """(height, width) of tile (col, row) cropped to the level: edge tiles are smaller."""
        self.check_tile(col, row)
        th, tw = self.tile_height, self.tile_width
        return min(th, self.height - row * th), min(tw, self.width - col * tw)


@dataclass(frozen=True)
class PublishedAssociated:
    """An associated image (label, macro, thumbnail): one stored chunk."""

    name: str
    width: int
    height: int
    codec: CodecId
    key: str
    size: int
    stored_codec: CodecId | None = None
    """As for `PublishedLevel.stored_codec`."""
    shows_label: bool = True
    """Whether it may show the slide's label (`layout.AssociatedEntry.shows_label`)."""

    @property
    def chunk_codec(self) -> CodecId:
        return self.stored_codec or self.codec

    @property
    def tile_width(self) -> int:
        return self.width

    @property
    def tile_height(self) -> int:
        return self.height

    @property
    def cols(self) -> int:
        return 1

    @property
    def rows(self) -> int:
        return 1

    @property
    def tile_count(self) -> int:
        return 1


StoredImage = PublishedLevel | PublishedAssociated
"""An array of a slide: its chunks are what `tile_bytes` and `frame_bytes` hand out."""


@dataclass(frozen=True)
class PublishedInstance:
    """One DICOM instance of a slide: a stored object that is also a Part 10 file."""

    sop_instance_uid: str
    flavor: Flavor
    image: StoredImage
    """The level or associated image whose chunks are the instance's frames."""

    @property
    def key(self) -> str:
        return self.image.key

    @property
    def size(self) -> int:
        return self.image.size

    @property
    def level(self) -> int | None:
        return self.image.index if isinstance(self.image, PublishedLevel) else None

    @property
    def associated(self) -> str | None:
        return self.image.name if isinstance(self.image, PublishedAssociated) else None

    @property
    def frames(self) -> int:
        """Tiles of the image: the frames of a TILED_FULL instance, numbered from 1, row-major.
        A TILED_SPARSE instance (blank tiles left out) has fewer: the reader's
        `frame_chunks` says which."""
        return self.image.tile_count


@dataclass(frozen=True)
class PublishedDicom:
    """The DICOM view of a slide: one series."""

    study_instance_uid: str
    series_instance_uid: str
    instances: tuple[PublishedInstance, ...]

    def instance(self, sop_instance_uid: str) -> PublishedInstance:
        for inst in self.instances:
            if inst.sop_instance_uid == sop_instance_uid:
                return inst
        raise SlideNotFound(f"no instance {sop_instance_uid} in series {self.series_instance_uid}")


class StoredTiles(Protocol):
    """What decoding a stored tile needs to know of its image (a level or an associated image)."""

    @property
    def codec(self) -> CodecId: ...

    @property
    def tile_width(self) -> int: ...

    @property
    def tile_height(self) -> int: ...


def decode_tile(image: StoredTiles, data: bytes) -> np.ndarray:
    """Stored bytes of one tile of `image` (from `tile_bytes`, `frame_bytes` or
    `associated_bytes`) -> (tile_height, tile_width, 3) uint8 RGB, edge padding included: for
    callers that hold the bytes already (a DICOM frame is the whole padded tile). A JPEG that
    declares another size is refused (CorruptSlide) before anything is allocated."""
    return layout.decode_chunk(image.codec, data, image.tile_height, image.tile_width)


class Downsampled(Protocol):
    @property
    def downsample(self) -> float: ...


_L = TypeVar("_L", bound=Downsampled)


def best_level(levels: Sequence[_L], downsample: float) -> _L:
    """The least detailed of `levels` (level 0 first) that still has at least the detail of
    `downsample` (level-0 pixels per output pixel), by the levels' own downsamples."""
    if not math.isfinite(downsample) or downsample <= 0:
        raise InvalidArgument(f"downsample must be positive, got {downsample}")
    chosen = levels[0]
    for level in levels:
        if chosen.downsample < level.downsample <= downsample * (1 + 1e-9):
            chosen = level
    return chosen
