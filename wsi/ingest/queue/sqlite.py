"""`SQLiteJobQueue`: the single-host job queue (any number of processes sharing one SQLite file).

Re-exported by `wsi.ingest.queue`, whose docstring tells the whole story.
"""

from __future__ import annotations

import builtins
import os
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from wsi.errors import InvalidArgument
from wsi.ingest.queue.base import (
    _LIVE_STATES,
    _MAX_LIST,
    _MAX_WORKER,
    LOST_LEASE,
    LOST_WORKER,
    SCHEMA_VERSION,
    STORED_COLUMNS,
    Clock,
    Job,
    JobNotFound,
    JobQueue,
    JobQueueUnavailable,
    JobState,
    Lease,
    RetryPolicy,
    SourceFile,
    _check_error,
    _check_files,
    _check_job_id,
    _check_lease,
    _check_number,
    _check_options,
    _check_source,
    _check_text,
    _moved_away,
    _standing_states,
)
from wsi.store.objects import check_slide_id

_SCHEMA = f"""
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    slide_id TEXT,
    state TEXT NOT NULL CHECK (state IN ({", ".join(f"'{s.value}'" for s in JobState)})),
    progress REAL NOT NULL DEFAULT 0,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    started REAL,
    finished REAL,
    next_attempt_at REAL NOT NULL,
    worker TEXT,
    lease_until REAL,
    lease_seconds REAL,
    options TEXT NOT NULL DEFAULT '{{}}',
    files TEXT NOT NULL DEFAULT '[]',
    warning TEXT
);
CREATE INDEX jobs_by_state ON jobs (state, created);
CREATE INDEX jobs_by_created ON jobs (created);
CREATE INDEX jobs_by_slide ON jobs (slide_id) WHERE slide_id IS NOT NULL;
-- Belt and braces under submit's check: one live job per slide, whatever a future writer does.
CREATE UNIQUE INDEX jobs_live_slide ON jobs (slide_id)
    WHERE slide_id IS NOT NULL AND state IN ('queued', 'running');
PRAGMA user_version = {SCHEMA_VERSION};
"""

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "ALTER TABLE jobs ADD COLUMN files TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE jobs ADD COLUMN warning TEXT",
    ),
}
"""The statements that bring a jobs database of version N to N + 1. Each only adds columns with
defaults, so a job queued by an older version keeps working (it has no recorded files: its
source is never moved or deleted)."""

_BY_SLIDE = "CREATE INDEX IF NOT EXISTS jobs_by_slide ON jobs (slide_id) WHERE slide_id IS NOT NULL"
"""A slide's jobs, for `submit`'s look-up of its standing job (any state for a watcher's
report). Without it that look-up read every job in those states (`jobs_by_state`): a table of
100,000 jobs took 0.1 s a submission, and a restarted watcher, which reports every slide its
folders still hold, 17 minutes for 10,000 of them. Made when absent in any version-2 table (an
index changes no row: versions that do not know it read and write the file as before)."""

_CLAIMABLE = """
SELECT id FROM (
    SELECT * FROM (
        SELECT id, created, rowid AS n FROM jobs WHERE state = ? AND next_attempt_at <= ?
        ORDER BY created, rowid LIMIT 1
    )
    UNION ALL
    SELECT * FROM (
        SELECT id, created, rowid AS n FROM jobs WHERE state = ? AND lease_until < ?
        ORDER BY created, rowid LIMIT 1
    )
) ORDER BY created, n LIMIT 1
"""
"""The oldest job a worker may take: queued and due, or running with its lease run out. Each
state's first one in `jobs_by_state` order, then the older of the two: one `OR` over both
sorted every queued job at every claim (100,000 queued: 0.24 s a claim, holding the write
lock)."""

_LEASES = """
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until REAL NOT NULL
)
"""
"""Leases on things other than jobs (`JobQueue.hold_lease`). A table of its own, made when
absent in any version of the schema: versions that do not know it never touch it."""

