"""One published version of a slide (`AsyncPublishedSlide`): its levels, stored tiles, pixels,
regions, patches, associated images and DICOM frames, read through the I/O, decoding threads and
caches of the `PublishedStore` that opened it (`wsi.published.store`). Publishing the slide again
makes a new one, with a new `version`.

A tile is one range read through the shard index (both cached); archived (JPEG XL) and JPEG 2000
chunks are handed out as JPEG, and tiles a shard does not hold (blank glass) as the fill grey.
"""

from __future__ import annotations

import asyncio
import enum
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np

from wsi.codecs import jpeg2000, jxl
from wsi.errors import (
    AssociatedImageRefused,
    CorruptSlide,
    EncodedTileUnavailable,
    InvalidArgument,
    SlideChanged,
    SlideNotFound,
    StoreError,
    WsiError,
)
from wsi.model import SlideProperties
from wsi.published import layout
from wsi.published.archive import ObjectPlan, ObjectWriter
from wsi.published.layout import Manifest, SlideAttributes, SlideKeys
from wsi.published.patches import PatchSettings, as_int, read_patches
from wsi.published.values import (
    PublishedAssociated,
    PublishedDicom,
    PublishedInstance,
    PublishedLevel,
    StoredImage,
    best_level,
)

if TYPE_CHECKING:
    from wsi.published.store import PublishedStore

FORM_BATCH_FRAMES = 32
"""Frames of an archived instance rebuilt at a time while its JPEG form is sent."""


class Absent(enum.Enum):
    """A chunk the shard does not hold (blank glass), as `_chunk_now` says it."""

    ABSENT = "absent"


ABSENT = Absent.ABSENT


def _jpeg_of_jpeg2000(data: bytes) -> bytes:
    """A JPEG 2000 chunk as the JPEG viewers are given (cached with the tiles)."""
    return jpeg2000.to_jpeg(data, layout.JPEG2000_SERVED_QUALITY)


def _dicom_view(
    attributes: SlideAttributes,
    keys: SlideKeys,
    levels: tuple[PublishedLevel, ...],
    associated: Mapping[str, PublishedAssociated],
) -> PublishedDicom | None:
    """The DICOM instances the attributes list, each tied to the level or image it holds."""
    dicom = attributes.dicom
    if dicom is None:
        return None
    by_path = {attributes.levels[lv.index].path: lv for lv in levels}
    instances = []
    for entry in dicom.instances:
        image: StoredImage | None
        if entry.level is not None:
            image = by_path.get(layout.level_path(entry.level))
        else:
            image = associated.get(entry.associated or "")
        if image is None or image.key != keys.in_store(entry.key):
            raise CorruptSlide(f"DICOM instance {entry.sop_instance_uid} has no matching image")
        instances.append(PublishedInstance(entry.sop_instance_uid, entry.flavor, image))
    return PublishedDicom(dicom.study_instance_uid, dicom.series_instance_uid, tuple(instances))


