"""The listing's and QIDO-RS's index entries kept on local disk between starts.

Filling them means opening every slide of the store (~10 ms a slide: 20 s for 2,000 slides, per
serving process), which a restart, an upgrade or a serving process restarted after a crash
would otherwise pay again. Kept here, an entry costs one manifest version read at the first
refresh after a start, and its slide is opened again only when the version changed, as between
refreshes.

One SQLite file in the store's state folder (`IngestSettings.state_path`: private to the
service's user, as the job table beside it), shared by the processes of the service. Its entries
hold what the listings and searches show (names, cases, patient attributes): the same as the
store's own objects, no more. An entry is valid only for the code and settings that made it
(`fingerprint`): a file written by another version of the service, or with labels allowed, is
not read, and its entries are dropped at open. A file that cannot be made or read costs only the
time it would have saved: the indexes are then filled from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

log = logging.getLogger("server.index_file")
T = TypeVar("T")

NAME = "indexes.sqlite"
LOCK_NAME = "indexes.lock"
"""Beside `NAME`: held by the process filling the indexes at start (`IndexFile.filling`)."""
LOCK_POLL_SECONDS = 0.2
_LOCK_FLAGS = os.O_CREAT | os.O_RDWR | os.O_CLOEXEC
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    fingerprint TEXT NOT NULL,
    kind TEXT NOT NULL,
    slide_id TEXT NOT NULL,
    version TEXT NOT NULL,
    meta TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (fingerprint, kind, slide_id)
)
"""


@dataclass(frozen=True)
class SavedEntry:
    """One slide's entry of one index: its manifest version, small fields as JSON (`meta`) and
    its compressed document (`data`)."""

    slide_id: str
    version: str
    meta: str
    data: bytes


def code_fingerprint() -> str:
    """A digest of the service's own code (every module of `server` and `wsi`): entries made by
    other code may describe slides otherwise, so they are never read."""
    digest = hashlib.sha256()
    for package in ("server", "wsi"):
        root = Path(__file__).resolve().parent.parent / package
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


class IndexFile:
    """The entries of one service's indexes, by kind (`"listing"`, `"series"`). Blocking: call it
    off the event loop. Every failure to read or write is logged once and answered as an empty
    file: the indexes are then filled from the store."""

    def __init__(self, connection: sqlite3.Connection, fingerprint: str, folder: str) -> None:
        self._db = connection
        self._fingerprint = fingerprint
        self._folder = folder
        self._lock = threading.Lock()
        self._failed = False

    @contextlib.asynccontextmanager
    async def filling(self) -> AsyncIterator[None]:
        """Held (an exclusive `flock` of `LOCK_NAME` beside the file) while a process fills its
        indexes at start, awaited without blocking the event loop: the service's other
        processes, started at the same time, wait and then read what it kept, instead of each
        opening every slide of the store too (N processes took N times the CPU, on the same
        cores, to start). A lock that cannot be taken costs only that time (logged once)."""
        try:
            fd = os.open(os.path.join(self._folder, LOCK_NAME), _LOCK_FLAGS, 0o600)
        except OSError as exc:
            log.warning("the indexes' fill is not shared between processes: %s", exc)
            yield
            return
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(LOCK_POLL_SECONDS)
            yield
        finally:
            os.close(fd)  # and the lock with it

    @classmethod
    def open(cls, folder: str, fingerprint: str) -> IndexFile | None:
        """The file in `folder` (made, private, when missing), its entries of other fingerprints
        dropped; None (logged) when it cannot be made or read."""
        path = os.path.join(folder, NAME)
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            # Made private before SQLite writes anything to it, whatever the umask.
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
            db = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                # A removed slide's entry (its name, its patient's attributes) is overwritten,
                # not left in free pages (`save` also checkpoints the log it went through).
                db.execute("PRAGMA secure_delete=ON")
                db.execute(_SCHEMA)
                db.execute("DELETE FROM entries WHERE fingerprint != ?", (fingerprint,))
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except BaseException:
                db.close()
                raise
        except (OSError, sqlite3.Error) as exc:
            log.warning("indexes are not kept between starts: cannot use %s (%s)", path, exc)
            return None
        return cls(db, fingerprint, folder)

    def load(self, kind: str, parse: Callable[[SavedEntry], T]) -> dict[str, T]:
        """The entries of `kind` by slide id, each as `parse` makes it; one it refuses
        (`ValueError`, `TypeError`: a damaged file) is left out, and its slide read again."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT slide_id, version, meta, data FROM entries "
                    "WHERE fingerprint = ? AND kind = ?",
                    (self._fingerprint, kind),
                ).fetchall()
            except sqlite3.Error as exc:
                self._failure("read", exc)
                return {}
        found: dict[str, T] = {}
        refused = 0
        for slide_id, version, meta, data in rows:
            try:
                if not (isinstance(slide_id, str) and isinstance(version, str)):
                    raise TypeError("not text")
                if not (isinstance(meta, str) and isinstance(data, bytes)):
                    raise TypeError("not text and bytes")
                found[slide_id] = parse(SavedEntry(slide_id, version, meta, data))
            except (ValueError, TypeError) as exc:
                refused += 1
                error = exc
        if refused:
            what = f"{refused} {kind} entries kept between starts"
            log.warning("%s are unreadable, their slides read again: %s", what, error)
        return found

    def save(self, kind: str, changed: Sequence[SavedEntry], removed: Iterable[str]) -> None:
        """Entries made or changed since the last save, and slides no longer listed, in one
        transaction."""
        gone = [(self._fingerprint, kind, slide_id) for slide_id in removed]
        if not changed and not gone:
            return
        rows = [(self._fingerprint, kind, e.slide_id, e.version, e.meta, e.data) for e in changed]
        with self._lock:
            try:
                with self._db:
                    self._db.execute("BEGIN IMMEDIATE")
                    self._db.executemany(
                        "DELETE FROM entries WHERE fingerprint = ? AND kind = ? AND slide_id = ?",
                        gone,
                    )
                    self._db.executemany(
                        "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?)", rows
                    )
                # Replaced or removed entries leave the write-ahead log too.
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                self._failure("write", exc)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _failure(self, what: str, exc: sqlite3.Error) -> None:
        if not self._failed:
            self._failed = True
            log.warning("cannot %s the indexes kept between starts: %s", what, exc)


__all__ = ["LOCK_NAME", "NAME", "IndexFile", "SavedEntry", "code_fingerprint"]
