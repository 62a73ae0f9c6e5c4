"""Ingest workers: take conversion jobs from a `JobQueue` and run each in its own subprocess.

A crash in a C reader (OpenSlide, libtiff, OpenJPEG) kills that subprocess only: the job is
retried (a crash counts as transient) and, after the queue's last attempt, failed. A slide the
converter calls unreadable (`ExitCode.FAILED`) fails at once and its source moves to the
quarantine folder with a reason file, so the next drop of good slides is not held up; unless
its files changed within `settle_seconds` (a copy that paused may resume): then it is retried. The
store's atomic publish means a killed conversion never leaves half a slide, whoever killed it.
A conversion that could not start because another process holds the slide's lock
(`ExitCode.SLIDE_BUSY`) is no attempt: the job is given back for later, never quarantined.
How the worker and the conversion talk (argv, progress, result lines, exit codes) is
`wsi.ingest.protocol`.

A job is done only once its slide's manifest reads back from the store and `after_success` has
moved or deleted the source (`wsi.ingest.source_files`: exactly the files recorded at submit,
only while they are still those files, durably). What cannot be done then (no right to delete on
a scanner share, a full disk) is a warning on the done job, never the end of the worker: `run`
outlives anything a job throws, and it runs under a `Supervisor` that restarts it
(`wsi.ingest.roles`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from wsi.errors import SlideNotFound, WsiError
from wsi.ingest.privacy import redact, reference, source_names
from wsi.ingest.protocol import (
    ExitCode,
    ProgressLine,
    convert_command,
    is_permanent_failure,
    parse_results,
    source_environment,
)
from wsi.ingest.quarantine import without_folders_of
from wsi.ingest.queue import Job, JobQueue, JobState, worker_name
from wsi.ingest.settings import IngestSettings
from wsi.ingest.source_files import (
    changed,
    delete_files,
    grown,
    move_files,
    move_source,
    moved_away,
)
from wsi.ingest.staging import STAGE_SHARE, is_remote
from wsi.ingest.supervise import describe, where
from wsi.store.objects import Store, StoreSettings

log = logging.getLogger("wsi.ingest.worker")


def _strerror(exc: BaseException) -> str:
    """What went wrong, for a job's record: an OSError's text without its file names."""
    if isinstance(exc, OSError) and not isinstance(exc, WsiError):
        return exc.strerror or describe(exc)
    return str(exc)


class LocalCopies(Protocol):
    """Where a worker gets a local copy of a job's remote source (see server/bucket_copies.py)."""

    async def prepare(self, job: Job) -> str | None:
        """The local path to convert instead of `job.source`, or None."""

    def progress(self, slide_id: str) -> float:
        """0-1 of the copy's download."""

    def finished(self, job: Job) -> None:
        """The job has ended (done, failed or cancelled): its copy may go."""


