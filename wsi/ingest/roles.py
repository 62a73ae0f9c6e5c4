"""The ingest roles a process runs (`wsi watch`, `wsi worker`, and the service's ingest): a
watcher feeding the job table, conversion workers (`wsi.ingest.worker`), the purge of old jobs,
and how long stopping them may take.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

from wsi.errors import WsiError
from wsi.ingest.lease import FolderLeases, dead_local_holder, run_while_held, store_lease_name
from wsi.ingest.quarantine import ResumedCopies
from wsi.ingest.queue import Job, JobQueue, JobState, SourceFile
from wsi.ingest.scan import SlideCandidate
from wsi.ingest.settings import IngestSettings
from wsi.ingest.source_files import SecondCopies, second_copy, submit_slide
from wsi.ingest.spool import sweep_orphans
from wsi.ingest.supervise import Supervisor, describe
from wsi.ingest.watcher import FolderWatcher
from wsi.ingest.worker import KILL_GRACE_SECONDS, Worker
from wsi.pseudonyms import CONTENT_IDS, PublishedIds
from wsi.store.objects import StoreSettings

log = logging.getLogger("wsi.ingest.roles")


async def feed(
    watcher: FolderWatcher,
    queue: JobQueue,
    on_submitted: Callable[[str, Path], None] | None = None,
    ids: PublishedIds = CONTENT_IDS,
    copies: SecondCopies | None = None,
) -> None:
    """Turn every complete slide the watcher reports into a job with its files, under the id
    `ids` names it by (the same content: one job; a cancelled or failed one too, until someone
    retries it). A slide that cannot be submitted now (it changed again, a file cannot be read,
    the queue is away) is reported again after another quiet period, not forgotten. With
    `copies`, another copy of a slide already published is moved or deleted as its first copy
    was; one of a slide still converting is looked at again after another quiet period."""
    async for slide in watcher.events():
        try:
            job = await asyncio.to_thread(submit_slide, queue, slide, watched=True, ids=ids)
        except (WsiError, OSError) as exc:
            log.info("a slide could not be submitted (%s): tried again later", describe(exc))
            watcher.retry(slide)
            continue
        if job.state is JobState.QUEUED and job.attempts == 0:
            log.info("job %s: queued (slide %s)", job.id, job.slide_id)
        if copies is not None and await _second_copy(watcher, job, slide, copies):
            continue
        if on_submitted is not None and job.slide_id is not None:
            on_submitted(job.slide_id, slide.path)


async def _second_copy(
    watcher: FolderWatcher, job: Job, slide: SlideCandidate, copies: SecondCopies
) -> bool:
    """Whether `slide` is another copy of the slide of `job` (`second_copy`): set aside when
    the job is done, looked at again later while it runs or waits. Only ids in the log: its
    file names are often a patient's."""
    if job.state is not JobState.DONE and job.state.terminal:
        return False  # failed or cancelled: left for whoever retries the slide
    try:
        files = await asyncio.to_thread(second_copy, job, slide)
        if files is None:
            return False
        if job.state is not JobState.DONE:
            watcher.retry(slide)
            return True
        await asyncio.to_thread(copies.set_aside, files, slide.path)
    except (WsiError, OSError) as exc:
        log.warning(
            "job %s: another copy of slide %s could not be %s: %s",
            job.id, job.slide_id, _VERB[copies.policy], describe(exc),
        )  # fmt: skip
        watcher.retry(slide)
        return True
    log.info(
        "job %s: another copy of slide %s (already published) was %s",
        job.id, job.slide_id, _VERB[copies.policy],
    )  # fmt: skip
    return True


_VERB = {"move": "moved to the done folder", "delete": "deleted"}
"""What `SecondCopies` does to a copy, by policy, as the log says it."""


async def watch_folders(
    folders: Sequence[str],
    queue: JobQueue,
    settings: IngestSettings,
    stop: asyncio.Event,
    on_submitted: Callable[[str, Path], None] | None = None,
    *,
    store: str,
) -> None:
    """`feed` from a new watcher of `folders` until `stop`. New at every (re)start: a watcher
    restarted after a crash reports every complete slide again (submitting is idempotent), so a
    slide reported just before the crash is not lost. Each folder is scanned only while this
    watcher holds its lease in the job table (`wsi.ingest.lease`): of the services sharing one
    folder, one watches it at a time. Another copy of a slide published into `store` (a store
    URL) is moved or deleted as the policy does to sources (`SecondCopies`), kept with "keep";
    a quarantined slide whose copy went on in quarantine is put back (`ResumedCopies`)."""
    leases = FolderLeases(queue, folders, settings.lease_seconds)
    resumed = ResumedCopies(settings.quarantine_path(store), settings.quiet_seconds)
    watcher = FolderWatcher(
        folders,
        settings.quiet_seconds,
        settings.poll_seconds,
        stop_event=stop,
        leases=leases,
        resumed=resumed,
    )
    policy = settings.after_success
    copies = None
    if policy != "keep":
        keep = tuple(Path(f) for f in folders)
        copies = SecondCopies(policy, Path(settings.done_path(store)), keep)
    await feed(watcher, queue, on_submitted, settings.published_ids(), copies)


