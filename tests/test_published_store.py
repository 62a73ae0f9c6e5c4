"""The store of published slides a service keeps open (`PublishedStore`), and the reader's two
faces, on the slides `tests/helpers.py` converts (`store`, as in `tests/test_published.py`).

A slide published again is read again (and only when `recheck_seconds` have passed, once however
many requests arrive, in the background if asked); the blocking face works from worker threads and
refuses its own loop; the async face's tile and index caches stay within their byte budgets
(`ByteLRU`); and a slide converted into the SeaweedFS the session starts reads as the local one,
also through zarr-python.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
import zarr.storage

import wsi
from wsi import (
    InvalidArgument,
    PublishedStore,
    ReaderSettings,
    SlideNotFound,
    open_published,
    open_published_async,
)
from wsi.errors import CorruptSlide, SlideChanged
from wsi.published import layout
from wsi.published.cache import ByteLRU
from wsi.published.layout import SlideAttributes, SlideKeys

from .published_fixtures import ALL_ASSOCIATED, zarr_level
from .published_fixtures import CMU_SMALL_REGION as CMU
from .published_fixtures import generated_jpeg_tiff as _generated_fixture  # noqa: F401
from .published_fixtures import published_store as _store_fixture  # noqa: F401
from .s3server import SeaweedFS
from .s3server import seaweedfs as _seaweedfs_fixture  # noqa: F401


def republish_with_downsample(st: wsi.Store, slide_id: str, level: int, downsample: float) -> None:
    """Rewrite the attributes' downsample of one level and publish the slide again."""
    keys = SlideKeys(slide_id)
    raw = st.get(keys.root_metadata)
    attributes = SlideAttributes.from_root_metadata(raw, "root")
    levels = list(attributes.levels)
    levels[level] = dataclasses.replace(levels[level], downsample=downsample)
    doc = layout.root_metadata(dataclasses.replace(attributes, levels=tuple(levels)))
    data = layout.dump_json(doc)
    st.put(keys.root_metadata, data)
    manifest = st.manifest(slide_id)
    objects = dict(manifest.objects)
    objects[keys.in_slide(keys.root_metadata)] = layout.ObjectEntry(
        len(data), layout.crc32c_hex(data)
    )
    st.publish(slide_id, dataclasses.replace(manifest, objects=objects))


# -- republication and re-checks ------------------------------------------------------------------
def test_republication_and_downsample_read_not_assumed(
    store: dict[str, Any], tmp_path: Path
) -> None:
    """A slide whose metadata says level 1 is 2.5x: the reader reports 2.5 (nothing assumes 2^k),
    and opening the slide again after the change gives a new version."""
    sid = store["gen"]
    shutil.copytree(store["root"] / sid, tmp_path / sid)
    st = wsi.Store(wsi.StoreSettings(str(tmp_path)))

    async def main() -> None:
        async with PublishedStore(str(tmp_path)) as published:
            assert await published.slide_ids() == [sid]
            first = await published.slide(sid)
            assert await published.slide(sid) is first  # manifest unchanged: the same object
            assert first.levels[1].downsample == 2.0
            republish_with_downsample(st, sid, 1, 2.5)
            second = await published.slide(sid)
            assert second is not first and second.version != first.version
            assert second.levels[1].downsample == 2.5
            assert second.best_level(2.4).index == 0
            assert await published.slide(sid) is second
            # Pixels did not change, and tiles cached under the old version are not mixed in.
            assert await second.tile_bytes(1, 0, 0) == await first.tile_bytes(1, 0, 0)
            st.unpublish(sid)
            with pytest.raises(SlideNotFound):
                await published.slide(sid)

    asyncio.run(main())


def test_an_opened_slide_is_trusted_for_recheck_seconds(
    store: dict[str, Any], tmp_path: Path
) -> None:
    sid = store["gen"]
    shutil.copytree(store["root"] / sid, tmp_path / sid)
    st = wsi.Store(wsi.StoreSettings(str(tmp_path)))
    now = [100.0]
    settings = ReaderSettings(recheck_seconds=5.0)

    async def main() -> None:
        async with PublishedStore(st, settings, clock=lambda: now[0]) as published:
            first = await published.slide(sid)
            republish_with_downsample(st, sid, 2, 3.0)
            now[0] += 4.9
            assert await published.slide(sid) is first  # not read again yet
            now[0] += 0.2
            second = await published.slide(sid)
            assert second.version != first.version and second.levels[2].downsample == 3.0

    asyncio.run(main())