# Only these constant column lists and WHERE clauses are formatted into SQL (hence the S608 noqa
# marks); every value is a bound parameter.
_COLUMNS = STORED_COLUMNS


def _job(row: tuple[Any, ...]) -> Job:
    return Job.from_row(row, JobState(row[3]))


class _Connection:
    """One thread's connection; a weak-referenceable holder so `close` can reach them all."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.pid = os.getpid()


_INHERITED: builtins.list[_Connection] = []
"""Connections a forked child inherited: never used (SQLite forbids it) and never closed there
(closing could disturb the parent's WAL), just kept alive."""


class SQLiteJobQueue(JobQueue):
    """Jobs in one SQLite file (WAL mode), shared by any number of processes on this host.

    Each thread gets its own connection. Every change is one `BEGIN IMMEDIATE` transaction: it
    takes SQLite's write lock before reading, so two processes claiming at once are serialized
    and never see the same job as free. Readers (`get`, `list`) never wait for writers in WAL mode.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Clock = time.time,
        retry: RetryPolicy | None = None,
        busy_timeout: float = 30.0,
    ) -> None:
        self.path = Path(path)
        self.clock = clock
        self.retry = retry or RetryPolicy()
        self.busy_timeout = _check_number("busy_timeout", busy_timeout, 0)
        self._local = threading.local()
        self._all: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False
        with self._transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    raise JobQueueUnavailable(f"{self.path} is not a jobs database")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            elif version > SCHEMA_VERSION:
                raise JobQueueUnavailable(
                    f"{self.path} has jobs schema {version}; this version reads up to "
                    f"{SCHEMA_VERSION}"
                )
            else:  # older: upgraded in this same transaction, so no process sees half of it
                for old in range(version, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[old]:
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute(_LEASES)
            conn.execute(_BY_SLIDE)

    # connections and transactions

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise JobQueueUnavailable(f"the job queue {self.path} is closed")
        holder: _Connection | None = getattr(self._local, "holder", None)
        if holder is not None and holder.pid != os.getpid():
            _INHERITED.append(holder)
            holder = None
        if holder is None:
            holder = _Connection(self._open())
            self._local.holder = holder
            with self._lock:
                self._all.add(holder)
        return holder.conn

    def _open(self) -> sqlite3.Connection:
        """Connect in WAL mode, waiting up to `busy_timeout` for other processes doing the same.

        Switching a new file to WAL takes an exclusive lock, and SQLite answers "database is
        locked" at once (its busy handler is not asked) to a process that opens the file while
        another one is switching it: roles started together (`wsi watch` and `wsi worker` on one
        fresh job table) would otherwise fail at random.
        """
        deadline = time.monotonic() + self.busy_timeout
        pause = 0.001
        while True:
            conn: sqlite3.Connection | None = None
            try:
                conn = sqlite3.connect(
                    self.path,
                    timeout=self.busy_timeout,
                    isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                    check_same_thread=False,  # used by its thread only; `close` may come from any
                )
                conn.execute("PRAGMA journal_mode = WAL")
                # A submitted job must survive a power cut: the scanner has moved on by then.
                conn.execute("PRAGMA synchronous = FULL")
                return conn
            except sqlite3.Error as exc:
                if conn is not None:
                    conn.close()
                busy = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY
                if not busy or time.monotonic() + pause > deadline:
                    raise JobQueueUnavailable(f"cannot open {self.path}: {exc}") from exc
                time.sleep(pause)
                pause = min(pause * 2, 0.05)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise JobQueueUnavailable(f"{self.path}: {exc}") from exc
        try:
            yield conn
        except sqlite3.Error as exc:
            conn.rollback()
            raise JobQueueUnavailable(f"{self.path}: {exc}") from exc
        except BaseException:
            conn.rollback()
            raise
        try:
            conn.commit()
        except sqlite3.Error as exc:
            conn.rollback()
            raise JobQueueUnavailable(f"{self.path}: {exc}") from exc

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> builtins.list[tuple[Any, ...]]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise JobQueueUnavailable(f"{self.path}: {exc}") from exc

    @staticmethod
    def _row(conn: sqlite3.Connection, job_id: str) -> Job:
        sql = f"SELECT {_COLUMNS} FROM jobs WHERE id = ?"  # noqa: S608 - constant columns
        row = conn.execute(sql, (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        return _job(row)

    def close(self) -> None:
        """Close every thread's connection; call once no thread uses the queue any more."""
        self._closed = True
        with self._lock:
            holders = builtins.list(self._all)
            self._all.clear()
        for holder in holders:
            if holder.pid == os.getpid():
                holder.conn.close()
        self._local = threading.local()

    # the queue

    def submit(
        self,
        source: str,
        slide_id: str | None = None,
        options: Mapping[str, Any] | None = None,
        files: tuple[SourceFile, ...] = (),
        *,
        watched: bool = False,
    ) -> Job:
        source = _check_source(source)
        if slide_id is not None:
            slide_id = check_slide_id(slide_id)
        options_json = _check_options(options)
        files_json = _check_files(files)
        with self._transaction() as conn:
            if slide_id is not None:
                states = _standing_states(watched)
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE slide_id = ? "  # noqa: S608
                    f"AND state IN ({', '.join('?' * len(states))}) "
                    "ORDER BY state NOT IN (?, ?), created DESC, rowid DESC LIMIT 1",
                    (slide_id, *states, *_LIVE_STATES),
                ).fetchone()
                if row is not None:
                    found = _job(row)
                    if not _moved_away(found, files):
                        return found
                    conn.execute(
                        "UPDATE jobs SET source = ?, files = ?, updated = ? WHERE id = ?",
                        (source, files_json, self.clock(), found.id),
                    )
                    return self._row(conn, found.id)
            now = self.clock()
            job_id = uuid.uuid4().hex
            conn.execute(
                "INSERT INTO jobs (id, source, slide_id, state, created, updated, "
                "next_attempt_at, options, files) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    source,
                    slide_id,
                    JobState.QUEUED,
                    now,
                    now,
                    now,
                    options_json,
                    files_json,
                ),
            )
            return self._row(conn, job_id)

    def claim(self, worker: str, lease_seconds: float) -> Job | None:
        worker = _check_text("worker", worker, _MAX_WORKER)
        lease = _check_number("lease_seconds", lease_seconds, 0)
        if lease <= 0:
            raise InvalidArgument("lease_seconds must be > 0")
        with self._transaction() as conn:
            now = self.clock()
            row = conn.execute(_CLAIMABLE, (JobState.QUEUED, now, JobState.RUNNING, now)).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET state = ?, worker = ?, lease_until = ?, lease_seconds = ?, "
                "attempts = attempts + 1, progress = 0, started = ?, updated = ? WHERE id = ?",
                (JobState.RUNNING, worker, now + lease, lease, now, now, row[0]),
            )
            return self._row(conn, row[0])

    def _holds(self, conn: sqlite3.Connection, job_id: str, worker: str) -> bool:
        row = conn.execute("SELECT state, worker FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        return bool(row[0] == JobState.RUNNING and row[1] == worker)

    def heartbeat(self, job_id: str, worker: str, progress: float) -> bool:
        job_id = _check_job_id(job_id)
        worker = _check_text("worker", worker, _MAX_WORKER)
        progress = _check_number("progress", progress, 0, 100)
        with self._transaction() as conn:
            if not self._holds(conn, job_id, worker):
                return False
            now = self.clock()
            conn.execute(
                "UPDATE jobs SET progress = ?, lease_until = ? + lease_seconds, updated = ? "
                "WHERE id = ?",
                (progress, now, now, job_id),
            )
            return True

    def complete(
        self,
        job_id: str,
        worker: str,
        slide_id: str,
        warning: str | None = None,
        *,
        cancelled_attempt: int | None = None,
    ) -> bool:
        job_id = _check_job_id(job_id)
        worker = _check_text("worker", worker, _MAX_WORKER)
        slide_id = check_slide_id(slide_id)
        if warning is not None:
            warning = _check_error(warning)
        with self._transaction() as conn:
            found = self._row(conn, job_id)
            late = self._cancelled_during(found.state, found.attempts, cancelled_attempt)
            if not (late or self._holds(conn, job_id, worker)):
                return False
            expected = found.slide_id
            if expected is not None and expected != slide_id:
                raise InvalidArgument(
                    f"job {job_id} was submitted for slide {expected}, not {slide_id}"
                )
            now = self.clock()
            conn.execute(
                "UPDATE jobs SET state = ?, slide_id = ?, progress = 100, error = NULL, "
                "warning = ?, worker = NULL, lease_until = NULL, finished = ?, updated = ? "
                "WHERE id = ?",
                (JobState.DONE, slide_id, warning, now, now, job_id),
            )
            return True

    def warn(self, job_id: str, warning: str) -> Job:
        job_id = _check_job_id(job_id)
        warning = _check_error(warning)
        with self._transaction() as conn:
            self._row(conn, job_id)
            conn.execute(
                "UPDATE jobs SET warning = ?, updated = ? WHERE id = ?",
                (warning, self.clock(), job_id),
            )
            return self._row(conn, job_id)

    def fail(self, job_id: str, worker: str, error: str, transient: bool) -> bool:
        job_id = _check_job_id(job_id)
        worker = _check_text("worker", worker, _MAX_WORKER)
        error = _check_error(error)
        with self._transaction() as conn:
            if not self._holds(conn, job_id, worker):
                return False
            attempts = self._row(conn, job_id).attempts
            now = self.clock()
            if transient and attempts < self.retry.max_attempts:
                conn.execute(
                    "UPDATE jobs SET state = ?, error = ?, worker = NULL, lease_until = NULL, "
                    "progress = 0, next_attempt_at = ?, updated = ? WHERE id = ?",
                    (JobState.QUEUED, error, now + self.retry.delay(attempts), now, job_id),
                )
            else:
                conn.execute(
                    "UPDATE jobs SET state = ?, error = ?, worker = NULL, lease_until = NULL, "
                    "finished = ?, updated = ? WHERE id = ?",
                    (JobState.FAILED, error, now, now, job_id),
                )
            return True

    def release(self, job_id: str, worker: str, reason: str, *, after: float = 0.0) -> bool:
        job_id = _check_job_id(job_id)
        worker = _check_text("worker", worker, _MAX_WORKER)
        reason = _check_error(reason)
        after = _check_number("after", after, 0, 86400 * 365)
        with self._transaction() as conn:
            if not self._holds(conn, job_id, worker):
                return False
            now = self.clock()
            conn.execute(
                "UPDATE jobs SET state = ?, error = ?, worker = NULL, lease_until = NULL, "
                "progress = 0, attempts = max(attempts - 1, 0), next_attempt_at = ?, "
                "updated = ? WHERE id = ?",
                (JobState.QUEUED, reason, now + after, now, job_id),
            )
            return True

    def purge(self, finished_before: float, keep: Collection[str] = ()) -> int:
        before = _check_number("finished_before", finished_before, 0)
        kept = frozenset(keep)
        with self._transaction() as conn:
            ended = conn.execute(
                "SELECT id FROM jobs WHERE state IN (?, ?, ?) AND finished < ?",
                (JobState.DONE, JobState.FAILED, JobState.CANCELLED, before),
            ).fetchall()
            doomed = [(job_id,) for (job_id,) in ended if job_id not in kept]
            conn.executemany("DELETE FROM jobs WHERE id = ?", doomed)
            return len(doomed)

    def cancel(self, job_id: str) -> Job:
        job_id = _check_job_id(job_id)
        with self._transaction() as conn:
            job = self._row(conn, job_id)
            if job.state.terminal:
                return job
            now = self.clock()
            conn.execute(
                "UPDATE jobs SET state = ?, worker = NULL, lease_until = NULL, finished = ?, "
                "updated = ? WHERE id = ?",
                (JobState.CANCELLED, now, now, job_id),
            )
            return self._row(conn, job_id)

    def get(self, job_id: str) -> Job:
        job_id = _check_job_id(job_id)
        sql = f"SELECT {_COLUMNS} FROM jobs WHERE id = ?"  # noqa: S608 - constant columns
        rows = self._read(sql, (job_id,))
        if not rows:
            raise JobNotFound(f"no job {job_id!r}")
        return _job(rows[0])

    def list(
        self, state: JobState | str | None = None, limit: int = 100, offset: int = 0
    ) -> builtins.list[Job]:
        for name, value, high in (("limit", limit, _MAX_LIST), ("offset", offset, 2**62)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
                raise InvalidArgument(f"{name} must be an integer in [0, {high}]")
        params: tuple[str, ...] = ()
        if state is None:
            where = ""
        else:
            try:
                state = JobState(state)
            except ValueError:
                raise InvalidArgument(
                    f"state must be one of {', '.join(s.value for s in JobState)}"
                ) from None
            where, params = "WHERE state = ?", (state.value,)
        rows = self._read(
            f"SELECT {_COLUMNS} FROM jobs {where} ORDER BY created DESC, rowid DESC "  # noqa: S608
            "LIMIT ? OFFSET ?",
            (*params, limit, offset),
        )
        return [_job(row) for row in rows]

    def counts(self) -> dict[JobState, int]:
        # Answered from the `jobs_by_state` index alone.
        found = dict.fromkeys(JobState, 0)
        for state, count in self._read("SELECT state, count(*) FROM jobs GROUP BY state"):
            found[JobState(state)] = int(count)
        return found

    def recover(self, now: float | None = None, gone: Callable[[str], bool] | None = None) -> int:
        if now is not None:
            now = _check_number("now", now, 0)
        with self._transaction() as conn:
            now = self.clock() if now is None else now
            running = conn.execute(
                "SELECT id, worker, lease_until FROM jobs WHERE state = ?", (JobState.RUNNING,)
            ).fetchall()
            lost = [
                (LOST_LEASE if expired else LOST_WORKER, job_id)
                for job_id, worker, until in running
                for expired in [until is not None and until < now]
                if expired or (gone is not None and worker is not None and gone(worker))
            ]
            conn.executemany(
                "UPDATE jobs SET state = ?, error = ?, worker = NULL, lease_until = NULL, "
                "progress = 0, next_attempt_at = ?, updated = ? WHERE id = ?",
                [(JobState.QUEUED, why, now, now, job_id) for why, job_id in lost],
            )
            return len(lost)

    # leases

    def hold_lease(
        self, name: str, holder: str, seconds: float, *, replacing: str | None = None
    ) -> bool:
        name, holder, seconds = _check_lease(name, holder, seconds)
        with self._transaction() as conn:
            now = self.clock()
            sql = "SELECT holder, until FROM leases WHERE name = ?"
            row = conn.execute(sql, (name,)).fetchone()
            if row is not None and row[0] not in (holder, replacing) and row[1] >= now:
                return False
            conn.execute(
                "INSERT INTO leases (name, holder, until) VALUES (?, ?, ?) ON CONFLICT (name) "
                "DO UPDATE SET holder = excluded.holder, until = excluded.until",
                (name, holder, now + seconds),
            )
            return True

    def drop_lease(self, name: str, holder: str) -> bool:
        name, holder, _ = _check_lease(name, holder)
        with self._transaction() as conn:
            cur = conn.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))
            return cur.rowcount > 0

    def lease(self, name: str) -> Lease | None:
        name, _, _ = _check_lease(name, "-")
        rows = self._read("SELECT holder, until FROM leases WHERE name = ?", (name,))
        return Lease(name, rows[0][0], rows[0][1]) if rows else None
