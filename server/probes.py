"""The blocking reads of `/readyz` and `/metrics`, run so that a read that hangs costs one thread.

Both endpoints read what the service does not control: watch folders on network mounts, the
store, a job table on another host, the status files other processes write. A read that hangs
(a hard NFS mount whose server went away; a PostgreSQL whose processes are stopped, whose kernel
still acknowledges, so that no TCP timeout ends the wait) keeps its thread for as long as it
hangs. On the default executor, each probe of a load balancer (every few seconds, with no
credentials) took one more of its few threads (min(32, cores + 4)) until every
`asyncio.to_thread` of the service, the job and console routes among them, waited behind them.

Here each check is one flight at a time, on a daemon thread of its own: callers that come while
it runs share its answer; one that finds it running past its limit is told at once (None) and
starts nothing; the process's exit never waits for it. Checks are named, so a hung one is told
apart from the others, which go on answering."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Probes:
    """Named single flights of blocking checks, on one event loop (one per app)."""

    def __init__(self) -> None:
        self._flights: dict[str, tuple[asyncio.Future[Any], float]] = {}

    def running(self) -> list[str]:
        """The names of the checks whose thread has not returned yet."""
        return sorted(name for name, (flight, _) in self._flights.items() if not flight.done())

    async def run(self, name: str, check: Callable[[], T], limit: float) -> T | None:
        """`check()`'s answer (or its exception) if it comes within `limit` seconds of the
        start of the flight that gives it; None once that flight has run longer. A flight of
        `name` still running is joined, never started again beside it."""
        loop = asyncio.get_running_loop()
        flight = self._flights.get(name)
        if flight is None or flight[0].done():
            flight = (_start(loop, name, check), loop.time())
            self._flights[name] = flight
        future, started = flight
        left = started + limit - loop.time()
        if left <= 0:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(future), left)
        except TimeoutError:
            return None


def _start(
    loop: asyncio.AbstractEventLoop, name: str, check: Callable[[], Any]
) -> asyncio.Future[Any]:
    """`check()` on a new daemon thread; its outcome in the future returned."""
    future: asyncio.Future[Any] = loop.create_future()
    # Its outcome is looked at even when every caller has stopped waiting: no "exception was
    # never retrieved" for a check that failed after its callers were answered.
    future.add_done_callback(lambda f: f.cancelled() or f.exception())

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def work() -> None:
        try:
            result = check()
        except Exception as exc:  # handed to the callers, as `asyncio.to_thread` does
            answer = exc

            def outcome() -> None:
                future.set_exception(answer)
        else:

            def outcome() -> None:
                future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the loop closed while the check hung
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=work, name=f"wsi-probe-{name}", daemon=True).start()
    return future
