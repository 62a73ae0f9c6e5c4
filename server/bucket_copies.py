"""Local copies of `s3://` job sources, made when the job is submitted to this service.

Readers need files, so a slide in a bucket has to be downloaded before anything can read it. The
service does that once, as soon as `POST /jobs` queues it: the copy makes the slide viewable from
its source (status `converting`) while the job waits and converts, and this service's workers
convert that same copy instead of downloading the slide again. Copies go when their job has ended.

Layout in the spool folder: `<slide-id>/` holds the staged slide under its own name (plus a MIRAX
companion folder or a sidecar JSON) and a `.ready` file naming it, written last; a download in
progress lives in `.partial-<slide-id>-<random>/` and is renamed into place when complete, so a
copy is either whole or absent, also after a crash.

Copies share the spool's quota with the conversions' own downloads (`wsi.ingest.staging`). A copy
made ahead of its conversion (at submit, or at start for the jobs still waiting) leaves room for
one largest source (`StagingLimits.max_bytes`): it is refused when that room would be taken, and
the job then waits without one; a conversion therefore always finds room once the conversions
running beside it end, and copies of waiting jobs can never hold it up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from wsi.errors import WsiError
from wsi.ingest.queue import Job, JobQueue, JobState
from wsi.ingest.spool import SpoolFull
from wsi.ingest.staging import StagingLimits, is_remote, stage_into
from wsi.store.objects import DIR_MODE, FILE_MODE, check_slide_id, make_dirs

log = logging.getLogger("wsistore.staged")

READY = ".ready"
PARTIAL = ".partial-"


class StagedSources:
    """One local copy per slide id, shared by the viewer side and this process's workers."""

    def __init__(
        self,
        root: str | Path,
        endpoint_url: str | None,
        on_ready: Callable[[str, Path], None] | None = None,
        parallel: int = 2,
        limits: StagingLimits | None = None,
    ) -> None:
        self.root = Path(root)
        self.spool = self.root.parent
        """The spool whose quota the copies share with conversions: the folder holding `root`."""
        self.endpoint_url = endpoint_url
        self.limits = limits or StagingLimits()
        # Downloads take minutes: threads of their own, so tile requests never wait behind one.
        self.executor = cf.ThreadPoolExecutor(parallel, thread_name_prefix="wsi-stage")
        self.on_ready = on_ready
        """Told (slide id, local slide path) when a copy is complete: the catalog registers it."""
        self._tasks: dict[str, asyncio.Task[Path | None]] = {}
        self._progress: dict[str, float] = {}

    # -- copies on disk -------------------------------------------------------------------------
    def ready(self, slide_id: str) -> Path | None:
        """The complete copy's local slide path, or None."""
        folder = self.root / check_slide_id(slide_id)
        try:
            name = (folder / READY).read_text().strip()
        except OSError:
            return None
        path = folder / name
        # The name was written by `_stage`; still, never step outside the copy's folder.
        if not name or "/" in name or name in (".", "..") or not path.exists():
            return None
        return path

    def copies(self) -> dict[str, Path]:
        """Every complete copy: slide id -> local slide path."""
        found: dict[str, Path] = {}
        if not self.root.is_dir():
            return found
        for entry in self.root.iterdir():
            with contextlib.suppress(WsiError):
                path = self.ready(entry.name) if not entry.name.startswith(".") else None
                if path is not None:
                    found[entry.name] = path
        return found

    def remove(self, slide_id: str) -> None:
        """Delete the copy (unless a download of it is running)."""
        if slide_id in self._tasks:
            return
        shutil.rmtree(self.root / check_slide_id(slide_id), ignore_errors=True)

    def sweep(self, live: set[str]) -> int:
        """Delete the copies (and stale partial downloads) of slides without a live job; returns
        how many copies went."""
        removed = 0
        if not self.root.is_dir():
            return 0
        for entry in self.root.iterdir():
            if entry.name.startswith(PARTIAL):
                slide_id = entry.name[len(PARTIAL) :].rsplit("-", 1)[0]
                if slide_id not in self._tasks:  # left by a crash: never completes now
                    shutil.rmtree(entry, ignore_errors=True)
                continue
            if entry.name.startswith(".") or entry.name in live or entry.name in self._tasks:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
        return removed

    def _stage(self, slide_id: str, url: str, headroom: int) -> Path:
        """Blocking: download into a partial folder, then rename it into place."""
        final = self.root / slide_id
        partial = self.root / f"{PARTIAL}{slide_id}-{uuid.uuid4().hex[:8]}"
        make_dirs(str(self.root))
        partial.mkdir(DIR_MODE)
        try:

            def progress(done: int, total: int) -> None:
                self._progress[slide_id] = done / total if total else 1.0

            slide = stage_into(
                url,
                partial,
                self.endpoint_url,
                progress,
                limits=self.limits,
                spool=self.spool,
                headroom=headroom,
            )
            fd = os.open(partial / READY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            with os.fdopen(fd, "w") as ready:
                ready.write(slide.name + "\n")
            partial.rename(final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return final / slide.name

    # -- asynchronous side ----------------------------------------------------------------------
    def ensure(self, slide_id: str, url: str, ahead: bool = True) -> asyncio.Task[Path | None]:
        """Start the download of `url` as `slide_id` unless it is staged or staging; the task
        gives the local slide path, or None if there is no copy (the download failed, or there was
        no room: the conversion then fetches the slide itself). `ahead`: a copy made before its
        job converts, which leaves room in the spool for one conversion."""
        check_slide_id(slide_id)
        task = self._tasks.get(slide_id)
        if task is None:
            headroom = self.limits.max_bytes if ahead else 0
            task = asyncio.ensure_future(self._run(slide_id, url, headroom))
            self._tasks[slide_id] = task
        return task

    async def _run(self, slide_id: str, url: str, headroom: int) -> Path | None:
        try:
            path = self.ready(slide_id)
            if path is None:
                loop = asyncio.get_running_loop()
                path = await loop.run_in_executor(
                    self.executor, self._stage, slide_id, url, headroom
                )
            if self.on_ready is not None:
                self.on_ready(slide_id, path)
            return path
        except SpoolFull:
            log.info("no room in the spool for a copy of slide %s now", slide_id)
            return None
        except (WsiError, OSError) as exc:
            # Only the id and the kind of failure: messages may quote names from the bucket.
            log.warning("staging slide %s failed: %s", slide_id, type(exc).__name__)
            return None
        finally:
            self._tasks.pop(slide_id, None)
            self._progress.pop(slide_id, None)

    def progress(self, slide_id: str) -> float:
        """0-1 of a running download (1 once staged)."""
        return 1.0 if self.ready(slide_id) else self._progress.get(slide_id, 0.0)

    async def prepare(self, job: Job) -> str | None:
        """For a worker of this process: the local copy to convert instead of the job's
        `s3://` source (waiting for its download), or None to use the source as it is."""
        if not is_remote(job.source) or job.slide_id is None:
            return None
        path = await self.ensure(job.slide_id, job.source, ahead=False)
        return str(path) if path is not None else None

    def finished(self, job: Job) -> None:
        """The job has ended (done, failed or cancelled): its copy is no longer needed."""
        if job.slide_id is not None and is_remote(job.source):
            with contextlib.suppress(WsiError):
                self.remove(job.slide_id)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        # A download still running in its thread finishes or fails on its own; its partial
        # folder is swept at the next start.
        self.executor.shutdown(wait=False, cancel_futures=True)


SWEEP_SECONDS = 60.0


async def keep_copies(queue: JobQueue, copies: StagedSources, stop: asyncio.Event) -> None:
    """At start: copies left by the last run are viewable again, and the downloads of live jobs
    whose copy is missing start over. Then every minute: copies of slides without a live job go
    (the job ended in another process, was cancelled before it ran, ...)."""
    first = True
    while not stop.is_set():
        with contextlib.suppress(WsiError, OSError):
            live: dict[str, str] = {}
            for state in (JobState.QUEUED, JobState.RUNNING):
                for job in await asyncio.to_thread(queue.list, state, 1000):
                    if job.slide_id is not None and is_remote(job.source):
                        live[job.slide_id] = job.source
            await asyncio.to_thread(copies.sweep, set(live))
            if first:
                for slide_id, url in live.items():
                    copies.ensure(slide_id, url)  # registers an existing copy at once
                first = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SWEEP_SECONDS)
