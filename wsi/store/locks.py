"""Per-slide lock files (flock): one conversion of a slide at a time on a machine."""

from __future__ import annotations

import fcntl
import os

from wsi.errors import SlideBusy


def locked_file(path: str, slide_id: str) -> int:
    """A descriptor of the lock file `path`, locked (flock) by this process. Its holder removes
    it on release, so a lock taken on a file no longer at `path` (unlinked between our open and
    our lock) is given up and taken again on the file there now."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise SlideBusy(
                f"slide {slide_id} is being converted by another process; try again later"
            ) from exc
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        held = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)
