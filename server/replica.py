"""One serving process among several (`server.processes`): how it answers for the whole service.

Every process keeps a small status file in the supervisor's private folder (`ProcessRole.shared`,
mode 0700), rewritten every `STATUS_SECONDS`: its metrics snapshot (`server.metrics`), and in the
process that runs the ingest roles, their state (loops down, the integrity check's status). Any
process then answers `/metrics` with the sums over all of them, and `/readyz` and `/integrity`
with the ingest process's state, read with a staleness limit (`STALE_SECONDS`): an ingest process
silent for longer is reported down, as a dead ingest loop is in a process alone.

The processes that do not run the ingest roles open the same job table (SQLite in WAL mode, or
PostgreSQL), to answer `/jobs`, and follow the conversions it lists (`follow_ingest`): a slide
queued or converting is served from its source here too, as in the process whose watcher found it.

The ingest gauges of `/metrics` (`ingest_figures`) are read by whichever process answers, at
each scrape, from what they all share (the job table, the quarantine folder, the ingest
process's status): not from the snapshots that are summed, so they count once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from server.bucket_copies import StagedSources
from server.integrity import DamagedObject, IntegrityMonitor, IntegrityStatus
from server.keys import (
    CATALOG,
    INGEST_TASKS,
    INTEGRITY,
    JOBS,
    JOBS_WAKE,
    METRICS,
    PROBES,
    ROLE,
    SETTINGS,
)
from server.metrics import IngestFigures
from server.settings import ProcessRole
from wsi.errors import WsiError
from wsi.ingest.quarantine import count_quarantine
from wsi.ingest.queue import JobState, open_queue
from wsi.ingest.spool import COPIES_FOLDER
from wsi.ingest.staging import is_remote
from wsi.store.objects import StoreSettings

log = logging.getLogger("server.replica")
T = TypeVar("T")

STATUS_SECONDS = 1.0
"""How often each process rewrites its status file."""
STALE_SECONDS = 10.0
"""A status file older than this is a process that is not answering (dead, or stuck)."""
STATUS_PREFIX = "process-"
INGEST_PROCESS = "ingest process"
"""The name `/readyz` lists as down while the ingest process's status is missing or stale."""
INGEST_READ_SECONDS = 4.0
"""How long `/metrics` waits for the job table's counts, and for the quarantine's: one that
does not answer by then (a database host gone silent, a hung network mount) is reported
unreadable, and `/metrics` still answers within a scrape's timeout (Prometheus: 10 s)."""


def status_path(shared: str | Path, index: int) -> Path:
    return Path(shared) / f"{STATUS_PREFIX}{index}.json"


def write_status(path: Path, doc: Mapping[str, Any]) -> None:
    """Replace `path` with `doc` at once (readers see the old or the new file, never half)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
    os.replace(tmp, path)


def read_statuses(shared: str | Path) -> dict[int, dict[str, Any]]:
    """Every process's last status: index -> document, with `live` (written within
    `STALE_SECONDS`). Unreadable files are skipped (one being replaced is read next time)."""
    found: dict[int, dict[str, Any]] = {}
    now = time.time()
    for path in Path(shared).glob(f"{STATUS_PREFIX}*.json"):
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(path.read_text())
            index = int(doc["process"])
            doc["live"] = now - float(doc["time"]) <= STALE_SECONDS
            found[index] = doc
    return found


def _status(app: web.Application) -> dict[str, Any]:
    role = app[ROLE]
    doc: dict[str, Any] = {"time": time.time(), "pid": os.getpid(), **app[METRICS].snapshot()}
    tasks = app.get(INGEST_TASKS)
    if role.ingest and tasks is not None:
        monitor = app.get(INTEGRITY)
        doc["ingest"] = {
            "down": tasks.down,
            "integrity": dataclasses.asdict(monitor.status()) if monitor is not None else None,
        }
    return doc


async def publish_status(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context of a process among several: takes its metrics over from the last process
    of its index, then keeps its status file current until it stops."""
    role = app[ROLE]
    assert role.shared is not None
    app[SHARED] = SharedStatus(role)
    path = status_path(role.shared, role.index)
    with contextlib.suppress(OSError, ValueError):
        app[METRICS].restore(json.loads(await asyncio.to_thread(path.read_text)))
    stop = asyncio.Event()

    async def keep() -> None:
        while not stop.is_set():
            try:
                await asyncio.to_thread(write_status, path, _status(app))
            except OSError as exc:  # the folder is the supervisor's: it may be going away
                log.warning("cannot write the process status: %s", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), STATUS_SECONDS)

    task = asyncio.create_task(keep(), name="wsi-status")
    yield
    stop.set()
    await task


