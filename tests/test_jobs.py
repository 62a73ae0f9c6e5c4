"""`SQLiteJobQueue` beyond the job queue contract (`tests/contracts/queues.py`, run on it by
`test_contract_queues.py`): its file format, what it refuses to open, and the module's values."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from wsi.errors import InvalidArgument, StoreError
from wsi.ingest.queue import (
    SCHEMA_VERSION,
    JobQueueUnavailable,
    RetryPolicy,
    SQLiteJobQueue,
    default_queue_path,
    worker_name,
)


@pytest.fixture
def open_queue(tmp_path: Path) -> Iterator[Callable[..., SQLiteJobQueue]]:
    """Opens queues on tmp_path/jobs.sqlite, and closes them all afterwards."""
    opened: list[SQLiteJobQueue] = []

    def open_(**kwargs: Any) -> SQLiteJobQueue:
        q = SQLiteJobQueue(tmp_path / "jobs.sqlite", **kwargs)
        opened.append(q)
        return q

    yield open_
    for q in opened:
        q.close()


def test_retry_policy_delays() -> None:
    policy = RetryPolicy(max_attempts=10, backoff_unit=0.5, backoff_cap=10)
    assert [policy.delay(n) for n in range(6)] == [0.5, 1, 2, 4, 8, 10]
    assert RetryPolicy().delay(10_000) == 600.0  # no overflow


@pytest.mark.parametrize(
    "make",
    [
        lambda: RetryPolicy(max_attempts=0),
        lambda: RetryPolicy(max_attempts=1.5),  # type: ignore[arg-type]
        lambda: RetryPolicy(backoff_unit=-1),
        lambda: RetryPolicy(backoff_cap=float("inf")),
    ],
)
def test_bad_retry_policy_is_refused(make: Callable[[], RetryPolicy]) -> None:
    with pytest.raises(InvalidArgument):
        make()


def test_file_is_a_versioned_wal_database(
    open_queue: Callable[..., SQLiteJobQueue], tmp_path: Path
) -> None:
    q = open_queue()
    job = q.submit("/a.svs")
    q.close()
    with sqlite3.connect(tmp_path / "jobs.sqlite") as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT id, state FROM jobs").fetchall() == [(job.id, "queued")]
    raw.close()


def test_closed_queue_refuses_work(open_queue: Callable[..., SQLiteJobQueue]) -> None:
    q = open_queue()
    q.close()
    with pytest.raises(JobQueueUnavailable):
        q.submit("/a.svs")
    with open_queue() as reopened:
        assert reopened.list() == []


def test_refuses_newer_schema_and_foreign_files(tmp_path: Path) -> None:
    newer = tmp_path / "newer.sqlite"
    with sqlite3.connect(newer) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(JobQueueUnavailable, match="schema"):
        SQLiteJobQueue(newer)

    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as raw:
        raw.execute("CREATE TABLE t (x)")
    raw.close()
    with pytest.raises(JobQueueUnavailable, match="not a jobs database"):
        SQLiteJobQueue(foreign)

    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(JobQueueUnavailable) as info:
        SQLiteJobQueue(garbage)
    assert isinstance(info.value, StoreError)  # the service answers 503


def test_helpers(tmp_path: Path) -> None:
    assert default_queue_path(tmp_path) == tmp_path / "jobs.sqlite"
    assert default_queue_path(str(tmp_path)) == tmp_path / "jobs.sqlite"
    names = {worker_name() for _ in range(100)}
    assert len(names) == 100


def test_opening_waits_for_another_process_making_the_file(tmp_path: Path) -> None:
    """`wsi watch` and `wsi worker` started together both open a new job table. While one of
    them holds the new file's write lock, SQLite answers the other's switch to WAL with "database
    is locked" at once, without waiting: the queue must wait for the lock like any other."""
    path = tmp_path / "jobs.sqlite"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # what the first process holds while it sets the file up
    release = threading.Timer(0.3, other.commit)
    release.start()
    try:
        with SQLiteJobQueue(path) as q:
            assert q.list() == []
    finally:
        release.join()
        other.close()


def _fill_ended(path: Path, count: int) -> None:
    """`count` done jobs of other slides, written straight into the table (as a year of a busy
    scanner's leaves it: done jobs of slides kept in their watch folder are not purged)."""
    with sqlite3.connect(path) as raw:
        raw.executemany(
            "INSERT INTO jobs (id, source, slide_id, state, created, updated, next_attempt_at, "
            "finished) VALUES (?, ?, ?, 'done', ?, 1, 1, 1)",
            [(f"{i:032x}", f"/inbox/{i}.svs", f"e{i:023d}", i + 1.0) for i in range(count)],
        )
    raw.close()


def _steps_of_report(q: SQLiteJobQueue, slide_id: str) -> int:
    """SQLite virtual-machine steps (in hundreds) of a watcher's report of a slide that has a
    job: the work of the look-up, counted rather than timed."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn = q._conn()
    conn.set_progress_handler(count, 100)
    try:
        q.submit("/inbox/known.svs", slide_id, watched=True)
    finally:
        conn.set_progress_handler(None, 0)
    return steps


def test_a_report_does_not_read_every_ended_job(tmp_path: Path) -> None:
    """A watcher reports every slide its folders hold at each (re)start, and each report looks
    up the slide's jobs: with no index on the slide it read every job of the table (a table of
    100,000 took 0.1 s a report, 10,000 kept slides 17 minutes). A table made by the version
    before the index gets it when opened."""
    counts: dict[int, int] = {}
    for ended in (20, 4000):
        path = tmp_path / f"jobs-{ended}.sqlite"
        SQLiteJobQueue(path).close()
        with sqlite3.connect(path) as raw:  # as the version before the index made it
            raw.execute("DROP INDEX IF EXISTS jobs_by_slide")
        raw.close()
        _fill_ended(path, ended)
        q = SQLiteJobQueue(path)
        try:
            known = q.submit("/inbox/known.svs", "k0000000000000000000000a")
            counts[ended] = _steps_of_report(q, "k0000000000000000000000a")
            assert q.submit("/inbox/known.svs", "k0000000000000000000000a", watched=True) == known
        finally:
            q.close()
    assert counts[4000] <= counts[20] + 2, counts


def test_a_claim_does_not_sort_every_queued_job(tmp_path: Path) -> None:
    """A claim takes the oldest due job: one query over both claimable states sorted every
    queued job at every claim, under the write lock (100,000 queued: 0.24 s a claim)."""
    counts: dict[int, int] = {}
    for queued in (20, 4000):
        path = tmp_path / f"jobs-{queued}.sqlite"
        SQLiteJobQueue(path).close()
        with sqlite3.connect(path) as raw:
            raw.executemany(
                "INSERT INTO jobs (id, source, slide_id, state, created, updated, "
                "next_attempt_at) VALUES (?, ?, ?, 'queued', ?, 1, 1)",
                [(f"{i:032x}", f"/inbox/{i}.svs", f"q{i:023d}", i + 1.0) for i in range(queued)],
            )
        raw.close()
        q = SQLiteJobQueue(path)
        steps = 0

        def count() -> int:
            nonlocal steps
            steps += 1
            return 0

        try:
            q._conn().set_progress_handler(count, 100)
            job = q.claim("worker-1", 60)
            assert job is not None and job.id == f"{0:032x}"  # the oldest
            counts[queued] = steps
        finally:
            q.close()
    assert counts[4000] <= counts[20] + 2, counts
