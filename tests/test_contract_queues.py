"""The job queue contract on `SQLiteJobQueue` (one file shared by threads and processes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wsi.ingest.queue import JobQueue, SQLiteJobQueue

from .contracts.queues import JobQueueContract, QueueFactory, QueueSpec


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
