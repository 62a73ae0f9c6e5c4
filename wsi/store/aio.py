"""Non-blocking reads of a `Store`: S3 objects through obstore's native coroutines, local files
from the page cache on the loop or else on a thread pool (`wsi.store.local_reads`). The event
loop never waits on a disk or a socket.

Single range reads of S3 objects (a tile, a shard index: what a cold tile waits on) are presigned
GETs that the loop sends and reads itself (`wsi.store.s3_loop`), without obstore's two thread
hops per request; whole objects and batches of ranges go through obstore's coroutines, which run
the requests on obstore's threads. In a process forked after obstore ran (see
`wsi.store.obstore_s3`) the reads go through an async s3fs client on the loop instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
from collections.abc import Callable, Container, Hashable, Sequence
from typing import Any, TypeVar

from wsi.errors import SlideNotFound, StoreError, WsiError
from wsi.store.local_reads import OPEN_FILES, OpenFiles, open_object, read_blocking
from wsi.store.objects import Store, store_failures
from wsi.store.obstore_s3 import ObstoreS3, check_spans
from wsi.store.s3_loop import S3RangeReader, on_loop_allowed

T = TypeVar("T")


class AsyncStore:
    """Reads of one `Store` for coroutines. `start` (on the loop that will use it) opens the S3
    client; `close` releases it (and a local store's open descriptors). Local stores need no
    `start`."""

    def __init__(self, store: Store, executor: cf.Executor, open_files: int = OPEN_FILES) -> None:
        self.store = store
        self.executor = executor
        self._obstore: ObstoreS3 | None = None
        self._ranges: S3RangeReader | None = None
        self._fs: Any = None
        self.files = OpenFiles(open_files)
        """Open descriptors of local objects read with a `version` (none on S3)."""

    async def start(self) -> None:
        if not self.store.settings.is_s3 or self._obstore is not None or self._fs is not None:
            return
        fast = self.store.obstore_client()
        if fast is not None:
            self._obstore = fast
            if on_loop_allowed():
                self._ranges = S3RangeReader(fast)
            return
        import s3fs

        # Our own instance: fsspec would otherwise hand every reader on this thread the same
        # client, and closing one reader would close the others' sessions.
        fs = s3fs.S3FileSystem(
            asynchronous=True, skip_instance_cache=True, **self.store.storage_options
        )
        await fs.set_session()
        self._fs = fs

    async def close(self) -> None:
        self.files.close()
        self._obstore = None
        ranges, self._ranges = self._ranges, None
        if ranges is not None:
            await ranges.close()
        fs, self._fs = self._fs, None
        if fs is not None:
            session = getattr(fs, "_s3", None)
            if session is not None:
                await session.close()

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call on the executor."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def get(self, key: str) -> bytes:
        if self._obstore is not None:
            self.store.path(key)  # validates the key
            return await self._obstore.get_async(key)
        if self._fs is None:
            return await self.blocking(self.store.get, key)
        try:
            return bytes(await self._fs._cat_file(self.store.path(key)))
        except FileNotFoundError as exc:
            raise SlideNotFound(f"no object {key}") from exc
        except store_failures() as exc:
            raise StoreError(f"cannot read {key}: {exc}") from exc

    async def get_many(self, keys: Sequence[str], concurrency: int = 32) -> list[bytes | WsiError]:
        """Whole objects, each or the error reading it (SlideNotFound when missing). A local
        store's are read in one call on the pool (a few microseconds each: one hand-off to a
        thread and back costs more than the read), an S3 store's `concurrency` at a time."""
        if not self.store.settings.is_s3:

            def read_all() -> list[bytes | WsiError]:
                found: list[bytes | WsiError] = []
                for key in keys:
                    try:
                        found.append(self.store.get(key))
                    except WsiError as exc:
                        found.append(exc)
                return found

            return await self.blocking(read_all)
        gate = asyncio.Semaphore(concurrency)

        async def one(key: str) -> bytes | WsiError:
            async with gate:
                try:
                    return await self.get(key)
                except WsiError as exc:
                    return exc

        return list(await asyncio.gather(*(one(k) for k in keys)))

    async def get_range(
        self,
        key: str,
        start: int,
        end: int,
        version: Hashable | None = None,
        if_match: str | None = None,
    ) -> bytes:
        """Bytes [start, end) of an object. `version` says the object is immutable as long as
        it is the same (a published slide's manifest version): a local one is then read
        through a descriptor kept open, from the page cache without leaving the loop (the
        version's own file, whatever replaced it since). `if_match`: the ETag `get_range_tagged`
        gave, which an S3 read then requires (SlideChanged when the object is another one since:
        republished under the same key); s3fs (a forked process) reads without it."""
        if self._ranges is not None:
            check_spans([(start, end)])
            if start == end:
                return b""
            self.store.path(key)  # validates the key
            return await self._ranges.get_range(key, start, end, if_match)
        if self._obstore is not None:
            self.store.path(key)
            return await self._obstore.get_range_async(key, start, end, if_match)
        if self._fs is None:
            if version is not None and not self.store.settings.is_s3:
                return await self._local_range(key, start, end, version)
            return await self.blocking(self.store.get_range, key, start, end)
        try:
            return bytes(await self._fs._cat_file(self.store.path(key), start=start, end=end))
        except FileNotFoundError as exc:
            raise SlideNotFound(f"no object {key}") from exc
        except store_failures() as exc:
            raise StoreError(f"cannot read {key}: {exc}") from exc

    @property
    def tagged(self) -> bool:
        """Whether reads give ETags and honour `if_match` (S3 through obstore)."""
        return self._ranges is not None or self._obstore is not None

    async def get_range_tagged(
        self, key: str, start: int, end: int, version: Hashable | None = None
    ) -> tuple[bytes, str | None]:
        """`get_range`, and on S3 the object's ETag (None elsewhere): what later reads of that
        version of it pass as `if_match`."""
        if self._ranges is not None and end > start:
            self.store.path(key)
            return await self._ranges.get_range_tagged(key, start, end)
        if self._obstore is not None and end > start:
            self.store.path(key)
            return await self._obstore.get_range_tagged_async(key, start, end)
        return await self.get_range(key, start, end, version), None

    async def _local_range(self, key: str, start: int, end: int, version: Hashable) -> bytes:
        length = end - start
        if length <= 0:
            return b""
        name = (key, version)
        files = self.files
        entry = files.get(name)
        if entry is None:
            fd = await self.blocking(open_object, self.store.path(key), key)
            entry = files.add(name, fd)
        data = files.read_now(entry, start, length)
        if data is not None:
            return data
        files.hold(entry)
        try:
            return await self.blocking(read_blocking, entry.fd, start, length, key)
        finally:
            files.release(entry)

    def get_range_now(self, key: str, start: int, end: int, version: Hashable) -> bytes | None:
        """Bytes [start, end) of an object of a published `version` when they can be had
        without waiting: a local object already open whose bytes are in the page cache. None
        otherwise (S3, a file not open yet, a page-cache miss): then await `get_range`. For
        callers that answer without a coroutine when they can (the service's express lane)."""
        if self._fs is not None or self._ranges is not None or self._obstore is not None:
            return None
        if self.store.settings.is_s3 or end <= start:
            return None
        entry = self.files.get((key, version))
        if entry is None:
            return None
        return self.files.read_now(entry, start, end - start)

    def forget(self, version: Hashable) -> None:
        """Close the descriptors kept for `version` (no longer the published one)."""
        self.files.forget(version)

    async def get_ranges(
        self, key: str, spans: Sequence[tuple[int, int]], version: Hashable | None = None
    ) -> list[bytes]:
        """Several [start, end) ranges of one object, fetched together (`version`: as for
        `get_range`)."""
        if self._obstore is not None:
            self.store.path(key)
            return await self._obstore.get_ranges_async(key, spans)
        if self._fs is None:
            if version is not None and not self.store.settings.is_s3:
                check_spans(spans)
                return [await self._local_range(key, s, e, version) for s, e in spans]
            return await self.blocking(self.store.get_ranges, key, spans)
        check_spans(spans)
        parts = await asyncio.gather(*(self.get_range(key, s, e) for s, e in spans))
        return list(parts)

    async def published(self, known: Container[str] = ()) -> list[str]:
        """Ids of the published slides (`Store.published_slides`: `known` ones not asked
        again)."""
        return await self.blocking(self.store.published_slides, known)

    def reachable(self) -> bool:
        """Blocking: `Store.answers`. Not on this store's executor: a store that hangs (a
        network mount, a silent endpoint) would hold a thread of the tile reads at each probe
        (the caller runs it where a hang costs one thread: `server.probes`)."""
        return self.store.answers()
