"""Slides as the service sees them: published slides, read through the library's
`PublishedStore` (one per app: its I/O, thread pool and byte-budgeted caches), and slides still
converting, served from their source files by `server.converting`.

Both kinds satisfy `ServedSlide`, the small interface the routes use, so a route never asks which
kind it holds except for what only a published slide has (its associated images and DICOM view:
`published`). Nothing here knows a key, a codec id or the shard index: that is the library's.

A slide published without its Zarr view (`wsi convert --format dicom`) is served like any other
(its manifest keeps the attributes its missing root `zarr.json` would hold), except one published
so by an earlier version, which kept no description of its levels: its routes answer 415, and the
listings show it (`Catalog.listed`: a `DicomOnlySlide`, status `dicom-only`) instead of leaving it
out unsaid.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from wsi.errors import InvalidArgument, SlideNotFound, UnsupportedSlide
from wsi.metadata import neutral_name
from wsi.model import Level, SlideProperties
from wsi.published.slide import AsyncPublishedSlide
from wsi.published.store import PublishedStore
from wsi.published.values import JPEG, CodecId, PublishedDicom, best_level, decode_tile

if TYPE_CHECKING:
    from server.converting import SourceSlides

T = TypeVar("T")

READY = "ready"
"""Status of a published slide."""
CONVERTING = "converting"
"""Status of a slide served from its source while its conversion runs."""
DICOM_ONLY = "dicom-only"
"""Status of a slide published without its Zarr view by an earlier version: listed, not served
(`DicomOnlySlide`)."""
PRIVATE_IMAGES = ("label", "macro")
"""Associated images that always may show patient names and barcodes: read only when the
service allows labels, and never kept by shared caches (`private_images`: and a thumbnail that
may show the label)."""


class ServedLevel(Protocol):
    """One pyramid level, in pixels of that level."""

    @property
    def index(self) -> int: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def tile_width(self) -> int: ...
    @property
    def tile_height(self) -> int: ...
    @property
    def downsample(self) -> float:
        """Level-0 pixels per pixel of this level."""

    @property
    def codec(self) -> CodecId:
        """How `tile_bytes` are encoded (`JPEG` ones are served as they are)."""

    @property
    def cols(self) -> int: ...
    @property
    def rows(self) -> int: ...
    def check_tile(self, col: int, row: int) -> None: ...


class SlideInfo(Protocol):
    """What pages and listings show of a slide."""

    @property
    def slide_id(self) -> str: ...
    @property
    def name(self) -> str:
        """What people call the slide: from its identifiers or its file's stem, a neutral name
        under de-identification, its id when nothing better is known."""

    @property
    def case(self) -> str | None:
        """The case (accession number / study id) it belongs to, when known."""

    @property
    def version(self) -> str:
        """Changes whenever the slide's bytes may change: the base of ETags and versioned URLs."""

    @property
    def levels(self) -> tuple[ServedLevel, ...]: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def properties(self) -> SlideProperties: ...
    @property
    def associated_names(self) -> tuple[str, ...]: ...


