"""How the service listens: aiohttp's runner, its connections made ours (`ServiceConnection`,
which puts the app's express lane, `server.express`, in front of aiohttp's request handling),
and `run`, which serves an app until SIGINT, SIGTERM or `web.GracefulExit`.

aiohttp answers a request it cannot parse (a bad request line, a header too long, a bare LF, a
broken chunk size) before any route or the front (`server.front`) sees it, from its connection
protocol, in plain text that quotes the request's bytes back; and it logs it with a traceback
that quotes them again (a header value may name a patient). It also waits for ever on a client
that does not read what it is sent. `ServiceRunner` makes every connection a `ServiceConnection`:
a JSON error like the front's, a log line that names what went wrong and nothing that was sent,
and the connection cut by the kernel once its client takes nothing for `STALL_SECONDS`.
`web.run_app` cannot be given a runner, hence `run`: aiohttp's own steps (set up, listen, wait,
clean up, cancel what is left) with this runner, in a process whose limit of open files is
raised (`raise_open_files_limit`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
import socket
import traceback
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest

from server.express import EXPRESS, MAX_HEAD, Express, Later, undelimited
from server.responses import json_error

log = logging.getLogger("aiohttp.server")

RequestHandlerFunc = Callable[[BaseRequest], Awaitable[web.StreamResponse]]

KEEPALIVE_SECONDS = 75.0
"""An idle keep-alive connection is closed after this (what `web.run_app` sets)."""


ResponseHook = Callable[[web.StreamResponse], None]
OUTSIDE_FRONT: web.AppKey[ResponseHook] = web.AppKey("outside_front")
"""Told of every answer a connection makes itself (`ServiceConnection.handle_error`), when the
app sets it: the service counts them in its metrics as it counts the front's answers."""

STALL_SECONDS = 60
"""A connection whose client takes none of the data sent to it for this long is cut by the
kernel (TCP_USER_TIMEOUT, which Linux also applies to a receive window left at zero)."""


MAX_REQUEST_HEAD = 64 * 1024
"""Bytes of one request head (its line and headers) aiohttp's parser is given. aiohttp bounds
each line (8 KB) and the number of headers (128), not their sum: a client that sent 120 lines
of 8 KB and never ended its head held about 1.9 MB of the service's memory per connection
(aiohttp keeps each header twice, as bytes and as text) until the keep-alive timeout, and 500
such connections grew one process from 90 MB to 1 GB, before any token was asked for. nginx's
default is 32 KB (four 8 KB buffers)."""


class HeadTooLarge(HttpProcessingError):
    """A request head longer than `MAX_REQUEST_HEAD` (431, RFC 6585 5)."""

    code = 431
    message = "Request Header Fields Too Large"


