"""A render (a region scaled and encoded: IIIF, DeepZoom levels below the stored ones, DICOMweb
rendered) holds its render slot until its answer is made, so the memory of renders is bounded by
the slots, whatever the number of clients."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

import wsi
from server import render, runner
from server.catalog import Catalog
from server.keys import CATALOG
from server.render import as_made, region
from server.settings import ServerSettings
from wsi.published.store import PublishedStore

from .conftest import sample
from .helpers import serving_app

WAIT = 60.0
"""A bound on waits that end as soon as what they wait for happens (never a timing guess)."""


class Reads:
    """A published slide whose region reads are counted (the slide itself does the reading)."""

    def __init__(self, slide: Any) -> None:
        self.slide = slide
        self.count = 0

    def best_level(self, downsample: float) -> Any:
        return self.slide.best_level(downsample)

    async def region(self, *args: int) -> np.ndarray:
        self.count += 1
        return await self.slide.region(*args)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("renders")
    src = sample("CMU-1-Small-Region.svs")
    return root, wsi.convert_slide(src, wsi.Store(wsi.StoreSettings(str(root)))).slide_id


def test_the_answer_is_made_inside_the_render_slot(published: tuple[Path, str]) -> None:
    """With one slot, a second render does not read its pixels while the first one's answer is
    still being made (the first holds the slot), and both answers are made in full after.
    Before, `region` gave the pixels back and released the slot: every client's render could
    read and keep its pixels while waiting for the pool to encode them."""
    root, sid = published

    async def main() -> None:
        async with PublishedStore(str(root)) as store:
            catalog = Catalog(store, render_slots=1)
            slide = Reads(await store.slide(sid))
            making, go_on = threading.Event(), threading.Event()

            def first_answer(pixels: np.ndarray) -> tuple[int, ...]:
                making.set()
                assert go_on.wait(WAIT)
                return pixels.shape

            def second_answer(pixels: np.ndarray) -> tuple[int, ...]:
                return pixels.shape

            whole = (0, 0, slide.slide.width, slide.slide.height)
            first = asyncio.ensure_future(
                region(catalog, slide, *whole, 400, 300, 10**6, first_answer, as_made)  # type: ignore[arg-type]
            )
            second = asyncio.ensure_future(
                region(catalog, slide, *whole, 200, 150, 10**6, second_answer, as_made)  # type: ignore[arg-type]
            )
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, making.wait, WAIT)
            # The first answer is being made on the pool; the loop is free to run the second
            # render as far as it may go, and it may not read before the slot is free.
            for _ in range(100):
                await asyncio.sleep(0)
            assert catalog.renders.locked()
            assert slide.count == 1 and not second.done()
            go_on.set()
            assert await first == (300, 400, 3)
            assert await second == (150, 200, 3)
            assert slide.count == 2

    asyncio.run(main())


def _asked(base: str, path: str) -> socket.socket:
    """A client that asks for `path` and does not read the answer (a tiny receive buffer)."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    return sock


def _received(sock: socket.socket) -> int:
    """Bytes the service sent on `sock` until it closed the connection."""
    sock.settimeout(WAIT)
    total = 0
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(1 << 20):
            total += len(chunk)
    return total


def test_a_client_that_does_not_read_keeps_its_render_slot_until_cut_off(
    published: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two clients ask for 16 MP PNG renders (about 14 MB each, more than the kernel's socket
    buffers hold) and read nothing: each answer stays in the service's memory while it is not
    taken. Before, the render slot was free once the answer was made, so every such client
    could hold one more answer (40 clients held 1.9 GB, and nothing ever cut them off); now
    each holds its slot (one thread: two slots) until its answer is sent, or until the send
    deadline cuts its connection, after which the next render runs."""
    root, sid = published
    # The first answer's deadline runs while the second is rendered (one thread): 3 s was
    # less than a 16 MP PNG takes on a loaded machine, and the first slot was free before
    # both could be seen held.
    monkeypatch.setattr(render, "SEND_FLOOR_SECONDS", 15.0)
    monkeypatch.setattr(render, "SEND_BYTES_PER_SECOND", 10**12)
    with serving_app(ServerSettings(store=str(root), threads=1)) as (base, app, loop):
        renders = app[CATALOG].renders
        slow = [_asked(base, f"/iiif/3/{sid}/full/^{w},/0/default.png") for w in (3460, 3400)]
        try:
            for s in slow:  # each answer made and being sent: its status line came
                s.settimeout(WAIT)
                assert s.recv(15).startswith(b"HTTP/1.1 200")
            assert renders.locked()  # both answers, unsent, hold their slots

            async def every_slot() -> None:  # free once both slow clients are done with theirs
                async with renders, renders:
                    pass

            asyncio.run_coroutine_threadsafe(every_slot(), loop).result(WAIT)
            # Neither client read its answer, so neither was sent: both were cut off.
            assert all(_received(s) < 13_000_000 for s in slow)
            ok = requests.get(f"{base}/iiif/3/{sid}/full/200,/0/default.png", timeout=WAIT)
            assert ok.status_code == 200 and ok.content[:4] == b"\x89PNG"
        finally:
            for s in slow:
                s.close()


def test_a_client_that_stops_reading_is_cut_off_by_the_kernel(
    published: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the answer (here a render, its own deadline out of the way), a connection
    whose client takes none of what is sent for `STALL_SECONDS` is cut (TCP_USER_TIMEOUT):
    aiohttp waited on such a client for ever, its answer in memory, its connection open."""
    root, sid = published
    monkeypatch.setattr(render, "SEND_FLOOR_SECONDS", 3600.0)
    monkeypatch.setattr(runner, "STALL_SECONDS", 2)
    with serving_app(ServerSettings(store=str(root), threads=1)) as (base, app, loop):
        renders = app[CATALOG].renders
        slow = [_asked(base, f"/iiif/3/{sid}/full/^{w},/0/default.png") for w in (3460, 3400)]
        try:
            for s in slow:
                s.settimeout(WAIT)
                assert s.recv(15).startswith(b"HTTP/1.1 200")

            async def every_slot() -> None:
                async with renders, renders:
                    pass

            asyncio.run_coroutine_threadsafe(every_slot(), loop).result(WAIT)
            assert all(_received(s) < 13_000_000 for s in slow)
        finally:
            for s in slow:
                s.close()
