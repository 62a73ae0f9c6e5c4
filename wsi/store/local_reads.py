"""Range reads of local published objects through a bounded cache of open descriptors, done on
the event loop when the bytes are in the page cache.

A published object never changes: re-publishing a slide writes new files (renamed into place)
and a new manifest, whose version differs (it holds every object's size and CRC32C). So an
open descriptor is keyed by (object key, manifest version): a reader of the new version opens
the new file, and a reader still holding the old version keeps reading the file it opened,
whose bytes match its shard indexes. Reads that name no version open the file each time.

Each read is first tried as `preadv(..., RWF_NOWAIT)` on the loop: the kernel copies the bytes
from the page cache or refuses at once (`BlockingIOError`) instead of waiting on the disk; only
then (or where the flag is unsupported) does the read go to the thread pool. A hot local range
read then costs a few microseconds instead of a thread hand-off (~15% of a WADO-RS frame's
server time) plus fsspec's open, seek, read and close.
"""

from __future__ import annotations

import errno
import os
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from wsi.errors import SlideNotFound, StoreError

OPEN_FILES = 256
"""Descriptors kept open per store and process (a slide's pyramid is ~10-20 objects); the
least recently read is closed past that."""

_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
"""What `preadv` says where a file system or kernel does not take RWF_NOWAIT."""


@dataclass(eq=False)
class OpenFile:
    """One open descriptor and how many reads on the thread pool are using it: an evicted
    descriptor is closed only once none is (its number could otherwise be reused by another
    open while a read still targets it)."""

    fd: int
    users: int = 0
    evicted: bool = False


class OpenFiles:
    """A bounded LRU of open descriptors of immutable objects (see the module docstring).
    Used from one event loop; reads on the pool hold their descriptor with `hold`/`release`."""

    def __init__(self, limit: int = OPEN_FILES) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._files: OrderedDict[Hashable, OpenFile] = OrderedDict()
        self.nowait = _NOWAIT is not None
        """Whether reads are tried on the loop first (off once the kernel refuses the flag)."""

    def __len__(self) -> int:
        return len(self._files)

    def get(self, name: Hashable) -> OpenFile | None:
        entry = self._files.get(name)
        if entry is not None:
            self._files.move_to_end(name)
        return entry

    def add(self, name: Hashable, fd: int) -> OpenFile:
        """Keep `fd` as `name`'s descriptor; when another open of `name` finished first, `fd`
        is closed and that one is kept."""
        entry = self._files.get(name)
        if entry is not None:
            os.close(fd)
            return entry
        entry = self._files[name] = OpenFile(fd)
        while len(self._files) > self.limit:
            _, old = self._files.popitem(last=False)
            old.evicted = True
            if old.users == 0:
                os.close(old.fd)
        return entry

    def hold(self, entry: OpenFile) -> None:
        entry.users += 1

    def release(self, entry: OpenFile) -> None:
        entry.users -= 1
        if entry.evicted and entry.users == 0:
            os.close(entry.fd)

    def forget(self, version: Hashable) -> None:
        """Close the descriptors opened for `version` (a slide published again or removed):
        their files may be deleted, and an open descriptor keeps a deleted file's space."""
        for name in [n for n in self._files if isinstance(n, tuple) and n[-1] == version]:
            entry = self._files.pop(name)
            entry.evicted = True
            if entry.users == 0:
                os.close(entry.fd)

    def close(self) -> None:
        for entry in self._files.values():
            entry.evicted = True
            if entry.users == 0:
                os.close(entry.fd)
        self._files.clear()

    def read_now(self, entry: OpenFile, start: int, length: int) -> bytes | None:
        """Bytes [start, start + length) if the page cache holds them all, else None (read
        them on the pool with `read_blocking`). Never waits on the disk."""
        if not self.nowait or _NOWAIT is None:
            return None
        buf = bytearray(length)
        try:
            got = os.preadv(entry.fd, [buf], start, _NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                self.nowait = False
                return None
            raise
        return bytes(buf) if got == length else None  # partly cached, or the end of the file


def open_object(path: str, key: str) -> int:
    """A read-only descriptor of a local object (blocking: the path lookup may hit the disk);
    the errors of `Store.get_range` for a missing or unreadable one."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise SlideNotFound(f"no object {key}") from exc
    except OSError as exc:
        raise StoreError(f"cannot read {key}: {exc}") from exc


def read_blocking(fd: int, start: int, length: int, key: str) -> bytes:
    """Bytes [start, start + length) of an open object, fewer at its end (blocking)."""
    parts = []
    try:
        while length > 0:
            part = os.pread(fd, length, start)
            if not part:
                break
            parts.append(part)
            start += len(part)
            length -= len(part)
    except OSError as exc:
        raise StoreError(f"cannot read {key}: {exc}") from exc
    return parts[0] if len(parts) == 1 else b"".join(parts)