class ServiceConnection(RequestHandler):
    """aiohttp's connection protocol, its own error answers made JSON (`handle_error`), cut
    when its client stops taking data (`connection_made`), with the app's express lane in
    front of aiohttp's request handling (`data_received`)."""

    __slots__ = (
        "_aiohttps",
        "_answered_by_aiohttp",
        "_body",
        "_express",
        "_given",
        "_head_bytes",
        "_head_refused",
        "_held",
        "_later",
        "_later_paused",
    )

    def __init__(self, manager: web.Server, *, express: Express | None, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._express = express
        self._held = b""
        """Bytes after the last request handled: the start of a request head not complete yet
        (at most `MAX_HEAD` bytes), or while `_later` runs, whatever arrived meanwhile."""
        self._aiohttps = express is None
        """Every byte goes to aiohttp from now on: only it knows where requests end."""
        self._later: asyncio.Task[bytes | None] | None = None
        """The lane's answer being awaited: nothing else is answered on the connection until
        it is sent."""
        self._later_paused = False
        """Reading paused while `_later` runs, more than `MAX_HEAD` bytes having arrived."""
        self._given = 0
        """Requests handed to aiohttp (each one whole: one message, or one error)."""
        self._answered_by_aiohttp = 0
        """Of those, the ones whose answer aiohttp has written: the lane answers only when it
        has written them all (answers go out in the order of their requests)."""
        self._head_bytes = 0
        """Bytes given to aiohttp since its parser last completed a head, while no body was
        being read: the head it holds, not complete yet (`_to_aiohttp`)."""
        self._body: StreamReader | None = None
        """The body of the last request aiohttp parsed (None before the first)."""
        self._head_refused = False
        """A head went past `MAX_REQUEST_HEAD`: its 431 is queued, nothing more is read."""

    async def _handle_request(
        self,
        request: BaseRequest,
        start_time: float | None,
        request_handler: RequestHandlerFunc,
    ) -> tuple[web.StreamResponse, bool]:
        """aiohttp's, counted once its answer is written (or it failed)."""
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            self._answered_by_aiohttp += 1

    def _give(self, request: bytes) -> None:
        """Hand one whole request to aiohttp."""
        self._given += 1
        super().data_received(request)

    def data_received(self, data: bytes) -> None:
        """Each complete request head is answered by the express lane when it can, else
        handed to aiohttp whole, in order (see `server.express`)."""
        if self._aiohttps:
            self._to_aiohttp(data)
            return
        if self._force_close or self._close:
            return
        if self._later is not None:  # what arrives waits behind the answer awaited
            self._held += data
            self._hold_back()
            return
        express = self._express
        assert express is not None
        held = self._held + data if self._held else data
        pos = 0
        while True:
            end = held.find(b"\r\n\r\n", pos)
            if end < 0 or end - pos > MAX_HEAD:
                break
            head = express.parse(held[pos:end])
            if head is None:  # aiohttp's from here on
                break
            stop = end + 4
            out = None
            if (
                self._answered_by_aiohttp == self._given  # aiohttp has nothing to answer
                and not self._messages
                and not self._paused  # the client takes what it is sent
            ):
                try:
                    out = express.answer(head)
                except Exception as exc:  # a bug of the lane: aiohttp's way answers
                    log.error("express lane failed, aiohttp answers: %s", type(exc).__name__)
                    out = None
            if out is None:
                self._give(held[pos:stop])
                if self._force_close or self._close:
                    return
            elif isinstance(out, bytes):
                transport = self.transport
                assert transport is not None
                transport.write(out)
                self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
            else:
                self._await(out, held[pos:stop])
                self._held = held[stop:]
                self._hold_back()
                return
            pos = stop
        rest = held[pos:] if pos else held
        if undelimited(rest):
            self._aiohttps = True
            self._held = b""
            self._to_aiohttp(rest)
        else:
            self._held = rest

    def _to_aiohttp(self, data: bytes) -> None:
        """Give `data` to aiohttp's parser, refusing a request head longer than
        `MAX_REQUEST_HEAD` (431, then the connection is closed). The parser says neither where
        a head starts nor how much of one it holds, so a head is counted from the outside: the
        bytes of every call that completes no head while no body is being read (the last
        request's body is whole, or there is no request yet). A call that completes one starts
        the count again; the bytes of the next head it may already hold go uncounted, so a head
        is refused at most one read of the socket past the limit."""
        if self._head_refused:
            return
        in_head = self._body is None or self._body.is_eof()
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:
            self._head_bytes = 0
            self._body = self._messages[-1][1] if self._messages else None
        elif in_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_REQUEST_HEAD and not (self._force_close or self._close):
                self._refuse_head()

    def _refuse_head(self) -> None:
        """Queue the 431 for a head past `MAX_REQUEST_HEAD` behind the requests aiohttp already
        has (answers go out in order), as aiohttp queues its own parse errors, and read no
        more: the connection is closed once it is sent (`handle_error`)."""
        self._head_refused = True
        exc = HeadTooLarge()
        self._messages.append((_ErrInfo(status=exc.code, exc=exc, message=""), EMPTY_PAYLOAD))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        transport = self.transport
        if transport is not None:
            transport.pause_reading()

    def _await(self, later: Later, request: bytes) -> None:
        """Send what `later` makes when it has made it, or hand `request` to aiohttp if it
        makes nothing; then go on with what arrived meanwhile."""
        self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
        task = self._later = self._loop.create_task(later)
        task.add_done_callback(functools.partial(self._answered, request))

    def _answered(self, request: bytes, task: asyncio.Task[bytes | None]) -> None:
        self._later = None
        transport = self.transport
        if self._later_paused:
            self._later_paused = False
            if transport is not None:
                transport.resume_reading()
        if task.cancelled() or transport is None or self._force_close or self._close:
            return
        out = task.result() if task.exception() is None else None
        held, self._held = self._held, b""
        if out is None:
            self._give(request)
        else:
            transport.write(out)
            self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
        if held:
            self.data_received(held)

    def _hold_back(self) -> None:
        """Stop reading while an answer is awaited and more than a head's worth waits."""
        if self._later is not None and len(self._held) > MAX_HEAD and not self._later_paused:
            transport = self.transport
            if transport is not None:
                self._later_paused = True
                transport.pause_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._later is not None:
            self._later.cancel()
        super().connection_lost(exc)

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        """As aiohttp's, after the lane's answer under way (as aiohttp lets its own finish)."""
        later = self._later
        if later is not None:
            with suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(later), timeout)
        await super().shutdown(timeout)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """As aiohttp's, and the connection is cut when what is sent stays unacknowledged, or
        the client's window shut, for `STALL_SECONDS`: aiohttp waits for a client that does not
        read for ever, its answer in our memory and the connection open (a tile, a label, a
        DICOM instance streamed: each keeps what it has queued). A client that reads, however
        slowly, is not cut; an idle keep-alive connection is the keep-alive timeout's."""
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
            with suppress(OSError):  # not TCP (a Unix socket): nothing to cut
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, STALL_SECONDS * 1000)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The answer to a request aiohttp could not parse (`HttpProcessingError`: 400), or whose
        handler raised past the front (a bug: 500). `message` (which quotes the request's bytes)
        is neither sent nor logged; the connection is closed after the answer, as aiohttp does."""
        if request.writer.output_size > 0:  # the answer had started: the connection is broken
            raise ConnectionError("an error after the response started")
        if isinstance(exc, HttpProcessingError):
            # Not an error of ours: a warning, and for what is not HTTP at all (scanners, TLS
            # clients on a plain port send it by the thousand) a debug line, as aiohttp does.
            level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.WARNING
            log.log(level, "malformed HTTP request answered %s: %s", status, type(exc).__name__)
            if isinstance(exc, HeadTooLarge):
                why = f"request head over {MAX_REQUEST_HEAD // 1024} KB ({type(exc).__name__})"
                response = json_error(status, why)
            else:
                response = json_error(status, f"malformed HTTP request ({type(exc).__name__})")
        else:
            frames = "".join(traceback.format_tb(exc.__traceback__)) if exc else ""
            log.error("internal error outside the front: %s\n%s", type(exc).__name__, frames)
            response = json_error(status, "internal error")
        response.force_close()
        told = self._manager.outside_front if isinstance(self._manager, _Server) else None
        if told is not None:
            told(response)
        return response


class _Server(web.Server):
    """aiohttp's low-level server, whose connections are `ServiceConnection` protocols."""

    outside_front: ResponseHook | None = None
    """The app's `OUTSIDE_FRONT`."""
    express: Express | None = None
    """The app's express lane, when it has one."""

    def __call__(self) -> RequestHandler:
        return ServiceConnection(self, loop=self._loop, express=self.express, **self._kwargs)


def _path_or_root(handle: RequestHandlerFunc) -> RequestHandlerFunc:
    """`handle`, given a request whose target has no path (`CONNECT host:port`, or the
    absolute form `GET http://host` that RFC 9112 says a server must accept) as one for `/`:
    aiohttp's router tries no route for an empty path, so it would answer 404 in plain text,
    past the front. `/` is the empty path's meaning (RFC 9110 4.2.3); a CONNECT there is a 405.
    A plain function, not a coroutine: a request with a path costs one call and a check."""

    def handler(request: BaseRequest) -> Awaitable[web.StreamResponse]:
        if request.raw_path[:1] == "/" or request.rel_url.raw_path:
            return handle(request)
        return handle(request.clone(rel_url=request.rel_url.with_path("/")))

    return handler


class ServiceRunner(web.AppRunner):
    """`web.AppRunner` whose server's connections are `ServiceConnection`s (aiohttp's runner
    takes no protocol class, so the server it makes is given this one's), and whose requests
    all have a path (`_path_or_root`)."""

    __slots__ = ()

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server
        assert isinstance(server, _Server)
        server.request_handler = _path_or_root(server.request_handler)
        server.outside_front = self.app.get(OUTSIDE_FRONT)
        express = self.app.get(EXPRESS)
        server.express = express.bind(self.app) if express is not None else None
        return server


def run(
    app: web.Application,
    host: str,
    port: int,
    loop: asyncio.AbstractEventLoop,
    *,
    reuse_port: bool = False,
    handle_signals: bool = True,
    listening: Callable[[], None] | None = None,
) -> None:
    """Serve `app` on `loop` until SIGINT or SIGTERM (with `handle_signals`) or until a signal
    handler of the caller's raises `web.GracefulExit`; `listening` is called once the port
    listens. As `web.run_app` does, the app's cleanup runs, then every task left is cancelled."""
    raise_open_files_limit()
    runner = ServiceRunner(
        app, handle_signals=handle_signals, access_log=None, keepalive_timeout=KEEPALIVE_SECONDS
    )

    async def serve() -> None:
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
            if listening is not None:
                listening()
            await asyncio.Event().wait()  # until cancelled
        finally:
            await runner.cleanup()

    asyncio.set_event_loop(loop)
    main = loop.create_task(serve())
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            _cancel_all(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            asyncio.set_event_loop(None)


MAX_OPEN_FILES = 1 << 20
"""Linux's default ceiling on a process's open files (`fs.nr_open`)."""


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (at most
    `MAX_OPEN_FILES`); returns the limit now. Every connection is an open file, and the usual
    soft limit (1024, systemd's default too, under a hard limit of 524,288) let a thousand idle
    or slowly sending clients, each kept up to the keep-alive timeout, leave no descriptor for
    anyone else: new connections were reset. The event loop waits with epoll and psycopg with
    poll(), neither of which stops at descriptor 1024 as select() does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < want:
        with suppress(ValueError, OSError):  # a container may refuse: keep what there is
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel every task still on `loop` and wait for them (as `asyncio.run` does on exit)."""
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {"message": "exception while stopping", "exception": task.exception(), "task": task}
            )
