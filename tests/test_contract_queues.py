"""The job queue contract on both backends: `SQLiteJobQueue` (one file shared by threads and
processes) and `PostgresJobQueue` (a real PostgreSQL started for the session, one fresh database
per test)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wsi.ingest.queue import JobQueue, SQLiteJobQueue, open_queue

from .contracts.queues import JobQueueContract, QueueFactory, QueueSpec
from .pgserver import PostgresServer, postgres  # noqa: F401 - the session fixture


class TestSQLiteJobQueue(JobQueueContract):
    @pytest.fixture
    def open_queue(self, tmp_path: Path) -> Iterator[QueueFactory]:
        opened: list[JobQueue] = []

        def open_(**kwargs: Any) -> JobQueue:
            q = SQLiteJobQueue(tmp_path / "jobs.sqlite", **kwargs)
            opened.append(q)
            return q

        yield open_
        for q in opened:
            q.close()

    @pytest.fixture
    def queue_spec(self, tmp_path: Path) -> QueueSpec:
        return QueueSpec("wsi.ingest.queue:SQLiteJobQueue", (str(tmp_path / "jobs.sqlite"),))


class TestPostgresJobQueue(JobQueueContract):
    @pytest.fixture
    def database(self, postgres: PostgresServer) -> Iterator[str]:  # noqa: F811
        url = postgres.database()
        yield url
        postgres.drop(url)

    @pytest.fixture
    def open_queue(self, database: str) -> Iterator[QueueFactory]:
        opened: list[JobQueue] = []

        def open_(**kwargs: Any) -> JobQueue:
            q = open_queue(database, **kwargs)
            opened.append(q)
            return q

        yield open_
        for q in opened:
            q.close()

    @pytest.fixture
    def queue_spec(self, database: str) -> QueueSpec:
        return QueueSpec("wsi.ingest.queue:open_queue", (database,))
