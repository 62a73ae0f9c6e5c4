"""S3 range reads on the event loop: presigned GETs over keep-alive HTTP/1.1 connections that the
loop itself reads, for the reads a cold tile waits on (a tile, a level's shard index).

Why not obstore's coroutines here: obstore runs each request on its own threads, so a read costs
two thread wake-ups beyond the GET itself (the loop hands the request to a tokio thread; that
thread takes the GIL and wakes the loop through `call_soon_threadsafe`). On a busy machine each
wake-up waits for a core. Against SeaweedFS on loopback (`bench/s3.py --cold-only`, 2 busy
cores) a cold tile from `wsi serve` took 1.75 ms at the median instead of 1.99 ms, and a read
costs half the CPU time (about 110 us instead of 200 us, obstore's threads included). On an
overloaded machine, with 64 reads in flight, obstore still read about 1.8x more per second: its
extra threads get more of the contended CPU than the one loop thread does.

What it sends: `GET <presigned URL>` with a `Range` header and nothing else. obstore signs the URL
(the store's credentials, region, endpoint and addressing style, as for every other S3 call); a
signature is valid for `SIGNED_FOR` and reused for `REUSE_SIGNED`, then made again off the loop
(`obstore.sign_async`: botocore may refresh credentials over the network). The credentials obstore
signs with are refreshed every 5 minutes and have at least 10 minutes left when fetched
(`wsi.store.obstore_s3.CREDENTIAL_LIFETIME`), so a URL is never used past its credentials.

What it accepts: `206` (or `200` when the object is no longer than the range asked for) with a
`Content-Length` no larger than the range. An answer longer than both the range and
`MAX_ERROR_BODY`, or of unknown length, is refused unread and its connection closed, so a read
holds at most the larger of the two plus `MAX_HEADER_BYTES`.

Errors, as everywhere in the store: 404 -> `SlideNotFound`; anything else -> `StoreError`, one
line, after one more attempt for a reused connection the server had closed, a connection that
broke, a 5xx, or a 403 (signed again). The attempt after a 5xx waits `RETRY_PAUSE` (jittered) first:
S3 answers 503 SlowDown when asked too fast, and a store answers 500 while it recovers (SeaweedFS
restarted: until its volume servers report again), so an immediate second request would meet
the same state; the other retries go at once. Connections: at most `MAX_CONNECTIONS` open, at most
`MAX_IDLE` kept between reads; TCP_NODELAY on each.

Not used (obstore's coroutines read instead) when the environment names an HTTP proxy, which
obstore's client honours and this one does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import cast
from urllib.parse import urlsplit

import obstore

from wsi.errors import SlideChanged, SlideNotFound, StoreError
from wsi.store.obstore_s3 import CONNECT_TIMEOUT, REQUEST_TIMEOUT, ObstoreS3, store_errors

__all__ = ["S3RangeReader", "on_loop_allowed"]

SIGNED_FOR = timedelta(minutes=15)
"""Validity of a presigned URL (generous against clock skew between us and the store)."""
REUSE_SIGNED = 60.0
"""Seconds a presigned URL is reused before it is signed again."""
RETRY_PAUSE = 0.1
"""Seconds (at most; at least half) waited before the second attempt after a 5xx."""
MAX_SIGNED = 4096
"""Presigned URLs kept (one per object read recently: a level's shard, say)."""
MAX_CONNECTIONS = 256
MAX_IDLE = 64
MAX_HEADER_BYTES = 64 * 1024
MAX_ERROR_BODY = 64 * 1024
"""An error document longer than this is not read (its connection is closed instead)."""
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")


def on_loop_allowed(environ: Mapping[str, str] | None = None) -> bool:
    """Whether reads may bypass obstore's client: not when a proxy is configured."""
    env = os.environ if environ is None else environ
    return not any(env.get(n) or env.get(n.lower()) for n in PROXY_VARIABLES)


class _Refused(Exception):
    """An answer that is not HTTP/1.1 as expected (its connection is closed)."""


class _Retry(Exception):
    """One more attempt may succeed (on a new connection, or signed again)."""

    def __init__(self, reason: str, resign: bool = False, pause: bool = False) -> None:
        super().__init__(reason)
        self.resign = resign
        self.pause = pause


@dataclass(frozen=True)
class _Signed:
    """A presigned GET of one object: where to connect and the request line's start."""

    host: str
    port: int
    tls: bool
    head: bytes
    """`GET <path>?<query> HTTP/1.1` and the Host header; the Range header follows."""
    made: float


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def more(self) -> None:
        """Wait for more bytes, or for the connection to end."""
        if self.closed:
            raise _Retry("the store closed the connection")
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes | None
    """None when not read (too long, or of unknown length): the connection is then closed."""
    keep: bool
    etag: str | None = None


async def _exchange(conn: _Connection, request: bytes, limit: int) -> _Response:
    """Send `request` and read one response whose body is read only up to `limit` bytes."""
    assert conn.transport is not None
    conn.transport.write(request)
    buffer = conn.buffer
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > MAX_HEADER_BYTES:
            raise _Refused("the store sent an oversized response header")
        await conn.more()
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise _Refused(f"the store sent no HTTP response ({lines[0][:60]!r})")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise _Refused("the store sent a malformed response header")
        headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length", "")
    chunked = "transfer-encoding" in headers
    keep = version != "HTTP/1.0" and headers.get("connection", "").lower() != "close"
    if chunked or not length.isdigit() or int(length) > limit:
        del buffer[: end + 4]
        return _Response(int(code), None, False)
    stop = end + 4 + int(length)
    while len(buffer) < stop:
        await conn.more()
    body = bytes(memoryview(buffer)[end + 4 : stop])
    del buffer[:stop]
    return _Response(int(code), body, keep and not buffer, headers.get("etag"))


class S3RangeReader:
    """`get_range` of one S3 store's objects, on the event loop that calls it. Connections
    belong to one loop: called from another one (a new `asyncio.run`), it starts afresh."""

    def __init__(self, client: ObstoreS3, clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._clock = clock
        self._signed: dict[str, _Signed] = {}
        self._idle: list[_Connection] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._tls: ssl.SSLContext | None = None

    async def get_range(self, key: str, start: int, end: int, if_match: str | None = None) -> bytes:
        """Bytes [start, end) of object `key` (fewer where it ends sooner); with `if_match` (an
        ETag), only of that version of it (SlideChanged otherwise)."""
        return (await self.get_range_tagged(key, start, end, if_match))[0]

    async def get_range_tagged(
        self, key: str, start: int, end: int, if_match: str | None = None
    ) -> tuple[bytes, str | None]:
        """`get_range`, and the object's ETag."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            idle, self._idle = self._idle, []
            for conn in idle:
                with contextlib.suppress(RuntimeError):  # the old loop is closed
                    conn.close()
            self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        async with self._slots:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT.total_seconds()):
                    return await self._attempts(key, start, end, if_match)
            except TimeoutError as exc:
                raise StoreError(f"cannot read {key}: the store did not answer in time") from exc

    async def _attempts(
        self, key: str, start: int, end: int, if_match: str | None
    ) -> tuple[bytes, str | None]:
        try:
            return await self._read(key, start, end, if_match, resign=False)
        except _Retry as first:
            if first.pause:
                await asyncio.sleep(random.uniform(RETRY_PAUSE / 2, RETRY_PAUSE))  # noqa: S311 (jitter)
            try:
                return await self._read(key, start, end, if_match, resign=first.resign)
            except _Retry as exc:
                raise StoreError(f"cannot read {key}: {exc}") from exc

    async def _read(
        self, key: str, start: int, end: int, if_match: str | None, resign: bool
    ) -> tuple[bytes, str | None]:
        signed = await self._sign(key, resign)
        conn = await self._connection(key, signed)
        condition = "" if if_match is None else f"If-Match: {_header_value(if_match)}\r\n"
        request = signed.head + f"{condition}Range: bytes={start}-{end - 1}\r\n\r\n".encode()
        try:
            response = await _exchange(conn, request, max(end - start, MAX_ERROR_BODY))
        except _Refused as exc:
            conn.close()
            raise StoreError(f"cannot read {key}: {exc}") from None
        except BaseException:
            conn.close()  # a response not read to its end cannot be followed by another
            raise
        if response.keep and len(self._idle) < MAX_IDLE:
            self._idle.append(conn)
        else:
            conn.close()
        return self._result(key, start, end, response), response.etag

    def _result(self, key: str, start: int, end: int, response: _Response) -> bytes:
        status, body = response.status, response.body
        whole = status == 200 and start == 0  # a store that ignores Range: fine if it fits
        if (status == 206 or whole) and body is not None and len(body) <= end - start:
            return body
        if status == 404:
            raise SlideNotFound(f"no object {key}")
        if status == 412:
            raise SlideChanged(f"{key} changed while it was read: published again")
        if status == 403:
            raise _Retry(f"access denied ({_error_code(body)})", resign=True)
        if status >= 500:
            raise _Retry(f"the store failed (HTTP {status} {_error_code(body)})", pause=True)
        if status in (200, 206):
            raise StoreError(f"cannot read {key}: the store answered more than bytes {start}-{end}")
        raise StoreError(f"cannot read {key}: HTTP {status} {_error_code(body)}")

    async def _sign(self, key: str, resign: bool) -> _Signed:
        now = self._clock()
        signed = self._signed.get(key)
        if signed is not None and not resign and now - signed.made < REUSE_SIGNED:
            return signed
        with store_errors(key, "read"):
            url = await obstore.sign_async(self._client.client, "GET", key, SIGNED_FOR)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise StoreError(f"cannot read {key}: obstore signed an unusable URL")
        tls = parts.scheme == "https"
        target = f"{parts.path}?{parts.query}" if parts.query else parts.path
        signed = _Signed(
            parts.hostname,
            parts.port or (443 if tls else 80),
            tls,
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n".encode("ascii"),
            now,
        )
        if len(self._signed) >= MAX_SIGNED:
            self._signed.clear()
        self._signed[key] = signed
        return signed

    async def _connection(self, key: str, signed: _Signed) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        if signed.tls and self._tls is None:
            self._tls = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE"))
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT.total_seconds()):
                _, conn = await loop.create_connection(
                    _Connection,
                    signed.host,
                    signed.port,
                    ssl=self._tls if signed.tls else None,
                    server_hostname=signed.host if signed.tls else None,
                )
        except (OSError, TimeoutError) as exc:
            where = f"{signed.host}:{signed.port}"
            raise StoreError(
                f"cannot read {key}: cannot connect to the store at {where} ({exc})"
            ) from exc
        return conn

    async def close(self) -> None:
        """Close the idle connections (those in use close when their reads end)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _header_value(value: str) -> str:
    """An ETag as a header value: the store's own (a quoted string), never a line break."""
    if any(c in value for c in "\r\n") or not value.isascii():
        raise StoreError("the store sent an unusable ETag")
    return value


def _error_code(body: bytes | None) -> str:
    """The S3 error code of an error document (`NoSuchKey`, `SlowDown`, ...), if it has one."""
    found = _ERROR_CODE.search(body or b"")
    return found.group(1).decode("ascii", "replace") if found else "no error code"
