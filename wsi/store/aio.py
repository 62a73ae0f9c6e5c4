"""Non-blocking reads of a `Store`: S3 through one async s3fs client on the running event loop,
local files on a thread pool. The event loop never waits on a disk or a socket."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
from collections.abc import Callable
from typing import Any, TypeVar

from wsi.errors import SlideNotFound, StoreError
from wsi.store.objects import STORE_FAILURES, Store

T = TypeVar("T")


class AsyncStore:
    """Reads of one `Store` for coroutines. `start` (on the loop that will use it) opens the S3
    client; `close` releases it. Local stores need neither but accept both."""

    def __init__(self, store: Store, executor: cf.Executor) -> None:
        self.store = store
        self.executor = executor
        self._fs: Any = None

    async def start(self) -> None:
        if self.store.settings.is_s3 and self._fs is None:
            import s3fs

            # Our own instance: fsspec would otherwise hand every reader on this thread the same
            # client, and closing one reader would close the others' sessions.
            fs = s3fs.S3FileSystem(
                asynchronous=True, skip_instance_cache=True, **self.store.storage_options
            )
            await fs.set_session()
            self._fs = fs

    async def close(self) -> None:
        fs, self._fs = self._fs, None
        if fs is not None:
            session = getattr(fs, "_s3", None)
            if session is not None:
                await session.close()

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call on the executor."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def get(self, key: str) -> bytes:
        if self._fs is None:
            return await self.blocking(self.store.get, key)
        try:
            return bytes(await self._fs._cat_file(self.store.path(key)))
        except FileNotFoundError as exc:
            raise SlideNotFound(f"no object {key}") from exc
        except STORE_FAILURES as exc:
            raise StoreError(f"cannot read {key}: {exc}") from exc

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object."""
        if self._fs is None:
            return await self.blocking(self.store.get_range, key, start, end)
        try:
            return bytes(await self._fs._cat_file(self.store.path(key), start=start, end=end))
        except FileNotFoundError as exc:
            raise SlideNotFound(f"no object {key}") from exc
        except STORE_FAILURES as exc:
            raise StoreError(f"cannot read {key}: {exc}") from exc

    async def published(self) -> list[str]:
        """Ids of the published slides."""
        return await self.blocking(self.store.published_slides)

    async def reachable(self) -> bool:
        try:
            await self.blocking(self.store.children)
        except Exception:
            return False
        return True