def test_a_busy_service_rechecks_in_the_background_once_at_a_time(
    store: dict[str, Any], tmp_path: Path
) -> None:
    """With `recheck_in_background`, requests after the re-check time get the opened slide at
    once, and however many arrive together, one manifest read runs (the stall of a service in
    which every open request re-read the manifest when the time expired)."""
    sid = store["gen"]
    shutil.copytree(store["root"] / sid, tmp_path / sid)
    st = wsi.Store(wsi.StoreSettings(str(tmp_path)))
    now = [100.0]
    settings = ReaderSettings(recheck_seconds=2.0, recheck_in_background=True)
    manifest_key = SlideKeys(sid).manifest

    async def main() -> None:
        async with PublishedStore(st, settings, clock=lambda: now[0]) as published:
            reads: list[str] = []
            real_get = published.io.get

            async def counting_get(key: str) -> bytes:
                if key == manifest_key:
                    reads.append(key)
                return await real_get(key)

            published.io.get = counting_get  # type: ignore[method-assign]
            first = await published.slide(sid)
            assert len(reads) == 1
            republish_with_downsample(st, sid, 2, 3.0)
            now[0] += 2.5
            answers = await asyncio.gather(*(published.slide(sid) for _ in range(50)))
            assert all(a is first for a in answers)  # nobody waited for the re-read
            while ("recheck", sid) in published._inflight:
                await asyncio.sleep(0)
            assert len(reads) == 2  # fifty requests, one re-read
            second = await published.slide(sid)
            assert second is not first and second.levels[2].downsample == 3.0
            assert len(reads) == 2  # the re-read's result is trusted for recheck_seconds
            st.unpublish(sid)
            now[0] += 2.5
            assert await published.slide(sid) is second  # the re-read runs behind this answer
            while ("recheck", sid) in published._inflight:
                await asyncio.sleep(0)
            with pytest.raises(SlideNotFound):
                await published.slide(sid)

    asyncio.run(main())


def test_an_open_slide_due_for_its_recheck_is_still_had_without_waiting(
    store: dict[str, Any], tmp_path: Path
) -> None:
    """`opened` (the requests answered without a coroutine: the service's express lane) gives
    an open slide whose re-check is due at once and starts the one background re-read, as
    `slide` does; it gave None, so the first request after every re-check time took the slow
    way (and every tile request of a slide opened more than `recheck_seconds` ago, until one
    awaited `slide`)."""
    sid = store["gen"]
    shutil.copytree(store["root"] / sid, tmp_path / sid)
    st = wsi.Store(wsi.StoreSettings(str(tmp_path)))
    now = [100.0]
    settings = ReaderSettings(recheck_seconds=2.0, recheck_in_background=True)

    async def main() -> None:
        async with PublishedStore(st, settings, clock=lambda: now[0]) as published:
            assert published.opened(sid) is None  # never opened
            first = await published.slide(sid)
            assert published.opened(sid) is first
            republish_with_downsample(st, sid, 2, 3.0)
            now[0] += 2.5
            assert published.opened(sid) is first  # at once, the re-read behind it
            assert ("recheck", sid) in published._inflight
            while ("recheck", sid) in published._inflight:
                await asyncio.sleep(0)
            second = published.opened(sid)
            assert second is not None and second is not first
            assert second.levels[2].downsample == 3.0

    asyncio.run(main())


# -- faces, caches, S3 ----------------------------------------------------------------------------
def test_sync_face_from_a_worker_thread_of_a_running_loop(store: dict[str, Any]) -> None:
    sid = store["gen"]
    location = f"{store['root']}/{sid}"
    expected = zarr_level(store["root"], sid, "1")[:64, :64]

    def blocking() -> np.ndarray:
        with open_published(location) as slide:
            return slide.region(1, 0, 0, 64, 64)

    async def main() -> tuple[np.ndarray, np.ndarray]:
        in_worker = await asyncio.get_running_loop().run_in_executor(None, blocking)
        on_loop_thread = blocking()  # blocks this loop for the call, but works
        return in_worker, on_loop_thread

    in_worker, on_loop_thread = asyncio.run(main())
    assert np.array_equal(in_worker, expected) and np.array_equal(on_loop_thread, expected)

    slide = open_published(location)
    loop_thread = slide._runner.thread
    assert loop_thread.is_alive()
    failure: list[BaseException] = []

    async def from_the_readers_own_loop() -> None:
        try:
            slide.tile(0, 0, 0)
        except RuntimeError as exc:
            failure.append(exc)

    asyncio.run_coroutine_threadsafe(from_the_readers_own_loop(), slide._runner.loop).result()
    assert failure and "async API" in str(failure[0])
    slide.close()
    slide.close()
    assert not loop_thread.is_alive()
    with pytest.raises(InvalidArgument, match="closed"):
        slide.tile(0, 0, 0)


