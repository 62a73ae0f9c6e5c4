"""Ingest never loses a slide and never stops silently.

Every case runs the real parts: real folders (made immutable with `chattr +i` where a scanner
share would deny a delete: root cannot override that flag), the folder watcher, the SQLite job
queue, and `wsi convert` subprocesses publishing into a real store. Waits are for conditions,
each bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from server.api import jobs as jobs_api
from server.app import create_app
from server.keys import INGEST_TASKS
from server.settings import ServerSettings
from wsi.ingest.queue import Job, JobState, RetryPolicy, SQLiteJobQueue
from wsi.ingest.roles import feed
from wsi.ingest.settings import IngestSettings
from wsi.ingest.watcher import FolderWatcher
from wsi.ingest.worker import Worker
from wsi.slide_id import content_slide_id
from wsi.store.objects import Store, StoreSettings

from .conftest import sample
from .helpers import serving, wait_until

FIXTURES = sample("openslide-python-fixtures")
SMALL = FIXTURES / "small.svs"
REGION = sample("CMU-1-Small-Region.svs")


def put(src: Path, dest: Path) -> Path:
    """A writable copy of a sample (copyfile keeps no mode)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


@contextlib.contextmanager
def immutable(folder: Path) -> Iterator[None]:
    """`chattr +i`: nothing in `folder` can be renamed or deleted, by root either (what a
    scanner share that grants no delete right does to the service)."""
    subprocess.run(["chattr", "+i", str(folder)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def settings(tmp_path: Path, **values: object) -> IngestSettings:
    values.setdefault("quarantine_dir", str(tmp_path / "quarantine"))
    values.setdefault("done_dir", str(tmp_path / "done"))
    return IngestSettings(poll_seconds=0.1, **values)  # type: ignore[arg-type]


def ingest(
    inbox: Path,
    queue: SQLiteJobQueue,
    store: Path,
    ingest_settings: IngestSettings,
    settled: Callable[[list[Job]], bool],
    *,
    workers: int = 1,
    timeout: float = 90.0,
) -> list[Job]:
    """The folder watcher feeding `queue` and `workers` workers converting into `store`, as
    `wsi serve --watch` runs them, until `settled(jobs)`; fails at once if a task ends."""

    async def main() -> list[Job]:
        stop = asyncio.Event()
        watcher = FolderWatcher(
            [inbox], quiet_seconds=0.2, poll_interval=0.1, use_inotify=False, stop_event=stop
        )
        tasks = [asyncio.create_task(feed(watcher, queue))]
        for i in range(workers):
            worker = Worker(queue, StoreSettings(str(store)), ingest_settings, name=f"w{i}")
            tasks.append(asyncio.create_task(worker.run(stop)))
        deadline = time.monotonic() + timeout
        try:
            while not settled(jobs := queue.list(limit=1000)):
                for task in tasks:
                    assert not task.done(), f"an ingest task ended: {task.exception()!r}"
                assert time.monotonic() < deadline, [(j.source, j.state, j.error) for j in jobs]
                await asyncio.sleep(0.05)
            return jobs
        finally:
            stop.set()
            watcher.stop()
            await asyncio.wait(tasks, timeout=60)

    return asyncio.run(main())


def finished(count: int) -> Callable[[list[Job]], bool]:
    return lambda jobs: len(jobs) == count and all(j.state.terminal for j in jobs)


def published(store: Path) -> list[str]:
    return Store(StoreSettings(str(store))).published_slides() if store.exists() else []


# ------------------------------------------------------------------------------------------
# POST /jobs takes one complete slide, as the watcher would report it


def test_post_jobs_takes_only_one_complete_slide(tmp_path: Path) -> None:
    """A watch folder, a folder of slides or one part of a slide is refused: a failed
    conversion would have quarantined the whole folder, and `after_success=delete` removed
    every pending drop with it."""
    inbox = tmp_path / "inbox"
    put(FIXTURES / "boxes_0.dcm", inbox / "b0.dcm")  # one loose DICOM series of two instances
    put(FIXTURES / "boxes_1.dcm", inbox / "b1.dcm")
    put(SMALL, inbox / "case7" / "small.svs")
    put(FIXTURES / "boxes_0.dcm", inbox / "series" / "a.dcm")
    put(FIXTURES / "boxes_1.dcm", inbox / "series" / "b.dcm")
    (inbox / "x.mrxs").write_bytes(b"")  # its folder has not arrived
    before = sorted(p.relative_to(inbox) for p in inbox.rglob("*"))
    service = ServerSettings(
        store=str(tmp_path / "store"),
        watch=(str(inbox),),
        ingest=settings(tmp_path, workers=0, quiet_seconds=3600, after_success="delete"),
    )

    async def main() -> None:
        async with TestClient(TestServer(create_app(service))) as c:
            for source, message in [
                (inbox, "watch or source folder itself"),
                (f"{inbox}/", "watch or source folder itself"),
                (inbox / "case7" / "..", "watch or source folder itself"),
                (inbox / "case7", "not one slide"),
                (inbox / "b1.dcm", "not one slide"),  # the series' second instance
                (inbox / "series" / "a.dcm", "not one slide"),
                (inbox / "x.mrxs", "not complete yet: x/ is missing"),
                (tmp_path, "inside a watch or source folder"),
            ]:
                r = await c.post("/jobs", json={"source": str(source)})
                body = await r.json()
                assert (r.status, body["status"]) == (400, 400), (source, body)
                assert message in body["error"], (source, body)
            assert (await (await c.get("/jobs")).json())["jobs"] == []

            accepted = {}
            for source in (inbox / "case7" / "small.svs", inbox / "b0.dcm", inbox / "series"):
                r = await c.post("/jobs", json={"source": str(source)})
                assert r.status == 202, await r.text()
                accepted[source.name] = await r.json()
            # Without the folders above the slide (scanners name them after patients).
            assert accepted["small.svs"]["source"] == "small.svs"
            assert accepted["small.svs"]["files"] == ["small.svs"]
            assert accepted["b0.dcm"]["files"] == ["b0.dcm", "b1.dcm"]
            assert accepted["series"]["source"] == "series"
            assert accepted["series"]["files"] == ["series/a.dcm", "series/b.dcm"]
            listed = (await (await c.get("/jobs")).json())["jobs"]
            assert str(inbox) not in json.dumps(listed) and "case7" not in json.dumps(listed)

    asyncio.run(main())
    assert sorted(p.relative_to(inbox) for p in inbox.rglob("*")) == before


def test_a_job_body_sent_too_slowly_is_a_408(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that sends `POST /jobs`'s body a little at a time held the handler and its
    connection for as long as it liked: aiohttp sets no limit on a body's arrival."""
    monkeypatch.setattr(jobs_api, "BODY_SECONDS", 1.0)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    service = ServerSettings(
        store=str(tmp_path / "store"),
        watch=(str(inbox),),
        ingest=settings(tmp_path, workers=0, quiet_seconds=3600),
    )
    with serving(service) as base:
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            head = f"POST /jobs HTTP/1.1\r\nHost: {host}:{port}\r\n"
            head += "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            sock.sendall(head.encode() + b'{"source": ')  # and nothing more
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = sock.recv(4096)  # the socket's timeout bounds the wait
                assert chunk, answer
                answer += chunk
        status = int(answer.split(b" ", 2)[1])
        body = json.loads(answer.partition(b"\r\n\r\n")[2])
        assert (status, body["status"]) == (408, 408)


# ------------------------------------------------------------------------------------------
# A source that cannot be moved or deleted: recorded on the job, the worker carries on


def test_a_done_folder_that_cannot_be_made_is_a_warning_not_a_dead_worker(tmp_path: Path) -> None:
    inbox, store = tmp_path / "inbox", tmp_path / "store"
    slides = [put(SMALL, inbox / "a.svs"), put(REGION, inbox / "b.svs")]
    contents = [p.read_bytes() for p in slides]
    (tmp_path / "done").write_text("a file where the done folder should be")
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    jobs = ingest(inbox, queue, store, settings(tmp_path, after_success="move"), finished(2))
    assert sorted(published(store)) == sorted(content_slide_id(p) for p in slides)
    for job in jobs:
        assert job.state is JobState.DONE, job
        assert job.warning is not None
        assert "published, but its source could not be moved to the done folder" in job.warning
    assert [p.read_bytes() for p in slides] == contents  # left where they were, whole


def test_a_source_whose_folder_denies_delete_is_kept_and_the_job_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inbox, store = tmp_path / "inbox", tmp_path / "store"
    slides = [put(SMALL, inbox / "case-0017.svs"), put(REGION, inbox / "case-0018.svs")]
    (inbox / "case-0017.svs.json").write_text('{"patient_id": "P-1"}')
    before = {p.name: p.read_bytes() for p in inbox.iterdir()}
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    caplog.set_level(logging.DEBUG)
    with immutable(inbox):
        jobs = ingest(inbox, queue, store, settings(tmp_path, after_success="delete"), finished(2))
    assert sorted(published(store)) == sorted(content_slide_id(p) for p in slides)
    for job in jobs:
        assert job.state is JobState.DONE, job
        assert job.warning == (
            "the slide is published, but its source could not be deleted: Operation not permitted"
        )
    assert {p.name: p.read_bytes() for p in inbox.iterdir()} == before
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("wsi"))
    assert "could not be deleted: PermissionError (EPERM)" in logged
    assert "case-00" not in logged and str(tmp_path) not in logged  # no file names in logs


def test_ingest_loops_are_supervised_and_readyz_lists_those_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    service = ServerSettings(
        store=str(tmp_path / "store"),
        watch=(str(inbox),),
        ingest=settings(tmp_path, workers=2, quiet_seconds=0.2),
    )
    marker = tmp_path / "case-0042-ready"
    runs: list[float] = []

    async def needs_marker() -> None:
        """A loop that dies (a real FileNotFoundError) until the marker exists, then runs
        until the service stops, as the real loops do (one that did not would hold the
        shutdown for its whole grace, `shutdown_seconds`)."""
        runs.append(time.monotonic())
        marker.read_bytes()
        await app[INGEST_TASKS].stop.wait()

    app = create_app(service)

    async def main() -> None:
        async with TestClient(TestServer(app)) as c:
            tasks = app[INGEST_TASKS]
            expected = ["copies", "follow", "purge", "verify", "watcher", "worker-1", "worker-2"]
            assert sorted(tasks.names) == expected
            assert tasks.down == {}
            assert (await c.get("/readyz")).status == 200

            tasks.start("probe", needs_marker)

            async def reported_down() -> dict[str, Any] | None:
                r = await c.get("/readyz")
                return await r.json() if r.status == 503 else None

            body = await wait_until(reported_down, 30)
            assert body["down"] == ["probe"] and "probe" in body["error"]
            assert tasks.down == {"probe": "FileNotFoundError (ENOENT)"}

            async def restarted() -> bool:
                return len(runs) >= 2

            await wait_until(restarted, 30)
            marker.write_text("")

            async def ready() -> bool:
                return (await c.get("/readyz")).status == 200

            await wait_until(ready, 30)
            # The real loops carry on meanwhile: a slide dropped now is converted.
            put(SMALL, inbox / "late.svs")

            async def converted() -> bool:
                jobs = (await (await c.get("/jobs")).json())["jobs"]
                return bool(jobs) and jobs[0]["state"] == "done"

            await wait_until(converted, 60)
            assert tasks.deaths("probe") >= 2 and tasks.deaths("watcher") == 0

    asyncio.run(main())
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("wsi"))
    assert "ingest task probe stopped: FileNotFoundError (ENOENT)" in logged
    assert "case-0042" not in logged and str(tmp_path) not in logged


def test_a_slide_reported_while_the_queue_is_locked_is_submitted_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The watcher reports a slide once; a job queue that is busy at that moment (another
    process holds its write lock) must not make the slide wait for the next restart."""
    inbox = tmp_path / "inbox"
    put(SMALL, inbox / "a.svs")
    path = tmp_path / "jobs.sqlite"
    queue = SQLiteJobQueue(path, busy_timeout=0.1)
    caplog.set_level(logging.INFO, logger="wsi.ingest")
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")

    async def main() -> None:
        stop = asyncio.Event()
        watcher = FolderWatcher(
            [inbox], quiet_seconds=0.2, poll_interval=0.1, use_inotify=False, stop_event=stop
        )
        task = asyncio.create_task(feed(watcher, queue))
        try:

            async def refused() -> bool:
                return any("could not be submitted" in r.getMessage() for r in caplog.records)

            await wait_until(refused, 30)
            lock.rollback()

            async def submitted() -> list[Job]:
                return queue.list()

            (job,) = await wait_until(submitted, 30)
            assert job.source == str(inbox / "a.svs")
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    try:
        asyncio.run(main())
    finally:
        lock.close()


def test_a_worker_says_when_the_job_table_stops_answering_and_when_it_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A job table that cannot be written (locked here; its disk full or its PostgreSQL down
    in a deployment) kept jobs queued with no line in the log for as long as it lasted. The
    worker says so once, then once when it answers again, and takes the job."""
    inbox = tmp_path / "inbox"
    slide = put(SMALL, inbox / "a.svs")
    path = tmp_path / "jobs.sqlite"
    queue = SQLiteJobQueue(path, busy_timeout=0.1)
    job = queue.submit(str(slide), content_slide_id(slide))
    caplog.set_level(logging.INFO, logger="wsi.ingest")
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")

    def said(text: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if text in r.getMessage()]

    async def main() -> None:
        stop = asyncio.Event()
        worker = Worker(queue, StoreSettings(str(tmp_path / "store")), settings(tmp_path))
        task = asyncio.create_task(worker.run(stop))
        try:

            async def down() -> list[str]:
                return said("the job table does not answer")

            (line,) = await wait_until(down, 30)
            assert "JobQueueUnavailable" in line and str(tmp_path) not in line
            await asyncio.sleep(0.5)  # several more polls fail: still the one line
            assert len(said("the job table does not answer")) == 1
            lock.rollback()

            async def done() -> bool:
                return queue.get(job.id).state is JobState.DONE

            await wait_until(done, 60)
            assert len(said("the job table answers again")) == 1
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    try:
        asyncio.run(main())
    finally:
        lock.close()


# ------------------------------------------------------------------------------------------
# A source goes only once its slide reads back from the store, durably


def test_delete_waits_for_a_manifest_the_store_can_read(tmp_path: Path) -> None:
    """A conversion that exits 0 but published elsewhere (here: a second `--out` wins) must not
    cost the source: the worker reads the manifest back before it deletes anything."""
    inbox, store, elsewhere = tmp_path / "inbox", tmp_path / "store", tmp_path / "elsewhere"
    slide = put(SMALL, inbox / "a.svs")
    original, slide_id = slide.read_bytes(), content_slide_id(slide)
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite", retry=RetryPolicy(max_attempts=1))
    values = {"after_success": "delete", "convert_args": ("--out", str(elsewhere))}
    (job,) = ingest(inbox, queue, store, settings(tmp_path, **values), finished(1))
    assert published(elsewhere) == [slide_id] and published(store) == []
    assert job.state is JobState.FAILED, job
    assert "the store does not have it" in (job.error or "")
    survivors = [p for p in tmp_path.rglob("a.svs") if p.is_file() and p.read_bytes() == original]
    assert survivors, "the source was deleted although the store has no slide"


def test_a_move_to_done_is_durable_before_the_job_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every fsync the worker makes is recorded with the job's state at that moment (the real
    fsync still runs): the moved file, its new folder, the done folder and the folder it left
    are all synced while the job is still running."""
    inbox, store, done = tmp_path / "inbox", tmp_path / "store", tmp_path / "done"
    put(SMALL, inbox / "a.svs")
    (inbox / "a.svs.json").write_text("{}")
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    synced: list[tuple[str, JobState | None]] = []
    real_fsync = os.fsync

    def state() -> JobState | None:
        jobs = queue.list()
        return jobs[0].state if jobs else None

    def recording_fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), state()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    (job,) = ingest(inbox, queue, store, settings(tmp_path, after_success="move"), finished(1))
    assert job.state is JobState.DONE and job.warning is None, job
    moved = done / "a.svs"
    assert sorted(p.name for p in moved.iterdir()) == ["a.svs", "a.svs.json"]
    needed = {moved / "a.svs", moved / "a.svs.json", moved, done, inbox}
    while_running = {Path(p) for p, s in synced if s is JobState.RUNNING}
    assert needed <= while_running, needed - while_running


# ------------------------------------------------------------------------------------------
# The files of the slide that was submitted, all of them, and only those


def test_a_replaced_slide_is_never_converted_under_the_old_id_nor_deleted(tmp_path: Path) -> None:
    inbox, store = tmp_path / "inbox", tmp_path / "store"
    first = put(SMALL, inbox / "case.svs")
    first_id = content_slide_id(first)
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    (queued,) = ingest(inbox, queue, store, settings(tmp_path), lambda j: len(j) == 1, workers=0)
    # The scanner writes the next slide under the same name before the job runs.
    put(REGION, tmp_path / "incoming.svs").rename(inbox / "case.svs")
    second_id = content_slide_id(inbox / "case.svs")

    def settled(jobs: list[Job]) -> bool:
        first_job = next(j for j in jobs if j.id == queued.id)
        if first_job.state is JobState.DONE:
            return True  # the defect: converted as the first slide
        later = [j for j in jobs if j.slide_id == second_id]
        return first_job.state.terminal and bool(later) and later[0].state.terminal

    jobs = ingest(inbox, queue, store, settings(tmp_path, after_success="delete"), settled)
    by_id = {j.id: j for j in jobs}
    first_job = by_id.pop(queued.id)
    assert first_job.state is JobState.FAILED, first_job
    assert first_job.error == (
        "the source changed since the job was submitted: case.svs was replaced or changed; "
        "not converted"
    )
    (second_job,) = by_id.values()
    assert second_job.state is JobState.DONE and second_job.slide_id == second_id
    assert published(store) == [second_id] and first_id != second_id
    manifest = Store(StoreSettings(str(store))).read_manifest(second_id)
    assert (manifest["width"], manifest["height"]) == (2220, 2967)  # the second slide's pixels
    assert not (inbox / "case.svs").exists()  # deleted after its own conversion


def test_a_slide_replaced_after_its_conversion_is_left_alone(tmp_path: Path) -> None:
    """The identity check right before a move or delete (the step after a conversion that
    published): what was submitted is what goes, or nothing does."""
    from wsi.ingest.scan import find_candidates
    from wsi.ingest.source_files import changed, submit_slide

    inbox = tmp_path / "inbox"
    put(SMALL, inbox / "case.svs")
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    (candidate,) = find_candidates(inbox)
    job = submit_slide(queue, candidate)
    assert changed(job.files) is None
    put(SMALL, tmp_path / "same-bytes.svs").rename(inbox / "case.svs")  # same content, new file
    replacement = (inbox / "case.svs").stat()
    worker = Worker(
        queue, StoreSettings(str(tmp_path / "store")), settings(tmp_path, after_success="delete")
    )
    assert worker._after_success(job) == (
        "the source was left in place: case.svs was replaced or changed since the job was submitted"
    )
    assert (inbox / "case.svs").stat().st_ino == replacement.st_ino
    (inbox / "case.svs").unlink()
    assert changed(job.files) == "case.svs is gone"


@pytest.mark.parametrize("policy", ["delete", "move"])
def test_a_loose_dicom_series_goes_whole_and_is_not_published_twice(
    tmp_path: Path, policy: str
) -> None:
    inbox, store = tmp_path / "inbox", tmp_path / "store"
    put(FIXTURES / "boxes_0.dcm", inbox / "b0.dcm")
    put(FIXTURES / "boxes_1.dcm", inbox / "b1.dcm")
    (inbox / "notes.txt").write_text("not part of any slide")
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    (job,) = ingest(inbox, queue, store, settings(tmp_path, after_success=policy), finished(1))
    assert job.state is JobState.DONE and job.warning is None, job
    assert sorted(p.name for p in inbox.iterdir()) == ["notes.txt"]
    assert published(store) == [job.slide_id]
    if policy == "move":
        assert sorted(p.name for p in (tmp_path / "done" / "b0.dcm").iterdir()) == [
            "b0.dcm",
            "b1.dcm",
        ]


@pytest.mark.parametrize("extra", [False, True])
def test_a_dicom_series_folder_goes_with_exactly_its_files(tmp_path: Path, extra: bool) -> None:
    """Its instances and sidecar go, and the folder once empty; what was never part of the
    slide (a subfolder, which DicomSource does not read) stays, and keeps the folder."""
    inbox, store = tmp_path / "inbox", tmp_path / "store"
    put(FIXTURES / "boxes_0.dcm", inbox / "series" / "a.dcm")
    put(FIXTURES / "boxes_1.dcm", inbox / "series" / "b.dcm")
    (inbox / "series.json").write_text("{}")
    if extra:
        put(SMALL, inbox / "series" / "scanner-log" / "overview.svs")
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    (job,) = ingest(inbox, queue, store, settings(tmp_path, after_success="delete"), finished(1))
    assert job.state is JobState.DONE and job.warning is None, job
    assert published(store) == [job.slide_id]
    remaining = sorted(p.relative_to(inbox).as_posix() for p in inbox.rglob("*"))
    if extra:
        assert remaining == ["series", "series/scanner-log", "series/scanner-log/overview.svs"]
    else:
        assert remaining == []


# ------------------------------------------------------------------------------------------
# All or nothing, also across file systems


def test_a_multi_file_slide_that_cannot_go_whole_stays_whole(tmp_path: Path) -> None:
    """A MIRAX slide whose companion folder denies changes: the `.mrxs` beside it could be
    moved or deleted, but then the folder would be left as a broken slide. Neither happens."""
    from wsi.ingest.scan import find_candidates
    from wsi.ingest.source_files import HIDDEN_DELETE_PREFIX, delete_files, move_files

    from .test_watch import make_mrxs

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    mrxs = make_mrxs(inbox)
    for name in ("Index.dat", "Data0000.dat", "Data0001.dat"):
        (inbox / "x" / name).write_bytes(name.encode() * 100)
    (candidate,) = find_candidates(inbox)
    assert candidate.complete and candidate.files[0] == mrxs and len(candidate.files) == 5
    before = {p: p.read_bytes() for p in candidate.files}
    with immutable(inbox / "x"):
        with pytest.raises(PermissionError):
            delete_files(list(candidate.files), mrxs)
        with pytest.raises(PermissionError):
            move_files(list(candidate.files), mrxs, tmp_path / "done")
    assert {p: p.read_bytes() for p in candidate.files} == before
    assert not [p for p in inbox.iterdir() if p.name.startswith(HIDDEN_DELETE_PREFIX)]
    assert list((tmp_path / "done").iterdir()) == []
    delete_files(list(candidate.files), mrxs, keep=[inbox])
    assert list(inbox.iterdir()) == []  # and the companion folder, left empty, went too


def test_a_move_across_file_systems_copies_then_removes(tmp_path: Path) -> None:
    from wsi.ingest.source_files import move_files

    inbox = tmp_path / "inbox"
    slide = put(SMALL, inbox / "a.svs")
    (inbox / "a.svs.json").write_text('{"patient_id": "P-1"}')
    before = {p.name: p.read_bytes() for p in inbox.iterdir()}
    shm = Path("/dev/shm")  # a tmpfs: another file system than tmp_path's
    assert shm.stat().st_dev != tmp_path.stat().st_dev
    done = shm / f"wsistore-test-{os.getpid()}-{tmp_path.name}"
    try:
        moved = move_files([slide, inbox / "a.svs.json"], slide, done)
        assert moved == done / "a.svs" / "a.svs"
        assert {p.name: p.read_bytes() for p in moved.parent.iterdir()} == before
        assert list(inbox.iterdir()) == []
    finally:
        shutil.rmtree(done, ignore_errors=True)


@contextlib.contextmanager
def small_file_system(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `folder` (another file system, and one that fills up: a
    real ENOSPC); skipped where this process may not mount."""
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=False
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_move_into_a_full_file_system_leaves_no_partial_copy(tmp_path: Path) -> None:
    """A copy across file systems that runs out of room half-way: the slide stays whole where
    it was, and no truncated copy of it is left in the done folder, looking like the slide."""
    from wsi.ingest.source_files import move_files

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    slide = inbox / "a.svs"
    slide.write_bytes(before := os.urandom(1 << 20))  # 1 MiB: four times the room there is
    with small_file_system(tmp_path / "small", "256k") as small:
        done = small / "done"
        with pytest.raises(OSError) as raised:
            move_files([slide], slide, done)
        assert raised.value.errno == errno.ENOSPC
        assert slide.read_bytes() == before
        assert [str(p.relative_to(done)) for p in done.rglob("*")] == []


