"""The published slides of one store (`PublishedStore`): listing them, opening each one from its
manifest and attributes, noticing that it was published again, and the I/O, decoding threads and
byte-budgeted caches that all its slides share. `open_published_async` opens one slide on a store
of its own.

Async at the core: S3 through obstore's coroutines, local files on a thread pool, decoding on
that thread pool. The slides it opens (`wsi.published.slide`) read their tiles through it;
`wsi.published.sync` is the blocking face, run on one private event-loop thread.

Everything about where things are and how they are encoded comes from `wsi.published.layout`, the
package the writers use: downsamples, codecs and keys are read, never assumed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from wsi.errors import CorruptSlide, SlideNotFound, UnsupportedSlide
from wsi.published import layout
from wsi.published.cache import ByteLRU
from wsi.published.layout import Manifest, SlideAttributes, SlideKeys
from wsi.published.slide import AsyncPublishedSlide
from wsi.published.values import PublishedAssociated, PublishedLevel, ReaderSettings
from wsi.store.aio import AsyncStore
from wsi.store.objects import Store, StoreSettings, check_slide_id, split_slide_location

T = TypeVar("T")


@dataclass(frozen=True)
class _Opened:
    slide: AsyncPublishedSlide
    checked: float


ETAG_CACHE_BYTES = 1 << 20
"""Memory for ETags (~100 bytes each: ten thousand objects' worth)."""


class PublishedStore:
    """The published slides of one store, with shared I/O, decoding threads and caches.

    Use it on one event loop (the one `start` runs on; the other methods start it if needed),
    and `close` it when done, or `async with PublishedStore(...) as store:`.
    """

    def __init__(
        self,
        store: Store | StoreSettings | str,
        settings: ReaderSettings | None = None,
        *,
        s3_endpoint: str | None = None,
        executor: cf.Executor | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(store, str):
            store = StoreSettings(store, endpoint_url=s3_endpoint)
        self.store = store if isinstance(store, Store) else Store(store)
        self.settings = settings or ReaderSettings()
        self._own_executor = executor is None
        self.executor = executor or cf.ThreadPoolExecutor(
            self.settings.threads, thread_name_prefix="wsi-published"
        )
        self.io = AsyncStore(self.store, self.executor)
        self.tiles: ByteLRU[Hashable, bytes] = ByteLRU(self.settings.tile_cache_bytes)
        """Stored tile bytes, keyed by slide, version, object and chunk."""
        self.indexes: ByteLRU[Hashable, np.ndarray] = ByteLRU(self.settings.index_cache_bytes)
        """Decoded shard indexes, keyed by slide, version and object."""
        self.etags: ByteLRU[Hashable, str] = ByteLRU(ETAG_CACHE_BYTES, size=lambda e: 64 + len(e))
        """On S3, the ETag of each object whose index was read, keyed as `indexes`: reads at
        offsets that index gave require it (`AsyncStore.get_range`'s `if_match`)."""
        self._opened: ByteLRU[str, _Opened] = ByteLRU(
            self.settings.slide_cache_entries, size=lambda _: 1
        )
        self._clock = clock
        self._inflight: dict[Hashable, asyncio.Task[Any]] = {}
        self._started = False
        self._published: set[str] = set()
        """Slides `slide_ids` found published and no manifest read has found unpublished
        since: listed again without a manifest check each (`Store.published_slides`)."""

    @property
    def url(self) -> str:
        return self.store.url

    async def start(self) -> None:
        if not self._started:
            await self.io.start()
            self._started = True

    async def close(self) -> None:
        await self.io.close()
        self._started = False
        if self._own_executor:
            self.executor.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> PublishedStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def run_in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking work (decoding, resampling) on the store's thread pool."""
        return await self.io.blocking(fn, *args)

    async def slide_ids(self) -> list[str]:
        """Ids of the published slides (those with a manifest). The store is listed each time;
        a manifest is looked for only in the folders not found published before: every listing
        and search of the service asks for this, and it cost one HEAD per slide of an S3 store
        (a stat locally) at every request. A slide unpublished since (its folder still there)
        is listed until a read of its manifest finds it gone (`versions`, `slide`), which the
        listings and searches make of every slide they describe within `recheck_seconds`."""
        await self.start()
        ids = await self.io.published(self._published)
        self._published = set(ids)
        return ids

    def _unpublished(self, slide_id: str) -> None:
        """A manifest read found `slide_id` unpublished: `slide_ids` looks again."""
        self._published.discard(slide_id)

    def reachable(self) -> bool:
        """Blocking: whether the store answers one small request (readiness probes;
        `Store.answers`)."""
        return self.io.reachable()

    def opened(self, slide_id: str) -> AsyncPublishedSlide | None:
        """The slide `slide_id` if it is open and was checked within `recheck_seconds` (or,
        with `recheck_in_background`, is being checked again off the request path), else None
        (then await `slide`): a busy service's requests without a coroutine. Call it on the
        event loop (a background re-check is a task on it)."""
        cached = self._opened.get(slide_id) if self._started else None
        if cached is None:
            return None
        if self._clock() - cached.checked < self.settings.recheck_seconds:
            return cached.slide
        if not self.settings.recheck_in_background:
            return None
        self._recheck_soon(SlideKeys(slide_id), cached.slide)  # an id it opened: valid
        return cached.slide

    async def slide(self, slide_id: str) -> AsyncPublishedSlide:
        """The published slide `slide_id` (SlideNotFound if unpublished). The same object while
        its manifest is unchanged (checked at most every `recheck_seconds`); a new one with a new
        `version` once the slide was published again."""
        cached = self._opened.get(slide_id) if self._started else None
        now = self._clock()
        if cached is not None and now - cached.checked < self.settings.recheck_seconds:
            return cached.slide  # every request of a busy service: only checked ids are held
        keys = SlideKeys(check_slide_id(slide_id))
        if not self._started:
            await self.start()
            cached = self._opened.get(slide_id)
            if cached is not None and now - cached.checked < self.settings.recheck_seconds:
                return cached.slide
        if cached is not None and self.settings.recheck_in_background:
            self._recheck_soon(keys, cached.slide)
            return cached.slide
        return await self._reopen(keys, cached)

    def changed(self, slide_id: str) -> None:
        """A read found an object of `slide_id` replaced (SlideChanged): the next `slide` call
        reads its manifest again, whatever `recheck_seconds` says."""
        self._opened.pop(slide_id)

    async def _reopen(self, keys: SlideKeys, cached: _Opened | None) -> AsyncPublishedSlide:
        """Read the slide's manifest and open it again if its version changed."""
        slide_id = keys.slide_id
        now = self._clock()
        try:
            data = await self._manifest_bytes(keys)
        except SlideNotFound:
            self._opened.pop(slide_id)
            if cached is not None:
                self.io.forget(cached.slide.version)  # its files may be gone: free their space
            raise
        version = layout.manifest_version(data)
        if cached is not None and cached.slide.version == version:
            slide = cached.slide
        else:
            slide = await self.once(("slide", slide_id, version), lambda: self._load(keys, data))
            if cached is not None:
                self.io.forget(cached.slide.version)
        self._opened.put(slide_id, _Opened(slide, now))
        return slide

    async def manifest(self, slide_id: str) -> tuple[Manifest, str]:
        """The manifest of the published slide `slide_id` and its version, whether or not
        `slide` can open it: what is known of a slide published without its Zarr view
        (`Manifest.zarr_view`), which `slide` refuses (UnsupportedSlide). SlideNotFound if
        unpublished, CorruptSlide when the manifest is malformed or names another slide."""
        await self.start()
        keys = SlideKeys(check_slide_id(slide_id))
        data = await self._manifest_bytes(keys)
        return _parsed_manifest(keys, data), layout.manifest_version(data)

    async def versions(self, slide_ids: Sequence[str]) -> dict[str, str | None]:
        """The version of each published slide as its manifest says now (None: unpublished),
        nothing parsed: what a listing compares with the version it described, instead of
        opening the slide again. A slide whose manifest could not be read is left out."""
        await self.start()
        keys = [SlideKeys(check_slide_id(i)).manifest for i in slide_ids]
        found: dict[str, str | None] = {}
        for slide_id, data in zip(slide_ids, await self.io.get_many(keys), strict=True):
            if isinstance(data, bytes):
                found[slide_id] = layout.manifest_version(data)
            elif isinstance(data, SlideNotFound):
                found[slide_id] = None
                self._unpublished(slide_id)
        return found

    async def _manifest_bytes(self, keys: SlideKeys) -> bytes:
        try:
            return await self.io.get(keys.manifest)
        except SlideNotFound as exc:
            self._unpublished(keys.slide_id)
            raise SlideNotFound(f"slide {keys.slide_id} is not published") from exc

    def _recheck_soon(self, keys: SlideKeys, opened: AsyncPublishedSlide) -> None:
        """Start the background re-read of a slide's manifest unless one is running."""
        key = ("recheck", keys.slide_id)
        if key in self._inflight:
            return

        async def recheck() -> None:
            current = self._opened.get(keys.slide_id)
            if current is None or current.slide is not opened:
                return  # opened again meanwhile, or evicted
            with contextlib.suppress(SlideNotFound):  # _reopen forgot it: the next call says so
                await self._reopen(keys, current)

        task = asyncio.ensure_future(recheck())
        self._inflight[key] = task
        task.add_done_callback(lambda t: self._finished(key, t))

    async def once(self, key: Hashable, make: Callable[[], Awaitable[T]]) -> T:
        """`await make()`, shared by every caller asking for the same `key` meanwhile (one
        index read for the many tiles of a level requested at once)."""
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(make())
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._finished(key, t))
        result: T = await asyncio.shield(task)
        return result

    def _finished(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here, so a failure no caller awaited is not logged

    async def _load(self, keys: SlideKeys, manifest_bytes: bytes) -> AsyncPublishedSlide:
        """Open the slide version whose manifest is `manifest_bytes`: its manifest and root
        attributes checked, its levels and associated images described from them."""
        manifest = _checked_manifest(keys, manifest_bytes)
        attributes = manifest.attributes or await self._root_attributes(keys)
        levels = _levels(keys, manifest, attributes)
        found = await asyncio.gather(
            *(self._associated(keys, manifest, a) for a in attributes.associated_images)
        )
        return AsyncPublishedSlide(
            self,
            manifest,
            layout.manifest_version(manifest_bytes),
            attributes,
            levels,
            {a.name: a for a in found},
        )

    async def _root_attributes(self, keys: SlideKeys) -> SlideAttributes:
        """The slide's attributes from its root `zarr.json`; CorruptSlide when they name
        another slide."""
        slide_id = keys.slide_id
        root = await self.io.get(keys.root_metadata)
        attributes = SlideAttributes.from_root_metadata(root, f"{slide_id}: root zarr.json")
        if attributes.slide_id != slide_id:
            raise CorruptSlide(f"the attributes of {slide_id} name slide {attributes.slide_id}")
        return attributes

    async def _associated(
        self, keys: SlideKeys, manifest: Manifest, entry: layout.AssociatedEntry
    ) -> PublishedAssociated:
        """An associated image: its codec is read from its array's metadata; a slide without
        its Zarr view has none, and only JPEG ones (its DICOM instances need them, and the
        archive tier recodes only a Zarr view's arrays)."""
        codec = layout.JPEG
        if manifest.zarr_view:
            meta_key = keys.array_metadata(entry.path)
            meta = layout.load_json(await self.io.get(meta_key), meta_key)
            codec = layout.codec_of_array(meta, meta_key)
        key = keys.shard(entry.path)
        return PublishedAssociated(
            entry.name,
            entry.width,
            entry.height,
            layout.served_codec(codec),
            key,
            _object_size(keys, manifest, key),
            _stored_codec(codec),
            entry.shows_label,
        )


def _parsed_manifest(keys: SlideKeys, manifest_bytes: bytes) -> Manifest:
    """The slide's manifest; CorruptSlide when it is malformed or names another slide."""
    slide_id = keys.slide_id
    try:
        manifest = Manifest.from_bytes(manifest_bytes)
    except CorruptSlide as exc:
        raise CorruptSlide(f"slide {slide_id}: {exc}") from exc
    if manifest.slide_id != slide_id:
        raise CorruptSlide(f"the manifest of {slide_id} names slide {manifest.slide_id}")
    return manifest


def _checked_manifest(keys: SlideKeys, manifest_bytes: bytes) -> Manifest:
    """The slide's manifest (`_parsed_manifest`); UnsupportedSlide when the slide was published
    without its Zarr view by a version that did not keep its attributes in the manifest
    (nothing describes its levels)."""
    manifest = _parsed_manifest(keys, manifest_bytes)
    if not manifest.servable:
        raise UnsupportedSlide(
            f"slide {keys.slide_id} was published without its Zarr view (--format dicom) by an "
            "earlier version, which kept no description of its levels: convert it again to "
            "serve it; `wsi export-dicom` writes its DICOM instances as they are"
        )
    return manifest


def _levels(
    keys: SlideKeys, manifest: Manifest, attributes: SlideAttributes
) -> tuple[PublishedLevel, ...]:
    """The pyramid's levels as the root attributes list them, with their shards' sizes."""
    levels = []
    for index, entry in enumerate(attributes.levels):
        key = keys.shard(entry.path)
        levels.append(
            PublishedLevel(
                index,
                entry.width,
                entry.height,
                entry.tile_width,
                entry.tile_height,
                entry.downsample,
                layout.served_codec(entry.codec),
                key,
                _object_size(keys, manifest, key),
                _stored_codec(entry.codec),
                fill=attributes.fill,
            )
        )
    return tuple(levels)


def _object_size(keys: SlideKeys, manifest: Manifest, key: str) -> int:
    """Bytes of the slide's object `key` (a key in the store), as its manifest records."""
    return manifest.object(keys.in_slide(key)).size


def _stored_codec(codec: layout.CodecId) -> layout.CodecId | None:
    """An image's `stored_codec`: set only when tiles are handed out in another codec."""
    return codec if layout.served_codec(codec) != codec else None


async def open_published_async(
    location: str,
    *,
    s3_endpoint: str | None = None,
    settings: ReaderSettings | None = None,
) -> AsyncPublishedSlide:
    """Open `DIR_OR_S3URL/<slide-id>` on a store of its own; close the slide to release it
    (`async with await open_published_async(...) as slide:`). To read many slides of one store,
    share one `PublishedStore` instead. The options are keywords only (as `open_published`'s)."""
    root, slide_id = split_slide_location(location)
    store = PublishedStore(StoreSettings(root, endpoint_url=s3_endpoint), settings)
    try:
        slide = await store.slide(slide_id)
    except BaseException:
        await store.close()
        raise
    slide.owns_store = True
    return slide
