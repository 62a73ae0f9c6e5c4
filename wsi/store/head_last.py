"""Objects written head last: a DICOM level object starts with a header that describes the frames
actually stored, known only when the level is complete, yet its frames should be stored while
the level is encoded, not copied after (`open_head_last`).

On S3 part 1 is the head plus the first bytes of the body (held in memory: at least
`MIN_PART_BYTES`, so that part 1 is a valid part), parts 2..N are uploaded as the body grows, by
a few threads while the writer goes on, and at the end the last part (the rest and the tail) and
part 1 go up, and the upload is completed when the block ends. Numbered parts need botocore's API
(obstore numbers parts itself, in the order they are sent), so they go through the store's
botocore client (`Store.s3_api`), which also works in a process forked after obstore ran
(`wsi.store.parts`). On a local store the body goes straight into the object's file and the head
is inserted in front of it at the end (`_LocalHeadLast`).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import functools
import os
import sys
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import google_crc32c

from wsi.errors import StoreError, WsiError
from wsi.published.layout import StoredObject
from wsi.store.objects import Store, fsync_dir, make_dirs, new_temporary
from wsi.store.parts import MIN_PART_BYTES, ObjectParts, PartRef, copy_file, crc32c_combine

__all__ = ["HeadLastObject", "open_head_last"]


class HeadLastObject(ABC):
    """One object written as head + body + tail, the body first (`write`, in order), the head
    and the tail at the end (`finish`). It appears when its `open_head_last` block ends."""

    def __init__(self, store: Store, key: str) -> None:
        self.store = store
        self.key = key

    @abstractmethod
    def write(self, data: bytes) -> None:
        """Append to the body."""

    def write_parts(self, parts: Sequence[bytes]) -> None:
        """Append `parts` to the body, in order: `write` of their join, unless the object can
        take them as they are (a local file: one gathered write, no joined copy)."""
        self.write(b"".join(parts))

    @abstractmethod
    def finish(self, head: bytes, tail: bytes) -> StoredObject:
        """Give the head and the tail: the object's size and CRC32C, as it will appear."""

    @abstractmethod
    def complete(self) -> None:
        """Make the finished object appear whole (at the end of the block)."""

    @abstractmethod
    def abort(self) -> None:
        """Discard everything written (an exception left the block, or it was never finished)."""


@contextlib.contextmanager
def open_head_last(store: Store, key: str) -> Iterator[HeadLastObject]:
    """A head-last object: completed when the block ends (after `finish`), discarded when it
    raises. On S3 the body streams out as numbered parts while it is written; locally it goes
    straight into the object's temporary file."""
    target: HeadLastObject = (
        _PartedUpload(store, key) if store.settings.is_s3 else _LocalHeadLast(store, key)
    )
    try:
        yield target
        target.complete()
    except BaseException:
        target.abort()
        raise


def _object_crc(head: bytes, body_crc: int, body_size: int, tail: bytes) -> int:
    return google_crc32c.extend(
        crc32c_combine(google_crc32c.value(head), body_crc, body_size), tail
    )


