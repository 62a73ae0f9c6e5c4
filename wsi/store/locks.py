"""Per-slide lock files (flock): one conversion of a slide at a time on a machine."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile

from wsi.errors import SlideBusy, StoreError


def private_temp_folder(name: str) -> str:
    """`<temp folder>/<name>-<uid>`, made if missing (mode 0700), checked to be a folder of this
    user's that nobody else may write in: the temp folder is shared, and a folder another user
    made there first (open to all, or a symlink) would let them remove, replace or redirect
    the files put in it. StoreError when it is not such a folder."""
    path = os.path.join(tempfile.gettempdir(), f"{name}-{os.getuid()}")
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        info = os.lstat(path)
    except OSError as exc:
        raise StoreError(f"cannot make the folder {path}: {exc}") from exc
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise StoreError(
            f"{path} is not a folder of this user's that only it may write in: remove it"
        )
    return path


def locked_file(path: str, slide_id: str) -> int:
    """A descriptor of the lock file `path`, locked (flock) by this process. Its holder removes
    it on release, so a lock taken on a file no longer at `path` (unlinked between our open and
    our lock) is given up and taken again on the file there now."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:  # ELOOP: a symlink in the lock's place
            raise StoreError(f"cannot open the lock file {path}: {exc}") from exc
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