@dataclass(frozen=True, eq=False)
class _Region:
    """A region request clipped to a level: which tiles, and where their pixels go."""

    level: PublishedLevel
    x: int
    y: int
    x0: int
    y0: int
    x1: int
    y1: int
    tiles: tuple[tuple[int, int], ...] = field(default=())

    @classmethod
    def clip(cls, level: PublishedLevel, x: int, y: int, w: int, h: int) -> _Region:
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, level.width), min(y + h, level.height)
        tw, th = level.tile_width, level.tile_height
        tiles: tuple[tuple[int, int], ...] = ()
        if x0 < x1 and y0 < y1:
            tiles = tuple(
                (col, row)
                for row in range(y0 // th, (y1 - 1) // th + 1)
                for col in range(x0 // tw, (x1 - 1) // tw + 1)
            )
        return cls(level, x, y, x0, y0, x1, y1, tiles)

    def paste(self, canvas: np.ndarray, col: int, row: int, pixels: np.ndarray) -> None:
        """Copy the part of tile (col, row) inside the region into `canvas`."""
        tw, th = self.level.tile_width, self.level.tile_height
        tx0, ty0 = max(col * tw, self.x0), max(row * th, self.y0)
        tx1, ty1 = min((col + 1) * tw, self.x1), min((row + 1) * th, self.y1)
        canvas[ty0 - self.y : ty1 - self.y, tx0 - self.x : tx1 - self.x] = pixels[
            ty0 - row * th : ty1 - row * th, tx0 - col * tw : tx1 - col * tw
        ]


_Read = TypeVar("_Read", bound=Callable[..., Awaitable[Any]])


def _explained(method: _Read) -> _Read:
    """A reading method whose CorruptSlide or StoreError becomes SlideChanged when the slide
    was published again (or removed) since this version was opened: a level this reader had
    not read yet is then another version's object, whose index fails its CRC or whose ranges
    lie past its end, which read as damage ("CRC32C mismatch", HTTP 416) though nothing is
    damaged. Only a failed read pays for the manifest's re-read."""

    @functools.wraps(method)
    async def read(self: AsyncPublishedSlide, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(self, *args, **kwargs)
        except (CorruptSlide, StoreError) as exc:
            await self._raise_if_republished(exc)
            raise

    return cast(_Read, read)


class AsyncPublishedSlide:
    """One published version of a slide. Made by `PublishedStore.slide` or
    `open_published_async`; the metadata is read once, pixels on demand.

    Stored tiles are padded to whole tiles at the right and bottom edges; `tile` and `region`
    return only pixels inside the level (`tile_bytes` hands out the stored JPEG as it is).
    """

    def __init__(
        self,
        store: PublishedStore,
        manifest: Manifest,
        version: str,
        attributes: SlideAttributes,
        levels: tuple[PublishedLevel, ...],
        associated: Mapping[str, PublishedAssociated],
    ) -> None:
        self.store = store
        self.manifest = manifest
        self.version = version
        """Changes whenever the slide is published again (the CRC32C of its manifest)."""
        self.attributes = attributes
        self.levels = levels
        self.associated: Mapping[str, PublishedAssociated] = MappingProxyType(dict(associated))
        """Every associated image stored, readable or not (see `ReaderSettings`)."""
        self.keys = SlideKeys(manifest.slide_id)
        self.dicom = _dicom_view(attributes, self.keys, levels, self.associated)
        """The DICOM view (study, series, instances), or None without one."""
        self.owns_store = False
        """Whether `close` closes the store too (a slide opened on its own by
        `open_published_async`)."""

    @property
    def slide_id(self) -> str:
        return self.manifest.slide_id

    @property
    def name(self) -> str:
        """What people call the slide (`Manifest.display_name`)."""
        return self.manifest.display_name

    @property
    def case(self) -> str | None:
        """The case it belongs to (accession number or study id), when known."""
        return self.manifest.case

    @property
    def properties(self) -> SlideProperties:
        """Vendor, microns per pixel, objective power, vendor properties, ICC profile."""
        return self.attributes.properties

    @property
    def width(self) -> int:
        return self.levels[0].width

    @property
    def height(self) -> int:
        return self.levels[0].height

    @property
    def associated_names(self) -> tuple[str, ...]:
        return tuple(sorted(self.associated))

    def level(self, index: int) -> PublishedLevel:
        index = as_int(index, "level")
        if not 0 <= index < len(self.levels):
            raise InvalidArgument(f"level {index} does not exist (0..{len(self.levels) - 1})")
        return self.levels[index]

    def best_level(self, downsample: float) -> PublishedLevel:
        """The least detailed level that still has at least the detail of `downsample`
        (level-0 pixels per output pixel), by the levels' own downsamples."""
        return best_level(self.levels, downsample)

    def __repr__(self) -> str:
        return f"<AsyncPublishedSlide {self.slide_id} version {self.version}>"

    # -- stored bytes -----------------------------------------------------------------------
    async def _raise_if_republished(self, exc: WsiError) -> None:
        """SlideChanged (from `exc`) when the manifest no longer names this version; nothing
        when it does, or cannot be read (`exc` then stands as it is)."""
        try:
            now = (await self.store.versions([self.slide_id])).get(self.slide_id, self.version)
        except WsiError:
            return
        if now == self.version:
            return
        self.store.changed(self.slide_id)
        what = "is no longer published" if now is None else "was published again while it was read"
        raise SlideChanged(f"slide {self.slide_id} {what}: open it again") from exc

    async def _index(self, image: StoredImage) -> np.ndarray:
        cache_key = (self.slide_id, self.version, image.key)
        index = self.store.indexes.get(cache_key)
        if index is not None:
            return index

        async def load() -> np.ndarray:
            start, end = layout.index_range(image.size, image.tile_count, image.key)
            raw = await self._get_range(image.key, start, end)  # and the object's ETag
            decoded = layout.decode_index(raw, image.tile_count, image.key)
            self.store.indexes.put(cache_key, decoded)
            return decoded

        return await self.store.once(("index", *cache_key), load)

    def _chunk_key(self, image: StoredImage, chunk: int) -> tuple[str, str, str, int]:
        """The tile cache's key of chunk `chunk` of `image` as handed out."""
        return (self.slide_id, self.version, image.key, chunk)

    async def _chunk(self, image: StoredImage, chunk: int) -> bytes | None:
        """The bytes of chunk `chunk` (row-major) as handed out, or None when the shard lacks
        it: the stored bytes, or for an archived image the JPEG rebuilt from them. Cached."""
        cache_key = self._chunk_key(image, chunk)
        data = self.store.tiles.get(cache_key)
        if data is not None:
            return data
        data = await self._read_chunk(image, chunk)
        if data is not None and image.stored_codec == layout.JPEGXL:
            data = await self.store.run_in_pool(jxl.jxl_to_jpeg, data)
        if data is not None and image.stored_codec == layout.JPEG2000:
            data = await self.store.run_in_pool(_jpeg_of_jpeg2000, data)
        if data is not None:
            self.store.tiles.put(cache_key, data)
        return data

    async def _stored_chunk(self, image: StoredImage, chunk: int) -> bytes | None:
        """The stored bytes of chunk `chunk` (an archived image's JPEG XL stream). Cached."""
        if image.stored_codec is None:
            return await self._chunk(image, chunk)
        cache_key = (self.slide_id, self.version, image.key, chunk, "stored")
        data = self.store.tiles.get(cache_key)
        if data is None:
            data = await self._read_chunk(image, chunk)
            if data is not None:
                self.store.tiles.put(cache_key, data)
        return data

    async def _read_chunk(self, image: StoredImage, chunk: int) -> bytes | None:
        """Chunk `chunk` read from the store through the cached shard index."""
        index = await self._index(image)
        data_end = image.size - layout.index_nbytes(image.tile_count)
        span = layout.chunk_span(index, chunk, data_end, image.key)
        if span is None:
            return None
        data = await self._get_range(image.key, *span)
        if len(data) != span[1] - span[0]:
            raise CorruptSlide(f"{image.key} ends inside chunk {chunk}")
        return data

    async def _get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes of an object of this version: on S3 only while it is the object whose index
        was read (its ETag), so that a slide published again under the same keys is never read
        at this version's offsets (SlideChanged, and the store reads the manifest again)."""
        io = self.store.io
        if not io.tagged:  # a local store: the version's own files are read (`get_range`)
            return await io.get_range(key, start, end, self.version)
        cache_key = (self.slide_id, self.version, key)
        etag = self.store.etags.get(cache_key)
        try:
            if etag is None:  # the object's first read here (its index's, usually)
                data, etag = await io.get_range_tagged(key, start, end, self.version)
                if etag is not None:
                    self.store.etags.put(cache_key, etag)
                return data
            return await io.get_range(key, start, end, self.version, etag)
        except SlideChanged:
            self.store.changed(self.slide_id)
            raise

    def _chunk_now(self, image: StoredImage, chunk: int) -> bytes | Absent | None:
        """`_chunk`'s answer when it needs no waiting (the chunk cached, or its shard index
        cached and its bytes in the page cache of a local store), else None. `ABSENT` when
        the shard holds no such chunk."""
        cache_key = self._chunk_key(image, chunk)
        data = self.store.tiles.get_if_held(cache_key)
        if data is not None or image.stored_codec is not None:  # rebuilt ones: on the pool
            return data
        index = self.store.indexes.get_if_held((self.slide_id, self.version, image.key))
        if index is None:
            return None
        data_end = image.size - layout.index_nbytes(image.tile_count)
        span = layout.chunk_span(index, chunk, data_end, image.key)
        if span is None:
            return ABSENT
        data = self.store.io.get_range_now(image.key, span[0], span[1], self.version)
        if data is None:
            return None
        if len(data) != span[1] - span[0]:
            raise CorruptSlide(f"{image.key} ends inside chunk {chunk}")
        self.store.tiles.put(cache_key, data)
        return data

    def tile_bytes_now(self, level: int, col: int, row: int) -> bytes | None:
        """`tile_bytes` when it needs no waiting (see `_chunk_now`), else None (then await
        `tile_bytes`): a hot tile, or a cold one of a local store in the page cache, without a
        coroutine. Bad coordinates raise as in `tile_bytes`."""
        lv = self.level(level)
        col, row = as_int(col, "col"), as_int(row, "row")
        lv.check_tile(col, row)
        data = self._chunk_now(lv, row * lv.cols + col)
        if data is ABSENT:
            return layout.background_chunk(lv.codec, lv.tile_width, lv.tile_height, lv.fill)
        return data

    @_explained
    async def tile_bytes(self, level: int, col: int, row: int) -> bytes:
        """The stored bytes of one tile: a complete JPEG stream for 'jpeg' levels (padded to the
        full tile size at the edges), zstd of the RGB bytes for 'zstd' levels. One range read
        through the cached shard index, or none when the tile is cached. A tile the shard does
        not hold (blank glass) is the level's background tile: the fill grey, encoded once."""
        lv = self.level(level)
        col, row = as_int(col, "col"), as_int(row, "row")
        lv.check_tile(col, row)
        data = await self._chunk(lv, row * lv.cols + col)
        if data is None:
            return layout.background_chunk(lv.codec, lv.tile_width, lv.tile_height, lv.fill)
        return data

    @_explained
    async def tile(self, level: int, col: int, row: int) -> np.ndarray:
        """Tile (col, row) of `level` as (h, w, 3) uint8 RGB, cropped to the level: edge tiles
        are smaller than `tile_width` x `tile_height`."""
        lv = self.level(level)
        col, row = as_int(col, "col"), as_int(row, "row")
        h, w = lv.tile_shape(col, row)
        data = await self._chunk(lv, row * lv.cols + col)
        if data is None:
            return np.full((h, w, 3), lv.fill, np.uint8)

        def decode() -> np.ndarray:
            pixels = layout.decode_chunk(lv.codec, data, lv.tile_height, lv.tile_width)
            return np.ascontiguousarray(pixels[:h, :w])

        return await self.store.run_in_pool(decode)

    @_explained
    async def region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """The rectangle at (x, y) of `width` x `height` pixels of `level` (in that level's
        pixels) as (height, width, 3) uint8 RGB. Parts outside the level, and tiles the shard
        does not hold, are the arrays' fill grey (`PublishedLevel.fill`; white on slides
        published without blank-glass detection): a region may overhang the edges or lie
        outside entirely."""
        lv = self.level(level)
        x, y = as_int(x, "x"), as_int(y, "y")
        width, height = as_int(width, "width"), as_int(height, "height")
        if width <= 0 or height <= 0:
            raise InvalidArgument(f"region size must be positive, got {width}x{height}")
        if width * height > self.store.settings.max_region_pixels:
            raise InvalidArgument(
                f"{width}x{height} exceeds the {self.store.settings.max_region_pixels} pixel limit"
            )
        canvas = np.full((height, width, 3), lv.fill, np.uint8)
        clipped = _Region.clip(lv, x, y, width, height)
        gate = asyncio.Semaphore(self.store.settings.fetch_concurrency)

        async def one(col: int, row: int) -> None:
            async with gate:
                data = await self._chunk(lv, row * lv.cols + col)
            if data is None:
                return

            def paste() -> None:
                pixels = layout.decode_chunk(lv.codec, data, lv.tile_height, lv.tile_width)
                clipped.paste(canvas, col, row, pixels)

            await self.store.run_in_pool(paste)

        await asyncio.gather(*(one(col, row) for col, row in clipped.tiles))
        return canvas

    @_explained
    async def patches(
        self,
        level: int,
        coords: Any,
        size: int | tuple[int, int],
        settings: PatchSettings | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Many patches of `level` at once as one (n, height, width, 3) uint8 array: `coords`
        are their top-left corners ((n, 2) pairs of (x, y)) in pixels of that level, `size` an
        int or (width, height). Parts outside the level are the fill grey. Each tile is read and
        decoded once per batch however many patches touch it; `out` is a preallocated array to
        decode into; see `wsi.published.patches`."""
        return await read_patches(self, level, coords, size, settings, out)

    # -- associated images and DICOM instances -----------------------------------------------
    def _allowed(self, name: str) -> PublishedAssociated:
        image = self.associated.get(name)
        if image is None:
            raise SlideNotFound(f"slide {self.slide_id} has no {name} image")
        allowed = self.store.settings.allow_associated
        if name not in allowed:
            raise AssociatedImageRefused(
                f"reading the {name} image is not allowed (it may show patient data): "
                f"allow it with ReaderSettings(allow_associated={{{name!r}}})"
            )
        # A thumbnail of the whole glass shows what the label shows: read where labels are.
        if name == "thumbnail" and image.shows_label and "label" not in allowed:
            raise AssociatedImageRefused(
                f"the {name} image of slide {self.slide_id} may show the slide's label: reading "
                "it needs the label allowed too (ReaderSettings(allow_associated={'label', ...}))"
            )
        return image

    @_explained
    async def associated_bytes(self, name: str) -> bytes:
        """The stored chunk of an associated image (a JPEG for 'jpeg', zstd RGB bytes for
        'zstd'); AssociatedImageRefused unless the settings allow `name`."""
        image = self._allowed(name)
        data = await self._chunk(image, 0)
        if data is None:
            raise CorruptSlide(f"{image.key} holds no image")
        return data

    @_explained
    async def associated_image(self, name: str) -> np.ndarray:
        """An associated image as (height, width, 3) uint8 RGB (same policy as the bytes)."""
        image = self._allowed(name)
        data = await self.associated_bytes(name)
        return await self.store.run_in_pool(
            layout.decode_chunk, image.codec, data, image.height, image.width
        )

    @_explained
    async def frame_bytes(
        self, instance: PublishedInstance, number: int, stored: bool = False
    ) -> bytes:
        """Frame `number` (from 1, row-major) of a DICOM instance of this slide: the JPEG that
        the instance's Pixel Data item holds, or for an archived instance the JPEG rebuilt from
        it; with `stored`, the item's bytes as they are (JPEG XL for an archived instance).
        A TILED_SPARSE instance's frames are its stored tiles in row-major order."""
        if instance.associated is not None:
            self._allowed(instance.associated)
        chunks = await self.frame_chunks(instance)
        if not 1 <= number <= len(chunks):
            raise InvalidArgument(f"frame {number} is outside 1..{len(chunks)}")
        read = self._stored_chunk if stored else self._chunk
        data = await read(instance.image, int(chunks[number - 1]))
        if data is None:
            raise EncodedTileUnavailable(f"{instance.key} stores no frame {number}")
        return data

    def frame_bytes_now(self, instance: PublishedInstance, number: int) -> bytes | None:
        """`frame_bytes` (not `stored`) when it needs no waiting, else None (then await
        `frame_bytes`): a level's frame whose chunk list is cached and whose bytes are cached
        or in the page cache. A frame out of range raises as in `frame_bytes`."""
        if instance.associated is not None:
            return None
        chunks = self.store.indexes.get_if_held(
            (self.slide_id, self.version, instance.image.key, "frames")
        )
        if chunks is None:
            return None
        if not 1 <= number <= len(chunks):
            raise InvalidArgument(f"frame {number} is outside 1..{len(chunks)}")
        data = self._chunk_now(instance.image, int(chunks[number - 1]))
        if data is ABSENT:
            raise EncodedTileUnavailable(f"{instance.key} stores no frame {number}")
        return data

    @_explained
    async def frame_chunks(self, instance: PublishedInstance) -> np.ndarray:
        """The chunk (row-major tile number) of each frame of a DICOM instance: every chunk of
        a TILED_FULL instance, the stored ones of a TILED_SPARSE one (blank tiles are absent).
        Its length is the instance's Number of Frames."""
        image = instance.image
        cache_key = (self.slide_id, self.version, image.key, "frames")
        chunks = self.store.indexes.get(cache_key)
        if chunks is None:
            index = await self._index(image)
            chunks = layout.stored_chunks(index)
            self.store.indexes.put(cache_key, chunks)
        return chunks

    def jpeg_form_size(self, instance: PublishedInstance) -> int:
        """Bytes of an archived instance in its JPEG form (`jpeg_form`): its size before the
        archive, which the manifest keeps."""
        entry = self.manifest.archived.get(self.keys.in_slide(instance.key))
        if entry is None or instance.image.stored_codec != layout.JPEGXL:
            raise InvalidArgument(f"{instance.key} is not archived")
        return entry.size

    async def jpeg_form(self, instance: PublishedInstance) -> AsyncIterator[bytes]:
        """An archived instance as it was before its archive (JPEG baseline frames), made part by
        part as `wsi restore` makes it: the same header with its transfer syntax switched back,
        every frame rebuilt, the index of those frames. `jpeg_form_size` bytes in all; a few
        dozen frames in memory at a time."""
        self.jpeg_form_size(instance)
        if instance.associated is not None:
            self._allowed(instance.associated)
        image = instance.image
        start, end = layout.index_range(image.size, image.tile_count, image.key)
        raw = await self.store.io.get_range(image.key, start, end, self.version)
        plan = ObjectPlan.from_index(image.key, image.size, image.tile_count, True, raw)
        parts: list[bytes] = []
        writer = ObjectWriter(plan, parts.append)
        header = await self._get_range(image.key, 0, plan.header_end)
        plan.check_header(header, layout.JPEGXL)
        writer.header(header, layout.JPEG)
        for batch in plan.batches(FORM_BATCH_FRAMES):
            data = await self._get_range(image.key, *plan.batch_range(batch))

            def rebuild(data: bytes = data, batch: tuple[tuple[int, int], ...] = batch) -> None:
                chunks = plan.chunks_of(batch, data)
                writer.chunks(batch, [jxl.jxl_to_jpeg(c) for c in chunks])

            await self.store.run_in_pool(rebuild)
            yield b"".join(parts)
            parts.clear()
        writer.finish()
        yield b"".join(parts)

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a stored object of this slide (a DICOM instance's header, or
        the whole instance in parts). The objects of associated images follow the policy."""
        entry = self.manifest.objects.get(self.keys.in_slide(key))
        if entry is None:
            raise SlideNotFound(f"slide {self.slide_id} has no object {key}")
        for image in self.associated.values():
            if image.key == key:
                self._allowed(image.name)
        if not 0 <= start <= end <= entry.size:
            raise InvalidArgument(f"range {start}-{end} is outside {key} ({entry.size} bytes)")
        if start == end:
            return b""
        return await self._get_range(key, start, end)

    # -- lifetime ---------------------------------------------------------------------------
    async def close(self) -> None:
        """Close the store this slide was opened with by `open_published_async`; a slide from a
        shared `PublishedStore` leaves it open."""
        if self.owns_store:
            await self.store.close()

    async def __aenter__(self) -> AsyncPublishedSlide:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
