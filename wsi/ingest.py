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
import ctypes
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import InvalidArgument, WsiError
from .jobs import Job, JobQueue, worker_name
from .slide_id import content_slide_id
from .watch import FolderWatcher

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
    job then resumes at the next start)."""
    after_success: Literal["keep", "move", "delete"] = "keep"
    done_dir: str | None = None
    quarantine_dir: str = "quarantine"
    convert_args: tuple[str, ...] = ()
    """Extra `wsi convert` flags (quality, format, ...)."""

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.lease_seconds <= 0 or self.poll_seconds <= 0:
            raise InvalidArgument("concurrency, lease and poll interval must be positive")
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


def _die_with_parent() -> None:
    """In the conversion child: be killed when the service dies, even by SIGKILL (Linux
    PR_SET_PDEATHSIG), so no orphaned conversion publishes behind the job's next attempt."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Worker:
    """One conversion at a time, in a subprocess; several run side by side for concurrency."""

    def __init__(self, queue: JobQueue, settings: IngestSettings, name: str | None = None):
        self.queue = queue
        self.settings = settings
        self.name = name or worker_name()
        self._proc: asyncio.subprocess.Process | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and run jobs until `stop` is set."""
        while not stop.is_set():
            job = await asyncio.to_thread(self.queue.claim, self.name, self.settings.lease_seconds)
            if job is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.poll_seconds)
                continue
            await self.run_job(job, stop)

    def _command(self, job: Job) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "wsi.cli",
            "convert",
            job.source,
            "--out",
            self.settings.store,
            "--no-progress",
        ]
        if job.slide_id:
            cmd += ["--slide-id", job.slide_id]
        if self.settings.s3_endpoint:
            cmd += ["--s3-endpoint", self.settings.s3_endpoint]
        return cmd + list(self.settings.convert_args)

    async def run_job(self, job: Job, stop: asyncio.Event) -> None:
        proc = await asyncio.create_subprocess_exec(
            *self._command(job),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        self._proc = proc
        communicate = asyncio.ensure_future(proc.communicate())
        beat = max(0.5, self.settings.lease_seconds / 3)
        stopping_since: float | None = None
        loop = asyncio.get_running_loop()
        while not communicate.done():
            await asyncio.wait([communicate], timeout=beat)
            if communicate.done():
                break
            held = await asyncio.to_thread(self.queue.heartbeat, job.id, self.name, 0.0)
            if not held:  # cancelled, or the lease went to another worker
                self._terminate(proc)
            if stop.is_set():
                stopping_since = stopping_since or loop.time()
                if loop.time() - stopping_since > self.settings.stop_timeout:
                    self._terminate(proc)
        out, err = communicate.result()
        self._proc = None
        await asyncio.to_thread(self._finish, job, proc.returncode, out.decode(), err.decode())

    @staticmethod
    def _terminate(proc: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()

    def _finish(self, job: Job, code: int | None, out: str, err: str) -> None:
        last_error = next((x for x in reversed(err.splitlines()) if x.strip()), "")
        if code == 0:
            slide_id = out.split("\t", 1)[0].strip()
            if self.queue.complete(job.id, self.name, slide_id):
                self._after_success(Path(job.source))
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

    def _after_success(self, source: Path) -> None:
        if self.settings.after_success == "keep" or not source.exists():
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


def run_roles(
    queue: JobQueue,
    settings: IngestSettings,
    workers: int,
    watch: tuple[str, ...] = (),
    quiet_seconds: float = 5.0,
    poll_seconds: float = 2.0,
) -> None:
    """`wsi worker` / `wsi watch`: one role (or both) without the HTTP service, until SIGTERM or
    SIGINT; running conversions get `settings.stop_timeout` to finish."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await asyncio.to_thread(queue.recover)
        tasks = [asyncio.create_task(Worker(queue, settings).run(stop)) for _ in range(workers)]
        watcher = None
        if watch:
            watcher = FolderWatcher(watch, quiet_seconds, poll_seconds, stop_event=stop)
            tasks.append(asyncio.create_task(feed(watcher, queue)))
        await stop.wait()
        if watcher is not None:
            watcher.stop()
        await asyncio.wait(tasks, timeout=settings.stop_timeout + 5)

    asyncio.run(main())
