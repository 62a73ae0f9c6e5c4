"""Keeping ingest's long-running loops alive: each one that dies is logged and restarted.

The watcher feed, the workers, the purge and the copies keeper each run for the life of the
service. An exception nobody expected (a disk error in a library, a bug) used to end such a task
silently: the service kept answering while slides queued for ever. A `Supervisor` runs each loop
as a named task, logs a death (the exception's type and errno and where it was raised, never its
message: messages carry file names, and file names carry patient data), restarts it with
exponential backoff, and says which tasks are down meanwhile (`/readyz` reports them).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from wsi.errors import InvalidArgument

log = logging.getLogger("wsi.ingest.supervise")


@dataclass(frozen=True)
class Backoff:
    """How long a supervisor waits before restarting a task that died."""

    first: float = 1.0
    """Seconds before the first restart ..."""
    cap: float = 60.0
    """... doubling with each death in a row, up to this."""
    healthy_after: float = 300.0
    """A task that ran this long (seconds) before dying starts again from `first`."""

    def delay(self, deaths: int) -> float:
        """Seconds to wait after the `deaths`-th death in a row (1, 2, ...)."""
        return float(min(self.cap, self.first * 2.0 ** min(max(deaths - 1, 0), 30)))


def describe(exc: BaseException) -> str:
    """An exception as logs may show it: its type and errno name, never its message."""
    code = getattr(exc, "errno", None)
    name = errno.errorcode.get(code, str(code)) if isinstance(code, int) else None
    return f"{type(exc).__name__} ({name})" if name else type(exc).__name__


def where(exc: BaseException) -> str:
    """The frames an exception went through (file, line, function, code; no values)."""
    return "".join(traceback.format_tb(exc.__traceback__)).rstrip()


class Supervisor:
    """Runs named loops until `stop` is set, restarting each one that ends before then.

    A loop may end by raising or by returning: either way, before `stop` it is a death. While a
    dead loop waits for its restart it is listed in `down`.
    """

    def __init__(self, stop: asyncio.Event, backoff: Backoff | None = None) -> None:
        self.stop = stop
        self.backoff = backoff or Backoff()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._down: dict[str, str] = {}
        self._deaths: dict[str, int] = {}

    def start(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run `loop()` as the task `name` (a new coroutine at each restart)."""
        if name in self._tasks:
            raise InvalidArgument(f"a task named {name} is already supervised")
        self._tasks[name] = asyncio.create_task(self._keep(name, loop), name=f"wsi-{name}")

    @property
    def names(self) -> list[str]:
        """Every supervised task, in the order started."""
        return list(self._tasks)

    @property
    def down(self) -> dict[str, str]:
        """The tasks that died and wait for their restart: name -> why (type and errno)."""
        return dict(self._down)

    def deaths(self, name: str) -> int:
        """How often the task `name` has died since the supervisor started."""
        return self._deaths.get(name, 0)

    async def _keep(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        clock = asyncio.get_running_loop().time
        in_a_row = 0
        while not self.stop.is_set():
            started = clock()
            try:
                await loop()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                why, trace = describe(exc), where(exc)
            else:
                if self.stop.is_set():
                    return
                why, trace = "returned", ""
            in_a_row = 1 if clock() - started >= self.backoff.healthy_after else in_a_row + 1
            self._deaths[name] = self._deaths.get(name, 0) + 1
            delay = self.backoff.delay(in_a_row)
            self._down[name] = why
            log.error(
                "ingest task %s stopped: %s; restarting in %.0f s\n%s", name, why, delay, trace
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)
            self._down.pop(name, None)

    async def wait(self, timeout: float) -> None:
        """After `stop` is set: let every task end, for at most `timeout` seconds; those still
        running then are cancelled."""
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


__all__ = ["Backoff", "Supervisor", "describe", "where"]