PURGE_EVERY_SECONDS = 3600.0


async def purge_jobs(queue: JobQueue, keep_days: float, stop: asyncio.Event) -> None:
    """Hourly (and once at start): `purge_ended` with the jobs that ended more than `keep_days`
    ago. A queue error is left for the next round: purging is housekeeping, never a reason to
    stop."""
    while not stop.is_set():
        with contextlib.suppress(WsiError):
            await asyncio.to_thread(purge_ended, queue, time.time() - keep_days * 86400.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PURGE_EVERY_SECONDS)


LISTED = 1000
"""Jobs read at a time while looking for cancelled ones to keep."""


def purge_ended(queue: JobQueue, finished_before: float) -> int:
    """Delete the jobs that ended before `finished_before`, but a cancelled or done one whose
    files are all still where it was submitted from, unchanged: the slide a watch folder still
    holds would be reported again and, its job gone, queued again. A cancelled slide would then
    be converted when someone said it must not be (a cancel lasts as long as the files it was
    given); a done one kept in its folder (`--after keep`) would cost a conversion process that
    finds it published, every slide of the inbox once a purge period. A failed job goes: its
    slide, unless quarantined, gets a new attempt. Returns how many jobs were deleted."""
    keep: list[str] = []
    for state in (JobState.CANCELLED, JobState.DONE):
        offset = 0
        while True:
            page = queue.list(state, LISTED, offset)
            keep += [
                job.id
                for job in page
                if job.finished is not None and job.finished < finished_before and _in_place(job)
            ]
            if len(page) < LISTED:
                break
            offset += LISTED
    return queue.purge(finished_before, keep)


def _in_place(job: Job) -> bool:
    """Whether every file the job was submitted with is still there, the same file (none for a
    slide in a bucket: those are not kept)."""
    try:
        return bool(job.files) and all(SourceFile.of(f.path) == f for f in job.files)
    except OSError:
        return False


def shutdown_seconds(settings: IngestSettings) -> float:
    """How long stopping the ingest tasks may take: running conversions get `stop_timeout`, then
    SIGTERM and, `KILL_GRACE_SECONDS` later, SIGKILL; a few seconds more for the bookkeeping."""
    return settings.stop_timeout + KILL_GRACE_SECONDS + 5


def run_roles(
    queue: JobQueue,
    store: StoreSettings,
    settings: IngestSettings,
    *,
    watch: tuple[str, ...] = (),
    convert: bool = False,
    housekeeping: Mapping[str, Callable[[asyncio.Event], Awaitable[None]]] | None = None,
) -> None:
    """`wsi watch` (`watch` folders feed the queue) and `wsi worker` (`convert`:
    `settings.workers` conversions into `store`) without the HTTP service, until SIGTERM or
    SIGINT; running conversions get `settings.stop_timeout` to finish. `housekeeping`: more
    loops of the converting role (name -> loop until the event is set), started with the
    conversions: the archive policy, which imports what ingest must not."""
    workers = settings.workers if convert else 0

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # Jobs of a crashed run: those of this host's dead processes at once, the rest once
        # their leases run out.
        await asyncio.to_thread(queue.recover, None, dead_local_holder)
        if workers:  # temp copies of s3:// sources whose conversions were killed
            await asyncio.to_thread(sweep_orphans, settings.spool_path(store.url))
        tasks = Supervisor(stop)
        for i in range(workers):
            tasks.start(
                f"worker-{i + 1}", functools.partial(Worker(queue, store, settings).run, stop)
            )
        if workers and settings.keep_jobs_days:
            tasks.start(
                "purge", functools.partial(purge_jobs, queue, settings.keep_jobs_days, stop)
            )
        for name, loop_until in (housekeeping or {}).items() if workers else ():
            # One worker of those sharing the job table runs each loop over the store.
            lease = store_lease_name(name, store.url)
            held = functools.partial(
                run_while_held, queue, lease, settings.lease_seconds, loop_until, stop
            )
            tasks.start(name, held)
        if watch:
            looking = functools.partial(
                watch_folders, watch, queue, settings, stop, store=store.url
            )
            tasks.start("watcher", looking)
        await stop.wait()
        await tasks.wait(shutdown_seconds(settings))

    asyncio.run(main())