class Worker:
    """One conversion at a time, in a subprocess, publishing into `store`; several run side by
    side for concurrency.

    The conversion runs in its own session, so a SIGTERM or Ctrl-C sent to the service's process
    group reaches the service only, which then decides: let it finish within `stop_timeout`, or
    stop it and give the job back. It still dies with the service, even a SIGKILLed one: it
    holds the read end of a pipe (its stdin) whose write end only the service holds, and exits
    when that closes. Its progress arrives as JSON lines on a second pipe.
    """

    def __init__(
        self,
        queue: JobQueue,
        store: StoreSettings,
        settings: IngestSettings,
        name: str | None = None,
        wake: asyncio.Event | None = None,
        copies: LocalCopies | None = None,
        keep: Sequence[str | os.PathLike[str]] = (),
    ):
        self.queue = queue
        self.store = store
        self.settings = settings
        self.name = name or worker_name()
        self.wake = wake
        """Set by whoever submits a job in this process, so an idle worker claims it at once
        instead of at its next poll (jobs from other processes are found by polling)."""
        self.copies = copies
        """Local copies of s3:// sources made by this process (the service's), converted
        instead of downloading the slide again."""
        self.keep = tuple(Path(k) for k in keep)
        """Folders never removed when a slide's folder is left empty (the watch folders)."""
        self._proc: asyncio.subprocess.Process | None = None
        self._lease_until = -float("inf")
        """Loop time until which the running job's lease is trusted: its claim's or its last
        successful heartbeat's sending time plus `lease_seconds`."""
        self._claims_down = False
        """Whether the last claim failed for the job table (logged once per outage)."""

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and run jobs until `stop` is set, whatever a job throws."""
        while not stop.is_set():
            job = None
            try:
                sent = asyncio.get_running_loop().time()
                try:
                    job = await asyncio.to_thread(
                        self.queue.claim, self.name, self.settings.lease_seconds
                    )
                except WsiError as exc:
                    self._claims_fail(exc)
                    raise
                self._claims_answer()
                if job is not None:
                    await self.run_job(job, stop, claimed=sent)
                    continue
            except WsiError:
                # The queue is unreachable for now (locked, disk full): a job we could not
                # record is taken back when its lease runs out. The worker itself carries on.
                pass
            except Exception as exc:  # a bug or an unforeseen error: that job fails, not us
                log.error("job %s: unexpected %s\n%s", job and job.id, describe(exc), where(exc))
                if job is not None:
                    with contextlib.suppress(WsiError):
                        await asyncio.to_thread(
                            self.queue.fail,
                            job.id,
                            self.name,
                            f"internal error: {describe(exc)}",
                            True,
                        )
            await self._idle(stop)

    def _claims_fail(self, exc: WsiError) -> None:
        """A claim failed: say so once, when the job table stops answering. Quietly retried at
        every poll, a job table that is down or cannot be written (its disk full) left jobs
        queued for as long as it lasted with no line in the log, and the service ready."""
        if self._claims_down:
            return
        self._claims_down = True
        log.warning(
            "worker %s: the job table does not answer (%s): no job is taken until it does",
            self.name,
            describe(exc),
        )

    def _claims_answer(self) -> None:
        """A claim went through: say so when it is the first since the job table was down."""
        if self._claims_down:
            self._claims_down = False
            log.info("worker %s: the job table answers again: taking jobs", self.name)

    async def _idle(self, stop: asyncio.Event) -> None:
        """Wait for the next poll, a wake-up or the stop, whichever comes first."""
        events = [stop] if self.wake is None else [stop, self.wake]
        waits = [asyncio.ensure_future(e.wait()) for e in events]
        await asyncio.wait(waits, timeout=self.settings.poll_seconds, return_when="FIRST_COMPLETED")
        for w in waits:
            w.cancel()
        if self.wake is not None:
            self.wake.clear()

    def _command(self, job: Job, progress_fd: int) -> list[str]:
        """The conversion's argv: into this worker's store, under the job's slide id, with the
        spool's bounds and the de-identification policy of `self.settings` (the source goes in
        its environment: `source_environment`)."""
        settings = self.settings
        return convert_command(
            store=self.store.url,
            progress_fd=progress_fd,
            slide_id=job.slide_id,
            s3_endpoint=self.store.endpoint_url,
            spool_dir=settings.spool_path(self.store.url),
            limits=settings.staging_limits,
            deidentify=settings.deidentify,
            keep_label=settings.keep_label,
            keep_macro=settings.keep_macro,
            extra=settings.convert_args,
        )

    async def _prepare(self, job: Job, stop: asyncio.Event) -> tuple[str, str | None]:
        """The path to convert: a local copy from `self.copies` (awaited, heart-beating the
        while), or the job's own source. Second value: why to stop instead, if so."""
        if self.copies is None:
            return job.source, None
        task = asyncio.ensure_future(self.copies.prepare(job))
        beat = min(2.0, max(0.2, self.settings.lease_seconds / 3))
        try:
            while not task.done():
                await asyncio.wait([task], timeout=beat)
                if task.done():
                    break
                if stop.is_set():
                    return job.source, "shutdown"
                share = STAGE_SHARE * self.copies.progress(job.slide_id or "")
                held = await self._heartbeat(job, round(share, 1))
                if held is False:
                    return job.source, "cancelled"
                if held is None:
                    return job.source, LEASE_LOST
            local = task.result()
        finally:
            if not task.done():
                task.cancel()
        return (local, None) if local is not None else (job.source, None)

    async def _heartbeat(self, job: Job, progress: float) -> bool | None:
        """Renew the running job's lease: True when renewed, False when lost (cancelled, or
        taken over by another worker), None once the queue has not answered for a whole lease.

        A failed renewal (the queue is busy or away) keeps the job only until the last renewal
        runs out, on this process's monotonic clock from before it was sent: after that another
        worker may have claimed the job and be converting it, so ours must stop (it holds the
        slide's lock, and would publish behind the other's back). As the watch folders' leases
        (`wsi.ingest.lease`)."""
        loop = asyncio.get_running_loop()
        sent = loop.time()
        try:
            held = await asyncio.to_thread(self.queue.heartbeat, job.id, self.name, progress)
        except WsiError:
            return True if loop.time() < self._lease_until else None
        if held:
            self._lease_until = sent + self.settings.lease_seconds
        return held

    async def run_job(self, job: Job, stop: asyncio.Event, claimed: float | None = None) -> None:
        """Run one claimed job to its end: done, failed, retried later, or given back.
        `claimed`: the loop time before the claim was sent (default now), from which its lease
        is trusted for `lease_seconds` until a heartbeat renews it."""
        try:
            await self._run_job(job, stop, claimed)
        finally:
            # A local copy serves retries and a job given back at shutdown; it goes once the
            # job has ended (done, failed, cancelled).
            if self.copies is not None:
                with contextlib.suppress(WsiError):
                    current = await asyncio.to_thread(self.queue.get, job.id)
                    if current.state.terminal:
                        self.copies.finished(job)

    async def _run_job(self, job: Job, stop: asyncio.Event, claimed: float | None) -> None:
        loop = asyncio.get_running_loop()
        claimed = loop.time() if claimed is None else claimed
        self._lease_until = claimed + self.settings.lease_seconds
        if job.files:
            # Never convert another slide under this job's content id.
            why = await asyncio.to_thread(changed, job.files)
            if why is None:
                why = await asyncio.to_thread(grown, job.source, job.files)
            if why is not None:
                await asyncio.to_thread(self._source_changed, job, why)
                return
        lost = self.queue.lost_every_attempt(job)
        if lost is not None:  # it killed its worker every time: failed and quarantined, as any
            await asyncio.to_thread(self._failed, job, lost, False)  # last failed attempt
            return
        slide = f" slide {job.slide_id}" if job.slide_id else ""
        log.info("job %s: converting%s (attempt %d)", job.id, slide, job.attempts)
        source, stopped = await self._prepare(job, stop)
        if stopped is not None:
            await asyncio.to_thread(self._finish, job, None, _Run(loop.time(), stopped=stopped))
            return
        # A staged copy's download counted for the first STAGE_SHARE of the progress.
        offset = STAGE_SHARE * 100.0 if source != job.source else 0.0
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._command(job, write_fd),
                env={**os.environ, **source_environment(source)},
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(write_fd,),
                start_new_session=True,
            )
        except OSError as exc:  # cannot even start (fd or process limits): try again later
            os.close(read_fd)
            await asyncio.to_thread(
                self.queue.fail, job.id, self.name, f"cannot start a conversion: {exc}", True
            )
            return
        finally:
            os.close(write_fd)
        self._proc = proc
        run = _Run(loop.time(), offset=offset, source=source)
        try:
            await self._supervise(job, proc, read_fd, run, stop)
        finally:
            self._proc = None
        slide_id = await asyncio.to_thread(self._finish, job, proc.returncode, run)
        if slide_id is not None and await self._publish(job, slide_id):
            seconds = loop.time() - run.started
            log.info("job %s: slide %s published (%.1f s)", job.id, slide_id, seconds)

    async def _supervise(
        self,
        job: Job,
        proc: asyncio.subprocess.Process,
        read_fd: int,
        run: _Run,
        stop: asyncio.Event,
    ) -> None:
        """Heart-beat the job while the conversion runs, following its progress and output;
        stop it when cancelled, over time, or at shutdown past the stop timeout."""
        loop = asyncio.get_running_loop()
        readers = [
            asyncio.ensure_future(_read_progress(read_fd, run, loop)),
            asyncio.ensure_future(_read_tail(proc.stdout, run, "out")),
            asyncio.ensure_future(_read_tail(proc.stderr, run, "err")),
        ]
        waiting = asyncio.ensure_future(proc.wait())
        stopping = asyncio.ensure_future(stop.wait())
        beat = min(2.0, max(0.2, self.settings.lease_seconds / 3))
        while not waiting.done():
            # Wake for the heartbeat, or at once when the service starts to shut down.
            watched = [waiting] if stopping.done() else [waiting, stopping]
            await asyncio.wait(watched, timeout=beat, return_when="FIRST_COMPLETED")
            if waiting.done():
                break
            held = await self._heartbeat(job, min(run.progress, 99.9))
            now = loop.time()
            if held is False:  # cancelled, or the lease went to another worker
                run.stopped = run.stopped or "cancelled"
            elif held is None:  # the queue is away: converting on only while the lease lasts
                run.stopped = run.stopped or LEASE_LOST
            elif self._over_time(run, now):
                run.stopped = run.stopped or self._over_time(run, now)
            elif stop.is_set():
                run.stopping_since = run.stopping_since or now
                if now - run.stopping_since >= self.settings.stop_timeout:
                    run.stopped = run.stopped or "shutdown"
            if run.stopped and run.kill_sent_at is None:
                run.kill_sent_at = now
                _signal_group(proc, signal.SIGTERM)
            elif run.kill_sent_at is not None and now - run.kill_sent_at > KILL_GRACE_SECONDS:
                _signal_group(proc, signal.SIGKILL)
        stopping.cancel()
        await asyncio.wait(readers, timeout=5)
        for reader in readers:
            reader.cancel()
        if stop.is_set() and (proc.returncode or 0) < 0:
            # Killed by a signal while the service stops: a supervisor that signals the whole
            # group or cgroup (systemd's default KillMode) got there first. Not the slide's doing.
            run.stopped = run.stopped or "shutdown"
        if proc.stdin is not None:
            proc.stdin.close()

    def _over_time(self, run: _Run, now: float) -> str | None:
        """Why a conversion should be stopped for taking too long, if it should."""
        limit, quiet = self.settings.job_timeout, self.settings.stall_timeout
        if limit and now - run.started > limit:
            return f"timed out after {limit:g} s"
        if quiet and now - run.last_sign > quiet:
            return f"stalled: no progress for {quiet:g} s"
        return None

    def _finish(self, job: Job, code: int | None, run: _Run) -> str | None:
        """Record how the conversion ended. Returns the slide id when it published one that
        reads back from the store: the job is then completed by `_publish`."""
        out, err = run.text("out"), run.text("err")
        last_error = next((x for x in reversed(err.splitlines()) if x.strip()), "")
        last_error = without_folders_of(last_error, run.source, job.source)
        if code == ExitCode.OK:  # finished, even if it was being stopped: the slide is published
            results = parse_results(out)
            slide_id = results[-1].slide_id if results else job.slide_id
            problem = "the conversion reported no slide" if slide_id is None else None
            problem = problem or self._unpublished(slide_id or "")
            if problem is None:
                return slide_id
            self._failed(job, problem, transient=True)
            return None
        if run.stopped in ("cancelled", LEASE_LOST):
            # The queue already says cancelled, or another worker owns the job now or may take
            # it once its lease has run out (an attempt spent, as by a worker that died).
            return None
        if run.stopped == "shutdown":
            self.queue.release(job.id, self.name, "stopped by a service shutdown; resumes")
            return None
        if run.stopped:  # timed out or stalled: maybe a hung reader, maybe a slow store
            self._failed(job, f"conversion {run.stopped}", transient=True)
            return None
        if code == ExitCode.SLIDE_BUSY:  # not attempted: another process converts the slide
            # (a worker that lost this job's lease, a user's `wsi convert`). Retried after the
            # backoff this attempt would have had, never failed nor quarantined for it.
            reason = "the slide is being converted by another process; tried again later"
            self.queue.release(
                job.id, self.name, reason, after=self.queue.retry.delay(job.attempts)
            )
            return None
        if code is not None and is_permanent_failure(code):
            # Final only for a slide that has been still a while: one written to moments ago
            # may be a copy that paused past the quiet period and will resume.
            reason = last_error or "the converter could not read this slide"
            self._failed(job, reason, transient=self._settling(job))
            return None
        # The store (TEMPFAIL), a crash or a kill (negative status): try again later. A store
        # that failed every attempt is no fault of the slide: it is not quarantined.
        reason = last_error or f"conversion ended with status {code}"
        self._failed(job, reason, transient=True, blame_slide=code != ExitCode.TEMPFAIL)
        return None

    def _settling(self, job: Job) -> bool:
        """Whether a file of the job's local source was modified less than `settle_seconds`
        ago (maybe still being copied). False when none can be looked at (a bucket's source)."""
        paths = [f.path for f in job.files] or ([] if is_remote(job.source) else [job.source])
        newest = -float("inf")
        for path in paths:
            with contextlib.suppress(OSError):
                newest = max(newest, os.stat(path).st_mtime)
        return time.time() - newest < self.settings.settle_seconds

    def _failed(self, job: Job, reason: str, transient: bool, *, blame_slide: bool = True) -> None:
        """Record a failed attempt; once the job has failed for good, quarantine its source,
        unless the last attempt failed for something else than the slide (`blame_slide`
        False: the store could not be written, every attempt): a good slide was moved to
        quarantine by an outage of a minute. The log says which (the reason is the job's
        error, never logged: it may quote a file name)."""
        if not self.queue.fail(job.id, self.name, reason, transient):
            return
        if self.queue.get(job.id).state.value != "failed":
            log.info("job %s: attempt %d failed; tried again later", job.id, job.attempts)
            return
        if not blame_slide:
            log.warning(
                "job %s: failed for good: the store failed on every attempt; its source stays "
                "where it is (retry the job once the store is back)",
                job.id,
            )
            return
        kept = " (its source stays in its bucket)" if is_remote(job.source) else ""
        log.info("job %s: failed for good%s", job.id, kept)
        try:
            self._quarantine(job, reason)
        except (OSError, WsiError) as exc:
            log.warning("job %s: its source could not be quarantined: %s", job.id, describe(exc))
            self.queue.warn(job.id, f"the source could not be quarantined: {_strerror(exc)}")

    def _unpublished(self, slide_id: str) -> str | None:
        """Why the slide `slide_id` cannot be read back from the store, or None when its manifest
        reads: what a finished conversion says is checked, not assumed, before a source goes."""
        try:
            manifest = Store(self.store).manifest(slide_id)
        except SlideNotFound:
            return f"the conversion reported slide {slide_id}, but the store does not have it"
        except WsiError as exc:
            return f"the manifest of slide {slide_id} cannot be read back: {exc}"
        if manifest.slide_id != slide_id:
            return f"the manifest of slide {slide_id} names another slide"
        return None

    def _source_changed(self, job: Job, why: str) -> None:
        """The job's files are no longer those submitted: never converted under its id. Done
        when the slide is already published (an earlier attempt got that far and moved the
        source). A slide that left its names (renamed or moved in its folder, none replaced)
        is tried again after the backoff: the watcher, reporting it under its new name
        meanwhile, moves this queued job there (`JobQueue.submit`); failed for good, a
        watcher's report of the new name was answered with this failed job, and the slide was
        never converted. Else failed for good; the files are left where they are (they are
        another slide now, which the watcher submits as a job of its own)."""
        message = f"the source changed since the job was submitted: {why}"
        if job.slide_id is not None and self._unpublished(job.slide_id) is None:
            self.queue.complete(job.id, self.name, job.slide_id, message)
            return
        if job.files and moved_away(job.files):
            note = f"{message}; tried again where the watcher finds it"
            self.queue.fail(job.id, self.name, note, transient=True)
            return
        self.queue.fail(job.id, self.name, f"{message}; not converted", transient=False)

    async def _publish(self, job: Job, slide_id: str) -> bool:
        """Apply `after_success` (heart-beating while a slow move runs), then mark the job done,
        with a warning for what could not be done; whether it was ours to mark. A job cancelled
        during this attempt is done all the same: its conversion published the slide before the
        cancel reached it, so a `cancelled` job would hide a published slide and leave its source
        behind."""
        late: str | None = None
        if not await asyncio.to_thread(self.queue.heartbeat, job.id, self.name, 99.9):
            current = await asyncio.to_thread(self.queue.get, job.id)
            if not (current.state is JobState.CANCELLED and current.attempts == job.attempts):
                return False  # taken over by another worker: the source is not ours to touch
            late = (
                "cancelled too late: the cancel reached the worker once its conversion had "
                "published the slide (a worker hears of a cancel at its next heartbeat)"
            )
        task = asyncio.ensure_future(asyncio.to_thread(self._after_success, job))
        beat = min(2.0, max(0.2, self.settings.lease_seconds / 3))
        while not task.done():
            await asyncio.wait([task], timeout=beat)
            if not task.done():
                with contextlib.suppress(WsiError):
                    await asyncio.to_thread(self.queue.heartbeat, job.id, self.name, 99.9)
        warning = "; ".join(w for w in (late, task.result()) if w) or None
        return await asyncio.to_thread(
            functools.partial(
                self.queue.complete,
                job.id,
                self.name,
                slide_id,
                warning,
                cancelled_attempt=job.attempts if late else None,
            )
        )

    def _after_success(self, job: Job) -> str | None:
        """Keep, move or delete the job's source as `after_success` says; returns what could not
        be done (a warning for the job), never raises for it."""
        policy = self.settings.after_success
        # Sources in a bucket stay where they are: the policies are for scanner drop folders.
        if policy == "keep" or is_remote(job.source):
            return None
        if not job.files:
            return "the source was left in place: its files were not recorded at submit"
        why = changed(job.files)
        if why is not None:
            return f"the source was left in place: {why} since the job was submitted"
        paths = [Path(f.path) for f in job.files]
        try:
            if policy == "move":
                done = Path(self.settings.done_path(self.store.url))
                move_files(paths, Path(job.source), done, keep=self.keep)
            else:
                delete_files(paths, Path(job.source), keep=self.keep)
        except (OSError, WsiError) as exc:
            verb = "moved to the done folder" if policy == "move" else "deleted"
            log.warning("job %s: the source could not be %s: %s", job.id, verb, describe(exc))
            return f"the slide is published, but its source could not be {verb}: {_strerror(exc)}"
        return None

    def _quarantine(self, job: Job, reason: str) -> None:
        """Move a local source that failed for good into the quarantine folder, with a
        `REASON.txt` beside it; both private to the service whatever the umask (the slide is
        patient data). De-identifying, the reason names the slide by its reference, no file."""
        source = Path(job.source)
        if is_remote(job.source) or not source.exists():
            return
        if self.settings.deidentify:
            ref = reference(job.slide_id, job.id)
            reason = redact(reason, source_names(job.source, [f.path for f in job.files]), ref)
        quarantine = Path(self.settings.quarantine_path(self.store.url))
        move_source(source, quarantine, reason, files=job.files)