def test_async_face_and_shared_caches_stay_within_budget(store: dict[str, Any]) -> None:
    sid = store["cmu"]
    settings = ReaderSettings(tile_cache_bytes=60_000, index_cache_bytes=2_000)

    async def main() -> None:
        async with PublishedStore(str(store["root"]), settings) as published:
            slide = await published.slide(sid)
            level = slide.levels[0]
            peak = 0
            sizes = []
            for row in range(level.rows):
                for col in range(level.cols):
                    sizes.append(len(await slide.tile_bytes(0, col, row)))
                    peak = max(peak, published.tiles.used)
                    assert published.tiles.used <= 60_000
                    assert published.indexes.used <= 2_000
            assert sum(sizes) > 10 * 60_000 and published.tiles.stats().evictions > 0
            assert 0 < peak <= 60_000
            hits = published.tiles.hits
            await slide.tile_bytes(0, level.cols - 1, level.rows - 1)  # the last one is cached
            assert published.tiles.hits == hits + 1
            # Many tiles of one level at once: all answered, within budget.
            tiles = await asyncio.gather(
                *(slide.tile(1, c, 0) for c in range(slide.levels[1].cols))
            )
            assert all(t.shape[0] == level.tile_height for t in tiles)
            assert published.tiles.used <= 60_000

        async with await open_published_async(f"{store['root']}/{sid}") as owned:
            assert (await owned.tile(owned.levels[-1].index, 0, 0)).shape[2] == 3

    asyncio.run(main())


def test_byte_lru_counts_bytes_of_any_value() -> None:
    cache: ByteLRU[tuple[str, int], object] = ByteLRU(1000)
    cache.put(("a", 1), b"x" * 400)
    cache.put(("b", 2), np.zeros((10, 10, 3), np.uint8))  # 300 bytes
    cache.put(("c", 3), bytearray(250))
    assert cache.used == 950 and len(cache) == 3
    assert cache.get(("a", 1)) is not None  # now the most recent
    cache.put(("d", 4), b"y" * 200)  # drops ("b", 2), the least recent
    assert ("b", 2) not in cache and cache.used == 850 and cache.evictions == 1
    cache.put(("e", 5), b"z" * 1001)  # larger than the budget: not kept
    assert ("e", 5) not in cache and cache.used <= 1000
    cache.put(("a", 1), b"short")  # replacing a value updates the count
    assert cache.used == 5 + 250 + 200
    assert cache.get(("zz", 0)) is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 3)
    counted: ByteLRU[str, str] = ByteLRU(2, size=lambda _: 1)
    for name in "xyz":
        counted.put(name, name)
    assert len(counted) == 2 and "x" not in counted
    with pytest.raises(TypeError):
        ByteLRU[str, object](10).put("k", object())


@pytest.mark.s3
def test_reading_from_s3_equals_the_local_store(
    seaweedfs: SeaweedFS, store: dict[str, Any]
) -> None:
    s3 = wsi.Store(
        wsi.StoreSettings(seaweedfs.url("published"), endpoint_url=seaweedfs.endpoint_url)
    )
    sid = wsi.convert_slide(CMU, s3, store["settings"]).slide_id
    assert sid == store["cmu"]
    location = f"{seaweedfs.url('published')}/{sid}"
    local = f"{store['root']}/{sid}"
    with (
        open_published(
            location, s3_endpoint=seaweedfs.endpoint_url, settings=ALL_ASSOCIATED
        ) as remote,
        open_published(local, settings=ALL_ASSOCIATED) as here,
    ):
        assert remote.version == here.version  # the same manifest bytes
        assert remote.levels == here.levels  # keys are relative to the store root
        for level in remote.levels:
            assert np.array_equal(
                remote.region(level.index, 0, 0, level.width, level.height),
                here.region(level.index, 0, 0, level.width, level.height),
            )
        assert remote.tile_bytes(0, 2, 3) == here.tile_bytes(0, 2, 3)
        assert remote.associated_bytes("macro") == here.associated_bytes("macro")
        zstore = zarr.storage.FsspecStore.from_url(
            f"{location}/slide.zarr",
            storage_options={"endpoint_url": seaweedfs.endpoint_url},
            read_only=True,
        )
        array = zarr.open_group(zstore, mode="r")["2"]
        assert isinstance(array, zarr.Array)
        level2 = np.asarray(array[:]).transpose(1, 2, 0)
        assert np.array_equal(remote.region(2, 0, 0, level2.shape[1], level2.shape[0]), level2)

    async def concurrently() -> None:
        async with PublishedStore(
            seaweedfs.url("published"), s3_endpoint=seaweedfs.endpoint_url
        ) as p:
            assert await p.slide_ids() == [sid]
            slide = await p.slide(sid)
            level = slide.levels[0]
            tiles = await asyncio.gather(
                *(slide.tile_bytes(0, c, r) for r in range(level.rows) for c in range(level.cols))
            )
            assert all(t[:2] == b"\xff\xd8" for t in tiles)

    asyncio.run(concurrently())


