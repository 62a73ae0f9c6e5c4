"""The PostgreSQL job queue's tables, and how a row of them reads as a `Job`.

`PostgresJobQueue` (`postgres`) keeps a job as a row of procrastinate's `procrastinate_jobs`
(queue `QUEUE_NAME`, task `TASK_NAME`) joined to one row of our `wsi_jobs`; leases on things
other than jobs are rows of `wsi_leases`. This module owns what those tables are: their creation
(`create_schema`, once per database, serialized across processes, a newer schema refused), the
procrastinate functions the queue needs, the map between procrastinate's statuses and
`JobState`, and the one column list every query selects (`COLUMNS` from `JOINED`) with its
decoding (`job_from_row`). Where a query reads a column by position, the position is that of
`COLUMNS`.
"""

from __future__ import annotations

from typing import Any

import psycopg
from procrastinate.schema import SchemaManager

from wsi.ingest.queue.base import Job, JobQueueUnavailable, JobState

QUEUE_NAME = "wsi-convert"
TASK_NAME = "wsi.convert"
PG_SCHEMA_VERSION = 1
"""`wsi_jobs_schema.version` this code writes; a newer database is refused."""

STATE_OF: dict[str, JobState] = {
    "todo": JobState.QUEUED,
    "doing": JobState.RUNNING,
    "succeeded": JobState.DONE,
    "failed": JobState.FAILED,
    "cancelled": JobState.CANCELLED,  # cancelled while queued
    "aborted": JobState.CANCELLED,  # cancelled while running
    "aborting": JobState.CANCELLED,  # procrastinate < 3 only
}
STATUSES: dict[JobState, tuple[str, ...]] = {
    state: tuple(s for s, st in STATE_OF.items() if st is state) for state in JobState
}
ENDED = (*STATUSES[JobState.DONE], *STATUSES[JobState.FAILED], *STATUSES[JobState.CANCELLED])

_SCHEMA = f"""
CREATE TABLE wsi_jobs (
    id text PRIMARY KEY,
    job_id bigint NOT NULL UNIQUE REFERENCES procrastinate_jobs (id) ON DELETE CASCADE,
    source text NOT NULL,
    slide_id text,
    progress double precision NOT NULL DEFAULT 0,
    error text,
    warning text,
    attempts integer NOT NULL DEFAULT 0,
    created double precision NOT NULL,
    updated double precision NOT NULL,
    started double precision,
    finished double precision,
    next_attempt_at double precision NOT NULL,
    worker text,
    lease_until double precision,
    lease_seconds double precision,
    options text NOT NULL DEFAULT '{{}}',
    files text NOT NULL DEFAULT '[]'
);
CREATE INDEX wsi_jobs_by_created ON wsi_jobs (created, job_id);
CREATE INDEX wsi_jobs_by_slide ON wsi_jobs (slide_id) WHERE slide_id IS NOT NULL;
CREATE INDEX wsi_jobs_by_finished ON wsi_jobs (finished) WHERE finished IS NOT NULL;
CREATE TABLE wsi_jobs_schema (version integer NOT NULL);
INSERT INTO wsi_jobs_schema VALUES ({PG_SCHEMA_VERSION});
"""  # noqa: S608 - constants only

_LEASES = """
CREATE TABLE IF NOT EXISTS wsi_leases (
    name text PRIMARY KEY,
    holder text NOT NULL,
    until double precision NOT NULL
)
"""
"""Leases on things other than jobs (`JobQueue.hold_lease`): made when absent, whatever the
schema version (versions that do not know the table never touch it)."""

_PROCRASTINATE_FUNCTIONS = (
    "procrastinate_defer_jobs_v1(procrastinate_job_to_defer_v1[])",
    "procrastinate_finish_job_v1(bigint, procrastinate_job_status, boolean)",
    "procrastinate_cancel_job_v1(bigint, boolean, boolean)",
    "procrastinate_retry_job_v2(bigint, timestamp with time zone, integer, character varying, "
    "character varying)",
)
"""procrastinate's functions this module calls: a database with an older procrastinate schema
is refused at open (upgrade it with procrastinate's migrations)."""

_SETUP_LOCK = 0x77_73_69_6A_6F_62  # "wsijob": serializes schema creation across processes

# Only these constant column lists and clauses are formatted into SQL (hence the S608 noqa marks);
# every value is a bound parameter.
COLUMNS = (
    "w.id, w.source, w.slide_id, p.status::text, w.progress, w.error, w.attempts, w.created, "
    "w.updated, w.started, w.finished, w.next_attempt_at, w.worker, w.lease_until, w.options, "
    "w.files, w.warning, p.id, w.lease_seconds"
)
JOINED = "wsi_jobs w JOIN procrastinate_jobs p ON p.id = w.job_id"


def job_from_row(row: tuple[Any, ...]) -> Job:
    """The `Job` a row of `COLUMNS` describes (the wsi_jobs columns in `Job.from_row`'s
    order, the state from procrastinate's status, then procrastinate's id and the lease)."""
    return Job.from_row(row[:17], STATE_OF[row[3]])


def create_schema(cur: psycopg.Cursor[Any], label: str) -> None:
    """Create procrastinate's schema and ours where absent, refuse a newer one (in the caller's
    transaction; `label` names the database in messages, without its password)."""
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SETUP_LOCK,))
    cur.execute("SELECT to_regclass('procrastinate_jobs'), to_regclass('wsi_jobs')")
    row = cur.fetchone()
    assert row is not None
    if row[0] is None:
        cur.execute(SchemaManager.get_schema())
    if row[1] is None:
        cur.execute(_SCHEMA)
    else:
        cur.execute("SELECT max(version) FROM wsi_jobs_schema")
        version = (cur.fetchone() or (None,))[0]
        if version is None or version > PG_SCHEMA_VERSION:
            raise JobQueueUnavailable(
                f"job table {label} has jobs schema {version}; this version reads "
                f"up to {PG_SCHEMA_VERSION}"
            )
    cur.execute(_LEASES)
    for function in _PROCRASTINATE_FUNCTIONS:
        cur.execute("SELECT to_regprocedure(%s)", (function,))
        if (cur.fetchone() or (None,))[0] is None:
            raise JobQueueUnavailable(
                f"job table {label}: procrastinate's schema there lacks "
                f"{function.split('(')[0]} (apply procrastinate's migrations)"
            )