class _LocalHeadLast(HeadLastObject):
    """Locally: the body goes straight into the object's temporary file, and at `finish` the
    head is put in front of it. When the head fills whole blocks of the file system (the
    DICOM writer pads large objects' headers to 4 KiB, `wsi.writers.dicom.HEADER_BLOCK`) and
    the file system can insert blocks into a file (ext4 and XFS, with fallocate's
    FALLOC_FL_INSERT_RANGE), that moves no byte of the body: the base level object of a 40,000
    x 30,000 pyramid is ~180 MB, which took 0.3 s to copy behind its head, a quarter of the
    whole conversion when the tiles are copied as they are. Otherwise the body is copied
    behind the head into a second temporary file, in the kernel where it can (copy_file_range).
    Either way the object appears by a rename at `complete`, fsynced, as `Store.open_write`'s
    objects do, and the body is never held in memory.

    The body's pages are sent to the disk as it grows (`_WRITEBACK_BYTES` at a time, without
    waiting): left to the end, the insertion and the fsync waited for all of them at once, 0.13
    s of the 0.45 s that a byte copy of that pyramid spent converting (0.04 s now)."""

    def __init__(self, store: Store, key: str) -> None:
        super().__init__(store, key)
        self._path = store.path(key)
        self._tmp = ""
        self._fd = -1
        self._crc = 0
        self._size = 0
        self._sent = 0
        """Bytes of the body whose writeback has been started."""
        self._finished = False
        try:
            make_dirs(os.path.dirname(self._path))
            self._tmp, self._fd = new_temporary(self._path)
            self._block = os.fstatvfs(self._fd).f_bsize
        except OSError as exc:
            self.abort()
            raise StoreError(f"cannot write {key}: {exc}") from exc

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._crc = google_crc32c.extend(self._crc, data)
        self._size += len(data)
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            raise StoreError(f"cannot write {self.key}: {exc}") from exc
        self._start_writeback()

    def write_parts(self, parts: Sequence[bytes]) -> None:
        crc = self._crc
        for part in parts:
            crc = google_crc32c.extend(crc, part)
            self._size += len(part)
        self._crc = crc
        try:
            _writev_all(self._fd, parts)
        except OSError as exc:
            raise StoreError(f"cannot write {self.key}: {exc}") from exc
        self._start_writeback()

    def _start_writeback(self) -> None:
        """Start the disk writes of the body written since the last start, once that is
        `_WRITEBACK_BYTES`; a file system that cannot is left to write back at the end."""
        if self._size - self._sent >= _WRITEBACK_BYTES:
            _sync_file_range_write(self._fd, self._sent, self._size - self._sent)
            self._sent = self._size

    def finish(self, head: bytes, tail: bytes) -> StoredObject:
        try:
            if not (len(head) % self._block == 0 and _insert_blocks(self._fd, len(head))):
                self._copy_behind(len(head))
            _write_all_at(self._fd, head, 0)
            os.lseek(self._fd, len(head) + self._size, os.SEEK_SET)
            _write_all(self._fd, tail)
            os.fsync(self._fd)
        except OSError as exc:
            raise StoreError(f"cannot write {self.key}: {exc}") from exc
        self._finished = True
        crc = _object_crc(head, self._crc, self._size, tail)
        return StoredObject(self.key, len(head) + self._size + len(tail), f"{crc:08x}")

    def _copy_behind(self, offset: int) -> None:
        """Move the body to a new temporary file, `offset` bytes from its start."""
        tmp, fd = new_temporary(self._path)
        try:
            os.lseek(self._fd, 0, os.SEEK_SET)
            os.lseek(fd, offset, os.SEEK_SET)
            with (
                open(self._fd, "rb", closefd=False) as source,
                open(fd, "wb", closefd=False) as target,
            ):
                copy_file(source, target, self._size)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(self._fd)
        os.unlink(self._tmp)
        self._tmp, self._fd = tmp, fd

    def complete(self) -> None:
        if not self._finished:
            raise WsiError(f"{self.key} was never finished")
        try:
            os.replace(self._tmp, self._path)
            self._tmp = ""
            fsync_dir(os.path.dirname(self._path))
        except OSError as exc:
            raise StoreError(f"cannot write {self.key}: {exc}") from exc
        finally:
            self._close()

    def abort(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._tmp = ""


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _writev_all(fd: int, parts: Sequence[bytes]) -> None:
    """`parts` written in order, `_IOV_MAX` a call (a short write's rest part by part)."""
    for start in range(0, len(parts), _IOV_MAX):
        batch = parts[start : start + _IOV_MAX]
        done = os.writev(fd, batch)
        for part in batch:
            if done >= len(part):
                done -= len(part)
                continue
            _write_all(fd, memoryview(part)[done:])
            done = 0


def _write_all_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


_IOV_MAX = 1024
"""Buffers a `writev` takes (Linux's IOV_MAX)."""
_WRITEBACK_BYTES = 8 * 1024 * 1024
"""Body bytes written between two starts of their writeback (`_LocalHeadLast`)."""
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range_write(fd: int, offset: int, length: int) -> None:
    """Start writing bytes `offset` .. `offset + length` of the file to the disk, not waiting
    for them (sync_file_range(2) with SYNC_FILE_RANGE_WRITE). Only a hint: where it fails or
    does not exist, the pages are written back later (and the fsync reports any error)."""
    function = _sync_file_range()
    if function is not None:
        function(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range(2) (called without the GIL); None where there is none (not
    Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int

    def call(fd: int, offset: int, length: int, flags: int) -> int:
        return int(function(fd, offset, length, flags))

    return call


_FALLOC_FL_INSERT_RANGE = 0x20
_NO_INSERT = {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.ENOTTY, errno.EPERM}
"""fallocate's answers for a file system (or file) that cannot insert blocks."""


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's fallocate(2), which takes the modes `os.posix_fallocate` does not; None where
    there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    function.restype = ctypes.c_int

    def call(fd: int, mode: int, offset: int, length: int) -> int:
        if function(fd, mode, offset, length) == 0:
            return 0
        return ctypes.get_errno()

    return call


def _insert_blocks(fd: int, length: int) -> bool:
    """Insert `length` bytes (whole blocks) of zeros at the start of the file, shifting its
    data: True when done, False when the file system cannot (nothing changed)."""
    fallocate = _fallocate()
    if fallocate is None:
        return False
    failure = fallocate(fd, _FALLOC_FL_INSERT_RANGE, 0, length)
    if failure in _NO_INSERT:
        return False
    if failure:
        raise OSError(failure, os.strerror(failure))
    return True


class _PartedUpload(HeadLastObject):
    """On S3: part 1 is the head and the body's first `MIN_PART_BYTES` (or the store's part
    size if smaller), held here; the rest of the body goes up in parts 2, 3, ... of at least
    `StoreSettings.upload_part_bytes` (a part is sent once it holds that much) by at most
    `upload_concurrency` threads at a time; the last part is the rest and the tail. An object
    whose body never passes one part is sent with one PUT at `complete`.

    Memory, per object: the opening (< 5 MiB + one write), the parts in flight (at most
    `upload_concurrency`) and one more, either being filled or waiting for a slot (a write
    waits beyond that), each < one part + one write. With the defaults (8 MiB, 4) and the
    converter's writes (one row of tiles: ~3 MB at the base of a 40,000 pixel wide slide),
    at most 5 x 11 + 8 = 63 MB, whatever the level's size; levels are written side by side,
    so a slide holds that per level object past 5 MiB (in practice a few MB: loopback S3
    takes parts faster than the converter makes them)."""

    def __init__(self, store: Store, key: str) -> None:
        super().__init__(store, key)
        settings = store.settings
        self._part_bytes = settings.upload_part_bytes
        self._opening_bytes = min(MIN_PART_BYTES, settings.upload_part_bytes)
        self._concurrency = settings.upload_concurrency
        self._opening = bytearray()
        self._group = bytearray()
        self._crc = 0
        """CRC32C of the body so far."""
        self._size = 0
        self._parts: ObjectParts | None = None
        self._pool: cf.ThreadPoolExecutor | None = None
        self._pending: deque[cf.Future[PartRef]] = deque()
        self._sent: list[PartRef] = []
        self._next = 2
        self._whole: bytes | None = None
        """The object, when it goes up in one PUT."""
        self._finished = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._crc = google_crc32c.extend(self._crc, data)
        self._size += len(data)
        if len(self._opening) < self._opening_bytes:
            self._opening += data
            return
        self._group += data
        if len(self._group) >= self._part_bytes:
            part, self._group = bytes(self._group), bytearray()
            self._send(self._next, part)
            self._next += 1

    def _send(self, number: int, data: bytes) -> None:
        """Upload part `number` on the pool, after waiting for a slot (and surfacing the error
        of any part that failed)."""
        if self._parts is None:
            self._parts = ObjectParts.begin(self.store, self.key, uuid.uuid4().hex)
            self._pool = cf.ThreadPoolExecutor(self._concurrency, thread_name_prefix="s3-part")
        assert self._pool is not None
        while self._pending and (
            self._pending[0].done() or len(self._pending) >= self._concurrency
        ):
            self._sent.append(self._pending.popleft().result())
        self._pending.append(self._pool.submit(self._parts.put, self.store, number, data))

    def finish(self, head: bytes, tail: bytes) -> StoredObject:
        size = len(head) + self._size + len(tail)
        crc = _object_crc(head, self._crc, self._size, tail)
        if self._parts is None:
            self._whole = b"".join((head, self._opening, self._group, tail))
        else:
            rest = bytes(self._group) + tail
            if rest:
                self._send(self._next, rest)
            self._send(1, head + bytes(self._opening))
        self._opening = self._group = bytearray()
        self._finished = True
        return StoredObject(self.key, size, f"{crc:08x}")

    def complete(self) -> None:
        if not self._finished:
            raise WsiError(f"{self.key} was never finished")
        if self._parts is None:
            assert self._whole is not None
            self.store.put(self.key, self._whole)
            self._whole = None
            return
        while self._pending:
            self._sent.append(self._pending.popleft().result())
        self._close_pool()
        self._parts.complete(self.store, sorted(self._sent, key=lambda p: p.number))

    def abort(self) -> None:
        self._close_pool()
        if self._parts is not None:
            self._parts.abort(self.store)
        self._whole = None

    def _close_pool(self) -> None:
        """Stop the pool: parts not started are dropped, parts being sent are waited for (so
        that none lands after the upload is aborted)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()
