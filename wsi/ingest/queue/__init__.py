"""Conversion jobs: a durable queue that survives restarts and never assumes one owner.

Scanners drop slides into watched folders; each slide becomes a job here and a worker converts it.
Workers may run in many processes on many machines, so ownership of a job is a *lease*: `claim`
takes a job for `lease_seconds`, `heartbeat` renews it, and a job whose lease runs out (its worker
crashed, hung or lost the network) is simply claimable again. Nothing in this module keeps state in
memory that another process would need; every decision is made inside one database transaction.

`JobQueue` is the small interface both backends implement. `SQLiteJobQueue` is the single-host
one (any number of processes on one machine sharing `<data>/jobs.sqlite`), the default. SQLite's
locking does not work over network file systems, so several machines share a PostgreSQL database
instead: `PostgresJobQueue` (in `postgres`, on procrastinate's job table). `open_queue` picks the
backend from what names the table: a `postgresql://` URL or a file path.

The values and the interface live in `base`, the backends in `sqlite` and `postgres`;
import them from here.
"""

import os
import time

from wsi.ingest.queue.base import (
    DATABASE_SCHEMES,
    SCHEMA_VERSION,
    Clock,
    Job,
    JobNotFound,
    JobQueue,
    JobQueueUnavailable,
    JobState,
    Lease,
    RetryPolicy,
    SourceFile,
    default_queue_path,
    is_database_url,
    redact_url,
    worker_name,
)
from wsi.ingest.queue.paths import path_from_stored, stored_path
from wsi.ingest.queue.sqlite import SQLiteJobQueue


def open_queue(
    target: str | os.PathLike[str], *, clock: Clock = time.time, retry: RetryPolicy | None = None
) -> JobQueue:
    """The job queue `target` names: a `postgresql://` URL (`PostgresJobQueue`, imported only
    then: psycopg and procrastinate stay out of processes that never use them) or the path of a
    SQLite file (`SQLiteJobQueue`). JobQueueUnavailable when it cannot be opened."""
    if is_database_url(target):
        from wsi.ingest.queue.postgres import PostgresJobQueue

        return PostgresJobQueue(str(target), clock=clock, retry=retry)
    return SQLiteJobQueue(target, clock=clock, retry=retry)


__all__ = [
    "DATABASE_SCHEMES",
    "SCHEMA_VERSION",
    "Clock",
    "Job",
    "JobNotFound",
    "JobQueue",
    "JobQueueUnavailable",
    "JobState",
    "Lease",
    "RetryPolicy",
    "SQLiteJobQueue",
    "SourceFile",
    "default_queue_path",
    "is_database_url",
    "open_queue",
    "path_from_stored",
    "redact_url",
    "stored_path",
    "worker_name",
]
