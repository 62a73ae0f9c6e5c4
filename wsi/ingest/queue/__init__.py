"""Conversion jobs: a durable queue that survives restarts and never assumes one owner.

Scanners drop slides into watched folders; each slide becomes a job here and a worker converts it.
Workers may run in many processes on many machines, so ownership of a job is a *lease*: `claim`
takes a job for `lease_seconds`, `heartbeat` renews it, and a job whose lease runs out (its worker
crashed, hung or lost the network) is simply claimable again. Nothing in this module keeps state in
memory that another process would need; every decision is made inside one database transaction.

`JobQueue` is the small interface a distributed backend implements later; `SQLiteJobQueue` is the
single-host implementation (any number of processes on one machine sharing `<data>/jobs.sqlite`).
SQLite's locking does not work over network file systems, so several machines need that other
backend, not a shared SQLite file.

The values and the interface live in `base`, the SQLite backend in `sqlite`;
import them from here.
"""

from wsi.ingest.queue.base import (
    SCHEMA_VERSION,
    Clock,
    Job,
    JobNotFound,
    JobQueue,
    JobQueueUnavailable,
    JobState,
    RetryPolicy,
    SourceFile,
    default_queue_path,
    worker_name,
)
from wsi.ingest.queue.sqlite import SQLiteJobQueue

__all__ = [
    "SCHEMA_VERSION",
    "Clock",
    "Job",
    "JobNotFound",
    "JobQueue",
    "JobQueueUnavailable",
    "JobState",
    "RetryPolicy",
    "SQLiteJobQueue",
    "SourceFile",
    "default_queue_path",
    "worker_name",
]
