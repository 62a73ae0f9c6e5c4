"""What published slides cost in storage (`wsi du`): bytes per slide, level and tier, the
background that was not stored, and the ratio to the source.

Everything comes from the published metadata: object sizes from the manifest (which lists every
object of the slide; the manifest's own size is read too), each level's codec (its tier: `jpeg`,
the JPEG XL archive tier, `zstd`) from the `wsistore` attributes, and per level the shard index,
whose entries say which tiles are stored: one small ranged read per level, and one tile.

Background not stored: a tile of blank glass is left out of its shard (its index entry is the
Zarr "missing chunk" marker; readers show the slide's fill grey). What it would have cost is not
recorded anywhere, so it is estimated: each missing tile as much as a **uniform tile of the fill
grey coded like the level's own tiles** (same size, the quantisation tables and chroma
subsampling of the level's smallest stored tile, optimised Huffman tables; zstd levels: the zstd
of that tile). On flat glass this is close: 18,036 bytes estimated for 15,988 saved on the
half-blank test slide of `tests/test_du.py`. Glass with noise costs more than a uniform tile (a
dropped tile may differ from the fill by the tolerance of `wsi.pyramid.background`, and noise
costs bits), so there the true saving is higher than the estimate: `bench/storage.py` prints
both. Index entries that point at bytes another entry already points at (one tile's bytes
shared by several tiles) are counted too, and what they save is exact.
"""

from __future__ import annotations

import functools
import io
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image, JpegImagePlugin

from wsi.codecs import jxl
from wsi.errors import CorruptSlide, SlideNotFound
from wsi.model import TileGrid
from wsi.published import layout
from wsi.published.layout import EMPTY_CHUNK, Manifest, SlideAttributes, SlideKeys
from wsi.store.objects import Store
from wsi.writers.dicom import JPEG_BASELINE, JPEG_XL_JPEG_RECOMPRESSION


@dataclass(frozen=True)
class _Grid(TileGrid):
    width: int
    height: int
    tile_width: int
    tile_height: int