class SharedStatus:
    """The other processes' status files, re-read at most every `STATUS_SECONDS / 2`."""

    def __init__(self, role: ProcessRole) -> None:
        self.role = role
        self._read_at = -1e9
        self._docs: dict[int, dict[str, Any]] = {}

    def others(self) -> dict[int, dict[str, Any]]:
        if self.role.shared is None:
            return {}
        now = time.monotonic()
        if now - self._read_at >= STATUS_SECONDS / 2:
            self._docs = read_statuses(self.role.shared)
            self._read_at = now
        return {i: d for i, d in self._docs.items() if i != self.role.index}

    def ingest(self) -> dict[str, Any] | None:
        """The ingest process's `ingest` section while its status is fresh, else None."""
        for doc in self.others().values():
            if doc.get("live") and isinstance(doc.get("ingest"), dict):
                return dict(doc["ingest"])
        return None


SHARED = web.AppKey("shared_status", SharedStatus)
"""Set by `publish_status`, in every process among several."""


def shared_status(app: web.Application) -> SharedStatus:
    """The other processes' status (none for a process alone)."""
    return app.get(SHARED) or SharedStatus(ProcessRole())


async def metrics_text(app: web.Application) -> bytes:
    """`/metrics`: this process's counts plus the other processes' last snapshots, and the
    ingest figures as this process reads them now."""
    others, ingest = await asyncio.gather(
        app[PROBES].run("process status", shared_status(app).others, INGEST_READ_SECONDS),
        ingest_figures(app),
    )
    return app[METRICS].render(list((others or {}).values()), ingest)


async def ingest_figures(app: web.Application) -> IngestFigures | None:
    """Jobs by state, slides in quarantine and ingest loops down, for the whole service, read
    now from what every process shares: the job table (one grouped read), the quarantine
    folder (`count_quarantine`) and the loops as `/readyz` has them (`ingest_down`). None where
    no job table is open (no ingest, and no job table followed). A part that cannot be read is
    None, never an error: `/metrics` answers the rest."""
    queue = app.get(JOBS)
    if queue is None:
        return None
    settings = app[SETTINGS]
    folder = settings.ingest.quarantine_path(settings.store)
    jobs, quarantined, down = await asyncio.gather(
        _bounded(app, "job counts", queue.counts),
        _bounded(app, "quarantine count", functools.partial(count_quarantine, folder)),
        _bounded(app, "ingest status", functools.partial(ingest_down, app)),
    )
    return IngestFigures(jobs, quarantined, len(down) if down is not None else None)


async def _bounded(app: web.Application, name: str, read: Callable[[], T]) -> T | None:
    """`read()` as `server.probes` runs it (one flight, on a thread of its own); None when it
    fails or has not answered within `INGEST_READ_SECONDS`."""
    try:
        return await app[PROBES].run(name, read, INGEST_READ_SECONDS)
    except (WsiError, OSError):
        return None


