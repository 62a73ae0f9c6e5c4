"""S3 range reads on the event loop (`wsi.store.s3_loop`), against the SeaweedFS the tests start,
and through a real HTTP proxy in front of it that misbehaves on request (drops the Range header,
fails a request with a 5xx).

What `AsyncStore.get_range` promises whichever client reads: the bytes asked for (fewer past the
end), `SlideNotFound` for a missing object, a one-line `StoreError` otherwise; here also that
connections are kept and reused, that a store restarted under them is reached again, that an
answer larger than the range is refused, and that one failed attempt is retried.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import numpy as np
import psutil
import pytest
from aiohttp import web

from wsi.errors import SlideNotFound, StoreError
from wsi.store import Store, StoreSettings, obstore_s3
from wsi.store.aio import AsyncStore
from wsi.store.s3_loop import MAX_IDLE, RETRY_PAUSE, on_loop_allowed

from .helpers import HOP_HEADERS, proxy_on_thread
from .s3server import SeaweedFS
from .s3server import seaweedfs as _seaweedfs_fixture  # noqa: F401

pytestmark = pytest.mark.s3

T = TypeVar("T")
BLOB = np.random.default_rng(7).integers(0, 256, 3 * 1024 * 1024 + 11, dtype=np.uint8).tobytes()


def s3_store(server: SeaweedFS, endpoint: str | None = None) -> Store:
    store = Store(StoreSettings(server.url(f"loop-{uuid.uuid4().hex[:12]}"), server.endpoint_url))
    store.put("o/blob", BLOB)
    if endpoint is None:
        return store
    return Store(StoreSettings(store.url, endpoint))


def read(store: Store, body: Callable[[AsyncStore], Awaitable[T]]) -> T:
    """`body(io)` with a started `AsyncStore` of `store` whose single range reads go through
    the event loop's own connections."""

    async def go() -> T:
        with cf.ThreadPoolExecutor(1) as pool:
            io = AsyncStore(store, pool)
            await io.start()
            assert io._ranges is not None
            try:
                return await body(io)
            finally:
                await io.close()

    return asyncio.run(go())


