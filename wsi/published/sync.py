"""The blocking face of the published-slide reader, for scripts, notebooks and data loaders.

`open_published` starts one private event loop on a daemon thread and runs the async core there
(the way zarr-python's sync API wraps its async one), so it works from plain code, from worker
threads, and from a thread whose own event loop is running (that loop is then blocked for the
call, as any blocking call blocks it). Calling it from the reader's own loop thread would
deadlock and is refused.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine, Mapping
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

from wsi.errors import InvalidArgument
from wsi.model import SlideProperties
from wsi.published.layout import Manifest, SlideAttributes
from wsi.published.patches import PatchSettings
from wsi.published.slide import AsyncPublishedSlide
from wsi.published.store import open_published_async
from wsi.published.values import (
    PublishedAssociated,
    PublishedDicom,
    PublishedInstance,
    PublishedLevel,
    ReaderSettings,
)

T = TypeVar("T")


class _LoopThread:
    """One event loop running forever on its own daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="wsi-published-loop", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop and wait for its result (exceptions are raised here)."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("a blocking reader call on the reader's own loop: use the async API")
        if self.loop.is_closed():
            coro.close()
            raise InvalidArgument("the slide is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


_Opening = Callable[[], tuple[AsyncPublishedSlide, _LoopThread]]

_FORKED: list[object] = []
"""Readers inherited through fork: their loop thread does not exist in the child, so they are
neither used nor closed there (closing would wait for that thread for ever); kept referenced so
that collecting them runs no finaliser that expects it."""

_reopening = threading.Lock()


def _new_lock_in_child() -> None:
    """A lock held by another thread at the fork stays held in the child, whose copy of that
    thread never releases it."""
    global _reopening
    _reopening = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


class PublishedSlide:
    """A published slide with blocking methods: those of `AsyncPublishedSlide`, same arguments,
    same results. Close it (or use `with`) to stop its loop thread and release its store.

    A process forked from the one that opened it (a DataLoader's workers, when the slide was
    opened in a dataset's `__init__`) has no copy of its loop thread: there the first read
    opens the slide again, for that process (the version published then), as `PatchDataset`
    does. A read used to wait for the missing thread for ever."""

    def __init__(
        self, slide: AsyncPublishedSlide, runner: _LoopThread, reopen: _Opening | None = None
    ) -> None:
        self._slide = slide
        self._runner = runner
        self._reopen = reopen
        self._pid = os.getpid()
        self._closed = False

    def _here(self) -> tuple[AsyncPublishedSlide, _LoopThread]:
        """The slide and loop of this process, opened again in a forked child."""
        if self._pid == os.getpid():
            return self._slide, self._runner
        with _reopening:
            if self._pid != os.getpid():
                if self._closed or self._reopen is None:
                    raise InvalidArgument("the slide is closed")
                _FORKED.append((self._slide, self._runner))
                self._slide, self._runner = self._reopen()
                self._pid = os.getpid()
        return self._slide, self._runner

    @property
    def aio(self) -> AsyncPublishedSlide:
        """The async slide underneath (its methods must run on this slide's loop)."""
        return self._slide

    @property
    def slide_id(self) -> str:
        return self._slide.slide_id

    @property
    def version(self) -> str:
        """Changes whenever the slide is published again (the CRC32C of its manifest)."""
        return self._slide.version

    @property
    def properties(self) -> SlideProperties:
        return self._slide.properties

    @property
    def levels(self) -> tuple[PublishedLevel, ...]:
        return self._slide.levels

    @property
    def width(self) -> int:
        return self._slide.width

    @property
    def height(self) -> int:
        return self._slide.height

    @property
    def associated(self) -> Mapping[str, PublishedAssociated]:
        return self._slide.associated

    @property
    def associated_names(self) -> tuple[str, ...]:
        return self._slide.associated_names

    @property
    def dicom(self) -> PublishedDicom | None:
        return self._slide.dicom

    @property
    def manifest(self) -> Manifest:
        return self._slide.manifest

    @property
    def attributes(self) -> SlideAttributes:
        return self._slide.attributes

    def level(self, index: int) -> PublishedLevel:
        return self._slide.level(index)

    def best_level(self, downsample: float) -> PublishedLevel:
        return self._slide.best_level(downsample)

    def tile_bytes(self, level: int, col: int, row: int) -> bytes:
        slide, runner = self._here()
        return runner.run(slide.tile_bytes(level, col, row))

    def tile(self, level: int, col: int, row: int) -> np.ndarray:
        slide, runner = self._here()
        return runner.run(slide.tile(level, col, row))

    def region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        slide, runner = self._here()
        return runner.run(slide.region(level, x, y, width, height))

    def patches(
        self,
        level: int,
        coords: Any,
        size: int | tuple[int, int],
        settings: PatchSettings | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        slide, runner = self._here()
        return runner.run(slide.patches(level, coords, size, settings, out))

    def associated_bytes(self, name: str) -> bytes:
        slide, runner = self._here()
        return runner.run(slide.associated_bytes(name))

    def associated_image(self, name: str) -> np.ndarray:
        slide, runner = self._here()
        return runner.run(slide.associated_image(name))

    def frame_bytes(self, instance: PublishedInstance, number: int) -> bytes:
        slide, runner = self._here()
        return runner.run(slide.frame_bytes(instance, number))

    def frame_chunks(self, instance: PublishedInstance) -> np.ndarray:
        slide, runner = self._here()
        return runner.run(slide.frame_chunks(instance))

    def read_range(self, key: str, start: int, end: int) -> bytes:
        slide, runner = self._here()
        return runner.run(slide.read_range(key, start, end))

    def close(self) -> None:
        """Release the store and stop the loop thread (idempotent). In a forked child that has
        not read through it, only this process's handle is dropped: the parent's loop thread
        and store are the parent's."""
        self._closed = True
        if self._pid != os.getpid():
            _FORKED.append((self._slide, self._runner))
            return
        if not self._runner.loop.is_closed():
            try:
                self._runner.run(self._slide.close())
            finally:
                self._runner.stop()

    def __enter__(self) -> PublishedSlide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PublishedSlide {self.slide_id} version {self.version}>"


def open_published(
    location: str,
    *,
    s3_endpoint: str | None = None,
    settings: ReaderSettings | None = None,
) -> PublishedSlide:
    """Open `DIR_OR_S3URL/<slide-id>` for blocking reads: `with open_published(url) as slide:`.
    The options are keywords only: `open_published(url, ReaderSettings(...))` would take the
    settings for the endpoint."""

    def opening() -> tuple[AsyncPublishedSlide, _LoopThread]:
        runner = _LoopThread()
        try:
            slide = runner.run(
                open_published_async(location, s3_endpoint=s3_endpoint, settings=settings)
            )
        except BaseException:
            runner.stop()
            raise
        return slide, runner

    return PublishedSlide(*opening(), reopen=opening)
