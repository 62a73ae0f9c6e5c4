"""S3 object I/O through obstore (`wsi.store.obstore_s3`), against the SeaweedFS the tests start.

What the store contract does not already pin down: how every obstore failure is mapped (a missing
key, refused credentials, an endpoint nobody answers), several ranges at once, uploads whose parts
go out while the next are written and never more than the bound at a time (seen by a real HTTP
proxy in front of SeaweedFS that holds each part a moment), and a process forked after obstore
ran, which must not hang (it reads through s3fs).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import io
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from wsi.errors import InvalidArgument, SlideNotFound, StoreError
from wsi.store import Store, StoreSettings
from wsi.store.aio import AsyncStore

from .helpers import HOP_HEADERS, proxy_on_thread
from .s3server import SeaweedFS
from .s3server import seaweedfs as _seaweedfs_fixture  # noqa: F401

pytestmark = pytest.mark.s3

_MiB = 1024 * 1024
PART = 5 * _MiB
"""The smallest part S3 accepts."""


def s3_store(server: SeaweedFS, **options: Any) -> Store:
    url = server.url(f"obstore-{uuid.uuid4().hex[:12]}")
    return Store(StoreSettings(url, options.pop("endpoint_url", server.endpoint_url), **options))


def noise(n: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def blob() -> bytes:
    return noise(3 * _MiB + 17)


SPANS = [(0, 0), (0, 1), (10, 20), (20, 30), (5, 50), (40, 60), (2 * _MiB, 3 * _MiB), (0, 4096)]


# -- reads ----------------------------------------------------------------------------------------


def test_ranges_match_slices_on_s3_and_locally(
    seaweedfs: SeaweedFS, blob: bytes, tmp_path: Any
) -> None:
    spans = [*SPANS, (len(blob) - 5, len(blob))]
    for store in (s3_store(seaweedfs), Store(StoreSettings(str(tmp_path / "local")))):
        store.put("r/blob", blob)
        assert store.get("r/blob") == blob
        assert store.get_ranges("r/blob", spans) == [blob[s:e] for s, e in spans]
        assert store.get_ranges("r/blob", []) == []
        for start, end in spans:
            assert store.get_range("r/blob", start, end) == blob[start:end]
        with pytest.raises(InvalidArgument):
            store.get_ranges("r/blob", [(5, 3)])
        with pytest.raises(InvalidArgument):
            store.get_ranges("../escape", [(0, 1)])


def test_async_reads_match_slices(seaweedfs: SeaweedFS, blob: bytes) -> None:
    store = s3_store(seaweedfs)
    store.put("a/blob", blob)

    async def go() -> None:
        with cf.ThreadPoolExecutor(2) as pool:
            io = AsyncStore(store, pool)
            await io.start()
            try:
                assert await io.get("a/blob") == blob
                assert await io.get_ranges("a/blob", SPANS) == [blob[s:e] for s, e in SPANS]
                offsets = [(i * 37_003) % (len(blob) - 20_000) for i in range(64)]
                parts = await asyncio.gather(
                    *(io.get_range("a/blob", o, o + 20_000) for o in offsets)
                )
                assert list(parts) == [blob[o : o + 20_000] for o in offsets]
                with pytest.raises(InvalidArgument):
                    await io.get_range("a/../x", 0, 1)
            finally:
                await io.close()

    asyncio.run(go())


# -- errors ---------------------------------------------------------------------------------------


def test_a_missing_key_is_slide_not_found_everywhere(seaweedfs: SeaweedFS) -> None:
    store = s3_store(seaweedfs)

    async def missing_async() -> list[BaseException]:
        errors: list[BaseException] = []
        with cf.ThreadPoolExecutor(1) as pool:
            io = AsyncStore(store, pool)
            await io.start()
            for call in (
                lambda: io.get("m/none"),
                lambda: io.get_range("m/none", 0, 4),
                lambda: io.get_ranges("m/none", [(0, 4), (8, 9)]),
            ):
                try:
                    await call()
                except BaseException as exc:
                    errors.append(exc)
            await io.close()
        return errors

    errors = asyncio.run(missing_async())
    for call in (
        lambda: store.get("m/none"),
        lambda: store.get_range("m/none", 0, 4),
        lambda: store.get_ranges("m/none", [(0, 4), (8, 9)]),
    ):
        with pytest.raises(SlideNotFound) as info:
            call()
        errors.append(info.value)
    assert len(errors) == 6
    for error in errors:
        assert isinstance(error, SlideNotFound) and isinstance(error, FileNotFoundError)
        assert str(error) == "no object m/none"


def test_refused_credentials_are_a_one_line_store_error(
    seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = s3_store(seaweedfs)
    good.put("c/obj", b"x")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    bad = Store(good.settings)
    for call in (
        lambda: bad.get("c/obj"),
        lambda: bad.get_range("c/obj", 0, 1),
        lambda: bad.put("c/other", b"y"),
    ):
        with pytest.raises(StoreError) as info:
            call()
        assert not isinstance(info.value, SlideNotFound)
        message = str(info.value)
        assert "\n" not in message and "<?xml" not in message, message
        assert message.startswith("cannot "), message
    monkeypatch.undo()
    assert good.get("c/obj") == b"x"  # its client keeps the credentials it was made with
    assert not good.exists("c/other")


def test_a_store_error_says_what_s3_answered(
    seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bucket typed wrong was "... 404 Not Found", a wrong key or secret "... 403 Forbidden":
    the error document that said why was cut off with the rest of obstore's dump. Its code now
    ends the line, with what it means for whoever set the service up."""
    missing = Store(StoreSettings(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/slides"))
    with pytest.raises(StoreError) as info:
        missing.children()
    assert str(info.value).endswith("(NoSuchBucket: the bucket does not exist)"), info.value
    good = s3_store(seaweedfs)
    good.put("c/obj", b"x")
    for variable, code in (
        ("AWS_ACCESS_KEY_ID", "InvalidAccessKeyId"),
        ("AWS_SECRET_ACCESS_KEY", "SignatureDoesNotMatch"),
    ):
        monkeypatch.setenv(variable, "not-the-right-one")
        with pytest.raises(StoreError) as info:
            Store(good.settings).get("c/obj")
        message = str(info.value)
        assert f"({code}: " in message and variable in message, message
        assert "\n" not in message and "<?xml" not in message, message
        monkeypatch.undo()


def test_an_unreachable_endpoint_fails_quickly_saying_so(seaweedfs: SeaweedFS) -> None:
    store = s3_store(seaweedfs, endpoint_url="http://127.0.0.1:1")
    start = time.monotonic()
    with pytest.raises(StoreError) as info:
        store.get("u/obj")
    assert "connect" in str(info.value).lower() and "\n" not in str(info.value)
    with pytest.raises(StoreError) as info, store.open_write("u/big") as f:
        f.write(noise(PART + 1))  # fails at the end, when the one PUT is sent
    assert "connect" in str(info.value).lower() and "\n" not in str(info.value)
    assert time.monotonic() - start < 30


# -- streamed uploads -----------------------------------------------------------------------------


@dataclass
class PartCounter:
    """What the proxy saw of UploadPart requests."""

    hold: float
    inflight: int = 0
    most: int = 0
    done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def slow_proxy(seaweedfs: SeaweedFS) -> Iterator[tuple[str, PartCounter]]:
    """An HTTP proxy to SeaweedFS that holds each part upload for `hold` seconds (a slow link)
    and counts how many are open at once. Headers go through as they are, so the client's
    signatures (which cover the Host header) still verify."""
    counter = PartCounter(hold=0.3)

    async def forward(client: aiohttp.ClientSession, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        part = request.method == "PUT" and "partNumber" in request.query
        if part:
            with counter.lock:
                counter.inflight += 1
                counter.most = max(counter.most, counter.inflight)
            await asyncio.sleep(counter.hold)
        try:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
            async with client.request(
                request.method,
                seaweedfs.endpoint_url + request.path_qs,
                headers=headers,
                data=io.BytesIO(body),
                allow_redirects=False,
            ) as upstream:
                payload = await upstream.read()
                out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
                return web.Response(status=upstream.status, body=payload, headers=out)
        finally:
            if part:
                with counter.lock:
                    counter.inflight -= 1
                    counter.done += 1

    with proxy_on_thread(forward, client_max_size=64 * _MiB) as url:
        yield url, counter


def test_parts_upload_while_the_next_are_written_never_more_than_the_bound(
    seaweedfs: SeaweedFS, slow_proxy: tuple[str, PartCounter]
) -> None:
    endpoint, counter = slow_proxy
    bound = 2
    parts = 8
    store = s3_store(
        seaweedfs, endpoint_url=endpoint, upload_part_bytes=PART, upload_concurrency=bound
    )
    direct = Store(StoreSettings(store.settings.url, seaweedfs.endpoint_url))
    data = noise(parts * PART + 12345, seed=3)
    with store.open_write("w/big.bin") as f:
        for start in range(0, len(data), 3 * _MiB):  # writes that straddle parts
            f.write(data[start : start + 3 * _MiB])
        # The writer ran ahead of the uploads only by the bound: the rest were already sent.
        assert counter.done >= parts - (bound + 2), counter
        assert not direct.exists("w/big.bin")
    assert 2 <= counter.most <= bound + 1, counter
    assert counter.done == parts + 1  # the last, short part goes out at close
    assert direct.size("w/big.bin") == len(data)
    assert direct.get("w/big.bin") == data


def test_one_large_write_is_sent_a_part_at_a_time(
    seaweedfs: SeaweedFS, slow_proxy: tuple[str, PartCounter]
) -> None:
    """A single write of many parts still waits for slots instead of queueing them all."""
    endpoint, counter = slow_proxy
    store = s3_store(seaweedfs, endpoint_url=endpoint, upload_part_bytes=PART, upload_concurrency=1)
    data = noise(6 * PART, seed=4)
    with store.open_write("w/one.bin") as f:
        f.write(data)
    assert 1 <= counter.most <= 2, counter
    assert store.get("w/one.bin") == data


# -- processes ------------------------------------------------------------------------------------


def _read_in_child(settings: StoreSettings, key: str, answers: Any) -> None:
    store = Store(settings)
    store.put(f"{key}.child", b"from the child")
    answers.put((store.obstore_client() is None, store.get(key), store.get_range(key, 2, 6)))


def test_a_process_forked_after_obstore_ran_reads_through_s3fs(seaweedfs: SeaweedFS) -> None:
    """obstore's runtime does not survive fork: a forked child must not touch it (it would hang)."""
    store = s3_store(seaweedfs)
    store.put("f/obj", b"0123456789")
    assert store.get("f/obj") == b"0123456789"  # obstore has run in this process
    assert store.obstore_client() is not None
    context = multiprocessing.get_context("fork")
    answers = context.Queue()
    child = context.Process(target=_read_in_child, args=(store.settings, "f/obj", answers))
    child.start()
    try:
        answer = answers.get(timeout=60)
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert answer == (True, b"0123456789", b"2345")
    assert store.get("f/obj.child") == b"from the child"
    assert os.getpid() != child.pid
