"""The service's scheduled integrity check: every published object read again and checked
against its manifest (`wsi.published.verify`), at a bounded read rate, on a schedule.

It runs in the process that runs ingest (one checker per store, not one per serving replica), as
a supervised loop beside the workers. The check itself runs on a thread of its own (blocking
store reads, paced by the rate); a stop request ends it within one read. The last result is kept
in the ingest state folder (`integrity.json`), so a restart neither forgets damage found nor
starts a daily check over; it is shown at `GET /integrity`, in `/metrics` and in `/readyz`.

Damage is per slide: a slide checked again replaces what the previous run found for it, so the
damage shown is the latest known while a long run goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wsi.published.verify import ReadRate, SlideCheck, Stopped, read_failures, verify_slide
from wsi.store.objects import Store, StoreSettings

log = logging.getLogger("server.integrity")

STATE_FILE = "integrity.json"
RETRY_SECONDS = 600.0
"""After a run that could not list the store, the next one is tried this soon (or at the
regular time, if sooner)."""


@dataclass(frozen=True)
class DamagedObject:
    """One damaged object, as `GET /integrity` lists it (no patient data: ids and keys)."""

    slide: str
    object: str
    problem: str

    def to_json(self) -> dict[str, str]:
        return {"slide": self.slide, "object": self.object, "problem": self.problem}


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return datetime.fromtimestamp(stamp, tz=UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class IntegrityStatus:
    """What the checker knows now. Times are Unix seconds."""

    last_run: float | None
    """When the last complete run ended; None before the first one."""
    running: bool
    slides_checked: int
    """Slides the last complete run checked."""
    bytes_read: int
    """Bytes the last complete run read."""
    damaged: tuple[DamagedObject, ...]
    """The latest known damage, per slide (see the module)."""
    next_run: float | None = None
    error: str | None = None
    """Why the last run did not complete (the store could not be listed), if it did not."""
    total_bytes_read: int = 0
    """Bytes read by every run of this process, the one under way included."""

    @property
    def damaged_slides(self) -> int:
        return len({d.slide for d in self.damaged})

    def to_json(self) -> dict[str, Any]:
        return {
            "last_run": _iso(self.last_run),
            "running": self.running,
            "slides_checked": self.slides_checked,
            "damaged": [d.to_json() for d in self.damaged],
            "bytes_read": self.bytes_read,
            "next_run": _iso(self.next_run),
            "error": self.error,
        }

    def readiness(self) -> dict[str, Any]:
        """The `/readyz` detail: counts only, since `/readyz` needs no credentials."""
        if self.damaged:
            state = "damaged"
        elif self.last_run is None:
            state = "running" if self.running else "not run yet"
        else:
            state = "ok"
        return {
            "status": state,
            "damaged_slides": self.damaged_slides,
            "last_run": _iso(self.last_run),
        }


NOT_SCHEDULED = IntegrityStatus(None, False, 0, 0, ())
"""The status of a service that runs no checks (no ingest, or `verify_every_hours` 0)."""


class IntegrityMonitor:
    """Runs the check every `every_seconds` at most `rate` bytes a second, and keeps its result.

    `status()` may be called from any thread; `run(stop)` is the loop a `Supervisor` keeps."""

    def __init__(
        self,
        store: StoreSettings,
        every_seconds: float,
        rate: float,
        state_folder: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.every_seconds = every_seconds
        self.rate = rate
        self._path = Path(state_folder) / STATE_FILE if state_folder else None
        self._clock = clock
        self._lock = threading.Lock()
        self._last_run: float | None = None
        self._last_started: float | None = None
        self._slides_checked = 0
        self._bytes_read = 0
        self._total_read = 0
        self._running = False
        self._error: str | None = None
        self._damaged: dict[str, tuple[DamagedObject, ...]] = {}
        self._load()

    # -- state --------------------------------------------------------------------------------
    def status(self) -> IntegrityStatus:
        with self._lock:
            damaged = tuple(d for slide in sorted(self._damaged) for d in self._damaged[slide])
            return IntegrityStatus(
                self._last_run,
                self._running,
                self._slides_checked,
                self._bytes_read,
                damaged,
                self.next_run(),
                self._error,
                self._total_read,
            )

    def next_run(self) -> float:
        """When the next run starts: an interval after the last one started (at once when
        none ever did), sooner after a run that failed."""
        if self._last_started is None:
            return self._clock()
        wait = self.every_seconds
        if self._error is not None:
            wait = min(wait, RETRY_SECONDS)
        return self._last_started + wait

    def _load(self) -> None:
        """The last result a previous process kept; ignored when unreadable (a run redoes it)."""
        if self._path is None:
            return
        try:
            doc = json.loads(self._path.read_text())
            self._last_run = float(doc["last_run"]) if doc["last_run"] is not None else None
            self._last_started = float(doc["last_started"])
            self._slides_checked = int(doc["slides_checked"])
            self._bytes_read = int(doc["bytes_read"])
            for item in doc["damaged"]:
                found = DamagedObject(str(item["slide"]), str(item["object"]), str(item["problem"]))
                self._damaged[found.slide] = (*self._damaged.get(found.slide, ()), found)
        except (OSError, ValueError, KeyError, TypeError):
            return

    def reload(self) -> None:
        """Take the kept result again from the state folder: where services share it and one
        of them runs the check (`wsi.ingest.lease.run_while_held`), the others show that one's
        result. Nothing changes while a run is under way here."""
        if self._path is None:
            return
        kept = IntegrityMonitor(
            self.store, self.every_seconds, self.rate, str(self._path.parent), self._clock
        )
        with self._lock:
            if self._running or kept._last_started is None:
                return
            self._last_run, self._last_started = kept._last_run, kept._last_started
            self._slides_checked, self._bytes_read = kept._slides_checked, kept._bytes_read
            self._damaged = kept._damaged

    def _save(self) -> None:
        if self._path is None:
            return
        with self._lock:
            doc = {
                "last_run": self._last_run,
                "last_started": self._last_started,
                "slides_checked": self._slides_checked,
                "bytes_read": self._bytes_read,
                "damaged": [d.to_json() for ds in self._damaged.values() for d in ds],
            }
        tmp = self._path.with_name(f".{STATE_FILE}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, self._path)
        except OSError as exc:
            log.warning("cannot keep the integrity result: %s", type(exc).__name__)

    # -- the loop -----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Check on schedule until `stop` is set."""
        while not stop.is_set():
            delay = self.next_run() - self._clock()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                continue
            await self.run_once(stop)

    async def run_once(self, stop: asyncio.Event | None = None) -> None:
        """One run over every published slide, on a thread; ends early once `stop` is set."""
        halt = threading.Event()
        work = asyncio.ensure_future(asyncio.to_thread(self._check_all, halt))
        if stop is None:
            await work
            return
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            halt.set()
        await work

    def _check_all(self, halt: threading.Event) -> None:
        started = self._clock()
        with self._lock:
            self._running, self._last_started = True, started
        store = Store(self.store)
        rate = ReadRate(self.rate, wait=halt.wait)
        seen: set[str] = set()
        checked = read = 0
        try:
            for slide_id in store.published_slides():
                if halt.is_set():
                    raise Stopped
                check = verify_slide(store, slide_id, rate)
                seen.add(slide_id)
                checked, read = checked + 1, read + check.bytes_read
                self._record(check)
        except Stopped:
            return
        except read_failures() as exc:
            with self._lock:
                self._error = f"{type(exc).__name__}: {exc}"
            log.warning("integrity check failed: %s", type(exc).__name__)
            return
        finally:
            with self._lock:
                self._running = False
        with self._lock:
            self._last_run, self._error = self._clock(), None
            self._slides_checked, self._bytes_read = checked, read
            for gone in set(self._damaged) - seen:
                del self._damaged[gone]
        self._save()
        if self._damaged:
            log.warning("integrity check: %d damaged slides", len(self._damaged))

    def _record(self, check: SlideCheck) -> None:
        found = tuple(DamagedObject(check.slide_id, d.key, str(d.problem)) for d in check.damage)
        with self._lock:
            self._total_read += check.bytes_read
            if found:
                self._damaged[check.slide_id] = found
            else:
                self._damaged.pop(check.slide_id, None)


def integrity_readiness(monitor: IntegrityMonitor | None) -> Mapping[str, Any]:
    """`/readyz`'s `integrity` detail: counts and a status ("ok", "damaged", "not run yet",
    "running", or "off" where this process runs no check); never slide ids, since `/readyz`
    needs no credentials."""
    if monitor is None:
        return {"status": "off"}
    return monitor.status().readiness()


def status_json(monitor: IntegrityMonitor | None) -> Mapping[str, Any]:
    """`GET /integrity`'s body; a service that runs no check says so (`scheduled`: false)."""
    status = monitor.status() if monitor is not None else NOT_SCHEDULED
    doc = status.to_json()
    doc["scheduled"] = monitor is not None
    if monitor is not None:
        doc["every_hours"] = monitor.every_seconds / 3600.0
        doc["rate_mb_per_s"] = monitor.rate / 1e6
    return doc