class ServedSlide(SlideInfo, Protocol):
    """A slide the routes serve: `AsyncPublishedSlide`, or `ConvertingSlide` while it converts."""

    @property
    def dicom(self) -> PublishedDicom | None: ...
    def level(self, index: int) -> ServedLevel: ...
    def best_level(self, downsample: float) -> ServedLevel: ...
    async def tile_bytes(self, level: int, col: int, row: int) -> bytes:
        """The stored (or, converting, the would-be stored) bytes of one tile, padded."""

    def tile_bytes_now(self, level: int, col: int, row: int) -> bytes | None:
        """`tile_bytes` when they can be had without waiting (the tile cache holds the tile;
        for a published slide of a local store also its bytes in the page cache), else None
        (then await `tile_bytes`): a busy viewer's tile without a coroutine."""

    async def tile(self, level: int, col: int, row: int) -> np.ndarray:
        """One tile as RGB pixels, cropped to the level."""

    async def region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB pixels of a rectangle of `level` (its pixels); white outside the level."""


def status(slide: SlideInfo) -> str:
    """READY for a published slide, CONVERTING for one served from its source, DICOM_ONLY for
    one published without its Zarr view that the service cannot read (`DicomOnlySlide`)."""
    if isinstance(slide, AsyncPublishedSlide):
        return READY
    return DICOM_ONLY if isinstance(slide, DicomOnlySlide) else CONVERTING


def published(slide: ServedSlide) -> AsyncPublishedSlide:
    """The published slide; SlideNotFound while it is still converting (associated images and
    the DICOM view exist only once published)."""
    if not isinstance(slide, AsyncPublishedSlide):
        raise SlideNotFound(f"slide {slide.slide_id} is still converting")
    return slide


def private_images(slide: SlideInfo) -> frozenset[str]:
    """The associated images of `slide` that may show patient names and barcodes: its label and
    macro, and a thumbnail its source did not say shows the scanned area only (some scanners'
    thumbnails are of the whole glass). Converting, its associated images are not served."""
    names = set(PRIVATE_IMAGES)
    if isinstance(slide, AsyncPublishedSlide):
        thumbnail = slide.associated.get("thumbnail")
        if thumbnail is not None and thumbnail.shows_label:
            names.add("thumbnail")
    return frozenset(names)


def shown_associated(slide: SlideInfo, allow_label: bool) -> list[str]:
    """The associated images a service (with or without labels allowed) lists for `slide`."""
    if allow_label:
        return list(slide.associated_names)
    private = private_images(slide)
    return [name for name in slide.associated_names if name not in private]


def summary(slide: SlideInfo, allow_label: bool) -> dict[str, Any]:
    """The JSON description of a slide (`GET /slides/{id}`, one entry of `GET /slides`), listing
    the associated images the service serves (`shown_associated`)."""
    props = slide.properties
    return {
        "id": slide.slide_id,
        "name": slide.name,
        "case": slide.case,
        "status": status(slide),
        "width": slide.width,
        "height": slide.height,
        "mpp_x": props.mpp_x,
        "mpp_y": props.mpp_y,
        "vendor": props.vendor,
        "objective_power": props.objective_power,
        "levels": [
            {
                "level": lv.index,
                "width": lv.width,
                "height": lv.height,
                "tile_width": lv.tile_width,
                "tile_height": lv.tile_height,
                "downsample": lv.downsample,
                "codec": lv.codec,
            }
            for lv in slide.levels
        ],
        "associated_images": shown_associated(slide, allow_label),
        **({"note": slide.note} if isinstance(slide, DicomOnlySlide) else {}),
    }


@dataclass(frozen=True)
class DicomOnlySlide:
    """What the listings show of a slide published without its Zarr view (`--format dicom`)
    by a version that kept no description of its levels in the manifest: its manifest's name,
    case and size, no levels and no images, and `note`, why it is not served (converting it
    again makes it servable). Its tiles, DeepZoom, IIIF and viewer answer 415 and DICOMweb
    leaves it out."""

    slide_id: str
    name: str
    case: str | None
    width: int
    height: int
    version: str
    note: str
    """The library's reason (UnsupportedSlide): what it lacks and how to get its DICOM files."""
    levels: tuple[ServedLevel, ...] = ()
    properties: SlideProperties = field(default_factory=SlideProperties)
    associated_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceLevel(Level):
    """A level of the pyramid a conversion will write; its tiles are JPEG, made from the
    source on request."""

    index: int = 0
    codec: CodecId = JPEG

    def tile_shape(self, col: int, row: int) -> tuple[int, int]:
        """(height, width) of tile (col, row) cropped to the level: edge tiles are smaller."""
        self.check_tile(col, row)
        th, tw = self.tile_height, self.tile_width
        return min(th, self.height - row * th), min(tw, self.width - col * tw)


@dataclass(frozen=True)
class SourcePyramid:
    """What is known of a slide still converting: the pyramid its conversion will write and
    its source's properties. It has no associated images or DICOM view until published."""

    slide_id: str
    levels: tuple[SourceLevel, ...]
    properties: SlideProperties
    name: str = field(default="", kw_only=True)
    """The source file's stem (the catalog shows a neutral name under de-identification)."""
    case: str | None = field(default=None, kw_only=True)
    """Unknown until the conversion reads the slide's identifiers."""

    @property
    def version(self) -> str:
        """Stable while the slide converts; the published slide gets its manifest's version."""
        return f"src{self.slide_id[:8]}"

    @property
    def width(self) -> int:
        return self.levels[0].width

    @property
    def height(self) -> int:
        return self.levels[0].height

    @property
    def associated_names(self) -> tuple[str, ...]:
        return ()

    @property
    def dicom(self) -> PublishedDicom | None:
        return None

    def level(self, index: int) -> SourceLevel:
        if not 0 <= index < len(self.levels):
            raise InvalidArgument(f"level {index} does not exist (0..{len(self.levels) - 1})")
        return self.levels[index]

    def best_level(self, downsample: float) -> SourceLevel:
        return best_level(self.levels, downsample)


