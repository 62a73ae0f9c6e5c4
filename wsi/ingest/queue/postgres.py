"""`PostgresJobQueue`: the job queue on PostgreSQL, for workers and services on many machines.

Built on procrastinate's job table. A job is a row of `procrastinate_jobs` (queue `wsi-convert`,
task `wsi.convert`), created, retried, finished and cancelled through procrastinate's own SQL
functions, so its `status` is the job's state and procrastinate's machinery applies: the
`queueing_lock` index (one queued job per slide), the `lock` index (one running job per slide),
`scheduled_at` set by each retry, one `procrastinate_events` row per transition, a `NOTIFY` per
new job, its job manager's listing and cancelling, and its schema and migrations
(`procrastinate schema --apply` works on the same database). Beside it, `wsi_jobs` (one row
per job, deleted with it) keeps what our interface needs and procrastinate has not: our opaque
id, the source and its files, progress, the slide id found, error and warning, and the lease.
The tables, their creation and how a row reads as a `Job` are `pg_schema`'s; this module is
the queue's transactions.

The lease is ours, not procrastinate's stalled-worker detection: that one watches whole worker
processes registered in `procrastinate_workers` on the database's clock (`now()`), and requeues
every job of a worker silent for a while. Ours is per job, renewed by the heartbeat that also
carries progress, and follows the queue's injected clock, as do backoff (`next_attempt_at`) and
purge: every time is the caller's clock, passed as a parameter, never `now()`. For the same
reason jobs are claimed by our own `SELECT ... FOR UPDATE SKIP LOCKED` (the same update as
`procrastinate_fetch_job_v2`) rather than by that function, which compares `scheduled_at` with
`now()`; a retry's time is our `next_attempt_at`. Do not run procrastinate's own workers or
`retry_stalled_jobs` on the `wsi-convert` queue: they know neither our task nor our leases.

Every method is one transaction (READ COMMITTED, rows locked with `FOR UPDATE`: claimers skip
each other's rows, everyone else waits for them), run by `pg_connections.Database`: one
connection per thread, retried when PostgreSQL reports a deadlock or serialization failure, and
any database error (down, refused, wrong password, bad URL) turned into `JobQueueUnavailable`
with one line that names the database without its password.
"""

from __future__ import annotations

import builtins
import json
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import Any

import psycopg

