"""Finding slides that scanners drop into shared folders, and telling when each one is complete.

Scanners and copy tools write slides slowly (a 5 GB SVS over SMB takes minutes), often as many
files (MIRAX, DICOM series, Hamamatsu VMS), and now and then leave a broken or half-copied one
behind. A conversion started on a half-written slide fails at best and publishes a truncated one at
worst, so a slide becomes a job only when it is *complete*: every part it needs is there, and the
size and mtime of every part have stayed the same for a quiet period.

Three layers, each usable on its own:

* `find_candidates(folder)`: one cheap scan (directory listings, stats, a few header bytes; no slide
  is opened) that groups files into `SlideCandidate`s, each saying what it still lacks.
* `StabilityTracker`: fed successive scans, it reports a complete candidate once its fingerprint
  has stayed the same for the quiet period, and once per fingerprint.
* `FolderWatcher`: the async loop. watchfiles (inotify) wakes it early where that works, and it
  always polls as well, because network shares deliver no inotify events for other clients' writes.

The scanning lives in `wsi.ingest.scan` and is re-exported here; what makes up a slide, and which
names never are one, in `wsi.slidefiles`.

The quiet period is measured with our own clock from the first scan that saw a fingerprint, never
from the files' mtimes: clocks of file servers drift, and copy tools (`cp -p`, rsync) set old
mtimes on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from wsi.errors import InvalidArgument
from wsi.ingest.lease import FolderLeases
from wsi.ingest.quarantine import ResumedCopies
from wsi.ingest.scan import (
    FolderUnavailable,
    ScanMemo,
    SlideCandidate,
    _find_candidates_cached,
    find_candidates,
)
from wsi.ingest.scan import Layout as Layout
from wsi.ingest.source_files import remove_deletion_leftovers
from wsi.ingest.supervise import describe
from wsi.slidefiles import is_temporary
from wsi.sources.dicom_backend import DicomSource as DicomSource

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Stability


_CLOCK_SLACK = 1e-6
"""Seconds of float rounding forgiven: 1000.2 + 0.3 - 1000.2 is a hair under 0.3."""


@dataclass
class _Seen:
    fingerprint: tuple[tuple[str, int, int], ...]
    since: float
    complete: bool
    reported: bool = False


class StabilityTracker:
    """Reports each complete candidate once its fingerprint has been the same for `quiet_seconds`.

    "The same" is measured between scans: the first scan that sees a fingerprint starts the clock,
    and a later scan that sees the same fingerprint after the quiet period reports the slide. A
    candidate is reported once per fingerprint: when it changes (the slide was copied again) the
    clock restarts and it can be reported again. Candidates missing from a scan are forgotten.
    """

    def __init__(self, quiet_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        if quiet_seconds < 0:
            raise InvalidArgument(f"quiet_seconds must be >= 0, not {quiet_seconds}")
        self.quiet_seconds = quiet_seconds
        self._clock = clock
        self._seen: dict[Path, _Seen] = {}

    def update(self, candidates: Iterable[SlideCandidate]) -> list[SlideCandidate]:
        """Feed one full scan; returns the candidates that became ready with it."""
        now = self._clock()
        seen: dict[Path, _Seen] = {}
        ready: list[SlideCandidate] = []
        for c in candidates:
            state = self._seen.get(c.path)
            if state is None or state.fingerprint != c.fingerprint:
                state = _Seen(c.fingerprint, now, c.complete)
            state.complete = c.complete
            quiet_for = now - state.since + _CLOCK_SLACK
            if c.complete and not state.reported and quiet_for >= self.quiet_seconds:
                state.reported = True
                ready.append(c)
            seen[c.path] = state
        self._seen = seen
        return ready

    def retry(self, path: Path) -> None:
        """Report the candidate at `path` again once it has stayed the same for another quiet
        period (its consumer could not take it this time); nothing if it is not tracked."""
        state = self._seen.get(path)
        if state is not None:
            state.reported = False
            state.since = self._clock()

    def next_due(self) -> float | None:
        """Clock time at which the earliest complete, unreported candidate becomes ready if it
        stays the same; None when there is none. Lets a watcher wake exactly then."""
        due = [
            s.since + self.quiet_seconds
            for s in self._seen.values()
            if s.complete and not s.reported
        ]
        return min(due, default=None)

    def __len__(self) -> int:
        return len(self._seen)


# ---------------------------------------------------------------------------------------------
# Watching


def _watch_filter(change: object, path: str) -> bool:
    return not is_temporary(os.path.basename(path))


class _InotifyThread:
    """watchfiles in a thread of its own, setting the watcher's wake-up event on every batch.

    A thread rather than `awatch`: awatch builds its RustNotify (which walks the whole tree to add
    a watch per folder, slow on a big share) in the event loop's thread, and the loop must never
    block. The thread ends within watchfiles' 50 ms step once `stop` is set.
    """

    def __init__(
        self,
        folders: Sequence[Path],
        debounce_ms: int,
        loop: asyncio.AbstractEventLoop,
        wake: asyncio.Event,
    ) -> None:
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.watched: frozenset[Path] | None = None
        """The folders that existed when it started (None until then)."""
        self._folders = folders
        self._debounce_ms = debounce_ms
        self._loop = loop
        self._wake = wake
        self.thread = threading.Thread(target=self._run, name="wsi-watch-inotify", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import watchfiles

        try:
            self.watched = frozenset(f for f in self._folders if f.is_dir())
            if not self.watched:
                return  # nothing to watch yet: the watcher starts another once a folder appears
            for _changes in watchfiles.watch(
                *sorted(self.watched),
                watch_filter=_watch_filter,
                debounce=self._debounce_ms,
                stop_event=self.stop_event,
                ignore_permission_denied=True,
            ):
                with contextlib.suppress(RuntimeError):  # the loop closed under us
                    self._loop.call_soon_threadsafe(self._wake.set)
        except Exception as exc:  # inotify limits, a folder unmounted: polling carries on
            self.error = exc

    def alive(self) -> bool:
        return self.thread.is_alive()

    async def close(self) -> None:
        self.stop_event.set()
        await asyncio.to_thread(self.thread.join, 5.0)


SWEEP_EVERY_SECONDS = 3600.0
"""How often a watcher looks for what deletions killed half-way left in its folders."""


class FolderWatcher:
    """Yields each slide dropped into `folders` once it is complete and has been quiet.

    Every `poll_interval` seconds, and early when watchfiles reports a change (with
    `use_inotify`), the folders are scanned in a worker thread and fed to one StabilityTracker per
    folder. It also wakes when a tracked slide's quiet period ends, so a slide is reported about
    `quiet_seconds` after its last write seen, not up to a poll later. A folder that cannot be
    listed (share unmounted) keeps its tracker as it was: slides already reported are not
    reported again when it comes back.

        watcher = FolderWatcher(["/scans"], quiet_seconds=30, poll_interval=10)
        async for slide in watcher:      # or watcher.events()
            queue.put(slide.path)
        ...
        watcher.stop()                   # from any task or thread

    `debounce_ms` groups a burst of file events into one early scan; correctness never depends
    on those events (the report is always decided on a fresh scan), only latency does.

    Consumers should still treat a report as "probably new": a slide whose folder vanished and
    came back, or that was copied again, is reported again (conversion dedupes by content id).

    With `leases` (`wsi.ingest.lease`), a folder is scanned only while this watcher holds its
    lease in the job table, so that of the services given one shared folder one watches it at a
    time; a folder taken over starts from a fresh tracker (each slide there waits one quiet
    period and is reported, idempotently, again).
    """

    def __init__(
        self,
        folders: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        quiet_seconds: float,
        poll_interval: float,
        use_inotify: bool = True,
        *,
        debounce_ms: int = 500,
        stop_event: asyncio.Event | None = None,
        leases: FolderLeases | None = None,
        resumed: ResumedCopies | None = None,
    ) -> None:
        if isinstance(folders, str | os.PathLike):
            folders = [folders]
        self.folders: tuple[Path, ...] = tuple(dict.fromkeys(Path(f) for f in folders))
        if not self.folders:
            raise InvalidArgument("no folder to watch")
        if poll_interval <= 0:
            raise InvalidArgument(f"poll_interval must be > 0, not {poll_interval}")
        self.quiet_seconds = quiet_seconds
        self.poll_interval = poll_interval
        self.use_inotify = use_inotify
        self.debounce_ms = debounce_ms
        self._trackers = {f: StabilityTracker(quiet_seconds) for f in self.folders}
        self._stop = stop_event if stop_event is not None else asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unavailable: set[Path] = set()
        self._caches: dict[Path, ScanMemo] = {}
        self._inotify_failed = False
        self._swept: dict[Path, float] = {}
        """When (monotonic) each folder was last cleared of deletion leftovers (`_sweep`)."""
        self.leases = leases
        self._held: frozenset[Path] = frozenset(self.folders) if leases is None else frozenset()
        self.resumed = resumed
        """The quarantined slides whose copy went on, put back into the first folder while this
        watcher holds it, at most once per quiet period (`_put_back_resumed`)."""
        self._resumed_at: float | None = None

    def stop(self) -> None:
        """End `events()` at its next wait; safe from other threads once it runs."""
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or loop is running or loop.is_closed():
            self._stop.set()
        else:
            loop.call_soon_threadsafe(self._stop.set)

    def retry(self, candidate: SlideCandidate) -> None:
        """Report `candidate` again after another quiet period, if it is still there then: for
        a consumer that could not take it (the job queue was away, a file could not be read)."""
        for tracker in self._trackers.values():
            tracker.retry(candidate.path)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _sweep(self, folder: Path) -> None:
        """When this watcher first scans a folder (it holds its lease), then hourly: remove what
        a deletion killed half-way left there (`remove_deletion_leftovers`; one left less than
        its age ago goes at a later sweep)."""
        last = self._swept.get(folder)
        if last is not None and time.monotonic() - last < SWEEP_EVERY_SECONDS:
            return
        try:
            removed = remove_deletion_leftovers(folder)
        except OSError as exc:  # unavailable now: the scan says so; tried at the next one
            log.debug("watch folder %s: leftovers not removed (%s)", folder, describe(exc))
            return
        self._swept[folder] = time.monotonic()
        if removed:
            log.info(
                "watch folder %s: removed %d hidden folder(s) of sources whose deletion was "
                "cut short",
                folder,
                removed,
            )

    def _put_back_resumed(self) -> None:
        """Every quiet period, while this watcher holds the first folder: put back there the
        quarantined slides whose copy went on in quarantine (`ResumedCopies`); the scan that
        follows finds them. Logged by reference: their names are often a patient's."""
        resumed, first = self.resumed, self.folders[0]
        if resumed is None or first not in self._held:
            return
        now = time.monotonic()
        if self._resumed_at is not None and now - self._resumed_at < self.quiet_seconds:
            return
        self._resumed_at = now
        for ref in resumed.put_back(first):
            log.info(
                "quarantined slide %s was written to after it was quarantined (its copy went "
                "on): put back into the watch folder",
                ref,
            )

    def _scan(self) -> dict[Path, list[SlideCandidate] | None]:
        self._put_back_resumed()
        results: dict[Path, list[SlideCandidate] | None] = {}
        for folder in self.folders:
            if folder not in self._held:
                continue
            self._sweep(folder)
            try:
                results[folder], self._caches[folder] = _find_candidates_cached(
                    folder, self._caches.get(folder)
                )
            except FolderUnavailable as exc:
                results[folder] = None
                if folder not in self._unavailable:
                    log.warning("%s", exc)
                self._unavailable.add(folder)
            else:
                if folder in self._unavailable:
                    log.info("watched folder available again: %s", folder)
                self._unavailable.discard(folder)
        return results

    async def _update_leases(self) -> None:
        """Hold, take or give up the folders' leases when due; a folder no longer held (lost,
        or not renewed in time) forgets what its tracker saw: whoever holds it reports those
        slides."""
        leases = self.leases
        if leases is None:
            return
        if time.monotonic() >= leases.due():
            await asyncio.to_thread(leases.renew)
        held = leases.held()
        for folder in self._held - held:
            self._trackers[folder] = StabilityTracker(self.quiet_seconds)
        self._held = held

    async def poll(self) -> list[SlideCandidate]:
        """One scan (in a worker thread) and tracker update: the slides that became ready."""
        await self._update_leases()
        results = await asyncio.to_thread(self._scan)
        ready: list[SlideCandidate] = []
        for folder, candidates in results.items():
            if candidates is not None:
                ready += self._trackers[folder].update(candidates)
        return ready

    def _delay(self) -> float:
        delay = self.poll_interval
        due = [d for t in self._trackers.values() if (d := t.next_due()) is not None]
        if self.leases is not None:
            due.append(self.leases.due())
        if due:
            delay = min(delay, min(due) - time.monotonic() + 0.01)
        return max(delay, 0.01)

    async def _wait(self, wake: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(self._stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=self._delay(), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def _inotify(
        self, current: _InotifyThread | None, loop: asyncio.AbstractEventLoop, wake: asyncio.Event
    ) -> _InotifyThread:
        """The running inotify thread, or a new one when it died or the set of folders that can
        be listed changed (a share came back: watch it too)."""
        available = frozenset(self.folders) - self._unavailable
        if current is not None:
            if current.watched in (None, available) and (current.alive() or not available):
                return current  # running, or nothing to watch until a folder appears
            if current.error is not None:
                level = logging.DEBUG if self._inotify_failed else logging.WARNING
                # `describe`: watchfiles' messages quote file names (one that is not UTF-8).
                log.log(level, "file events unavailable, polling only: %s", describe(current.error))
                self._inotify_failed = True
            await current.close()
        return _InotifyThread(self.folders, self.debounce_ms, loop, wake)

    async def events(self) -> AsyncIterator[SlideCandidate]:
        """Ready slides, each once per fingerprint, until `stop()` (a stopped watcher stays
        stopped). Close it with `stop()` or `contextlib.aclosing` so the inotify thread ends."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        wake = asyncio.Event()
        inotify: _InotifyThread | None = None
        try:
            while not self._stop.is_set():
                if self.use_inotify:
                    inotify = await self._inotify(inotify, loop, wake)
                wake.clear()  # a change during the scan below wakes the next round
                for candidate in await self.poll():
                    yield candidate
                    if self._stop.is_set():
                        return
                await self._wait(wake)
        finally:
            if inotify is not None:
                await inotify.close()
            if self.leases is not None:
                # Blocking but short, and never skipped by a second cancellation: the others
                # take the folders at once instead of after the lease time.
                self.leases.release()

    def __aiter__(self) -> AsyncIterator[SlideCandidate]:
        return self.events()


__all__ = [
    "FolderUnavailable",
    "FolderWatcher",
    "SlideCandidate",
    "StabilityTracker",
    "find_candidates",
]