@dataclass(frozen=True)
class LevelUsage:
    """One pyramid level's object (its shard, which is also its DICOM instance)."""

    index: int
    width: int
    height: int
    tier: str
    """The level's chunk codec id (`wsi.published.layout`): jpeg, zstd, the archive tier's."""
    bytes: int
    tiles: int
    """Tiles of the level's grid."""
    missing_tiles: int
    """Tiles not stored (background)."""
    shared_tiles: int = 0
    """Tiles whose index entry points at bytes another tile's entry points at."""
    saved_bytes: int = 0
    """Estimated bytes the missing and shared tiles would have cost (see the module)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "level": self.index,
            "width": self.width,
            "height": self.height,
            "tier": self.tier,
            "bytes": self.bytes,
            "tiles": self.tiles,
            "missing_tiles": self.missing_tiles,
            "shared_tiles": self.shared_tiles,
            "background_saved_bytes": self.saved_bytes,
        }


@dataclass(frozen=True)
class SlideUsage:
    """What one published slide costs."""

    slide_id: str
    bytes: int
    """Every object the manifest lists, and the manifest itself: the slide's folder on disk."""
    source_bytes: int | None
    """The source's size as recorded at conversion; None for slides converted before it was."""
    levels: tuple[LevelUsage, ...]
    associated_bytes: int
    """Label, macro, thumbnail objects."""
    metadata_bytes: int
    """zarr.json documents and the manifest."""
    tiers: Mapping[str, int] = field(default_factory=dict)
    """Bytes of the level and associated objects per codec id."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tiers", MappingProxyType(dict(self.tiers)))

    @property
    def ratio(self) -> float | None:
        """Stored bytes / source bytes (None when the source size is not known)."""
        return self.bytes / self.source_bytes if self.source_bytes else None

    @property
    def missing_tiles(self) -> int:
        return sum(lv.missing_tiles for lv in self.levels)

    @property
    def saved_bytes(self) -> int:
        return sum(lv.saved_bytes for lv in self.levels)

    def to_json(self, by_level: bool = True) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "slide": self.slide_id,
            "bytes": self.bytes,
            "source_bytes": self.source_bytes,
            "ratio": self.ratio,
            "tiers": dict(self.tiers),
            "associated_bytes": self.associated_bytes,
            "metadata_bytes": self.metadata_bytes,
            "missing_tiles": self.missing_tiles,
            "background_saved_bytes": self.saved_bytes,
        }
        if by_level:
            doc["levels"] = [lv.to_json() for lv in self.levels]
        return doc


@dataclass(frozen=True)
class StoreUsage:
    """The slides of a store, and their totals."""

    slides: tuple[SlideUsage, ...]
    unreadable: tuple[tuple[str, str], ...] = ()
    """(slide id, why) of slides whose metadata could not be read (`wsi verify` says more)."""

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.slides)

    @property
    def source_bytes(self) -> int:
        """Source bytes of the slides whose source size is known."""
        return sum(s.source_bytes or 0 for s in self.slides)

    @property
    def ratio(self) -> float | None:
        """Stored / source bytes over the slides whose source size is known."""
        known = [s for s in self.slides if s.source_bytes]
        source = sum(s.source_bytes or 0 for s in known)
        return sum(s.bytes for s in known) / source if source else None

    @property
    def tiers(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for slide in self.slides:
            total.update(slide.tiers)
        return dict(sorted(total.items()))

    @property
    def missing_tiles(self) -> int:
        return sum(s.missing_tiles for s in self.slides)

    @property
    def saved_bytes(self) -> int:
        return sum(s.saved_bytes for s in self.slides)

    def to_json(self, by_level: bool = False) -> dict[str, Any]:
        return {
            "slides": [s.to_json(by_level) for s in self.slides],
            "unreadable": [{"slide": sid, "error": why} for sid, why in self.unreadable],
            "total": {
                "slides": len(self.slides),
                "bytes": self.bytes,
                "source_bytes": self.source_bytes,
                "ratio": self.ratio,
                "tiers": self.tiers,
                "missing_tiles": self.missing_tiles,
                "background_saved_bytes": self.saved_bytes,
            },
        }


@dataclass(frozen=True)
class _IndexStats:
    missing: int
    shared: int
    shared_bytes: int
    smallest: tuple[int, int] | None
    """[start, end) of the smallest stored chunk."""


def _index_stats(index: np.ndarray) -> _IndexStats:
    """Counts over one shard index ((tiles, 2) offsets and lengths, row-major)."""
    stored = ~((index[:, 0] == EMPTY_CHUNK) & (index[:, 1] == EMPTY_CHUNK))
    pairs = index[stored].astype(np.int64)
    unique = np.unique(pairs, axis=0) if len(pairs) else pairs
    shared = len(pairs) - len(unique)
    # Every entry beyond the first of each distinct (offset, length) reuses bytes.
    shared_bytes = int(pairs[:, 1].sum() - unique[:, 1].sum()) if shared else 0
    smallest = None
    if len(pairs):
        offset, length = (int(v) for v in pairs[int(np.argmin(pairs[:, 1]))])
        smallest = (offset, offset + length)
    return _IndexStats(int((~stored).sum()), shared, shared_bytes, smallest)


def _blank_tile_bytes(
    store: Store, key: str, stats: _IndexStats, grid: TileGrid, tier: str, fill: int
) -> int:
    """What a uniform tile of the fill grey costs coded like this level's stored tiles (see the
    module); 0 when the level stores no tile to take the coding from."""
    if tier == layout.ZSTD:
        pixels = np.full((grid.tile_height, grid.tile_width, 3), fill, np.uint8)
        return len(layout.encode_chunk_zstd(pixels))
    if stats.smallest is None or tier not in (layout.JPEG, layout.JPEGXL):
        return 0
    sample = store.get_range(key, *stats.smallest)
    if tier == layout.JPEGXL:
        sample = jxl.jxl_to_jpeg(sample)
    try:
        with Image.open(io.BytesIO(sample)) as tile:
            tables = getattr(tile, "quantization", None)
            sampling = JpegImagePlugin.get_sampling(tile)
    except (OSError, ValueError, SyntaxError) as exc:
        raise CorruptSlide(f"{key}: a stored tile is not a JPEG") from exc
    if not tables:
        raise CorruptSlide(f"{key}: a stored tile is not a JPEG")
    coding = tuple(tuple(int(v) for v in tables[k]) for k in sorted(tables))
    return _blank_jpeg_bytes(grid.tile_width, grid.tile_height, fill, coding, max(sampling, 0))


@functools.lru_cache(maxsize=64)
def _blank_jpeg_bytes(
    width: int, height: int, fill: int, tables: tuple[tuple[int, ...], ...], sampling: int
) -> int:
    """The bytes of a uniform `fill` tile coded with these quantisation tables and sampling.
    Remembered: a store's slides share a few codings, and encoding one for every level of
    every slide was a quarter of `wsi du` (15 ms a slide: 25 minutes for 100,000)."""
    pixels = np.full((height, width, 3), fill, np.uint8)
    out = io.BytesIO()
    qtables = [list(table) for table in tables]
    Image.fromarray(pixels).save(out, "JPEG", qtables=qtables, subsampling=sampling, optimize=True)
    return len(out.getvalue())


def _read_index(store: Store, key: str, size: int, grid: TileGrid) -> np.ndarray:
    start, end = layout.index_range(size, grid.tile_count, key)
    return layout.decode_index(store.get_range(key, start, end), grid.tile_count, key)


def slide_usage(store: Store, slide_id: str) -> SlideUsage:
    """The storage report of the published slide `slide_id` (SlideNotFound if unpublished,
    CorruptSlide when its metadata does not follow the layout)."""
    keys = SlideKeys(slide_id)
    try:
        manifest_bytes = store.get(keys.manifest)
    except SlideNotFound as exc:
        raise SlideNotFound(f"slide {slide_id} is not published") from exc
    manifest = Manifest.from_bytes(manifest_bytes)
    sizes = {keys.in_store(k): e.size for k, e in manifest.objects.items()}
    total = sum(sizes.values()) + len(manifest_bytes)
    root_key = keys.root_metadata
    if root_key not in sizes:
        return _dicom_only(store, manifest, keys, sizes, total)
    attributes = SlideAttributes.from_root_metadata(store.get(root_key), f"{slide_id}: zarr.json")
    tiers: Counter[str] = Counter()
    levels = []
    for index, entry in enumerate(attributes.levels):
        key = keys.shard(entry.path)
        size = sizes.get(key)
        if size is None:
            raise CorruptSlide(f"the manifest of {slide_id} does not list {key}")
        grid = _Grid(entry.width, entry.height, entry.tile_width, entry.tile_height)
        tier = str(entry.codec)
        levels.append(_level_usage(store, key, size, index, grid, tier, attributes.fill))
        tiers[tier] += size
    associated = 0
    for image in attributes.associated_images:
        key = keys.shard(image.path)
        size = sizes.get(key, 0)
        associated += size
        tiers[_associated_tier(store, keys, image.path)] += size
    metadata = total - sum(lv.bytes for lv in levels) - associated
    return SlideUsage(
        slide_id, total, manifest.source_bytes, tuple(levels), associated, metadata, tiers
    )


def _level_usage(
    store: Store, key: str, size: int, index: int, grid: _Grid, tier: str, fill: int
) -> LevelUsage:
    stats = _index_stats(_read_index(store, key, size, grid))
    blank = _blank_tile_bytes(store, key, stats, grid, tier, fill) if stats.missing else 0
    return LevelUsage(
        index, grid.width, grid.height, tier, size, grid.tile_count, stats.missing,
        stats.shared, stats.missing * blank + stats.shared_bytes,
    )  # fmt: skip


def _associated_tier(store: Store, keys: SlideKeys, path: str) -> str:
    key = keys.array_metadata(path)
    return str(layout.codec_of_array(layout.load_json(store.get(key), key), key))


def _dicom_only(
    store: Store, manifest: Manifest, keys: SlideKeys, sizes: Mapping[str, int], total: int
) -> SlideUsage:
    """A slide published with `--format dicom`: its instances, each level described by its own
    DICOM header (transfer syntax, total pixel matrix, frame size)."""
    levels, associated = [], 0
    tiers: Counter[str] = Counter()
    fill = layout.FILL_VALUE  # the fill grey is in the Zarr attributes, which this slide lacks
    for instance in manifest.dicom:
        key = keys.in_store(instance.key)
        size = sizes.get(key, 0)
        tier, grid = _dicom_header(store, key, size)
        tiers[tier] += size
        if instance.level is None:
            associated += size
            continue
        levels.append(_level_usage(store, key, size, instance.level, grid, tier, fill))
    levels.sort(key=lambda lv: lv.index)
    stored = sum(lv.bytes for lv in levels) + associated
    return SlideUsage(
        manifest.slide_id, total, manifest.source_bytes, tuple(levels), associated,
        total - stored, tiers,
    )  # fmt: skip


_DICOM_HEADER_BYTES = 256 * 1024
"""Our instances' headers (attributes before Pixel Data) take a few KB; an ICC profile adds a
few more."""


_DICOM_TIERS = {JPEG_BASELINE: layout.JPEG, JPEG_XL_JPEG_RECOMPRESSION: layout.JPEGXL}
"""The chunk codec id of the transfer syntaxes our instances use."""


def _dicom_header(store: Store, key: str, size: int) -> tuple[str, _Grid]:
    """(tier, tile grid) of a DICOM instance from its header: `jpeg` for JPEG baseline, else the
    transfer syntax's name."""
    import pydicom  # ~0.1 s to import (it imports requests): only when a header is read
    from pydicom.errors import InvalidDicomError

    head = store.get_range(key, 0, min(size, _DICOM_HEADER_BYTES))
    try:
        ds = pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True)
        syntax = ds.file_meta.TransferSyntaxUID
        tier = _DICOM_TIERS.get(str(syntax)) or str(syntax.name or syntax)
        grid = _Grid(
            int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows),
            int(ds.Columns), int(ds.Rows),
        )  # fmt: skip
    except (AttributeError, ValueError, TypeError, EOFError, InvalidDicomError) as exc:
        raise CorruptSlide(f"{key}: unreadable DICOM header") from exc
    return tier, grid


