"""`Database`: how `PostgresJobQueue` talks to PostgreSQL: one psycopg connection per thread,
one transaction per call, database errors as one readable line without the password.

Kept apart from the queue's SQL so that each reads on its own: this module knows nothing of jobs.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors

from wsi.ingest.queue.base import JobQueueUnavailable, redact_url, url_password

T = TypeVar("T")

RETRIES = 5
"""Attempts of a transaction that PostgreSQL aborted for a deadlock or serialization failure."""

SILENT_PEER: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
"""libpq settings that make a connection whose server went silent (a failover, a dropped NAT
entry) fail in about 30 s instead of the kernel's ~15 min: without them a worker's heartbeat or
claim blocks on the dead socket that long and the worker is frozen. Keepalives catch an idle
connection, `tcp_user_timeout` (ms) one with unacknowledged data in flight. A URL that sets any
of them itself keeps its own value."""


def one_line(exc: BaseException, secrets: tuple[str, ...]) -> str:
    """`exc`'s message on one line, with every secret blanked out."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def url_secrets(url: str) -> tuple[str, ...]:
    """The password of `url`, as written and as libpq decodes it (blanked from messages: libpq
    quotes parts of a URL it cannot parse)."""
    found = [url_password(url)]
    with contextlib.suppress(psycopg.Error):
        found.append(psycopg.conninfo.conninfo_to_dict(url).get("password"))  # type: ignore[arg-type]
    return tuple(p for p in found if isinstance(p, str) and p)


class _Connection:
    """One thread's connection, with the thread and process that opened it."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.pid = os.getpid()
        self.thread = threading.current_thread()


_INHERITED: builtins.list[_Connection] = []
"""Connections a forked child inherited: never used nor closed there (closing would end the
parent's session on the shared socket), just kept alive."""


class Database:
    """The database at `url`, reached by each thread through its own connection (opened on first
    use, replaced when it breaks, closed when its thread has ended or by `close`).

    `connect_timeout` bounds how long reaching the server may take, `lock_timeout` how long a
    statement waits for a row another transaction holds (seconds).
    """

    def __init__(self, url: str, connect_timeout: float, lock_timeout: float) -> None:
        self.url = url
        self.label = redact_url(url)
        """The URL as messages show it: no password, no query."""
        self.connect_timeout = connect_timeout
        self.lock_timeout = lock_timeout
        self._secrets = url_secrets(url)
        self._local = threading.local()
        self._all: builtins.list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def unavailable(self, exc: BaseException) -> JobQueueUnavailable:
        """`exc` as the queue reports it: one line naming the database, never its password."""
        return JobQueueUnavailable(f"job table {self.label}: {one_line(exc, self._secrets)}")

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            given = psycopg.conninfo.conninfo_to_dict(self.url)
            silent_peer: dict[str, Any] = {k: v for k, v in SILENT_PEER.items() if k not in given}
            conn = psycopg.connect(
                self.url,
                autocommit=True,  # transactions are opened explicitly, one per call of `run`
                connect_timeout=max(1, round(self.connect_timeout)),
                application_name="wsistore",
                **silent_peer,
            )
        except psycopg.Error as exc:
            raise self.unavailable(exc) from None
        except ValueError as exc:  # libpq refuses some malformed URLs before connecting
            raise self.unavailable(exc) from None
        try:
            conn.execute(f"SET lock_timeout = {round(self.lock_timeout * 1000)}")
        except psycopg.Error as exc:
            conn.close()
            raise self.unavailable(exc) from None
        return conn

    def _conn(self) -> psycopg.Connection[Any]:
        if self._closed:
            raise JobQueueUnavailable(f"the job queue {self.label} is closed")
        holder: _Connection | None = getattr(self._local, "holder", None)
        if holder is not None and holder.pid != os.getpid():
            _INHERITED.append(holder)
            holder = None
        if holder is not None and (holder.conn.closed or holder.conn.broken):
            self._drop()
            holder = None
        if holder is None:
            holder = _Connection(self._connect())
            self._local.holder = holder
            with self._lock:
                # Connections of threads that have ended are closed here: a service's thread
                # pools come and go, the queue's connections must not pile up.
                ended = [h for h in self._all if not h.thread.is_alive()]
                self._all = [h for h in self._all if h.thread.is_alive()]
                self._all.append(holder)
            for old in ended:
                if old.pid == os.getpid():
                    old.conn.close()
        return holder.conn

    def _drop(self) -> None:
        holder: _Connection | None = getattr(self._local, "holder", None)
        self._local.holder = None
        if holder is not None and holder.pid == os.getpid():
            holder.conn.close()
            with self._lock:
                self._all = [h for h in self._all if h is not holder]

    def run(self, step: Callable[[psycopg.Cursor[Any]], T]) -> T:
        """`step` in one transaction, re-run when PostgreSQL aborted it for a deadlock or a
        serialization failure, or when the connection turned out dead at its `BEGIN` (the
        server restarted since: nothing was done). Database errors become JobQueueUnavailable;
        the step's own (JobNotFound, InvalidArgument) pass through, the transaction rolled back."""
        for attempt in range(RETRIES):
            conn = self._conn()
            began = False
            try:
                with conn.transaction(), conn.cursor() as cur:
                    began = True
                    return step(cur)
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure) as exc:
                if attempt == RETRIES - 1:
                    raise self.unavailable(exc) from None
            except psycopg.OperationalError as exc:
                dead = conn.broken or conn.closed
                if dead:
                    self._drop()
                if not (dead and not began and attempt == 0):
                    raise self.unavailable(exc) from None
            except psycopg.Error as exc:
                if conn.broken:
                    self._drop()
                raise self.unavailable(exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close every thread's connection; call once no thread uses the database any more."""
        self._closed = True
        with self._lock:
            holders, self._all = self._all, []
        for holder in holders:
            if holder.pid == os.getpid():
                holder.conn.close()
        self._local = threading.local()