LEASE_LOST = "lease lost: the job table could not be reached for a whole lease"
"""Why a conversion is stopped when its worker's heartbeats kept failing past the lease."""

KILL_GRACE_SECONDS = 5.0
"""A conversion asked to stop (SIGTERM) is killed this long afterwards."""
_TAIL_BYTES = 64 * 1024


@dataclass
class _Run:
    """What a worker knows about its running conversion (mutable: readers update it)."""

    started: float
    progress: float = 0.0
    offset: float = 0.0
    """Progress already made before the conversion started (a staged download)."""
    last_sign: float = 0.0
    """When the conversion last reported progress (loop time)."""
    stopped: str | None = None
    """Why the worker stops it: cancelled, shutdown, or a timeout message."""
    stopping_since: float | None = None
    kill_sent_at: float | None = None
    tails: dict[str, bytearray] = field(default_factory=dict)
    source: str = ""
    """What the conversion was given (the job's source, or its staged copy)."""

    def __post_init__(self) -> None:
        self.last_sign = self.started

    def text(self, name: str) -> str:
        return bytes(self.tails.get(name, b"")).decode(errors="replace")


async def _read_progress(fd: int, run: _Run, loop: asyncio.AbstractEventLoop) -> None:
    """Follow the conversion's progress lines; malformed ones are ignored."""
    reader = asyncio.StreamReader(limit=1 << 16)
    pipe = os.fdopen(fd, "rb", buffering=0)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        while line := await reader.readline():
            reported = ProgressLine.parse(line)
            if reported is not None:
                run.progress = run.offset + (100.0 - run.offset) * reported.percent / 100.0
                run.last_sign = loop.time()
    finally:
        transport.close()


async def _read_tail(stream: asyncio.StreamReader | None, run: _Run, name: str) -> None:
    """Keep the last 64 KiB of a stream: bounded, however much a conversion prints."""
    tail = run.tails.setdefault(name, bytearray())
    if stream is None:
        return
    while chunk := await stream.read(65536):
        tail += chunk
        del tail[:-_TAIL_BYTES]


def _signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    """Signal the conversion's session (it leads its own process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