def store_usage(store: Store, slide_ids: Iterable[str] = ()) -> StoreUsage:
    """The report of the given slides, or of every published slide of the store. A slide whose
    metadata cannot be read (or that is unpublished meanwhile) is listed in `unreadable`; a
    store that cannot be read raises StoreError."""
    slides, unreadable = [], []
    for slide_id in list(slide_ids) or store.published_slides():
        try:
            slides.append(slide_usage(store, slide_id))
        except (CorruptSlide, SlideNotFound) as exc:
            unreadable.append((slide_id, str(exc)))
    return StoreUsage(tuple(slides), tuple(unreadable))


def _tiers_text(tiers: Mapping[str, int]) -> str:
    return ", ".join(f"{tier} {size:,}" for tier, size in sorted(tiers.items())) or "-"


def _ratio_text(ratio: float | None) -> str:
    return f"{ratio:.3f}x" if ratio is not None else "n/a"


def report_lines(usage: StoreUsage, by_level: bool = False) -> list[str]:
    """`wsi du`'s table: a line per slide (and per level with `by_level`), then the total.
    Sizes in bytes; "not stored": background tiles left out, with the estimated bytes saved."""
    head = f"{'slide':<26}{'stored bytes':>15}{'source bytes':>15}{'ratio':>9}  "
    lines = [head + "tiers (bytes); background not stored"]

    def row(name: str, stored: int, source: int | None, ratio: float | None) -> str:
        src = f"{source:,}" if source else "n/a"
        return f"{name:<26}{stored:>15,}{src:>15}{_ratio_text(ratio):>9}  "

    for slide in usage.slides:
        lines.append(
            row(slide.slide_id, slide.bytes, slide.source_bytes, slide.ratio)
            + f"{_tiers_text(slide.tiers)}; {slide.missing_tiles:,} tiles "
            f"(~{slide.saved_bytes:,} bytes)"
        )
        if by_level:
            for lv in slide.levels:
                shared = f", {lv.shared_tiles:,} shared" if lv.shared_tiles else ""
                lines.append(
                    f"  level {lv.index:<3}{lv.width:>7} x {lv.height:<7}{lv.tier:<6}"
                    f"{lv.bytes:>15,} bytes  {lv.tiles:,} tiles, {lv.missing_tiles:,} not stored"
                    f"{shared} (~{lv.saved_bytes:,} bytes saved)"
                )
            lines.append(
                f"  associated images {slide.associated_bytes:,} bytes, "
                f"metadata {slide.metadata_bytes:,} bytes"
            )
    lines += [f"{sid:<26}unreadable: {why}" for sid, why in usage.unreadable]
    count = len(usage.slides)
    name = f"total ({count} slide{'s' if count != 1 else ''})"
    lines.append(
        row(name, usage.bytes, usage.source_bytes, usage.ratio)
        + f"{_tiers_text(usage.tiers)}; {usage.missing_tiles:,} tiles "
        f"(~{usage.saved_bytes:,} bytes)"
    )
    return lines


__all__ = [
    "LevelUsage",
    "SlideUsage",
    "StoreUsage",
    "report_lines",
    "slide_usage",
    "store_usage",
]