@dataclass(frozen=True, eq=False)
class ConvertingSlide(SourcePyramid):
    """A slide still converting, with its tiles: each made by `sources` on the store's thread
    pool and kept in the store's tile cache (one memory budget for both kinds of slide)."""

    sources: SourceSlides
    store: PublishedStore

    def _tile_key(self, level: int, col: int, row: int) -> tuple[str, str, int, int, int]:
        self.level(level).check_tile(col, row)
        return ("source", self.slide_id, level, col, row)

    def tile_bytes_now(self, level: int, col: int, row: int) -> bytes | None:
        return self.store.tiles.get_if_held(self._tile_key(level, col, row))

    async def tile_bytes(self, level: int, col: int, row: int) -> bytes:
        """Tile (col, row) of `level` as a complete JPEG of the full tile size."""
        key = self._tile_key(level, col, row)
        data = self.store.tiles.get(key)
        if data is not None:
            return data

        async def make() -> bytes:
            made = await self.store.run_in_pool(self.sources.tile, self.slide_id, level, col, row)
            self.store.tiles.put(key, made)
            return made

        # Requests for the same tile while it is being made share the one decode and encode.
        return await self.store.once(key, make)

    async def tile(self, level: int, col: int, row: int) -> np.ndarray:
        lv = self.level(level)
        h, w = lv.tile_shape(col, row)
        data = await self.tile_bytes(level, col, row)
        return await self.store.run_in_pool(
            lambda: np.ascontiguousarray(decode_tile(lv, data)[:h, :w])
        )

    async def region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        lv = self.level(level)
        if width <= 0 or height <= 0:
            raise InvalidArgument(f"region size must be positive, got {width}x{height}")
        canvas = np.full((height, width, 3), 255, np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, lv.width), min(y + height, lv.height)
        if x0 >= x1 or y0 >= y1:
            return canvas
        tw, th = lv.tile_width, lv.tile_height
        cells = [
            (col, row)
            for row in range(y0 // th, (y1 - 1) // th + 1)
            for col in range(x0 // tw, (x1 - 1) // tw + 1)
        ]
        chunks = await asyncio.gather(*(self.tile_bytes(level, c, r) for c, r in cells))

        def paste() -> np.ndarray:
            for (col, row), data in zip(cells, chunks, strict=True):
                pixels = decode_tile(lv, data)
                tx0, ty0 = max(col * tw, x0), max(row * th, y0)
                tx1, ty1 = min((col + 1) * tw, x1), min((row + 1) * th, y1)
                canvas[ty0 - y : ty1 - y, tx0 - x : tx1 - x] = pixels[
                    ty0 - row * th : ty1 - row * th, tx0 - col * tw : tx1 - col * tw
                ]
            return canvas

        return await self.store.run_in_pool(paste)


class Catalog:
    """The slides of the service: those `store` has published, then those `sources` serves
    while they convert (a published slide takes over as soon as its manifest exists)."""

    def __init__(
        self,
        store: PublishedStore,
        sources: SourceSlides | None = None,
        render_slots: int = 4,
        deidentify: bool = False,
    ) -> None:
        self.store = store
        self.sources = sources
        self.deidentify = deidentify
        """Slides still converting are shown by a neutral name, not their file's (published
        ones carry the name their conversion chose)."""
        self.renders = asyncio.Semaphore(render_slots)
        """Renders (regions, scaled views) in progress at once, each until its answer is made
        (`server.render.region`): each holds at most 4x the pixel budget of source pixels, the
        budget of scaled ones and its answer, so their memory is bounded by the slots, not by
        the clients."""

    async def slide_ids(self) -> list[str]:
        """Published slides, then slides only present as sources (being converted)."""
        ids = await self.store.slide_ids()
        if self.sources is None:
            return ids
        found = await self.store.run_in_pool(self.sources.scan)
        return ids + sorted(set(found) - set(ids))

    def opened(self, slide_id: str) -> ServedSlide | None:
        """`slide`'s answer without awaiting when it is a published slide already open and
        recently checked, else None (then await `slide`)."""
        return self.store.opened(slide_id)

    async def slide(self, slide_id: str) -> ServedSlide:
        """The slide `slide_id`: published, else from its source; SlideNotFound otherwise."""
        try:
            return await self.store.slide(slide_id)
        except SlideNotFound as exc:
            if self.sources is None:
                raise SlideNotFound(f"no slide {slide_id}") from exc
        pyramid = await self.store.run_in_pool(self._source_pyramid, slide_id)
        return ConvertingSlide(
            pyramid.slide_id,
            pyramid.levels,
            pyramid.properties,
            self.sources,
            self.store,
            name=neutral_name(slide_id) if self.deidentify else pyramid.name or slide_id,
        )

    async def listed(self, slide_id: str) -> SlideInfo:
        """The slide as the listings show it (`GET /slides`, `GET /slides/{id}`, the viewer's
        index): `slide`'s, or a `DicomOnlySlide` for one published without its Zarr view by an
        earlier version (`Manifest.servable`), which `slide` refuses (UnsupportedSlide): listed
        as such rather than silently left out."""
        try:
            return await self.slide(slide_id)
        except UnsupportedSlide as exc:
            manifest, version = await self.store.manifest(slide_id)
            if manifest.servable:
                raise  # refused for another reason
            return DicomOnlySlide(
                manifest.slide_id,
                manifest.display_name,
                manifest.case,
                manifest.width,
                manifest.height,
                version,
                str(exc),
            )

    def _source_pyramid(self, slide_id: str) -> SourcePyramid:
        assert self.sources is not None
        try:
            return self.sources.view(slide_id)
        except SlideNotFound:
            self.sources.scan()  # a slide that just landed
            return self.sources.view(slide_id)

    def reachable(self) -> bool:
        """Blocking: whether the store answers (readiness; run it as `server.probes` does)."""
        return self.store.reachable()

    async def in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        """Blocking work (decoding, resampling, encoding) on the app's thread pool."""
        return await self.store.run_in_pool(fn, *args)
