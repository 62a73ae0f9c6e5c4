"""Local range reads through kept-open descriptors (`wsi.store.local_reads`): a replaced object
is read fresh under its new version, the descriptors are bounded, a page-cache miss goes to the
thread pool, and a missing object is the same error as a plain read."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import ctypes
import dataclasses
import mmap
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import wsi
from wsi.errors import SlideNotFound
from wsi.published import layout
from wsi.published.layout import SlideKeys
from wsi.published.store import PublishedStore
from wsi.published.values import ReaderSettings
from wsi.store.aio import AsyncStore
from wsi.store.local_reads import OpenFiles

from .conftest import make_tiff


class CountingPool(cf.ThreadPoolExecutor):
    """A real thread pool that counts the calls handed to it."""

    def __init__(self) -> None:
        super().__init__(2)
        self.calls = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        self.calls += 1
        return super().submit(fn, *args, **kwargs)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def resident_pages(path: Path, start: int, stop: int) -> int:
    """Pages of bytes [start, stop) of `path` in the page cache (mincore(2) of a mapping, which
    reads nothing), counting pages still being read in."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = os.sysconf("SC_PAGE_SIZE")
    first = start // page * page
    length = stop - first
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, first)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vector = (ctypes.c_ubyte * (-(-length // page)))()
            assert libc.mincore(address, length, vector) == 0, os.strerror(ctypes.get_errno())
            return sum(v & 1 for v in vector)
        finally:
            libc.munmap(address, length)
    finally:
        os.close(fd)


def evict_from_page_cache(path: Path, start: int = 0, stop: int | None = None) -> None:
    """Drop `path` from the page cache until bytes [start, stop) are no longer in it: a page
    still being read in (the kernel's readahead after sequential reads) cannot be dropped
    until its read ends, so the eviction is repeated until mincore says it took (at most
    10 s: a machine whose disk never answers fails here, not later)."""
    stop = path.stat().st_size if stop is None else stop
    kind = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    if kind.stdout.strip() == "tmpfs":  # its pages are the file: nothing can drop them
        pytest.skip("the test's folder is on tmpfs, whose pages cannot leave the page cache")
    deadline = time.monotonic() + 10
    while True:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if resident_pages(path, start, stop) == 0:
            return
        assert time.monotonic() < deadline, f"{path} stays in the page cache"
        time.sleep(0.001)


def test_a_replaced_object_is_read_fresh_under_its_new_version(tmp_path: Path) -> None:
    st = wsi.Store(wsi.StoreSettings(str(tmp_path)))
    st.put("s/a", b"old bytes " * 100)

    async def main() -> None:
        io = AsyncStore(st, pool := CountingPool())
        try:
            assert await io.get_range("s/a", 4, 9, "v1") == b"bytes"
            st.put("s/a", b"NEW BYTES " * 100)  # a new file renamed into place
            assert await io.get_range("s/a", 4, 9, "v2") == b"BYTES"
            # The old version keeps reading the file it opened: the bytes its index describes.
            assert await io.get_range("s/a", 4, 9, "v1") == b"bytes"
            # Without a version, every read opens the object as it is now.
            assert await io.get_range("s/a", 4, 9) == b"BYTES"
            io.forget("v1")
            assert len(io.files) == 1
        finally:
            await io.close()
            pool.shutdown()

    asyncio.run(main())


def test_descriptors_are_bounded_and_closed(tmp_path: Path) -> None:
    st = wsi.Store(wsi.StoreSettings(str(tmp_path)))
    for i in range(20):
        st.put(f"s/o{i}", bytes([i]) * 64)

    async def main() -> None:
        io = AsyncStore(st, pool := CountingPool(), open_files=4)
        before = open_fds()  # with the event loop's own
        try:
            for _ in range(3):
                for i in range(20):
                    assert await io.get_range(f"s/o{i}", 10, 12, "v") == bytes([i]) * 2
                    assert len(io.files) <= 4
                    assert open_fds() <= before + 4
        finally:
            await io.close()
            pool.shutdown()
        assert open_fds() == before

    asyncio.run(main())


def readahead_window(path: Path) -> int:
    """The largest read the kernel starts at once for `path`'s device (its read-ahead, in
    bytes; 8 MB where sysfs does not say)."""
    st = os.stat(path)
    bdi = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
    try:
        return int(bdi.read_text()) << 10
    except (OSError, ValueError):
        return 8 << 20


def test_hot_reads_stay_on_the_loop_and_misses_go_to_the_pool(tmp_path: Path) -> None:
    st = wsi.Store(wsi.StoreSettings(str(tmp_path)))
    path = tmp_path / "s" / "big"
    # A miss is a range several read-ahead windows long: RWF_NOWAIT starts the read of the
    # first window and, on a fast disk, may find it done before it checks (a short range can
    # then be answered without a wait, which is right); a range it cannot finish in one
    # window is always refused or cut short, so it goes to the pool every time.
    miss = max(4 * readahead_window(tmp_path), 16 << 20)
    body = np.random.default_rng(1).integers(0, 256, miss + (1 << 20), dtype=np.uint8).tobytes()
    st.put("s/big", body)
    size = len(body)

    async def main() -> None:
        io = AsyncStore(st, pool := CountingPool())
        try:
            assert await io.get_range("s/big", 1000, 5000, "v") == body[1000:5000]
            opened = pool.calls  # the open (and the read if the page cache had dropped it)
            for start in range(0, 1 << 20, 64 << 10):
                assert (
                    await io.get_range("s/big", start, start + 4096, "v")
                    == body[start : start + 4096]
                )
            if io.files.nowait:
                assert pool.calls == opened  # every range was in the page cache
            evict_from_page_cache(path, 1 << 20, size)
            calls = pool.calls
            assert await io.get_range("s/big", 1 << 20, size, "v") == body[1 << 20 :]
            assert pool.calls == calls + 1  # not cached: read on the pool, the loop never waited
            # Past the end: what is there, as a plain read gives.
            assert await io.get_range("s/big", size - 10, size + 10, "v") == body[-10:]
            assert await io.get_range("s/big", 5, 5, "v") == b""
        finally:
            await io.close()
            pool.shutdown()

    asyncio.run(main())


def test_a_missing_object_is_the_same_error_as_a_plain_read(tmp_path: Path) -> None:
    st = wsi.Store(wsi.StoreSettings(str(tmp_path)))
    with pytest.raises(SlideNotFound) as plain:
        st.get_range("s/missing", 0, 10)

    async def main() -> None:
        io = AsyncStore(st, pool := CountingPool())
        try:
            with pytest.raises(SlideNotFound) as kept:
                await io.get_range("s/missing", 0, 10, "v")
            assert str(kept.value) == str(plain.value)
            assert len(io.files) == 0
        finally:
            await io.close()
            pool.shutdown()

    asyncio.run(main())


def test_an_evicted_descriptor_in_use_is_closed_when_its_read_ends(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    files = OpenFiles(1)
    first = files.add("a", os.open(tmp_path / "a", os.O_RDONLY))
    files.hold(first)  # a read on the pool
    files.add("b", os.open(tmp_path / "b", os.O_RDONLY))
    assert first.evicted and os.pread(first.fd, 1, 0) == b"a"  # still open for that read
    files.release(first)
    with pytest.raises(OSError):
        os.fstat(first.fd)
    files.close()


def test_a_republished_slide_is_read_from_its_new_files(tmp_path: Path) -> None:
    """End to end: a slide's level object rewritten (one tile's bytes changed, same size) and
    the slide published again: the new version reads the new bytes, the old one the old."""
    src = make_tiff(tmp_path / "src.tif", 600, 500, seed=3)
    st = wsi.Store(wsi.StoreSettings(str(tmp_path / "store")))
    keep = wsi.ConvertSettings(wsi.PyramidSettings(optimize_huffman=False, keep_background=True))
    sid = wsi.convert_slide(src, st, keep).slide_id

    async def main() -> None:
        settings = ReaderSettings(tile_cache_bytes=0)
        async with PublishedStore(st, settings) as published:
            first = await published.slide(sid)
            before = await first.tile_bytes(0, 0, 0)
            level = first.levels[0]
            raw = bytearray(st.get(level.key))
            start = raw.find(before)
            assert start >= 0
            middle = start + len(before) // 2
            raw[middle] ^= 0xFF
            keys = SlideKeys(sid)
            st.put(level.key, bytes(raw))
            manifest = st.manifest(sid)
            objects = dict(manifest.objects)
            objects[keys.in_slide(level.key)] = layout.ObjectEntry(
                len(raw), layout.crc32c_hex(bytes(raw))
            )
            st.publish(sid, dataclasses.replace(manifest, objects=objects))
            second = await published._reopen(keys, None)
            assert second.version != first.version
            after = await second.tile_bytes(0, 0, 0)
            assert len(after) == len(before) and after != before
            assert after[len(before) // 2] == before[len(before) // 2] ^ 0xFF
            assert await first.tile_bytes(0, 0, 0) == before

    asyncio.run(main())


def test_bytes_at_hand_are_had_without_waiting_and_equal_the_awaited_ones(
    tmp_path: Path,
) -> None:
    """`tile_bytes_now` and `frame_bytes_now` (what the service answers without a coroutine):
    None until the level's index is read and its file open, then every tile and frame of that
    level from the page cache, equal to what `tile_bytes` and `frame_bytes` give, blank glass
    included; bad coordinates and frame numbers raise as the awaited reads do."""
    src = make_tiff(tmp_path / "src.tif", 900, 700, seed=5)
    st = wsi.Store(wsi.StoreSettings(str(tmp_path / "store")))
    sid = wsi.convert_slide(src, st, wsi.ConvertSettings()).slide_id

    async def main() -> None:
        async with PublishedStore(st, ReaderSettings(tile_cache_bytes=0)) as published:
            slide = await published.slide(sid)
            level = slide.levels[0]
            assert slide.tile_bytes_now(0, 1, 1) is None  # no index read yet
            await slide.tile_bytes(0, 0, 0)
            tiles = [(c, r) for c in range(level.cols) for r in range(level.rows)]
            for col, row in tiles:
                now = slide.tile_bytes_now(0, col, row)
                assert now == await slide.tile_bytes(0, col, row), (col, row)
            with pytest.raises(wsi.errors.InvalidArgument):
                slide.tile_bytes_now(0, level.cols, 0)
            assert slide.dicom is not None
            inst = next(i for i in slide.dicom.instances if i.level == 0)
            assert slide.frame_bytes_now(inst, 1) is None  # its frame list not read yet
            await slide.frame_bytes(inst, 1)
            count = len(await slide.frame_chunks(inst))
            for number in range(1, count + 1):
                assert slide.frame_bytes_now(inst, number) == await slide.frame_bytes(inst, number)
            with pytest.raises(wsi.errors.InvalidArgument):
                slide.frame_bytes_now(inst, count + 1)

    asyncio.run(main())