def connections_to(port: int) -> int:
    """This process's established TCP connections to `port` on loopback."""
    return sum(
        1
        for c in psutil.Process().net_connections("tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def test_ranges_are_the_bytes_asked_for_over_reused_connections(seaweedfs: SeaweedFS) -> None:
    store = s3_store(seaweedfs)
    port = int(seaweedfs.endpoint_url.rsplit(":", 1)[1])
    spans = [(0, 1), (10, 20), (5, 50_000), (len(BLOB) - 5, len(BLOB) + 100), (7, 7)]
    offsets = [(i * 37_003) % (len(BLOB) - 20_000) for i in range(100)]

    async def body(io: AsyncStore) -> None:
        before = connections_to(port)  # obstore's own, from the upload
        for start, end in spans:
            assert await io.get_range("o/blob", start, end) == BLOB[start:end]
        parts = await asyncio.gather(*(io.get_range("o/blob", o, o + 20_000) for o in offsets))
        assert list(parts) == [BLOB[o : o + 20_000] for o in offsets]
        kept = connections_to(port)
        assert 1 <= kept - before <= MAX_IDLE
        for o in offsets:  # one at a time: one kept connection serves them all
            assert await io.get_range("o/blob", o, o + 20_000) == BLOB[o : o + 20_000]
        assert connections_to(port) == kept
        whole = await io.get_range("o/blob", 0, len(BLOB))
        assert whole == BLOB
        with pytest.raises(SlideNotFound) as info:
            await io.get_range("o/none", 0, 4)
        assert str(info.value) == "no object o/none"
        assert await io.get_range("o/blob", 3, 9) == BLOB[3:9]  # the 404 left it usable

    read(store, body)


def test_a_store_restarted_under_kept_connections_is_reached_again(seaweedfs: SeaweedFS) -> None:
    store = s3_store(seaweedfs)

    async def body(io: AsyncStore) -> None:
        await asyncio.gather(*(io.get_range("o/blob", i, i + 100) for i in range(8)))
        await asyncio.to_thread(seaweedfs.stop)
        try:
            with pytest.raises(StoreError) as info:
                await io.get_range("o/blob", 0, 10)
            message = str(info.value)
            assert "connect" in message and "\n" not in message, message
            assert not isinstance(info.value, SlideNotFound)
        finally:
            await asyncio.to_thread(seaweedfs.start)
        # Every kept connection died with the server: the first read finds that out and goes on
        # with a new one.
        assert await io.get_range("o/blob", 100, 200) == BLOB[100:200]

    read(store, body)


def test_refused_credentials_are_a_one_line_store_error(
    seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = s3_store(seaweedfs)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    bad = Store(good.settings)

    async def body(io: AsyncStore) -> None:
        with pytest.raises(StoreError) as info:
            await io.get_range("o/blob", 0, 10)
        message = str(info.value)
        assert not isinstance(info.value, SlideNotFound)
        assert message.startswith("cannot read o/blob: access denied (") and "\n" not in message

    read(bad, body)


@dataclass
class Misbehave:
    """What the proxy does to the next requests."""

    drop_range: bool = False
    fail: int = 0
    """Answer this many requests with a 503 SlowDown before forwarding again."""
    seen: int = 0
    arrived: list[float] = field(default_factory=list)
    """`time.monotonic()` as each request reached the proxy."""


@pytest.fixture
def proxy(seaweedfs: SeaweedFS) -> Iterator[tuple[str, Misbehave]]:
    """A real HTTP proxy to SeaweedFS on loopback: headers go through as they are (the Host
    header too, so presigned URLs verify), except what `Misbehave` says."""
    plan = Misbehave()

    async def forward(client: aiohttp.ClientSession, request: web.Request) -> web.StreamResponse:
        plan.seen += 1
        plan.arrived.append(time.monotonic())
        if plan.fail:
            plan.fail -= 1
            error = b"<?xml version='1.0'?><Error><Code>SlowDown</Code></Error>"
            return web.Response(status=503, body=error)
        drop = HOP_HEADERS | ({"range"} if plan.drop_range else set())
        headers = {k: v for k, v in request.headers.items() if k.lower() not in drop}
        async with client.get(
            seaweedfs.endpoint_url + request.path_qs, headers=headers, allow_redirects=False
        ) as upstream:
            payload = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
            return web.Response(status=upstream.status, body=payload, headers=out)

    with proxy_on_thread(forward) as url:
        yield url, plan


def test_an_answer_larger_than_the_range_is_refused(
    seaweedfs: SeaweedFS, proxy: tuple[str, Misbehave]
) -> None:
    endpoint, plan = proxy
    plan.drop_range = True  # SeaweedFS then sends the whole 3 MiB object with a 200
    store = s3_store(seaweedfs, endpoint)

    async def body(io: AsyncStore) -> None:
        with pytest.raises(StoreError) as info:
            await io.get_range("o/blob", 10, 20)
        assert "answered more than bytes 10-20" in str(info.value)
        assert await io.get_range("o/blob", 0, len(BLOB)) == BLOB  # the whole object: fine

    read(store, body)


def test_a_failed_attempt_is_retried_once(
    seaweedfs: SeaweedFS, proxy: tuple[str, Misbehave]
) -> None:
    endpoint, plan = proxy
    store = s3_store(seaweedfs, endpoint)

    async def body(io: AsyncStore) -> None:
        plan.fail = 1
        assert await io.get_range("o/blob", 5, 25) == BLOB[5:25]
        assert plan.seen == 2
        # Not at once: a store that said SlowDown is given a moment.
        assert plan.arrived[1] - plan.arrived[0] >= RETRY_PAUSE / 2
        plan.fail = 2
        with pytest.raises(StoreError) as info:
            await io.get_range("o/blob", 5, 25)
        assert str(info.value) == "cannot read o/blob: the store failed (HTTP 503 SlowDown)"
        assert await io.get_range("o/blob", 5, 25) == BLOB[5:25]

    read(store, body)


def test_a_configured_proxy_leaves_the_reads_to_obstore() -> None:
    assert on_loop_allowed({})
    assert not on_loop_allowed({"HTTPS_PROXY": "http://proxy:3128"})
    assert not on_loop_allowed({"http_proxy": "http://proxy:3128"})


def test_a_reader_called_from_another_event_loop_starts_afresh(seaweedfs: SeaweedFS) -> None:
    """Connections belong to the loop that opened them: another loop gets its own."""
    store = s3_store(seaweedfs)
    port = int(seaweedfs.endpoint_url.rsplit(":", 1)[1])
    first = asyncio.new_event_loop()
    with cf.ThreadPoolExecutor(1) as pool:
        io = AsyncStore(store, pool)
        try:
            first.run_until_complete(io.start())
            assert first.run_until_complete(io.get_range("o/blob", 0, 10)) == BLOB[:10]
            before = connections_to(port)

            async def second() -> bytes:
                try:
                    return await io.get_range("o/blob", 10, 20)
                finally:
                    await io.close()

            assert asyncio.run(second()) == BLOB[10:20]
            first.run_until_complete(asyncio.sleep(0.05))  # the old loop closes its connection
            assert connections_to(port) == before - 1
        finally:
            first.close()


def test_obstore_asks_for_credentials_once_not_ten_times_a_second(
    seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each credential fetch runs botocore on one of obstore's threads, holding the GIL."""
    calls: list[float] = []
    provider = obstore_s3._BotocoreCredentials.__call__

    def counted(self: Any) -> Any:
        calls.append(time.monotonic())
        return provider(self)

    monkeypatch.setattr(obstore_s3._BotocoreCredentials, "__call__", counted)
    store = s3_store(seaweedfs)
    fast = store.obstore_client()
    assert fast is not None
    end = time.monotonic() + 0.6
    while time.monotonic() < end:
        assert fast.get_range("o/blob", 0, 10) == BLOB[:10]
    assert len(calls) == 1