def ingest_down(app: web.Application) -> dict[str, str]:
    """The ingest loops that are down (name -> why), for the whole service: this process's own,
    or those the ingest process reports; that whole process while its status is stale."""
    tasks = app.get(INGEST_TASKS)
    if tasks is not None:
        return tasks.down
    settings = app[SETTINGS]
    if app[ROLE].ingest or not (settings.watch or settings.s3_sources):
        return {}
    ingest = shared_status(app).ingest()
    if ingest is None:
        return {INGEST_PROCESS: f"no status for {STALE_SECONDS:g} s"}
    return {str(k): str(v) for k, v in dict(ingest.get("down") or {}).items()}


class IntegrityView(IntegrityMonitor):
    """The ingest process's integrity check as another process sees it: its status, from the
    ingest process's status file (the check itself never runs here)."""

    def __init__(self, app: web.Application) -> None:
        settings = app[SETTINGS]
        super().__init__(
            StoreSettings(settings.store, settings.s3_endpoint),
            every_seconds=settings.verify_every_hours * 3600.0,
            rate=settings.verify_rate_mb * 1e6,
        )
        self._shared = shared_status(app)

    def status(self) -> IntegrityStatus:
        ingest = self._shared.ingest()
        doc = ingest.get("integrity") if ingest is not None else None
        if not isinstance(doc, dict):
            return super().status()
        try:
            fields = {k: v for k, v in doc.items() if k != "damaged"}
            damaged = tuple(DamagedObject(**d) for d in doc["damaged"])
            return IntegrityStatus(**fields, damaged=damaged)
        except (TypeError, KeyError):
            return super().status()

    async def run(self, stop: asyncio.Event) -> None:
        raise NotImplementedError("the integrity check runs in the ingest process")


async def follow_ingest(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context of a serving process that does not run the ingest roles: the shared job
    table (for `/jobs`, `/readyz`), the integrity check's status, and the conversions it lists
    made viewable from their sources here too."""
    settings = app[SETTINGS]
    # An explicit job table (`--jobs`) is followed even without watch folders: every instance
    # sharing it answers `/jobs` and shows converting slides alike.
    if not (settings.watch or settings.s3_sources or settings.ingest.jobs_db):
        yield
        return
    ingest = settings.ingest
    await asyncio.to_thread(ingest.make_state, settings.store)
    queue = await asyncio.to_thread(open_queue, ingest.jobs_path(settings.store))
    app[JOBS] = queue
    # The ingest process's workers find jobs submitted here at their next poll.
    app[JOBS_WAKE] = asyncio.Event()
    if settings.verify_every_hours and (settings.watch or settings.s3_sources):
        # The ingest process's check; a service that only follows a job table runs none.
        view = app[INTEGRITY] = IntegrityView(app)
        app[METRICS].integrity = view.status
    spool = Path(ingest.spool_path(settings.store))
    copies = StagedSources(spool / COPIES_FOLDER, None, parallel=1)
    stop = asyncio.Event()
    task = asyncio.create_task(follow_jobs(app, copies, stop), name="wsi-follow-jobs")
    yield
    stop.set()
    await task
    await copies.close()
    queue.close()


async def follow_jobs(app: web.Application, copies: StagedSources, stop: asyncio.Event) -> None:
    """Every poll: each queued or running job's source (its file, or the local copy of an
    `s3://` source once complete) registered as the slide's source, as the ingest process's
    watcher and copies keeper do there. Sources are registered only from jobs: a job exists
    only for a complete slide, so a file still being copied is never opened."""
    sources = app[CATALOG].sources
    queue = app[JOBS]
    every = app[SETTINGS].ingest.poll_seconds
    while not stop.is_set() and sources is not None:
        with contextlib.suppress(WsiError, OSError):
            for state in (JobState.QUEUED, JobState.RUNNING):
                for job in await asyncio.to_thread(queue.list, state, 1000):
                    if job.slide_id is None:
                        continue
                    if is_remote(job.source):
                        path = await asyncio.to_thread(copies.ready, job.slide_id)
                    else:
                        path = Path(job.source)
                    if path is not None:
                        sources.register(job.slide_id, path)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