# ------------------------------------------------------------------------------------------
# The job table keeps each job's files; an older table is upgraded in place

_SCHEMA_1 = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, source TEXT NOT NULL, slide_id TEXT,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    progress REAL NOT NULL DEFAULT 0, error TEXT, attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL, updated REAL NOT NULL, started REAL, finished REAL,
    next_attempt_at REAL NOT NULL, worker TEXT, lease_until REAL, lease_seconds REAL,
    options TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX jobs_by_state ON jobs (state, created);
CREATE INDEX jobs_by_created ON jobs (created);
CREATE UNIQUE INDEX jobs_live_slide ON jobs (slide_id)
    WHERE slide_id IS NOT NULL AND state IN ('queued', 'running');
PRAGMA user_version = 1;
"""


def test_a_version_1_job_table_is_upgraded_and_its_jobs_sources_are_kept(tmp_path: Path) -> None:
    from wsi.ingest.queue import SCHEMA_VERSION, SourceFile

    inbox, path = tmp_path / "inbox", tmp_path / "jobs.sqlite"
    slide = put(SMALL, inbox / "a.svs")
    with contextlib.closing(sqlite3.connect(path)) as raw:
        raw.executescript(_SCHEMA_1)
        raw.execute(
            "INSERT INTO jobs (id, source, slide_id, state, created, updated, next_attempt_at) "
            "VALUES ('old', ?, ?, 'queued', 1, 1, 1)",
            (str(slide), content_slide_id(slide)),
        )
        raw.commit()
    queue = SQLiteJobQueue(path)
    old = queue.get("old")
    assert (old.state, old.files, old.warning) == (JobState.QUEUED, (), None)
    with contextlib.closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    # A job queued by the older version converts, but nothing recorded its files at submit:
    # its source is left where it is rather than deleted on trust.
    store = tmp_path / "store"
    (done,) = ingest(inbox, queue, store, settings(tmp_path, after_success="delete"), finished(1))
    assert done.state is JobState.DONE and published(store) == [done.slide_id]
    assert done.warning == ("the source was left in place: its files were not recorded at submit")
    assert slide.exists()
    recorded = SourceFile.of(slide)
    fresh = queue.submit("/elsewhere/b.svs", "0123456789abcdef01234567", files=(recorded,))
    assert SQLiteJobQueue(path).get(fresh.id).files == (recorded,)
    assert queue.warn(fresh.id, "noted").warning == "noted"


def _one_watcher_pass(inbox: Path, queue: SQLiteJobQueue) -> list[Job]:
    """A new watcher of `inbox` (as after a restart) until it has submitted every slide there
    once; the jobs it got back, in order."""
    got: list[str] = []

    async def main() -> None:
        stop = asyncio.Event()
        watcher = FolderWatcher(
            [inbox], quiet_seconds=0.2, poll_interval=0.1, use_inotify=False, stop_event=stop
        )
        task = asyncio.create_task(
            feed(watcher, queue, lambda slide_id, path: got.append(slide_id))
        )
        try:

            async def reported() -> bool:
                assert not task.done(), task.exception()
                return len(got) >= len(list(inbox.iterdir()))

            await wait_until(reported, 30)
        finally:
            stop.set()
            watcher.stop()
            await asyncio.wait_for(task, 30)

    asyncio.run(main())
    return queue.list()


@pytest.mark.parametrize("ended", ["cancelled", "failed"])
def test_a_cancel_or_failure_lasts_across_watcher_restarts(tmp_path: Path, ended: str) -> None:
    """A cancelled slide (or one that failed without being quarantined) stays in its folder; a
    restarted watcher reports it again and must get that job back, not convert it anew. A
    user's submission (a retry) still makes a new job."""
    inbox = tmp_path / "inbox"
    slide = put(SMALL, inbox / "a.svs")
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    (job,) = _one_watcher_pass(inbox, queue)
    if ended == "cancelled":
        queue.cancel(job.id)
    else:
        assert queue.claim("w", 60) is not None
        assert queue.fail(job.id, "w", "the share went away", transient=False)
    (again,) = _one_watcher_pass(inbox, queue)  # a restart: every slide is reported again
    assert again.id == job.id and again.state.value == ended
    retried = queue.submit(str(slide), content_slide_id(slide))
    assert retried.id != job.id and retried.state is JobState.QUEUED