@pytest.mark.s3
def test_a_slide_published_again_on_s3_is_never_read_at_the_old_offsets(
    seaweedfs: SeaweedFS, store: dict[str, Any]
) -> None:
    """A new version replaces the objects under the same keys: a reader still holding the old
    version (its shard indexes cached) read the new objects at the old offsets, and gave other
    tiles' bytes, or other pixels, without an error. Reads at an index's offsets now require the
    object the index was read from (If-Match on its ETag): SlideChanged, and the store reads the
    manifest again."""
    url = seaweedfs.url(f"again-{uuid.uuid4().hex[:8]}")
    s3 = wsi.Store(wsi.StoreSettings(url, endpoint_url=seaweedfs.endpoint_url))
    sid = wsi.convert_slide(CMU, s3, store["settings"]).slide_id
    other = dataclasses.replace(
        store["settings"],
        pyramid=dataclasses.replace(store["settings"].pyramid, quality=60, reuse_levels=False),
    )
    settings = ReaderSettings(tile_cache_bytes=0, recheck_seconds=3600.0)

    async def main() -> None:
        async with PublishedStore(url, settings, s3_endpoint=seaweedfs.endpoint_url) as p:
            old = await p.slide(sid)
            for level in old.levels:  # every index read (and every ETag learnt)
                assert (await old.tile_bytes(level.index, 0, 0))[:2] == b"\xff\xd8"
            await asyncio.to_thread(wsi.convert_slide, CMU, s3, other)
            for level in old.levels:
                for col in range(level.cols):
                    with pytest.raises(SlideChanged):
                        await old.tile_bytes(level.index, col, level.rows - 1)
            new = await p.slide(sid)  # read again at once, whatever recheck_seconds says
            assert new.version != old.version
            assert (await new.tile_bytes(0, 0, 0))[:2] == b"\xff\xd8"
        # The same through obstore's client (what reads go through behind an HTTP proxy).
        client = s3.obstore_client()
        assert client is not None
        key = f"{sid}/probe"
        s3.put(key, b"first version " * 10)
        data, etag = await client.get_range_tagged_async(key, 0, 5)
        assert data == b"first" and etag is not None
        assert await client.get_range_async(key, 6, 13, etag) == b"version"
        s3.put(key, b"other bytes ! " * 10)
        with pytest.raises(SlideChanged):
            await client.get_range_async(key, 6, 13, etag)

    asyncio.run(main())


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_a_level_first_read_after_a_new_version_says_the_slide_changed(
    where: str, seaweedfs: SeaweedFS, store: dict[str, Any], tmp_path: Path
) -> None:
    """A reader holding a version whose slide was published again read the *new* object of a
    level it had not read yet: its index failed its CRC ("CRC32C mismatch"), or its range lay
    past the new object's end (S3: HTTP 416), which said the slide was damaged. It is
    SlideChanged now, as for a level read before, and the next open gets the new version; an
    object damaged in the version still published stays a CorruptSlide."""
    if where == "s3":
        url, endpoint = seaweedfs.url(f"first-{uuid.uuid4().hex[:8]}"), seaweedfs.endpoint_url
    else:
        url, endpoint = str(tmp_path / "store"), None
    target = wsi.Store(wsi.StoreSettings(url, endpoint_url=endpoint))
    sid = wsi.convert_slide(CMU, target, store["settings"]).slide_id
    other = dataclasses.replace(
        store["settings"],
        pyramid=dataclasses.replace(store["settings"].pyramid, quality=60, reuse_levels=False),
    )
    with wsi.open_published(f"{url}/{sid}", s3_endpoint=endpoint) as old:
        old.region(0, 0, 0, 64, 64)  # level 0 read; the others not yet
        wsi.convert_slide(CMU, target, other)
        for level in old.levels[1:]:
            with pytest.raises(SlideChanged, match="published again while it was read"):
                old.region(level.index, 0, 0, 64, 64)
    with wsi.open_published(f"{url}/{sid}", s3_endpoint=endpoint) as new:
        assert new.version != old.version
        assert new.region(2, 0, 0, 64, 64).shape == (64, 64, 3)
        key = new.levels[2].key
        data = bytearray(target.get(key))
        data[-5] ^= 0xFF  # the index's CRC, in the version still published
        target.put(key, bytes(data))
    with (
        wsi.open_published(f"{url}/{sid}", s3_endpoint=endpoint) as damaged,
        pytest.raises(CorruptSlide),
    ):
        damaged.region(2, 0, 0, 64, 64)
