"""Ingest workers: conversions in subprocesses, quarantine for unreadable slides, retries after
crashes, and what happens to sources afterwards."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

import wsi
from wsi.ingest import IngestSettings, Worker
from wsi.jobs import JobState, RetryPolicy, SQLiteJobQueue
from wsi.slide_id import content_slide_id

from .conftest import sample


def drain(queue: SQLiteJobQueue, settings: IngestSettings, until: float = 120.0) -> None:
    """Run one worker until no job is queued or running."""

    async def main() -> None:
        stop = asyncio.Event()
        worker = Worker(queue, settings, name="test-worker")
        task = asyncio.create_task(worker.run(stop))
        deadline = time.monotonic() + until
        while time.monotonic() < deadline:
            states = {j.state for j in queue.list(limit=1000)}
            if not states & {JobState.QUEUED, JobState.RUNNING}:
                break
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(task, 60)

    asyncio.run(main())


def drop(inbox: Path, name: str) -> Path:
    inbox.mkdir(exist_ok=True)
    dest = inbox / Path(name).name
    shutil.copy(sample(name), dest)
    return dest


def test_good_slide_converts_and_corrupt_one_is_quarantined(tmp_path):
    inbox, store = tmp_path / "inbox", tmp_path / "store"
    good = drop(inbox, "openslide-python-fixtures/small.svs")
    bad = drop(inbox, "openslide-python-fixtures/unopenable.tiff")
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    settings = IngestSettings(
        store=str(store), quarantine_dir=str(tmp_path / "quarantine"), poll_seconds=0.1
    )
    good_job = queue.submit(str(good), content_slide_id(good))
    bad_job = queue.submit(str(bad), content_slide_id(bad))
    drain(queue, settings)
    assert queue.get(good_job.id).state is JobState.DONE
    assert wsi.Store(wsi.StoreSettings(str(store))).published_slides() == [good_job.slide_id]
    failed = queue.get(bad_job.id)
    assert failed.state is JobState.FAILED and "Unsupported TIFF compression" in failed.error
    reason = (tmp_path / "quarantine" / "unopenable.tiff" / "REASON.txt").read_text()
    assert "Unsupported TIFF compression" in reason
    assert not bad.exists() and good.exists()  # kept by default


def test_same_slide_twice_is_one_job(tmp_path):
    inbox = tmp_path / "inbox"
    first = drop(inbox, "openslide-python-fixtures/small.svs")
    second = inbox / "copy-of-small.svs"
    shutil.copy(first, second)
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    a = queue.submit(str(first), content_slide_id(first))
    b = queue.submit(str(second), content_slide_id(second))
    assert a.id == b.id and len(queue.list()) == 1


def test_killed_conversion_is_retried_and_publishes_once(tmp_path, medium_jpeg_tiff):
    store = tmp_path / "store"
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite", retry=RetryPolicy(backoff_unit=0.05))
    settings = IngestSettings(store=str(store), poll_seconds=0.1, lease_seconds=2)
    sid = content_slide_id(medium_jpeg_tiff)
    job = queue.submit(str(medium_jpeg_tiff), sid)

    async def kill_first_attempt() -> None:
        stop = asyncio.Event()
        worker = Worker(queue, settings, name="w1")
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


@pytest.mark.parametrize("policy", ["move", "delete"])
def test_source_after_success(tmp_path, policy):
    inbox = tmp_path / "inbox"
    slide = drop(inbox, "openslide-python-fixtures/small.svs")
    (inbox / "small.svs.json").write_text('{"patient_id": "X"}')
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    settings = IngestSettings(
        store=str(tmp_path / "store"),
        after_success=policy,
        done_dir=str(tmp_path / "done"),
        poll_seconds=0.1,
    )
    queue.submit(str(slide), content_slide_id(slide))
    drain(queue, settings)
    assert not slide.exists() and not (inbox / "small.svs.json").exists()
    if policy == "move":
        assert (tmp_path / "done" / "small.svs" / "small.svs").exists()
        assert (tmp_path / "done" / "small.svs" / "small.svs.json").exists()


def test_settings_are_checked():
    with pytest.raises(wsi.InvalidArgument):
        IngestSettings(store="x", after_success="move")
    with pytest.raises(wsi.InvalidArgument):
        IngestSettings(store="x", concurrency=0)


def test_roles_run_on_their_own(tmp_path):
    """`wsi watch` (jobs only) and `wsi worker` (conversions only) share one job table."""
    import subprocess
    import sys

    inbox, store, jobs = tmp_path / "inbox", tmp_path / "store", tmp_path / "jobs.sqlite"
    inbox.mkdir()
    common = ["--store", str(store), "--jobs", str(jobs)]
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
        ]
    )
    worker = subprocess.Popen([sys.executable, "-m", "wsi.cli", "worker", *common])
    try:
        slide = drop(tmp_path / "staging", "openslide-python-fixtures/small.svs")
        slide.rename(inbox / slide.name)
        published = wsi.Store(wsi.StoreSettings(str(store)))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not published.published_slides():
            time.sleep(0.1)
        assert published.published_slides() == [content_slide_id(inbox / "small.svs")]
    finally:
        for proc in (watcher, worker):
            proc.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=40) == 0 and worker.wait(timeout=40) == 0
