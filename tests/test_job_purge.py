"""The hourly purge of ended jobs keeps a cancelled or done job while its slide is still where
it was submitted from: the watcher reports that slide again, and without its job it was queued
again (a cancelled slide converted)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from wsi.ingest.queue import JobState, SourceFile, SQLiteJobQueue
from wsi.ingest.roles import purge_ended


def _slide(folder: Path, name: str) -> tuple[str, tuple[SourceFile, ...]]:
    path = folder / name
    path.write_bytes(name.encode())
    return str(path), (SourceFile.of(path),)


def test_a_cancel_lasts_while_the_slide_is_in_place(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with SQLiteJobQueue(tmp_path / "jobs.sqlite") as queue:
        jobs = {}
        for name in ("kept.svs", "deleted.svs", "replaced.svs", "failed.svs", "bucket"):
            source, files = _slide(inbox, name)
            if name == "bucket":
                source, files = "s3://scans/bucket.svs", ()
            jobs[name] = queue.submit(source, f"{name[:4]}0", files=files)
        for name in ("kept.svs", "deleted.svs", "replaced.svs", "bucket"):
            queue.cancel(jobs[name].id)
        claimed = queue.claim("w", 60)
        assert claimed is not None and claimed.id == jobs["failed.svs"].id
        assert queue.fail(claimed.id, "w", "unreadable", transient=False)
        (inbox / "deleted.svs").unlink()
        replaced = inbox / "replaced.svs"
        os.utime(replaced, ns=(0, 0))  # another file under the same name
        assert purge_ended(queue, time.time() + 1) == 4
        left = queue.list(limit=100)
        assert [(j.id, j.state) for j in left] == [(jobs["kept.svs"].id, JobState.CANCELLED)]
        # Gone from its folder, the slide's cancelled job goes at the next round.
        (inbox / "kept.svs").unlink()
        assert purge_ended(queue, time.time() + 1) == 1
        assert queue.list() == []


def test_a_cancelled_job_newer_than_the_cut_off_stays_without_a_look(tmp_path: Path) -> None:
    with SQLiteJobQueue(tmp_path / "jobs.sqlite") as queue:
        job = queue.submit("/nowhere/x.svs", "x0")
        queue.cancel(job.id)
        assert purge_ended(queue, time.time() - 3600) == 0
        assert [j.id for j in queue.list()] == [job.id]


def test_a_done_job_stays_while_its_slide_is_kept_in_place(tmp_path: Path) -> None:
    """With `--after keep` a converted slide stays in the watch folder: its job gone, the
    watcher's next report queued it again (a conversion process finding it published, for
    every slide of the inbox once a purge period)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with SQLiteJobQueue(tmp_path / "jobs.sqlite") as queue:
        jobs = {}
        for name in ("kept.svs", "moved.svs"):
            source, files = _slide(inbox, name)
            jobs[name] = queue.submit(source, f"{name[:4]}0", files=files, watched=True)
            claimed = queue.claim("w", 60)
            assert claimed is not None and claimed.id == jobs[name].id
            assert queue.complete(claimed.id, "w", f"{name[:4]}0")
        (inbox / "moved.svs").rename(tmp_path / "moved.svs")  # `--after move`
        assert purge_ended(queue, time.time() + 1) == 1
        assert [(j.id, j.state) for j in queue.list()] == [(jobs["kept.svs"].id, JobState.DONE)]
        kept = inbox / "kept.svs"
        again = queue.submit(str(kept), "kept0", files=(SourceFile.of(kept),), watched=True)
        assert again.id == jobs["kept.svs"].id and again.state is JobState.DONE
