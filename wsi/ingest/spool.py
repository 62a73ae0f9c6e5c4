"""The spool's quota: the room the staged copies of S3 sources take on this host's disk.

A copy reserves its full size (`reserve_room`, a `RESERVED` file in its folder) under a lock
shared by every process using the spool, before it downloads; the spool's usage counts a
reserved folder as at least its reservation, so a copy still downloading holds the room it will
fill. A copy whose process died holds no room (`sweep_orphans`: folder names carry the process
id). Kept apart from the S3 side of staging (`wsi.ingest.staging`): the quota is a rule of the
local disk, which the service, the workers and the bucket copies share.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from wsi.errors import StoreError
from wsi.store.objects import FILE_MODE, make_dirs

ROOM_POLL_SECONDS = 2.0
"""How often a copy that waits for room in the spool looks again (and a waiting conversion
shows its supervisor it is alive: well inside any stall timeout)."""


class SpoolFull(StoreError):
    """The spool has no room for this copy now (its quota is taken by other copies). Transient:
    the copy is made once conversions that hold room end."""


def reserve_waiting(
    spool: Path, root: Path, total: int, quota: int, waiting: Callable[[], None] | None
) -> None:
    """`reserve_room`, or with `waiting`, call it and try again every ROOM_POLL_SECONDS."""
    while True:
        try:
            reserve_room(spool, root, total, quota)
            return
        except SpoolFull:
            if waiting is None:
                raise
            waiting()
            time.sleep(ROOM_POLL_SECONDS)


RESERVED = ".reserved-bytes"
"""In a folder that is being (or was) filled with a copy: the bytes it reserved."""
COPIES_FOLDER = "copies"
"""The service's copies of `s3://` job sources, in its spool (`server.bucket_copies`)."""


@contextlib.contextmanager
def _spool_lock(spool: Path) -> Iterator[None]:
    """Held while one process checks and reserves room: two copies never both take the last
    room. An advisory lock on the spool folder itself, which every process using the spool
    shares, and which leaves no file behind."""
    try:
        fd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise StoreError(f"cannot lock the spool {spool}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def spool_usage(spool: Path) -> int:
    """Bytes the copies in the spool take (the folders `copy_folder` makes and the service's
    `COPIES_FOLDER`), counting a folder with a reservation (`RESERVED`) as at least its
    reserved size: a copy that is still downloading holds the room it will fill. Nothing else
    in the spool counts, nor is looked into: the default spool is the system's temp folder,
    whose other files (other programs', other users') are not ours to count (nor to walk: there
    may be millions)."""
    try:
        entries = [e for e in os.scandir(spool) if _is_copy(e.name)]
    except OSError:
        return 0
    total = 0
    for entry in entries:
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                total += _usage(Path(entry.path))
    return total


def _is_copy(name: str) -> bool:
    return name.startswith(_TEMP_PREFIX) or name == COPIES_FOLDER


def _usage(folder: Path) -> int:
    total = 0
    reserved = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                total += _usage(Path(entry.path))
            elif entry.name == RESERVED:
                with open(entry.path) as f:
                    reserved = int(f.read().strip() or 0)
            elif entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
        except (OSError, ValueError):
            continue  # gone meanwhile, or a reservation being written
    return max(total, reserved)


def reserve_room(spool: Path, folder: Path, nbytes: int, limit: int) -> None:
    """Reserve `nbytes` in `spool` for the copy that `folder` (inside it, existing) will hold, or
    SpoolFull when the spool's usage would then exceed `limit` bytes. Copies left by dead
    processes are swept first: they hold no room."""
    make_dirs(str(spool))
    with _spool_lock(spool):
        sweep_orphans(spool)
        used = spool_usage(spool)
        if used + nbytes > limit:
            raise SpoolFull(
                f"the spool has no room for {nbytes} more bytes now ({used} of {limit} in use)"
            )
        try:
            fd = os.open(folder / RESERVED, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            with os.fdopen(fd, "w") as f:
                f.write(f"{nbytes}\n")
        except OSError as exc:
            raise StoreError(f"cannot reserve room in the spool {spool}: {exc}") from exc


_TEMP_PREFIX = "wsi-staged-"


def copy_folder(spool: Path) -> Path:
    """A new private folder in `spool` for one copy, named for this process so that
    `sweep_orphans` can tell when the copy's owner is gone (OSError when it cannot be made)."""
    return Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-", dir=spool)).resolve()


def sweep_orphans(spool_dir: str | os.PathLike[str]) -> int:
    """Delete the temporary copies `staged` left in `spool_dir` when its process was killed
    (the folder names carry the process id; a live process's copy is left alone). Returns how
    many went. Meant for a service or worker starting up on this host."""
    removed = 0
    spool = Path(spool_dir)
    if not spool.is_dir():
        return 0
    for entry in spool.iterdir():
        if not entry.name.startswith(_TEMP_PREFIX):
            continue
        pid_text = entry.name[len(_TEMP_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
