"""Ingest workers: take conversion jobs from a `JobQueue` and run each in its own subprocess.

A crash in a C reader (OpenSlide, libtiff, OpenJPEG) kills that subprocess only: the job is
retried (a crash counts as transient) and, after the queue's last attempt, failed. A slide the
converter calls unreadable (exit status 1) fails at once and its source moves to the quarantine
folder with a reason file, so the next drop of good slides is not held up. The store's atomic
publish means a killed conversion never leaves half a slide, whoever killed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from wsi.errors import InvalidArgument, WsiError
from wsi.ingest.queue import Job, JobQueue, worker_name
from wsi.ingest.staging import STAGE_SHARE, sweep_orphans
from wsi.ingest.watcher import FolderWatcher
from wsi.slide_id import content_slide_id

EXIT_SLIDE_UNREADABLE = 1
EXIT_TEMPFAIL = 75


@dataclass(frozen=True)
class IngestSettings:
    """How conversions run and what happens to sources afterwards."""

    store: str
    """Where slides are published (folder or s3:// URL)."""
    s3_endpoint: str | None = None
    concurrency: int = 1
    """Conversions running at once (each uses all cores through its own thread pool)."""
    lease_seconds: float = 60.0
    """A job whose worker stops heart-beating this long is taken over by another worker."""
    poll_seconds: float = 1.0
    stop_timeout: float = 30.0
    """On shutdown, running conversions get this long to finish before they are stopped (the
    job is given back, its attempt not counted, and resumes at the next start)."""
    job_timeout: float = 0.0
    """Stop a conversion that runs longer than this (seconds; 0: no limit). Counts as a
    transient failure: retried, then failed and quarantined."""
    stall_timeout: float = 600.0
    """Stop a conversion that reports no progress for this long (a hung reader or store);
    0: never. Retried like a timeout."""
    spool_dir: str | None = None
    """Where s3:// sources are downloaded for conversion (default: the temp folder)."""
    after_success: Literal["keep", "move", "delete"] = "keep"
    done_dir: str | None = None
    quarantine_dir: str = "quarantine"
    convert_args: tuple[str, ...] = ()
    """Extra `wsi convert` flags (quality, format, ...)."""

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.lease_seconds <= 0 or self.poll_seconds <= 0:
            raise InvalidArgument("concurrency, lease and poll interval must be positive")
        if min(self.stop_timeout, self.job_timeout, self.stall_timeout) < 0:
            raise InvalidArgument("stop, job and stall timeouts must be >= 0")
        if self.after_success == "move" and not self.done_dir:
            raise InvalidArgument("after_success='move' needs a done folder")


def source_parts(source: Path) -> list[Path]:
    """The filesystem entries that make up a slide: the file or folder, a MIRAX companion
    folder, and a sidecar JSON."""
    parts = [source]
    companion = source.with_suffix("")
    if source.suffix.lower() in {".mrxs", ".vms", ".vmu"} and companion.is_dir():
        parts.append(companion)
    for sidecar in (source.with_name(source.name + ".json"), source.with_suffix(".json")):
        if sidecar != source and sidecar.is_file():
            parts.append(sidecar)
    return parts


def move_source(source: Path, dest_dir: Path, reason: str | None = None) -> Path:
    """Move a slide's parts into a new folder `dest_dir/<slide name>[-n]` (never overwriting
    anything), with `REASON.txt` beside them when a reason is given. Returns the new path."""
    target = dest_dir / source.name
    n = 0
    while target.exists():
        n += 1
        target = dest_dir / f"{source.name}-{n}"
    target.mkdir(parents=True)
    for part in source_parts(source):
        shutil.move(str(part), str(target / part.name))
    if reason is not None:
        (target / "REASON.txt").write_text(reason.rstrip() + "\n")
    return target / source.name


class LocalCopies(Protocol):
    """Where a worker gets a local copy of a job's remote source (see server/staged.py)."""

    async def prepare(self, job: Job) -> str | None:
        """The local path to convert instead of `job.source`, or None."""

    def progress(self, slide_id: str) -> float:
        """0-1 of the copy's download."""

    def finished(self, job: Job) -> None:
        """The job has ended (done, failed or cancelled): its copy may go."""


class Worker:
    """One conversion at a time, in a subprocess; several run side by side for concurrency.

    The conversion runs in its own session, so a SIGTERM or Ctrl-C sent to the service's process
    group reaches the service only, which then decides: let it finish within `stop_timeout`, or
    stop it and give the job back. It still dies with the service, even a SIGKILLed one: it
    holds the read end of a pipe (its stdin) whose write end only the service holds, and exits
    when that closes. Its progress arrives as JSON lines on a second pipe.
    """

    def __init__(
        self,
        queue: JobQueue,
        settings: IngestSettings,
        name: str | None = None,
        wake: asyncio.Event | None = None,
        copies: LocalCopies | None = None,
    ):
        self.queue = queue
        self.settings = settings
        self.name = name or worker_name()
        self.wake = wake
        """Set by whoever submits a job in this process, so an idle worker claims it at once
        instead of at its next poll (jobs from other processes are found by polling)."""
        self.copies = copies
        """Local copies of s3:// sources made by this process (the service's), converted
        instead of downloading the slide again."""
        self._proc: asyncio.subprocess.Process | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and run jobs until `stop` is set."""
        while not stop.is_set():
            try:
                job = await asyncio.to_thread(
                    self.queue.claim, self.name, self.settings.lease_seconds
                )
                if job is not None:
                    await self.run_job(job, stop)
                    continue
            except WsiError:
                # The queue is unreachable for now (locked, disk full): a job we could not
                # record is taken back when its lease runs out. The worker itself carries on.
                pass
            await self._idle(stop)

    async def _idle(self, stop: asyncio.Event) -> None:
        """Wait for the next poll, a wake-up or the stop, whichever comes first."""
        events = [stop] if self.wake is None else [stop, self.wake]
        waits = [asyncio.ensure_future(e.wait()) for e in events]
        await asyncio.wait(waits, timeout=self.settings.poll_seconds, return_when="FIRST_COMPLETED")
        for w in waits:
            w.cancel()
        if self.wake is not None:
            self.wake.clear()

    def _command(self, job: Job, source: str, progress_fd: int) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "wsi.cli",
            "convert",
            source,
            "--out",
            self.settings.store,
            "--no-progress",
            "--progress-fd",
            str(progress_fd),
            "--exit-with-stdin",
        ]
        if job.slide_id:
            cmd += ["--slide-id", job.slide_id]
        if self.settings.s3_endpoint:
            cmd += ["--s3-endpoint", self.settings.s3_endpoint]
        if self.settings.spool_dir:
            cmd += ["--spool", self.settings.spool_dir]
        return cmd + list(self.settings.convert_args)

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
                with contextlib.suppress(WsiError):
                    if not await asyncio.to_thread(
                        self.queue.heartbeat, job.id, self.name, round(share, 1)
                    ):
                        return job.source, "cancelled"
            local = task.result()
        finally:
            if not task.done():
                task.cancel()
        return (local, None) if local is not None else (job.source, None)

    async def run_job(self, job: Job, stop: asyncio.Event) -> None:
        """Run one claimed job to its end: done, failed, retried later, or given back."""
        try:
            await self._run_job(job, stop)
        finally:
            # A local copy serves retries and a job given back at shutdown; it goes once the
            # job has ended (done, failed, cancelled).
            if self.copies is not None:
                with contextlib.suppress(WsiError):
                    current = await asyncio.to_thread(self.queue.get, job.id)
                    if current.state.terminal:
                        self.copies.finished(job)

    async def _run_job(self, job: Job, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        source, stopped = await self._prepare(job, stop)
        if stopped is not None:
            await asyncio.to_thread(self._finish, job, None, _Run(loop.time(), stopped=stopped))
            return
        # A staged copy's download counted for the first STAGE_SHARE of the progress.
        offset = STAGE_SHARE * 100.0 if source != job.source else 0.0
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._command(job, source, write_fd),
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
        run = _Run(loop.time(), offset=offset)
        try:
            await self._supervise(job, proc, read_fd, run, stop)
        finally:
            self._proc = None
        await asyncio.to_thread(self._finish, job, proc.returncode, run)

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
            try:
                held = await asyncio.to_thread(
                    self.queue.heartbeat, job.id, self.name, min(run.progress, 99.9)
                )
            except WsiError:  # the queue is busy or away: keep converting, beat again later
                held = True
            now = loop.time()
            if not held:  # cancelled, or the lease went to another worker
                run.stopped = run.stopped or "cancelled"
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

    def _finish(self, job: Job, code: int | None, run: _Run) -> None:
        out, err = run.text("out"), run.text("err")
        last_error = next((x for x in reversed(err.splitlines()) if x.strip()), "")
        if code == 0:  # finished, even if it was being stopped: the slide is published
            slide_id = out.split("\t", 1)[0].strip()
            if self.queue.complete(job.id, self.name, slide_id):
                self._after_success(job.source)
            return
        if run.stopped == "cancelled":
            return  # the queue already says cancelled (or another worker owns the job now)
        if run.stopped == "shutdown":
            self.queue.release(job.id, self.name, "stopped by a service shutdown; resumes")
            return
        if run.stopped:  # timed out or stalled: maybe a hung reader, maybe a slow store
            self.queue.fail(job.id, self.name, f"conversion {run.stopped}", transient=True)
            if self.queue.get(job.id).state.value == "failed":
                self._quarantine(job, f"conversion {run.stopped}")
            return
        if code == EXIT_SLIDE_UNREADABLE:
            reason = last_error or "the converter could not read this slide"
            if self.queue.fail(job.id, self.name, reason, transient=False):
                self._quarantine(job, reason)
            return
        # Store trouble (75), a crash or a kill (negative status): try again later.
        reason = last_error or f"conversion ended with status {code}"
        self.queue.fail(job.id, self.name, reason, transient=True)
        current = self.queue.get(job.id)
        if current.state.value == "failed":  # out of attempts
            self._quarantine(job, reason)

    def _after_success(self, job_source: str) -> None:
        # Sources in a bucket stay where they are: the policies are for scanner drop folders.
        source = Path(job_source)
        if job_source.startswith("s3://") or self.settings.after_success == "keep":
            return
        if not source.exists():
            return
        if self.settings.after_success == "move" and self.settings.done_dir:
            move_source(source, Path(self.settings.done_dir))
            return
        for part in source_parts(source):
            if part.is_dir():
                shutil.rmtree(part)
            else:
                part.unlink()

    def _quarantine(self, job: Job, reason: str) -> None:
        source = Path(job.source)
        if source.exists() and not job.source.startswith("s3://"):
            move_source(source, Path(self.settings.quarantine_dir), reason)


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

    def __post_init__(self) -> None:
        self.last_sign = self.started

    def text(self, name: str) -> str:
        return bytes(self.tails.get(name, b"")).decode(errors="replace")


async def _read_progress(fd: int, run: _Run, loop: asyncio.AbstractEventLoop) -> None:
    """Follow the conversion's `--progress-fd` lines; malformed lines are ignored."""
    reader = asyncio.StreamReader(limit=1 << 16)
    pipe = os.fdopen(fd, "rb", buffering=0)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        while line := await reader.readline():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                value = float(json.loads(line)["progress"])
                if 0.0 <= value <= 100.0:
                    run.progress = run.offset + (100.0 - run.offset) * value / 100.0
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


async def feed(
    watcher: FolderWatcher,
    queue: JobQueue,
    on_submitted: Callable[[str, Path], None] | None = None,
) -> None:
    """Turn every complete slide the watcher reports into a job (the same content: one job)."""
    async for slide in watcher.events():
        try:
            slide_id = await asyncio.to_thread(content_slide_id, slide.path)
            await asyncio.to_thread(queue.submit, str(slide.path), slide_id)
        except (WsiError, OSError):  # gone again, or unreadable: the next scan decides
            continue
        if on_submitted is not None:
            on_submitted(slide_id, slide.path)


PURGE_EVERY_SECONDS = 3600.0


async def purge_jobs(queue: JobQueue, keep_days: float, stop: asyncio.Event) -> None:
    """Hourly (and once at start): delete jobs that ended more than `keep_days` ago. A queue
    error is left for the next round: purging is housekeeping, never a reason to stop."""
    while not stop.is_set():
        with contextlib.suppress(WsiError):
            await asyncio.to_thread(queue.purge, time.time() - keep_days * 86400.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PURGE_EVERY_SECONDS)


def run_roles(
    queue: JobQueue,
    settings: IngestSettings,
    workers: int,
    watch: tuple[str, ...] = (),
    quiet_seconds: float = 5.0,
    poll_seconds: float = 2.0,
    keep_jobs_days: float = 30.0,
) -> None:
    """`wsi worker` / `wsi watch`: one role (or both) without the HTTP service, until SIGTERM or
    SIGINT; running conversions get `settings.stop_timeout` to finish."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await asyncio.to_thread(queue.recover)
        if workers:  # temp copies of s3:// sources whose conversions were killed
            spool = settings.spool_dir or tempfile.gettempdir()
            await asyncio.to_thread(sweep_orphans, spool)
        tasks = [asyncio.create_task(Worker(queue, settings).run(stop)) for _ in range(workers)]
        if workers and keep_jobs_days:
            tasks.append(asyncio.create_task(purge_jobs(queue, keep_jobs_days, stop)))
        watcher = None
        if watch:
            watcher = FolderWatcher(watch, quiet_seconds, poll_seconds, stop_event=stop)
            tasks.append(asyncio.create_task(feed(watcher, queue)))
        await stop.wait()
        if watcher is not None:
            watcher.stop()
        await asyncio.wait(tasks, timeout=settings.stop_timeout + KILL_GRACE_SECONDS + 5)

    asyncio.run(main())
