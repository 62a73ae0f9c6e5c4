"""Helpers several test modules share: the CLI as a subprocess, a fake clock, waiting loops, what
zarr-python makes of a published slide."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pydicom
from aiohttp import web

from server.app import create_app
from server.runner import ServiceRunner
from server.settings import ServerSettings
from wsi.ingest.queue import JobState, SQLiteJobQueue
from wsi.ingest.settings import IngestSettings
from wsi.ingest.worker import Worker
from wsi.store.objects import StoreSettings

from .conftest import sample


def run_wsi(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`wsi ARGS` as a user runs it (`python -m server.cli`, the console script's module);
    output captured as text, never raising."""
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env if env is not None else dict(os.environ),
        check=False,
    )


@contextlib.contextmanager
def wsi_process(
    log: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`wsi ARGS` running in a session of its own (a test may SIGKILL it, or its group),
    output to `log`; stopped on the way out: SIGTERM to the group, SIGKILL if it lingers."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def empty_folders(folder: Path) -> list[str]:
    """The folders under `folder` that hold nothing, relative to it."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_dir() and not any(p.iterdir())
    )


def zarr_members(group: Path) -> tuple[list[str], list[str]]:
    """Every member zarr-python finds in the local Zarr group `group`, and what it warns while
    listing them (an emptied folder of a deleted array is a member it does not recognise)."""
    import zarr

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        members = sorted(name for name, _ in zarr.open_group(str(group), mode="r").members(None))
    return members, [str(w.message) for w in caught]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeClock:
    """A clock tests move by hand (`step`), for code that takes one as a parameter."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def step(self, seconds: float) -> None:
        self.now += seconds


def settled(*paths: Path) -> None:
    """Date `paths` (and every file under a folder among them) an hour back: slides that have
    not changed for longer than any settle time, so a worker that cannot read one quarantines
    it at once instead of retrying it as a copy that may still be under way."""
    old = time.time() - 3600
    for path in paths:
        for each in [path, *(path.rglob("*") if path.is_dir() else ())]:
            os.utime(each, (old, old))


def drain(
    queue: SQLiteJobQueue, store: str, settings: IngestSettings, until: float = 120.0
) -> None:
    """Run one worker publishing into `store` until no job is queued or running (or `until`
    seconds passed)."""

    async def main() -> None:
        stop = asyncio.Event()
        worker = Worker(queue, StoreSettings(store), settings, name="test-worker")
        task = asyncio.create_task(worker.run(stop))
        deadline = time.monotonic() + until
        while time.monotonic() < deadline:
            states = {j.state for j in queue.list(limit=1000)}
            if not states & {JobState.QUEUED, JobState.RUNNING}:
                break
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(task, 60)

    asyncio.run(main())


def run_worker_until(worker: Worker, event: asyncio.Event, timeout: float = 120.0) -> None:
    """Run `worker` until `event` is set (at most `timeout` seconds), then stop it."""

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            await asyncio.wait_for(event.wait(), timeout)
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)

    asyncio.run(main())


async def wait_until(check: Callable[[], Awaitable[Any]], timeout: float = 90.0) -> Any:
    """Await `check()` every 0.1 s until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s")


@contextlib.contextmanager
def serving_app(
    settings: ServerSettings,
) -> Iterator[tuple[str, web.Application, asyncio.AbstractEventLoop]]:
    """The app on 127.0.0.1 (a free port), on its own event loop in a thread, as `wsi serve`
    runs it: (base URL, the app, its loop)."""
    loop = asyncio.new_event_loop()
    app = create_app(settings)
    runner = ServiceRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def stop() -> None:  # as `server.runner.run` stops: what is left is cancelled
        await runner.cleanup()
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)

    try:
        yield f"http://127.0.0.1:{port}", app, loop
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


@contextlib.contextmanager
def serving(settings: ServerSettings) -> Iterator[str]:
    """`serving_app`'s base URL."""
    with serving_app(settings) as (base, _, _):
        yield base


HOP_HEADERS = frozenset({"transfer-encoding", "connection", "keep-alive", "content-length"})
"""Headers a proxy must not pass on as they are."""

ProxyHandler = Callable[[aiohttp.ClientSession, web.Request], Awaitable[web.StreamResponse]]


@contextlib.contextmanager
def proxy_on_thread(handle: ProxyHandler, client_max_size: int = 1024**2) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 with its own event loop on a thread, every request of any
    method given to `handle` with a client session for the upstream (e.g. a proxy in front of
    SeaweedFS that slows or breaks some answers on purpose). Yields its base URL; stopped and its
    session closed on exit."""
    state: dict[str, Any] = {}
    ready = threading.Event()

    def run() -> None:
        loop = asyncio.new_event_loop()
        state["loop"] = loop

        async def start() -> None:
            client = aiohttp.ClientSession(auto_decompress=False)
            state["client"] = client

            async def route(request: web.Request) -> web.StreamResponse:
                return await handle(client, request)

            app = web.Application(client_max_size=client_max_size)
            app.router.add_route("*", "/{tail:.*}", route)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            state["runner"] = runner
            state["port"] = runner.addresses[0][1]
            ready.set()

        loop.run_until_complete(start())
        loop.run_forever()

        async def stop() -> None:
            await state["runner"].cleanup()
            await state["client"].close()

        loop.run_until_complete(stop())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10), "the proxy did not start"
    try:
        yield f"http://127.0.0.1:{state['port']}"
    finally:
        state["loop"].call_soon_threadsafe(state["loop"].stop)
        thread.join(10)


def dicom_series(folder: Path, label_in_thumbnail: str) -> Path:
    """The openslide-python DICOM fixture (a volume and a THUMBNAIL instance) in `folder`, its
    thumbnail saying whether it shows the label (DICOM's Specimen Label In Image)."""
    folder.mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(sample(f"openslide-python-fixtures/{name}"), folder / name)
    thumbnail = pydicom.dcmread(folder / "boxes_1.dcm")
    assert "THUMBNAIL" in thumbnail.ImageType
    thumbnail.SpecimenLabelInImage = label_in_thumbnail
    thumbnail.save_as(folder / "boxes_1.dcm")
    return folder
