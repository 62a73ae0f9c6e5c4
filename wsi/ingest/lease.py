"""One watcher per watch folder, however many services watch it: a lease in the job table.

Several services (on several machines) may be given the same watch folder on a shared mount, for
availability. Only one of them may scan it at a time: two scanners would each submit the same
drop, race each other moving it to `done/`, and double the listing load on a slow share. So each
folder has a lease in the job table they share (`JobQueue.hold_lease`, both backends): a row with
its holder and an expiry, renewed by the holder every third of `seconds`. The others try to take
it at the same pace and succeed once it has run out (its holder died, hung, or lost the
database), so a dead holder's folder is watched again within `seconds` plus one try. A holder
that stops cleanly drops its leases at once.

A lease is only as good as the holder's knowledge of it: a holder that cannot reach the job
table stops scanning a folder once its own last renewal has run out (measured on its monotonic
clock from before that renewal was sent), never later than another process may take it over.
Submitting stays idempotent by content id besides, so a slide reported by two holders in the
moment of a takeover is still one job.

A holder on the same host whose process is gone (its pid, in its `worker_name`, no longer runs)
is taken over at once instead of after the lease time: a service restarted after a SIGKILL
watches its folders again without waiting for its own old lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from wsi.errors import InvalidArgument, WsiError
from wsi.ingest.queue import JobQueue, stored_path, worker_name
from wsi.ingest.staging import is_remote
from wsi.ingest.supervise import describe

log = logging.getLogger("wsi.ingest.lease")

LEASE_PREFIX = "watch:"
"""A watch folder's lease is named `watch:<its resolved absolute path>` (as the job table stores
a path: `stored_path`): services sharing a
folder must mount it at the same path (as they must for the job's `source` paths anyway)."""


def lease_name(folder: str | os.PathLike[str]) -> str:
    """The lease name of a watch folder."""
    return LEASE_PREFIX + stored_path(str(Path(folder).resolve()))


def store_lease_name(role: str, store: str) -> str:
    """The lease under which one service among those sharing a job table runs `role` over the
    whole store `store` (the scheduled integrity check, the archive policy): named by the
    bucket URL or the folder's resolved path, so every machine names it alike."""
    store = store.rstrip("/")
    return f"{role}:" + (store if is_remote(store) else str(Path(store).resolve()))


def dead_local_holder(holder: str) -> bool:
    """Whether `holder` (a `worker_name`: host:pid:suffix) names a process of this host that
    no longer runs. False when in doubt (another host, a name of another form, a pid that runs
    or is not ours to signal): only the lease's expiry decides then."""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def take_or_renew(queue: JobQueue, name: str, holder: str, seconds: float) -> bool:
    """Hold the lease `name` for `holder` for `seconds` more: renewed, taken when free or run
    out, or taken at once from a holder of this host whose process is gone. Blocking."""
    if queue.hold_lease(name, holder, seconds):
        return True
    current = queue.lease(name)
    if current is not None and dead_local_holder(current.holder):
        return queue.hold_lease(name, holder, seconds, replacing=current.holder)
    return False


class FolderLeases:
    """The leases of `folders` for one watcher: `renew()` takes, renews or gives up each one,
    `held()` says which folders may be scanned now.

    `clock` is monotonic and local: it bounds how long a held lease is trusted without a
    successful renewal. The job table compares expiries on its own (the queue's) clock.
    """

    def __init__(
        self,
        queue: JobQueue,
        folders: Iterable[str | os.PathLike[str]],
        seconds: float,
        *,
        holder: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not seconds > 0:
            raise InvalidArgument(f"lease seconds must be > 0, not {seconds}")
        self.queue = queue
        self.folders = tuple(dict.fromkeys(Path(f) for f in folders))
        self.seconds = float(seconds)
        self.holder = holder or worker_name()
        self._clock = clock
        self._names = {f: lease_name(f) for f in self.folders}
        self._valid_until: dict[Path, float] = {}
        self._elsewhere: set[Path] = set()
        """Folders last found held by another holder (logged once per change)."""
        self._next_renewal = -float("inf")

    @property
    def every(self) -> float:
        """Seconds between renewals (and between tries for a lease another holds)."""
        return self.seconds / 3

    def held(self) -> frozenset[Path]:
        """The folders whose lease this holder knows it still has."""
        now = self._clock()
        return frozenset(f for f, until in self._valid_until.items() if until > now)

    def due(self) -> float:
        """Clock time of the next renewal."""
        return self._next_renewal

    def renew(self) -> frozenset[Path]:
        """One round (blocking: job table calls): hold or take each folder's lease; the folders
        held after it. A folder whose renewal fails (the job table is away) stays held only
        until its last successful renewal runs out."""
        for folder in self.folders:
            sent = self._clock()
            try:
                got = self._try(folder)
            except WsiError as exc:
                log.debug("watch folder lease not renewed (%s)", describe(exc))
                continue
            had = self._valid_until.get(folder, -float("inf")) > sent
            if got:
                self._valid_until[folder] = sent + self.seconds
                if folder in self._elsewhere:
                    log.warning(
                        "watch folder %s: taken over from a service that stopped renewing its "
                        "lease",
                        folder,
                    )
                elif not had:
                    log.info("watch folder %s: watched here (lease held)", folder)
                self._elsewhere.discard(folder)
            else:
                self._valid_until.pop(folder, None)
                if had:
                    log.warning("watch folder %s: lease lost to another service", folder)
                if folder not in self._elsewhere:
                    self._elsewhere.add(folder)
                    log.info(
                        "watch folder %s: watched by another service; taken over here if it "
                        "stops for %g s",
                        folder,
                        self.seconds,
                    )
        self._next_renewal = self._clock() + self.every
        return self.held()

    def _try(self, folder: Path) -> bool:
        return take_or_renew(self.queue, self._names[folder], self.holder, self.seconds)

    def release(self) -> None:
        """Drop every lease this holder has (a clean stop): others take the folders at once."""
        for folder in self.folders:
            self._valid_until.pop(folder, None)
            try:
                self.queue.drop_lease(self._names[folder], self.holder)
            except WsiError as exc:
                log.debug("watch folder lease not dropped (%s)", describe(exc))


async def run_while_held(
    queue: JobQueue,
    name: str,
    seconds: float,
    body: Callable[[asyncio.Event], Awaitable[None]],
    stop: asyncio.Event,
    *,
    idle: Callable[[], None] | None = None,
) -> None:
    """Run the loop `body(event)` only while this process holds the lease `name`, until `stop`:
    of the services sharing the job table, one runs it at a time (a scheduled check of the whole
    store, say), another takes over within `seconds` (plus a try) of its holder's death. Losing
    the lease sets `body`'s event and waits for it to end; `idle` (blocking, run in a thread) is
    called at each try while another process holds it. An error of `body` ends this loop with
    it (its supervisor restarts both); the lease is dropped on the way out."""
    holder = worker_name()
    valid_until = -float("inf")
    inner = asyncio.Event()
    task: asyncio.Future[None] | None = None
    try:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                if await asyncio.to_thread(take_or_renew, queue, name, holder, seconds):
                    valid_until = sent + seconds
                else:
                    valid_until = -float("inf")
            except WsiError as exc:  # unknown: trusted until the last renewal runs out
                log.debug("lease %s not renewed (%s)", name, describe(exc))
            held = valid_until > time.monotonic()
            if task is not None and (task.done() or not held):
                inner.set()
                await task  # an error of the body ends this loop too
                task = None
            if held and task is None:
                inner = asyncio.Event()
                task = asyncio.ensure_future(body(inner))
            if not held and idle is not None:
                await asyncio.to_thread(idle)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds / 3)
    finally:
        if task is not None:
            inner.set()
            await task
        with contextlib.suppress(WsiError):
            queue.drop_lease(name, holder)


__all__ = [
    "LEASE_PREFIX",
    "FolderLeases",
    "dead_local_holder",
    "lease_name",
    "run_while_held",
    "take_or_renew",
]
