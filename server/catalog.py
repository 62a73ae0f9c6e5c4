"""Published slides as the service sees them: metadata and stored tile bytes, read without
blocking the event loop (S3 through one shared async s3fs client, local files on a thread pool),
with the shard index of each level and hot tiles kept in memory."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import json
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import google_crc32c
import numpy as np

from wsi.errors import InvalidArgument, SlideNotFound, StoreError
from wsi.store.objects import Store, check_slide_id

if TYPE_CHECKING:
    from server.converting import SourceSlides


@dataclass(frozen=True)
class LevelView:
    """One pyramid level of a published slide."""

    index: int
    width: int
    height: int
    tile_width: int
    tile_height: int
    codec: str
    """'jpeg' (chunks are complete JPEG streams) or 'zstd'."""
    key: str
    """The level's object (shard / DICOM instance)."""
    size: int

    @property
    def cols(self) -> int:
        return -(-self.width // self.tile_width)

    @property
    def rows(self) -> int:
        return -(-self.height // self.tile_height)

    def check_tile(self, col: int, row: int) -> None:
        if not (0 <= col < self.cols and 0 <= row < self.rows):
            raise InvalidArgument(
                f"tile ({col}, {row}) is outside level {self.index} ({self.cols}x{self.rows} tiles)"
            )


@dataclass(frozen=True)
class SlideView:
    """What the service knows of one slide."""

    slide_id: str
    status: str
    """'ready' (published) or 'converting' (served from its source)."""
    levels: tuple[LevelView, ...]
    mpp_x: float | None
    mpp_y: float | None
    vendor: str | None
    objective_power: float | None
    associated: dict[str, LevelView] = field(default_factory=dict)
    dicom: dict[str, Any] | None = None
    manifest_crc: str = ""
    """Changes whenever the published slide changes: the base of strong ETags."""

    @property
    def width(self) -> int:
        return self.levels[0].width

    @property
    def height(self) -> int:
        return self.levels[0].height

    def level(self, index: int) -> LevelView:
        if not 0 <= index < len(self.levels):
            raise InvalidArgument(f"level {index} does not exist (0..{len(self.levels) - 1})")
        return self.levels[index]

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.slide_id,
            "status": self.status,
            "width": self.width,
            "height": self.height,
            "mpp_x": self.mpp_x,
            "mpp_y": self.mpp_y,
            "vendor": self.vendor,
            "objective_power": self.objective_power,
            "levels": [
                {
                    "level": lv.index,
                    "width": lv.width,
                    "height": lv.height,
                    "tile_width": lv.tile_width,
                    "tile_height": lv.tile_height,
                    "downsample": 2**lv.index,
                    "codec": lv.codec,
                }
                for lv in self.levels
            ],
            "associated_images": sorted(self.associated),
        }


class ByteLRU:
    """Least-recently-used cache of bytes values with a byte budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._items: collections.OrderedDict[Any, bytes] = collections.OrderedDict()

    def get(self, key: Any) -> bytes | None:
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: Any, value: bytes) -> None:
        if len(value) > self.budget:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.used -= len(old)
        self._items[key] = value
        self.used += len(value)
        while self.used > self.budget:
            _, dropped = self._items.popitem(last=False)
            self.used -= len(dropped)


class AsyncStore:
    """Non-blocking reads of a `wsi.Store`."""

    def __init__(self, store: Store, executor: cf.Executor) -> None:
        self.store = store
        self.executor = executor
        self._fs: Any = None

    async def start(self) -> None:
        if self.store.settings.is_s3:
            import s3fs

            self._fs = s3fs.S3FileSystem(asynchronous=True, **self.store.storage_options)
            await self._fs.set_session()

    async def close(self) -> None:
        if self._fs is not None:
            session = getattr(self._fs, "_s3", None)
            if session is not None:
                await session.close()
            self._fs = None

    async def _blocking(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def get(self, key: str) -> bytes:
        if self._fs is None:
            return await self._blocking(self.store.get, key)
        try:
            return bytes(await self._fs._cat_file(self.store.path(key)))
        except FileNotFoundError as exc:
            raise SlideNotFound(f"no object {key}") from exc
        except OSError as exc:
            raise StoreError(f"cannot read {key}: {exc}") from exc

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        if self._fs is None:
            return await self._blocking(self.store.get_range, key, start, end)
        try:
            return bytes(await self._fs._cat_file(self.store.path(key), start=start, end=end))
        except FileNotFoundError as exc:
            raise SlideNotFound(f"no object {key}") from exc
        except OSError as exc:
            raise StoreError(f"cannot read {key}: {exc}") from exc

    async def published(self) -> list[str]:
        return await self._blocking(self.store.published_slides)

    async def reachable(self) -> bool:
        try:
            await self._blocking(self.store.children)
        except Exception:
            return False
        return True


class Catalog:
    """Published slides of one store, with caches for slide metadata, shard indexes and tiles."""

    def __init__(
        self,
        reader: AsyncStore,
        tile_cache_bytes: int,
        sources: SourceSlides | None = None,
        recheck_seconds: float = 2.0,
    ) -> None:
        self.reader = reader
        self.sources = sources
        self.recheck_seconds = recheck_seconds
        """How long a slide's manifest is trusted before it is read again: tile requests must
        not each cost a store round trip, and a re-published slide must still show up."""
        self._checked: dict[str, float] = {}
        self.tiles = ByteLRU(tile_cache_bytes)
        self._views: collections.OrderedDict[str, SlideView] = collections.OrderedDict()
        self._indexes: collections.OrderedDict[tuple[str, int | str], np.ndarray] = (
            collections.OrderedDict()
        )

    async def slide_ids(self) -> list[str]:
        """Published slides, then slides only present as sources (being converted)."""
        published = await self.reader.published()
        if self.sources is None:
            return published
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self.reader.executor, self.sources.scan)
        return published + sorted(set(found) - set(published))

    async def slide(self, slide_id: str) -> SlideView:
        """The published slide `slide_id` (SlideNotFound otherwise), cached by manifest."""
        check_slide_id(slide_id)
        cached = self._views.get(slide_id)
        now = time.monotonic()
        if cached is not None and now - self._checked.get(slide_id, 0.0) < self.recheck_seconds:
            return cached
        try:
            manifest_bytes = await self.reader.get(f"{slide_id}/manifest.json")
        except SlideNotFound as exc:
            if self.sources is not None:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self.reader.executor, self._source_view, slide_id)
            raise SlideNotFound(f"no slide {slide_id}") from exc
        crc = f"{google_crc32c.value(manifest_bytes):08x}"
        self._checked[slide_id] = now
        if cached is not None and cached.manifest_crc == crc:
            self._views.move_to_end(slide_id)
            return cached
        view = await self._load(slide_id, json.loads(manifest_bytes), crc)
        self._views[slide_id] = view
        while len(self._views) > 256:
            dropped, _ = self._views.popitem(last=False)
            self._checked.pop(dropped, None)
        return view

    def _source_view(self, slide_id: str) -> SlideView:
        assert self.sources is not None
        try:
            return self.sources.view(slide_id)
        except SlideNotFound:
            self.sources.scan()  # a slide that just landed
            return self.sources.view(slide_id)

    async def _load(self, slide_id: str, manifest: dict[str, Any], crc: str) -> SlideView:
        try:
            root = json.loads(await self.reader.get(f"{slide_id}/slide.zarr/zarr.json"))
        except SlideNotFound as exc:
            raise SlideNotFound(f"slide {slide_id} has no Zarr view to serve") from exc
        attrs = root["attributes"]["wsistore"]
        objects = manifest["objects"]

        def view(path: str, lv: dict[str, Any], index: int) -> LevelView:
            key = f"slide.zarr/{path}/c/0/0/0"
            return LevelView(
                index,
                lv["width"],
                lv["height"],
                lv.get("tile_width", lv["width"]),
                lv.get("tile_height", lv["height"]),
                lv.get("codec", "jpeg"),
                f"{slide_id}/{key}",
                int(objects[key]["size"]),
            )

        levels = tuple(view(lv["path"], lv, i) for i, lv in enumerate(attrs["levels"]))
        associated = {}
        for a in attrs.get("associated_images", []):
            key = f"slide.zarr/{a['path']}/c/0/0/0"
            meta = json.loads(await self.reader.get(f"{slide_id}/slide.zarr/{a['path']}/zarr.json"))
            codec = "jpeg" if "jpeg" in json.dumps(meta["codecs"]) else "zstd"
            associated[a["name"]] = LevelView(
                0,
                a["width"],
                a["height"],
                a["width"],
                a["height"],
                codec,
                f"{slide_id}/{key}",
                int(objects[key]["size"]),
            )
        return SlideView(
            slide_id,
            "ready",
            levels,
            attrs.get("mpp_x"),
            attrs.get("mpp_y"),
            attrs.get("vendor"),
            attrs.get("objective_power"),
            associated,
            attrs.get("dicom"),
            crc,
        )

    async def _index(self, slide: SlideView, level: LevelView, tag: int | str) -> np.ndarray:
        cache_key = (slide.slide_id + slide.manifest_crc, tag)
        index = self._indexes.get(cache_key)
        if index is None:
            n = level.cols * level.rows
            raw = await self.reader.get_range(level.key, level.size - 16 * n - 4, level.size)
            (crc,) = struct.unpack("<I", raw[-4:])
            if google_crc32c.value(raw[:-4]) != crc:
                raise StoreError(f"shard index of {level.key} is corrupt")
            index = np.frombuffer(raw[:-4], "<u8").reshape(n, 2)
            self._indexes[cache_key] = index
            while len(self._indexes) > 4096:
                self._indexes.popitem(last=False)
        return index

    async def chunk(
        self, slide: SlideView, level: LevelView, col: int, row: int, tag: int | str
    ) -> bytes:
        """The stored bytes of one tile (a complete JPEG for JPEG levels), from the LRU or one
        range read."""
        level.check_tile(col, row)
        key = (slide.slide_id, slide.manifest_crc, tag, col, row)
        cached = self.tiles.get(key)
        if cached is not None:
            return cached
        if slide.status == "converting" and self.sources is not None:
            loop = asyncio.get_running_loop()
            data = await loop.run_in_executor(
                self.reader.executor, self.sources.tile, slide.slide_id, level.index, col, row
            )
            self.tiles.put(key, data)
            return data
        index = await self._index(slide, level, tag)
        offset, nbytes = (int(v) for v in index[row * level.cols + col])
        data = await self.reader.get_range(level.key, offset, offset + nbytes)
        self.tiles.put(key, data)
        return data

    async def tile(self, slide: SlideView, level: int, col: int, row: int) -> bytes:
        return await self.chunk(slide, slide.level(level), col, row, level)

    async def associated(self, slide: SlideView, name: str) -> tuple[LevelView, bytes]:
        if name not in slide.associated:
            raise SlideNotFound(f"slide {slide.slide_id} has no {name} image")
        view = slide.associated[name]
        return view, await self.chunk(slide, view, 0, 0, name)
