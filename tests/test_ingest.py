"""Ingest workers: conversions in subprocesses, quarantine for unreadable slides, retries after
crashes, and what happens to sources afterwards."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import psutil
import pytest

import wsi
from server.settings import ServerSettings
from wsi.ingest.queue import Job, JobQueueUnavailable, JobState, RetryPolicy, SQLiteJobQueue
from wsi.ingest.scan import find_candidates
from wsi.ingest.settings import AfterSuccess, IngestSettings
from wsi.ingest.source_files import submit_slide
from wsi.ingest.worker import Worker
from wsi.slide_id import content_slide_id
from wsi.store.objects import StoreSettings

from .conftest import sample
from .helpers import FakeClock, drain, run_worker_until, run_wsi


def drop(inbox: Path, name: str) -> Path:
    inbox.mkdir(exist_ok=True)
    dest = inbox / Path(name).name
    shutil.copy(sample(name), dest)
    return dest


def test_good_slide_converts_and_corrupt_one_is_quarantined(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wsi.ingest")
    inbox, store = tmp_path / "inbox", tmp_path / "store"
    good = drop(inbox, "openslide-python-fixtures/small.svs")
    bad = drop(inbox, "openslide-python-fixtures/unopenable.tiff")
    still = time.time() - 3600  # unchanged for an hour: no copy of it is still under way
    os.utime(bad, (still, still))
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    settings = IngestSettings(quarantine_dir=str(tmp_path / "quarantine"), poll_seconds=0.1)
    good_job = queue.submit(str(good), content_slide_id(good))
    bad_job = queue.submit(str(bad), content_slide_id(bad))
    drain(queue, str(store), settings)
    assert queue.get(good_job.id).state is JobState.DONE
    assert wsi.Store(wsi.StoreSettings(str(store))).published_slides() == [good_job.slide_id]
    failed = queue.get(bad_job.id)
    assert failed.state is JobState.FAILED
    assert failed.error is not None and "Unsupported TIFF compression" in failed.error
    reason = (tmp_path / "quarantine" / "unopenable.tiff" / "REASON.txt").read_text()
    assert "Unsupported TIFF compression" in reason
    assert not bad.exists() and good.exists()  # kept by default
    # The log says what happened to each job, by ids alone (a file name may name a patient).
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("wsi.ingest")]
    assert f"job {good_job.id}: converting slide {good_job.slide_id} (attempt 1)" in logged
    assert any(
        m.startswith(f"job {good_job.id}: slide {good_job.slide_id} published (") for m in logged
    )
    assert f"job {bad_job.id}: failed for good" in logged
    assert not [m for m in logged if "small" in m or "unopenable" in m or str(inbox) in m]


def test_same_slide_twice_is_one_job(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    first = drop(inbox, "openslide-python-fixtures/small.svs")
    second = inbox / "copy-of-small.svs"
    shutil.copy(first, second)
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    a = queue.submit(str(first), content_slide_id(first))
    b = queue.submit(str(second), content_slide_id(second))
    assert a.id == b.id and len(queue.list()) == 1


def test_killed_conversion_is_retried_and_publishes_once(
    tmp_path: Path, medium_jpeg_tiff: Path
) -> None:
    store = tmp_path / "store"
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite", retry=RetryPolicy(backoff_unit=0.05))
    settings = IngestSettings(poll_seconds=0.1, lease_seconds=2)
    sid = content_slide_id(medium_jpeg_tiff)
    job = queue.submit(str(medium_jpeg_tiff), sid)

    async def kill_first_attempt() -> None:
        stop = asyncio.Event()
        worker = Worker(queue, StoreSettings(str(store)), settings, name="w1")
        task = asyncio.create_task(worker.run(stop))
        killed = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and queue.get(job.id).state is not JobState.DONE:
            proc = worker._proc
            shard = list(store.glob("*/slide.zarr/0/c/0/0/0*"))
            if not killed and proc is not None and shard:
                os.kill(proc.pid, signal.SIGKILL)  # the C reader "crashed"
                killed = True
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 60)
        assert killed, "the conversion ended before it could be killed"

    asyncio.run(kill_first_attempt())
    done = queue.get(job.id)
    assert done.state is JobState.DONE and done.attempts >= 2
    reference = tmp_path / "reference"
    wsi.convert_slide(medium_jpeg_tiff, wsi.Store(wsi.StoreSettings(str(reference))))
    a = wsi.Store(wsi.StoreSettings(str(store)))
    b = wsi.Store(wsi.StoreSettings(str(reference)))
    assert a.published_slides() == [sid]
    assert a.read_manifest(sid)["objects"] == b.read_manifest(sid)["objects"]


def test_a_slide_that_kills_every_worker_is_failed_and_quarantined(tmp_path: Path) -> None:
    """Each attempt's worker dies (SIGKILL, OOM: its lease just runs out). After the last one the
    job is failed and its source quarantined like any final failure, so no watcher restart can
    queue it again to crash workers forever."""
    inbox = tmp_path / "inbox"
    slide = drop(inbox, "openslide-python-fixtures/small.svs")
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite", retry=RetryPolicy(max_attempts=2))
    (candidate,) = find_candidates(inbox)
    job = submit_slide(queue, candidate)
    for _ in range(2):  # a worker that claims, then dies without a word
        claimed = queue.claim("doomed", lease_seconds=0.05)
        assert claimed is not None and claimed.lease_until is not None
        deadline = time.monotonic() + 30
        while time.time() <= claimed.lease_until and time.monotonic() < deadline:
            time.sleep(0.01)
    settings = IngestSettings(quarantine_dir=str(tmp_path / "quarantine"), poll_seconds=0.1)
    drain(queue, str(tmp_path / "store"), settings)
    failed = queue.get(job.id)
    assert failed.state is JobState.FAILED, failed
    assert failed.error is not None and "(lease expired) on each of 2 attempts" in failed.error
    reason = (tmp_path / "quarantine" / "small.svs" / "REASON.txt").read_text()
    assert "lease expired" in reason
    assert not slide.exists()
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").iterdir())


def test_a_slide_renamed_while_queued_is_converted_under_its_new_name(tmp_path: Path) -> None:
    """The slide is renamed between submit and claim; the watcher's report of the new name moves
    the queued job there, and the worker converts (and moves away) the renamed file."""
    inbox = tmp_path / "inbox"
    slide = drop(inbox, "openslide-python-fixtures/small.svs")
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    (candidate,) = find_candidates(inbox)
    job = submit_slide(queue, candidate, watched=True)
    renamed = slide.rename(inbox / "renamed.svs")
    (candidate,) = find_candidates(inbox)
    again = submit_slide(queue, candidate, watched=True)
    assert again.id == job.id and again.source == str(renamed)
    settings = IngestSettings(
        after_success="move", done_dir=str(tmp_path / "done"), poll_seconds=0.1
    )
    drain(queue, str(tmp_path / "store"), settings)
    done = queue.get(job.id)
    assert done.state is JobState.DONE and done.warning is None, done
    assert not renamed.exists() and (tmp_path / "done" / "renamed.svs" / "renamed.svs").exists()


def test_a_cancel_after_the_publish_leaves_the_job_done(tmp_path: Path) -> None:
    """The conversion exits 0 (the slide is published) and the cancel lands right then, before
    the worker records it: the job is done with a warning, and `--after move` still runs."""
    inbox = tmp_path / "inbox"
    slide = drop(inbox, "openslide-python-fixtures/small.svs")
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    (candidate,) = find_candidates(inbox)
    job = submit_slide(queue, candidate)

    ran = asyncio.Event()

    class CancelledRightAfterPublish(Worker):
        def _unpublished(self, slide_id: str) -> str | None:
            queue.cancel(job.id)  # the user's DELETE /jobs/{id}, after the publish
            return super()._unpublished(slide_id)

        async def run_job(
            self, job: Job, stop: asyncio.Event, claimed: float | None = None
        ) -> None:
            await super().run_job(job, stop, claimed)
            ran.set()

    settings = IngestSettings(
        after_success="move", done_dir=str(tmp_path / "done"), poll_seconds=0.1
    )

    store = StoreSettings(str(tmp_path / "store"))
    run_worker_until(CancelledRightAfterPublish(queue, store, settings, name="w"), ran)
    done = queue.get(job.id)
    assert done.state is JobState.DONE, done
    assert done.warning is not None and "too late" in done.warning
    assert wsi.Store(wsi.StoreSettings(str(tmp_path / "store"))).published_slides() == [
        done.slide_id
    ]
    assert not slide.exists() and (tmp_path / "done" / "small.svs" / "small.svs").exists()


@pytest.mark.parametrize("policy", ["move", "delete"])
def test_source_after_success(tmp_path: Path, policy: AfterSuccess) -> None:
    inbox = tmp_path / "inbox"
    slide = drop(inbox, "openslide-python-fixtures/small.svs")
    (inbox / "small.svs.json").write_text('{"patient_id": "X"}')
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    settings = IngestSettings(
        after_success=policy, done_dir=str(tmp_path / "done"), poll_seconds=0.1
    )
    (candidate,) = find_candidates(inbox)  # the slide and its sidecar, as the watcher sees them
    job = submit_slide(queue, candidate)
    drain(queue, str(tmp_path / "store"), settings)
    assert queue.get(job.id).warning is None
    assert not slide.exists() and not (inbox / "small.svs.json").exists()
    if policy == "move":
        assert (tmp_path / "done" / "small.svs" / "small.svs").exists()
        assert (tmp_path / "done" / "small.svs" / "small.svs.json").exists()


def test_settings_are_checked() -> None:
    with pytest.raises(wsi.InvalidArgument):
        IngestSettings(after_success="move", done_dir="")
    with pytest.raises(wsi.InvalidArgument):
        IngestSettings(after_success="later")  # type: ignore[arg-type]
    with pytest.raises(wsi.InvalidArgument):
        IngestSettings(workers=-1)
    for limit in ("stop_timeout", "job_timeout", "stall_timeout", "keep_jobs_days"):
        with pytest.raises(wsi.InvalidArgument):
            IngestSettings(**cast(dict[str, Any], {limit: -1.0}))
    for positive in ("poll_seconds", "lease_seconds"):
        with pytest.raises(wsi.InvalidArgument):
            IngestSettings(**cast(dict[str, Any], {positive: 0.0}))
    with pytest.raises(wsi.InvalidArgument):
        IngestSettings(stall_timeout=float("nan"))


@pytest.mark.parametrize(
    "env",
    [
        {"WSI_S3_SOURCES": "http://bucket/x"},
        {"WSI_S3_SOURCES": "s3://"},
        {"WSI_STALL_TIMEOUT": "-1"},
        {"WSI_KEEP_JOBS_DAYS": "-2"},
        {"WSI_JOB_TIMEOUT": "soon"},
    ],
)
def test_bad_ingest_environment_is_refused_at_start(env: dict[str, str]) -> None:
    with pytest.raises(wsi.InvalidArgument):
        ServerSettings.from_env(env)


@pytest.mark.parametrize("inside", ["store", "jobs_db", "done_dir", "quarantine_dir", "spool_dir"])
def test_a_watch_folder_holding_the_services_own_folders_is_refused(
    tmp_path: Path, inside: str
) -> None:
    """Stored levels are DICOM files and moved slides would come back: each would be ingested
    again and again; probing the job table's files would drop SQLite's locks."""
    inbox = tmp_path / "inbox"
    own = str(inbox / "own")
    values: dict[str, Any] = (
        {"jobs_db": own + "/jobs.sqlite"} if inside == "jobs_db" else {inside: own}
    )
    store = own if inside == "store" else str(tmp_path / "store")
    ingest = IngestSettings(**{k: v for k, v in values.items() if k != "store"})
    with pytest.raises(wsi.InvalidArgument, match="holds the"):
        ServerSettings(store=store, watch=(str(inbox),), ingest=ingest)
    ServerSettings(store=store, watch=(str(tmp_path / "elsewhere"),), ingest=ingest)
    cli = run_wsi(
        "watch",
        str(tmp_path),
        "--store",
        str(tmp_path / "store"),
        "--jobs",
        str(tmp_path / "j.sqlite"),
    )
    assert cli.returncode == 1 and cli.stderr.count("\n") == 1 and "holds the" in cli.stderr


def test_serve_refuses_a_bad_s3_source_prefix_in_one_line(tmp_path: Path) -> None:
    done = run_wsi("serve", "--store", str(tmp_path), "--s3-source", "bucket/no-scheme")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "wsi: error: s3_sources entries must be s3://bucket[/prefix]: bucket/no-scheme"
    )


def test_roles_run_on_their_own(tmp_path: Path) -> None:
    """`wsi watch` (jobs only) and `wsi worker` (conversions only) share one job table."""
    import subprocess
    import sys

    inbox, store, jobs = tmp_path / "inbox", tmp_path / "store", tmp_path / "jobs.sqlite"
    inbox.mkdir()
    common = ["--store", str(store), "--jobs", str(jobs)]
    logs = {role: tmp_path / f"{role}.err" for role in ("watch", "worker")}
    with logs["watch"].open("w") as watch_err, logs["worker"].open("w") as worker_err:
        watcher = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "wsi.cli",
                "watch",
                str(inbox),
                *common,
                "--quiet-seconds",
                "0.3",
                "--poll-seconds",
                "0.1",
            ],
            stderr=watch_err,
        )
        worker = subprocess.Popen(
            [sys.executable, "-m", "wsi.cli", "worker", *common], stderr=worker_err
        )
    try:
        slide = drop(tmp_path / "staging", "openslide-python-fixtures/small.svs")
        slide.rename(inbox / "DOE^JANE.svs")  # a scanner names files after the patient
        sid = content_slide_id(inbox / "DOE^JANE.svs")
        published = wsi.Store(wsi.StoreSettings(str(store)))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and f"slide {sid} published" not in (
            logs["worker"].read_text()
        ):
            time.sleep(0.1)
        assert published.published_slides() == [sid]
    finally:
        for proc in (watcher, worker):
            proc.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=40) == 0 and worker.wait(timeout=40) == 0
    # Each role's stderr says what it did, a timed line each, naming no file.
    watched, worked = logs["watch"].read_text(), logs["worker"].read_text()
    assert re.search(
        rf"^\d{{4}}-\d\d-\d\d [\d:,]+ wsistore: job \w+: queued \(slide {sid}\)$", watched, re.M
    )
    assert re.search(rf"wsistore: job \w+: converting slide {sid} \(attempt 1\)$", worked, re.M)
    assert re.search(rf"wsistore: job \w+: slide {sid} published \([\d.]+ s\)$", worked, re.M)
    assert "DOE" not in watched + worked


def _run_worker(
    queue: SQLiteJobQueue,
    store: Path,
    settings: IngestSettings,
    job_id: str,
    watch: Callable[[Worker, asyncio.Event], None] | None = None,
    until: float = 120.0,
) -> None:
    """Run one worker publishing into `store` until the job leaves queued/running (or `watch`
    sets stop), calling `watch(worker, stop)` every 20 ms meanwhile."""

    async def main() -> None:
        stop = asyncio.Event()
        worker = Worker(queue, StoreSettings(str(store)), settings, name="w1")
        task = asyncio.create_task(worker.run(stop))
        deadline = time.monotonic() + until
        while time.monotonic() < deadline and not stop.is_set():
            if queue.get(job_id).state not in (JobState.QUEUED, JobState.RUNNING):
                break
            if watch is not None:
                watch(worker, stop)
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(task, 60)

    asyncio.run(main())


def test_progress_is_reported_while_converting(tmp_path: Path, medium_jpeg_tiff: Path) -> None:
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    # Every tile decoded by OpenSlide and every level encoded on one thread: about 7 s where
    # this was measured, against 1 s for the default conversion (a couple of 0.25 s progress
    # lines on a fast machine), so several heartbeats go by on any machine.
    settings = IngestSettings(
        poll_seconds=0.1,
        lease_seconds=0.6,
        convert_args=("--no-reuse-levels", "--backend", "openslide", "--workers", "1"),
    )
    job = queue.submit(str(medium_jpeg_tiff), content_slide_id(medium_jpeg_tiff))
    seen: list[float] = []

    def record(worker: Worker, stop: asyncio.Event) -> None:
        current = queue.get(job.id)
        if current.state is JobState.RUNNING:
            seen.append(current.progress)

    _run_worker(queue, tmp_path / "store", settings, job.id, record)
    done = queue.get(job.id)
    assert done.state is JobState.DONE and done.progress == 100
    middle = sorted({p for p in seen if 0 < p < 100})
    assert len(middle) >= 3, f"progress seen while running: {sorted(set(seen))}"
    assert seen == sorted(seen), "progress went backwards"


def _hanging_source(tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    """A slide whose conversion never ends, and the converter arguments that make it so: its
    metadata file (`--metadata`) is a FIFO, whose opening blocks until a writer comes (none
    does), as a reader stuck on a dead network share would. (A FIFO given as the slide itself
    is refused before it is opened.)"""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    slide = inbox / "stuck.svs"
    shutil.copyfile(sample("CMU-1-Small-Region.svs"), slide)
    fifo = tmp_path / "metadata.json"
    os.mkfifo(fifo)
    return slide, ("--metadata", str(fifo))


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"stall_timeout": 1.0}, "stalled: no progress for 1 s"),
        ({"stall_timeout": 0.0, "job_timeout": 1.5}, "timed out after 1.5 s"),
    ],
)
def test_hung_conversion_is_stopped_then_failed(
    tmp_path: Path, limits: dict[str, Any], message: str
) -> None:
    fifo, hang = _hanging_source(tmp_path)
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite", retry=RetryPolicy(max_attempts=2))
    settings = IngestSettings(
        quarantine_dir=str(tmp_path / "quarantine"),
        poll_seconds=0.1,
        lease_seconds=0.6,
        convert_args=hang,
        **limits,
    )
    job = queue.submit(str(fifo), "0123456789abcdef01234567")
    started = time.monotonic()
    _run_worker(queue, tmp_path / "store", settings, job.id, until=60)
    failed = queue.get(job.id)
    assert failed.state is JobState.FAILED and failed.attempts == 2, failed
    assert failed.error == f"conversion {message}"
    assert time.monotonic() - started < 40
    reason = (tmp_path / "quarantine" / "stuck.svs" / "REASON.txt").read_text()
    assert message in reason


def test_shutdown_gives_a_running_job_back(tmp_path: Path) -> None:
    fifo, hang = _hanging_source(tmp_path)
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    settings = IngestSettings(
        poll_seconds=0.1, lease_seconds=30, stop_timeout=0.5, convert_args=hang
    )
    job = queue.submit(str(fifo), "0123456789abcdef01234567")
    pids: list[int] = []

    def stop_when_running(worker: Worker, stop: asyncio.Event) -> None:
        if worker._proc is not None and queue.get(job.id).state is JobState.RUNNING:
            pids.append(worker._proc.pid)
            stop.set()  # what SIGTERM to the service does

    started = time.monotonic()
    _run_worker(queue, tmp_path / "store", settings, job.id, stop_when_running, until=60)
    assert pids, "the conversion never started"
    assert time.monotonic() - started < 20
    back = queue.get(job.id)
    # Queued again, at once and with the attempt not counted: a shutdown is not the slide's fault.
    assert (back.state, back.attempts, back.worker) == (JobState.QUEUED, 0, None), back
    assert "shutdown" in (back.error or "")
    assert back.next_attempt_at <= time.time()
    assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == "zombie"


def test_cancel_stops_the_conversion(tmp_path: Path) -> None:
    fifo, hang = _hanging_source(tmp_path)
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    settings = IngestSettings(poll_seconds=0.1, lease_seconds=0.6, convert_args=hang)
    job = queue.submit(str(fifo), "0123456789abcdef01234567")
    pids: list[int] = []

    def cancel_when_running(worker: Worker, stop: asyncio.Event) -> None:
        if worker._proc is not None and not pids:
            pids.append(worker._proc.pid)
            queue.cancel(job.id)
        elif pids and worker._proc is None:
            stop.set()  # the worker is done with it

    _run_worker(queue, tmp_path / "store", settings, job.id, cancel_when_running, until=60)
    assert pids and queue.get(job.id).state is JobState.CANCELLED
    assert fifo.exists()  # a cancelled job's source is left alone
    assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == "zombie"


def test_a_slide_locked_by_another_conversion_waits_without_spending_attempts(
    tmp_path: Path,
) -> None:
    """Another process converts the slide (its lock is held: here by the test, as a worker that
    lost this job's lease would hold it). Each attempt's `wsi convert` exits at once; the job is
    given back without counting, far more often than it may be attempted, and never
    quarantined. Once the lock is free it converts."""
    inbox = tmp_path / "inbox"
    slide = drop(inbox, "openslide-python-fixtures/small.svs")
    queue = SQLiteJobQueue(
        tmp_path / "jobs.sqlite", retry=RetryPolicy(max_attempts=2, backoff_unit=0.02)
    )
    (candidate,) = find_candidates(inbox)
    job = submit_slide(queue, candidate)
    assert job.slide_id is not None
    store = wsi.Store(wsi.StoreSettings(str(tmp_path / "store")))
    settings = IngestSettings(quarantine_dir=str(tmp_path / "quarantine"), poll_seconds=0.05)
    ended: list[Job] = []

    class Counting(Worker):
        async def run_job(
            self, job: Job, stop: asyncio.Event, claimed: float | None = None
        ) -> None:
            await super().run_job(job, stop, claimed)
            ended.append(queue.get(job.id))

    async def main() -> None:
        stop = asyncio.Event()
        worker = Counting(queue, StoreSettings(str(tmp_path / "store")), settings, name="w")
        task = asyncio.create_task(worker.run(stop))
        try:
            deadline = time.monotonic() + 120
            with store.slide_lock(job.slide_id or ""):
                # More runs than the job's 2 attempts, or its end (the failure before the fix).
                while len(ended) < 4 and not queue.get(job.id).state.terminal:
                    assert time.monotonic() < deadline, ended
                    await asyncio.sleep(0.02)
            for back in ended:
                assert (back.state, back.attempts) == (JobState.QUEUED, 0), back
                assert "being converted by another process" in (back.error or "")
            assert slide.exists() and not (tmp_path / "quarantine").exists()
            while not queue.get(job.id).state.terminal:  # the lock is free now
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)

    asyncio.run(main())
    done = queue.get(job.id)
    assert done.state is JobState.DONE and done.attempts == 1, done
    assert store.published_slides() == [job.slide_id]


class _CutOffQueue(SQLiteJobQueue):
    """A job table this worker loses: once `away`, every heartbeat and claim fails as an
    unreachable database's would (PostgreSQL behind a dead network, a SQLite file locked past
    its timeout)."""

    away = False

    def heartbeat(self, job_id: str, worker: str, progress: float) -> bool:
        if self.away:
            raise JobQueueUnavailable("the job table cannot be reached")
        return super().heartbeat(job_id, worker, progress)

    def claim(self, worker: str, lease_seconds: float) -> Job | None:
        if self.away:
            raise JobQueueUnavailable("the job table cannot be reached")
        return super().claim(worker, lease_seconds)


def test_a_worker_cut_off_from_the_job_table_stops_its_conversion_after_the_lease(
    tmp_path: Path,
) -> None:
    """Its heartbeats fail from some point on: once a whole lease has passed since the last one
    that succeeded, another worker may have the job, so the conversion (which would never end on
    its own: its metadata is a FIFO) is stopped, and the job left to the queue (nothing
    recorded)."""
    fifo, hang = _hanging_source(tmp_path)
    queue = _CutOffQueue(tmp_path / "jobs.sqlite")
    settings = IngestSettings(
        poll_seconds=0.1,
        lease_seconds=0.6,
        stall_timeout=0.0,
        stop_timeout=0.5,
        convert_args=hang,
    )
    job = queue.submit(str(fifo), "0123456789abcdef01234567")
    pids: list[int] = []
    stopped_itself: list[bool] = []

    def cut_off(worker: Worker, stop: asyncio.Event) -> None:
        if worker._proc is not None and not pids:
            pids.append(worker._proc.pid)
            queue.away = True
        elif pids and worker._proc is None:
            stopped_itself.append(True)
            stop.set()

    _run_worker(queue, tmp_path / "store", settings, job.id, cut_off, until=30)
    assert pids, "the conversion never started"
    assert stopped_itself, "the conversion went on after its lease ran out"
    assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == "zombie"
    left = queue.get(job.id)  # for its lease to run out and another worker to claim it
    assert (left.state, left.worker, left.attempts) == (JobState.RUNNING, "w1", 1), left


def test_a_copy_that_pauses_past_the_quiet_period_is_converted_once_complete(
    tmp_path: Path,
) -> None:
    """A copy stops at 60% for longer than the quiet period: the half file becomes a job and the
    converter cannot read it. Written to moments ago, it is retried, not quarantined; the copy
    then completes (the next attempt finds the source changed and leaves it), and the complete
    slide, reported again by the watcher, converts. A file as broken but still for
    `settle_seconds` is quarantined at once."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    data = sample("openslide-python-fixtures/small.svs").read_bytes()
    slide = inbox / "small.svs"
    slide.write_bytes(data[: len(data) * 6 // 10])  # the copy, paused
    clock = FakeClock()
    clock.now = time.time()
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite", clock=clock)
    settings = IngestSettings(quarantine_dir=str(tmp_path / "quarantine"), poll_seconds=0.05)
    assert settings.settle_seconds == 4 * settings.quiet_seconds
    (candidate,) = find_candidates(inbox)
    half = submit_slide(queue, candidate, watched=True)
    ended = asyncio.Event()

    class OneJob(Worker):
        async def run_job(
            self, job: Job, stop: asyncio.Event, claimed: float | None = None
        ) -> None:
            await super().run_job(job, stop, claimed)
            ended.set()

    store = StoreSettings(str(tmp_path / "store"))
    run_worker_until(OneJob(queue, store, settings, name="w"), ended)
    retried = queue.get(half.id)
    assert (retried.state, retried.attempts) == (JobState.QUEUED, 1), retried
    assert retried.next_attempt_at > clock.now  # after the backoff
    assert slide.exists() and not (tmp_path / "quarantine").exists()

    with slide.open("ab") as rest:  # the copy resumes and completes
        rest.write(data[len(data) * 6 // 10 :])
    clock.step(3600)  # the half file's retry is due
    (candidate,) = find_candidates(inbox)
    whole = submit_slide(queue, candidate, watched=True)  # the watcher's report of it
    assert whole.id != half.id
    drain(queue, str(tmp_path / "store"), settings)
    left = queue.get(half.id)
    assert left.state is JobState.FAILED and "source changed" in (left.error or ""), left
    done = queue.get(whole.id)
    assert done.state is JobState.DONE, done
    assert wsi.Store(wsi.StoreSettings(str(tmp_path / "store"))).published_slides() == [
        content_slide_id(slide)
    ]
    assert not (tmp_path / "quarantine").exists()

    broken = inbox / "broken.svs"  # a copy that never completes
    broken.write_bytes(data[: len(data) * 6 // 10])
    still = time.time() - settings.settle_seconds - 1
    os.utime(broken, (still, still))
    (candidate,) = (c for c in find_candidates(inbox) if c.path == broken)
    job = submit_slide(queue, candidate)
    drain(queue, str(tmp_path / "store"), settings)
    failed = queue.get(job.id)
    assert (failed.state, failed.attempts) == (JobState.FAILED, 1), failed
    assert (tmp_path / "quarantine" / "broken.svs" / "REASON.txt").exists()


def _run_claimed(queue: SQLiteJobQueue, store: Path, settings: IngestSettings) -> Job:
    """Claim the next job and run it to its end with one worker; the job as it ends."""
    job = queue.claim("w1", 60.0)
    assert job is not None
    worker = Worker(queue, StoreSettings(str(store)), settings, name="w1")
    asyncio.run(worker.run_job(job, asyncio.Event()))
    return queue.get(job.id)


def test_a_slide_renamed_before_its_worker_came_is_converted_under_its_new_name(
    tmp_path: Path,
) -> None:
    """The worker claimed the job before the watcher saw the new name: "a.svs is gone", failed
    for good, and the watcher's report of b.svs was answered with that failed job, so the slide
    was never converted. The job is tried again after the backoff, the watcher's report moves
    it to the new name meanwhile, and it converts."""
    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    shutil.copy(sample("openslide-python-fixtures/small.svs"), inbox / "a.svs")
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite", retry=RetryPolicy(backoff_unit=0.0))
    settings = IngestSettings(quarantine_dir=str(tmp_path / "quarantine"))
    (candidate,) = find_candidates(inbox)
    job = submit_slide(queue, candidate, watched=True)
    os.rename(inbox / "a.svs", inbox / "b.svs")
    waiting = _run_claimed(queue, store, settings)
    assert waiting.state is JobState.QUEUED, waiting.error
    assert waiting.error is not None and "tried again where the watcher finds it" in waiting.error
    (renamed,) = find_candidates(inbox)
    moved = submit_slide(queue, renamed, watched=True)
    assert moved.id == job.id and moved.source == str(inbox / "b.svs")
    done = _run_claimed(queue, store, settings)
    assert done.state is JobState.DONE, done.error
    assert wsi.Store(wsi.StoreSettings(str(store))).published_slides() == [job.slide_id]
    assert not (tmp_path / "quarantine").exists()


def test_a_dicom_series_that_grew_after_its_job_was_made_waits_for_the_whole_series(
    tmp_path: Path,
) -> None:
    """A series arriving instance by instance, paused past the quiet period: its job recorded
    boxes_0 alone, converted the whole folder under boxes_0's content id and moved boxes_0
    alone; boxes_1, left behind, was then quarantined as a slide without its base level. The
    job that finds files its slide did not have ends unconverted; the series' own job, the
    watcher's next report, publishes both instances under the series' id."""
    inbox, store = tmp_path / "inbox", tmp_path / "store"
    series = inbox / "series S"
    series.mkdir(parents=True)
    fixtures = sample("openslide-python-fixtures")
    shutil.copy(fixtures / "boxes_0.dcm", series / "boxes_0.dcm")
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite", retry=RetryPolicy(backoff_unit=0.0))
    settings = IngestSettings(
        quarantine_dir=str(tmp_path / "quarantine"),
        after_success="move",
        done_dir=str(tmp_path / "done"),
    )
    (first,) = find_candidates(inbox)
    early = submit_slide(queue, first, watched=True)
    shutil.copy(fixtures / "boxes_1.dcm", series / "boxes_1.dcm")
    ended = _run_claimed(queue, store, settings)
    assert ended.state is JobState.FAILED
    assert ended.error is not None and "1 file(s) arrived in the slide" in ended.error
    assert not (store.exists() and wsi.Store(wsi.StoreSettings(str(store))).published_slides())
    assert sorted(p.name for p in series.iterdir()) == ["boxes_0.dcm", "boxes_1.dcm"]
    (whole,) = find_candidates(inbox)
    job = submit_slide(queue, whole, watched=True)
    assert job.id != early.id and job.slide_id == content_slide_id(series)
    done = _run_claimed(queue, store, settings)
    assert done.state is JobState.DONE, done.error
    manifest = wsi.Store(wsi.StoreSettings(str(store))).manifest(job.slide_id or "")
    sizes = sum(p.stat().st_size for p in fixtures.glob("boxes_*.dcm"))
    assert manifest.source_bytes == sizes
    assert not (tmp_path / "quarantine").exists()


def test_a_store_that_fails_every_attempt_leaves_the_slide_where_it_is(tmp_path: Path) -> None:
    """Five attempts against a store it could not write (its lock folder a file) took about 30
    s, then the good slide was quarantined as if it were to blame. It stays in the watch folder
    now, its job failed with the store's error, for a retry once the store is back."""
    inbox, store = tmp_path / "inbox", tmp_path / "store"
    slide = drop(inbox, "openslide-python-fixtures/small.svs")
    store.mkdir()
    (store / ".wsistore-locks").write_text("not a folder")
    queue = SQLiteJobQueue(
        tmp_path / "jobs.sqlite", retry=RetryPolicy(max_attempts=2, backoff_unit=0.0)
    )
    settings = IngestSettings(quarantine_dir=str(tmp_path / "quarantine"))
    (candidate,) = find_candidates(inbox)
    submit_slide(queue, candidate, watched=True)
    assert _run_claimed(queue, store, settings).state is JobState.QUEUED
    failed = _run_claimed(queue, store, settings)
    assert failed.state is JobState.FAILED
    assert failed.error is not None and "lock" in failed.error
    assert slide.exists() and not (tmp_path / "quarantine").exists()