from wsi.errors import InvalidArgument
from wsi.ingest.queue.base import (
    _LIVE_STATES,
    _MAX_LIST,
    _MAX_WORKER,
    LOST_LEASE,
    LOST_WORKER,
    Clock,
    Job,
    JobNotFound,
    JobQueue,
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
from wsi.ingest.queue.pg_connections import Database
from wsi.ingest.queue.pg_schema import (
    COLUMNS,
    ENDED,
    JOINED,
    QUEUE_NAME,
    STATE_OF,
    STATUSES,
    TASK_NAME,
    create_schema,
    job_from_row,
)
from wsi.store.objects import check_slide_id


class PostgresJobQueue(JobQueue):
    """Jobs in a PostgreSQL database shared by any number of processes on any number of hosts.

    `url` is a libpq URL (`postgresql://user:password@host:port/database`, query parameters such
    as `sslmode` or `options=-csearch_path%3Dwsi` allowed). The first open creates procrastinate's
    schema and ours when absent, in one transaction; that needs the right to create tables there.
    """

    def __init__(
        self,
        url: str,
        *,
        clock: Clock = time.time,
        retry: RetryPolicy | None = None,
        connect_timeout: float = 10.0,
        lock_timeout: float = 30.0,
    ) -> None:
        if not isinstance(url, str) or not url:
            raise InvalidArgument("the job table's URL must be a non-empty string")
        self.clock = clock
        self.retry = retry or RetryPolicy()
        self._db = Database(
            url,
            _check_number("connect_timeout", connect_timeout, 1, 3600),
            _check_number("lock_timeout", lock_timeout, 0, 3600),
        )
        self.label = self._db.label
        """The URL as messages show it: no password, no query."""
        self._run = self._db.run
        try:
            self._run(lambda cur: create_schema(cur, self.label))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close every thread's connection; call once no thread uses the queue any more."""
        self._db.close()

    @staticmethod
    def _locked(cur: psycopg.Cursor[Any], job_id: str) -> tuple[Any, ...]:
        """The job's row, locked (ours and procrastinate's) until the transaction ends."""
        cur.execute(
            f"SELECT {COLUMNS} FROM {JOINED} WHERE w.id = %s FOR UPDATE OF w, p",  # noqa: S608
            (job_id,),
        )
        row = cur.fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        return row

    @staticmethod
    def _holds(row: tuple[Any, ...], worker: str) -> bool:
        return bool(STATE_OF[row[3]] is JobState.RUNNING and row[12] == worker)

    @staticmethod
    def _job(cur: psycopg.Cursor[Any], job_id: str) -> Job:
        cur.execute(f"SELECT {COLUMNS} FROM {JOINED} WHERE w.id = %s", (job_id,))  # noqa: S608
        row = cur.fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        return job_from_row(row)

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
        lock = None if slide_id is None else f"slide:{slide_id}"

        def step(cur: psycopg.Cursor[Any]) -> Job:
            if slide_id is not None:
                # Submitters of one slide wait for each other: the second sees the first's job.
                cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (lock,))
                cur.execute(
                    f"SELECT {COLUMNS} FROM {JOINED} WHERE w.slide_id = %s "  # noqa: S608
                    "AND p.status::text = ANY(%s) "
                    "ORDER BY NOT p.status::text = ANY(%s), w.created DESC, p.id DESC LIMIT 1",
                    (
                        slide_id,
                        [s for st in _standing_states(watched) for s in STATUSES[st]],
                        [s for st in _LIVE_STATES for s in STATUSES[st]],
                    ),
                )
                row = cur.fetchone()
                if row is not None:
                    found = job_from_row(row)
                    if not _moved_away(found, files):
                        return found
                    # Locked and read again: a worker may have claimed it meanwhile.
                    if not _moved_away(job_from_row(self._locked(cur, found.id)), files):
                        return self._job(cur, found.id)
                    cur.execute(
                        "UPDATE wsi_jobs SET source = %s, files = %s, updated = %s WHERE id = %s",
                        (source, files_json, self.clock(), found.id),
                    )
                    return self._job(cur, found.id)
            now = self.clock()
            job_id = uuid.uuid4().hex
            cur.execute(
                "SELECT unnest(procrastinate_defer_jobs_v1(ARRAY[ROW("
                "%s, %s, 0, %s, %s, %s::jsonb, NULL"
                ")]::procrastinate_job_to_defer_v1[]))",
                (QUEUE_NAME, TASK_NAME, lock, lock, json.dumps({"job": job_id})),
            )
            row = cur.fetchone()
            assert row is not None
            cur.execute(
                "INSERT INTO wsi_jobs (id, job_id, source, slide_id, created, updated, "
                "next_attempt_at, options, files) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (job_id, row[0], source, slide_id, now, now, now, options_json, files_json),
            )
            return self._job(cur, job_id)

        return self._run(step)

    def claim(self, worker: str, lease_seconds: float) -> Job | None:
        worker = _check_text("worker", worker, _MAX_WORKER)
        lease = _check_number("lease_seconds", lease_seconds, 0)
        if lease <= 0:
            raise InvalidArgument("lease_seconds must be > 0")

        def step(cur: psycopg.Cursor[Any]) -> Job | None:
            now = self.clock()
            # Oldest first by procrastinate's id (the database's own submit order, whichever
            # machine's clock stamped `created`); rows another claimer holds are skipped.
            cur.execute(
                f"SELECT w.id, p.id, p.status::text FROM {JOINED} "  # noqa: S608
                "WHERE p.status IN ('todo', 'doing') AND ("
                "(p.status = 'todo' AND w.next_attempt_at <= %s) "
                "OR (p.status = 'doing' AND w.lease_until < %s)"
                ") ORDER BY p.id LIMIT 1 FOR UPDATE OF w, p SKIP LOCKED",
                (now, now),
            )
            row = cur.fetchone()
            if row is None:
                return None
            job_id, pid, status = row
            if status == "todo":  # what procrastinate_fetch_job_v2 does, on our clock
                cur.execute("UPDATE procrastinate_jobs SET status = 'doing' WHERE id = %s", (pid,))
            cur.execute(
                "UPDATE wsi_jobs SET worker = %s, lease_until = %s, lease_seconds = %s, "
                "attempts = attempts + 1, progress = 0, started = %s, updated = %s WHERE id = %s",
                (worker, now + lease, lease, now, now, job_id),
            )
            return self._job(cur, job_id)

        return self._run(step)

    def heartbeat(self, job_id: str, worker: str, progress: float) -> bool:
        job_id = _check_job_id(job_id)
        worker = _check_text("worker", worker, _MAX_WORKER)
        progress = _check_number("progress", progress, 0, 100)

        def step(cur: psycopg.Cursor[Any]) -> bool:
            row = self._locked(cur, job_id)
            if not self._holds(row, worker):
                return False
            now = self.clock()
            cur.execute(
                "UPDATE wsi_jobs SET progress = %s, lease_until = %s, updated = %s WHERE id = %s",
                (progress, now + row[18], now, job_id),
            )
            return True

        return self._run(step)

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

        def step(cur: psycopg.Cursor[Any]) -> bool:
            row = self._locked(cur, job_id)
            late = self._cancelled_during(STATE_OF[row[3]], row[6], cancelled_attempt)
            if not (late or self._holds(row, worker)):
                return False
            expected = row[2]
            if expected is not None and expected != slide_id:
                raise InvalidArgument(
                    f"job {job_id} was submitted for slide {expected}, not {slide_id}"
                )
            now = self.clock()
            if late:  # procrastinate finishes only running jobs: from cancelled, set directly
                cur.execute(
                    "UPDATE procrastinate_jobs SET status = 'succeeded' WHERE id = %s", (row[17],)
                )
            else:
                cur.execute(
                    "SELECT procrastinate_finish_job_v1(%s, 'succeeded', false)", (row[17],)
                )
            cur.execute(
                "UPDATE wsi_jobs SET slide_id = %s, progress = 100, error = NULL, warning = %s, "
                "worker = NULL, lease_until = NULL, finished = %s, updated = %s WHERE id = %s",
                (slide_id, warning, now, now, job_id),
            )
            return True

        return self._run(step)

    def warn(self, job_id: str, warning: str) -> Job:
        job_id = _check_job_id(job_id)
        warning = _check_error(warning)

        def step(cur: psycopg.Cursor[Any]) -> Job:
            self._locked(cur, job_id)
            cur.execute(
                "UPDATE wsi_jobs SET warning = %s, updated = %s WHERE id = %s",
                (warning, self.clock(), job_id),
            )
            return self._job(cur, job_id)

        return self._run(step)

    def _requeue(
        self,
        cur: psycopg.Cursor[Any],
        row: tuple[Any, ...],
        at: float,
        sets: str,
        values: tuple[Any, ...],
    ) -> None:
        """Back to queued, runnable from `at` (procrastinate's retry: `scheduled_at` is set)."""
        cur.execute(
            "SELECT procrastinate_retry_job_v2(%s, to_timestamp(%s), NULL, NULL, NULL)",
            (row[17], at),
        )
        cur.execute(
            "UPDATE wsi_jobs SET worker = NULL, lease_until = NULL, progress = 0, "  # noqa: S608
            f"next_attempt_at = %s, {sets} WHERE id = %s",
            (at, *values, row[0]),
        )

    def fail(self, job_id: str, worker: str, error: str, transient: bool) -> bool:
        job_id = _check_job_id(job_id)
        worker = _check_text("worker", worker, _MAX_WORKER)
        error = _check_error(error)

        def step(cur: psycopg.Cursor[Any]) -> bool:
            row = self._locked(cur, job_id)
            if not self._holds(row, worker):
                return False
            attempts, now = row[6], self.clock()
            if transient and attempts < self.retry.max_attempts:
                at = now + self.retry.delay(attempts)
                self._requeue(cur, row, at, "error = %s, updated = %s", (error, now))
            else:
                cur.execute("SELECT procrastinate_finish_job_v1(%s, 'failed', false)", (row[17],))
                cur.execute(
                    "UPDATE wsi_jobs SET error = %s, worker = NULL, lease_until = NULL, "
                    "finished = %s, updated = %s WHERE id = %s",
                    (error, now, now, job_id),
                )
            return True

        return self._run(step)

    def release(self, job_id: str, worker: str, reason: str, *, after: float = 0.0) -> bool:
        job_id = _check_job_id(job_id)
        worker = _check_text("worker", worker, _MAX_WORKER)
        reason = _check_error(reason)
        after = _check_number("after", after, 0, 86400 * 365)

        def step(cur: psycopg.Cursor[Any]) -> bool:
            row = self._locked(cur, job_id)
            if not self._holds(row, worker):
                return False
            now = self.clock()
            sets = "error = %s, attempts = greatest(attempts - 1, 0), updated = %s"
            self._requeue(cur, row, now + after, sets, (reason, now))
            return True

        return self._run(step)

    def purge(self, finished_before: float, keep: Collection[str] = ()) -> int:
        before = _check_number("finished_before", finished_before, 0)
        kept = builtins.list(keep)

        def step(cur: psycopg.Cursor[Any]) -> int:
            # procrastinate's events go with their job (ON DELETE CASCADE), and so does ours.
            cur.execute(
                "DELETE FROM procrastinate_jobs p USING wsi_jobs w WHERE w.job_id = p.id "
                "AND p.status::text = ANY(%s) AND w.finished < %s AND NOT (w.id = ANY(%s))",
                (builtins.list(ENDED), before, kept),
            )
            return cur.rowcount

        return self._run(step)

    def cancel(self, job_id: str) -> Job:
        job_id = _check_job_id(job_id)

        def step(cur: psycopg.Cursor[Any]) -> Job:
            row = self._locked(cur, job_id)
            state = STATE_OF[row[3]]
            if state.terminal:
                return job_from_row(row)
            if state is JobState.QUEUED:
                cur.execute("SELECT procrastinate_cancel_job_v1(%s, false, false)", (row[17],))
            else:  # procrastinate's end state of a job stopped while running
                cur.execute("SELECT procrastinate_finish_job_v1(%s, 'aborted', false)", (row[17],))
            now = self.clock()
            cur.execute(
                "UPDATE wsi_jobs SET worker = NULL, lease_until = NULL, finished = %s, "
                "updated = %s WHERE id = %s",
                (now, now, job_id),
            )
            return self._job(cur, job_id)

        return self._run(step)

    def get(self, job_id: str) -> Job:
        job_id = _check_job_id(job_id)
        return self._run(lambda cur: self._job(cur, job_id))

    def list(
        self, state: JobState | str | None = None, limit: int = 100, offset: int = 0
    ) -> builtins.list[Job]:
        for name, value, high in (("limit", limit, _MAX_LIST), ("offset", offset, 2**62)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
                raise InvalidArgument(f"{name} must be an integer in [0, {high}]")
        statuses: builtins.list[str] | None = None
        if state is not None:
            try:
                statuses = builtins.list(STATUSES[JobState(state)])
            except ValueError:
                raise InvalidArgument(
                    f"state must be one of {', '.join(s.value for s in JobState)}"
                ) from None

        def step(cur: psycopg.Cursor[Any]) -> builtins.list[Job]:
            cur.execute(
                f"SELECT {COLUMNS} FROM {JOINED} "  # noqa: S608
                "WHERE (%s::text[] IS NULL OR p.status::text = ANY(%s::text[])) "
                "ORDER BY w.created DESC, p.id DESC LIMIT %s OFFSET %s",
                (statuses, statuses, limit, offset),
            )
            return [job_from_row(row) for row in cur.fetchall()]

        return self._run(step)

    def counts(self) -> dict[JobState, int]:
        def step(cur: psycopg.Cursor[Any]) -> dict[JobState, int]:
            # The jobs `list` reads (`JOINED`); several procrastinate statuses make one state.
            cur.execute(f"SELECT p.status::text, count(*) FROM {JOINED} GROUP BY p.status")  # noqa: S608
            found = dict.fromkeys(JobState, 0)
            for status, count in cur.fetchall():
                found[STATE_OF[status]] += int(count)
            return found

        return self._run(step)

    def recover(self, now: float | None = None, gone: Callable[[str], bool] | None = None) -> int:
        if now is not None:
            now = _check_number("now", now, 0)
        given = now

        def step(cur: psycopg.Cursor[Any]) -> int:
            at = self.clock() if given is None else given
            if gone is None:  # only the expired: those rows alone are locked
                cur.execute(
                    f"SELECT {COLUMNS} FROM {JOINED} WHERE p.status = 'doing' "  # noqa: S608
                    "AND w.lease_until < %s ORDER BY p.id FOR UPDATE OF w, p",
                    (at,),
                )
            else:
                cur.execute(
                    f"SELECT {COLUMNS} FROM {JOINED} WHERE p.status = 'doing' "  # noqa: S608
                    "ORDER BY p.id FOR UPDATE OF w, p"
                )
            lost = 0
            for row in cur.fetchall():
                expired = row[13] is not None and row[13] < at
                if not expired and not (gone is not None and row[12] and gone(row[12])):
                    continue
                why = LOST_LEASE if expired else LOST_WORKER
                self._requeue(cur, row, at, "error = %s, updated = %s", (why, at))
                lost += 1
            return lost

        return self._run(step)

    # leases

    def hold_lease(
        self, name: str, holder: str, seconds: float, *, replacing: str | None = None
    ) -> bool:
        name, holder, seconds = _check_lease(name, holder, seconds)

        def step(cur: psycopg.Cursor[Any]) -> bool:
            now = self.clock()
            # One statement: a free lease goes to exactly one of two racing callers (the other
            # waits for the row, then finds it renewed and updates nothing).
            cur.execute(
                "INSERT INTO wsi_leases AS l (name, holder, until) VALUES (%s, %s, %s) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until = excluded.until "
                "WHERE l.holder = excluded.holder OR l.holder = %s OR l.until < %s "
                "RETURNING holder",
                (name, holder, now + seconds, replacing, now),
            )
            return cur.fetchone() is not None

        return self._run(step)

    def drop_lease(self, name: str, holder: str) -> bool:
        name, holder, _ = _check_lease(name, holder)

        def step(cur: psycopg.Cursor[Any]) -> bool:
            cur.execute("DELETE FROM wsi_leases WHERE name = %s AND holder = %s", (name, holder))
            return cur.rowcount > 0

        return self._run(step)

    def lease(self, name: str) -> Lease | None:
        name, _, _ = _check_lease(name, "-")

        def step(cur: psycopg.Cursor[Any]) -> Lease | None:
            cur.execute("SELECT holder, until FROM wsi_leases WHERE name = %s", (name,))
            row = cur.fetchone()
            return Lease(name, row[0], row[1]) if row is not None else None

        return self._run(step)
