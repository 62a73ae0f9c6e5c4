"""The express lane: the requests a busy viewer makes most (a tile, a DeepZoom tile, a WADO-RS
frame, whose bytes are at hand), answered by the connection as they arrive, without aiohttp's
request and response objects, its handler task and its router.

A hot tile through aiohttp costs about twice aiohttp's own floor (a handler returning one fixed
tile), and that floor is most of it: parsing into a request object, a task and two coroutines
per request, the response object and its writer. Here a request's head is split into its lines,
checked, matched against the routes that take this lane (with the very resources aiohttp routes
by, so the two agree on what a path means), admitted as the front admits it (`server.front`:
the Host check, Bearer tokens and signed URLs, CORS headers and metrics, from the same
functions), and answered with the route's own function, the one its aiohttp handler answers
with first (`tile_now`, `frame_now`, ...), through the same `ResponseHeaders.answer`. The
answers are the same bytes aiohttp would send, Date aside (a test compares them). An answer
that needs waiting (a tile in neither the tile cache nor the page cache: a cold tile of an S3
store) is awaited with the function the route's handler awaits (`ExpressLater`), the connection
answering nothing else until it is sent (`server.runner.ServiceConnection`).

Whatever is not plainly such a request goes aiohttp's way, as before: any other method or
route, a query or path with characters beyond the unreserved ones, an HTTP version other than
1.1, a repeated header, `Connection` other than keep-alive, `Expect`, bytes aiohttp must judge
(control characters, a bare CR or LF), a request that arrives before aiohttp has written its
answer to an earlier one (answers go out in order), a client not reading what it is sent, an
answer the route cannot make without its aiohttp handler (an error, an assembled DeepZoom
tile, a frame of an instance not looked up yet). A request that may have
a body (`Content-Length`, `Transfer-Encoding`), or `Upgrade`, or anything this module cannot
delimit exactly, hands the connection to aiohttp for good: only aiohttp then knows where its
requests end. An app with an audit log, an `on_response_prepare` receiver or a middleware has
no express lane (each request must pass through them).
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from server.auth import ROUTE_SCOPES, bearer, permits, signed_expiry
from server.cors import CORS_POLICY, HOSTS_SEEN
from server.keys import METRICS, SETTINGS
from server.responses import RESPONSE_HEADERS, VERSION_PARAM, Stored
from wsi.errors import InvalidArgument

if TYPE_CHECKING:
    from server.cors import CorsPolicy
    from server.metrics import Metrics
    from server.responses import ResponseHeaders
    from server.settings import ServerSettings

ExpressAnswer = Callable[[web.Application, Mapping[str, str], Mapping[str, str]], Stored | None]
"""A route's answer without waiting: (app, path parameters, request headers read by lower-case
names) -> the stored bytes to send, or None when they are not at hand (then the route's aiohttp
handler answers, which calls the same function first)."""
ExpressLater = Callable[
    [web.Application, Mapping[str, str], Mapping[str, str]], Awaitable[Stored | None]
]
"""A route's answer when it needs waiting (a cold tile of an S3 store): the same arguments, the
stored bytes or None (aiohttp's way answers); the route's aiohttp handler awaits it too."""
Later = Coroutine[Any, Any, bytes | None]
"""An answer the lane awaits (`Express.answer`)."""

MAX_HEAD = 16 * 1024
"""Bytes of a request head this lane holds while it is incomplete; a longer one is aiohttp's
(whose limits answer it), and the connection with it."""

_PRINTABLE = bytes(range(0x20, 0x7F)) + b"\t\r\n"
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""A header name (RFC 9110 5.1): nothing before its colon, not even a space."""
_PATH = re.compile(r"(?:/[A-Za-z0-9_~,-][A-Za-z0-9._~,-]*)+")
"""A path of unreserved characters and commas (IIIF's regions and sizes) whose segments are
neither empty nor dot segments: the same text before and after aiohttp decodes and normalises
it."""
_QUERY = re.compile(r"[A-Za-z0-9._~-]+=[A-Za-z0-9._~-]*(?:&[A-Za-z0-9._~-]+=[A-Za-z0-9._~-]*)*")
_DELIMITING = frozenset({"content-length", "transfer-encoding", "upgrade"})
"""Headers after which only aiohttp knows where the connection's next request starts."""
_UNUSUAL = frozenset({"expect"})
_READS = {b"GET": "GET", b"HEAD": "HEAD"}
_READ_LINE = re.compile(rb"(GET|HEAD) (/[!-~]*) HTTP/1\.1")
"""The request line of a read this lane may answer: printable ASCII, no space in the target,
which is a path (origin form), so that the Host header is the authority the client names the
service by: an absolute-form target (`GET http://host/path`), whose authority replaces Host
(RFC 9112 3.2.2), is aiohttp's, and the front's Host check judges it (`server.cors.refusal`)."""
_STATUS_LINES = {200: "HTTP/1.1 200 OK\r\n", 304: "HTTP/1.1 304 Not Modified\r\n"}

_UNDELIMITED: Final = "undelimited"
_NOT_PLAIN: Final = "not plain"
MEMO_FIELDS = 256
"""Header blocks whose parse each process remembers (a client sends the same headers with
every tile; an If-None-Match differs per tile): each at most `MEMO_BLOCK` bytes."""
MEMO_BLOCK = 2048


class Head:
    """A request head this lane can delimit: it has no body, so its request ends at its blank
    line. `fields` holds its headers by lower-case name (shared between requests with the same
    headers: read only), or is None when it is not a plain GET or HEAD this lane may answer
    (the request then goes to aiohttp, whole)."""

    __slots__ = ("fields", "method", "target")

    def __init__(self, method: str, target: str, fields: Mapping[str, str] | None) -> None:
        self.method = method
        self.target = target
        self.fields = fields


def _lone_break(data: bytes, more: bool = False) -> bool:
    """Whether `data` holds a CR or an LF that is not part of a CRLF; `more`: more bytes may
    follow, so a CR that ends `data` may be the first half of one."""
    pairs = data.count(b"\r\n")
    crs = data.count(b"\r") - (more and data.endswith(b"\r"))
    return crs != pairs or data.count(b"\n") != pairs


def _unsafe(data: bytes) -> bool:
    """Whether aiohttp's parser must judge `data`: control characters, non-ASCII bytes, a lone
    CR or LF."""
    return bool(data.translate(None, _PRINTABLE)) or _lone_break(data)


def undelimited(rest: bytes) -> bool:
    """Whether the connection must hand `rest` to aiohttp, and every byte after it: `rest` is
    what arrived after the last request the lane delimited, not yet a head the lane can parse
    (`Express.parse`). So it is when longer than `MAX_HEAD`; when it holds a complete head the
    lane could not take; and when it holds a lone CR or LF: the lane ends a head at CRLF CRLF
    only, and would wait for one that never comes while the head already ended by a bare LF
    (`GET / HTTP/1.1\nHost: a\n\n`, or `\n\r\n` after CRLF lines). aiohttp's parser answers
    such a head at once (400, `server.runner.ServiceConnection.handle_error`)."""
    return len(rest) > MAX_HEAD or b"\r\n\r\n" in rest or _lone_break(rest, more=True)


def _fields(block: bytes) -> dict[str, str] | str:
    """The header lines `block` by lower-case name, or `_UNDELIMITED`, or `_NOT_PLAIN`."""
    if _unsafe(block):
        return _UNDELIMITED
    fields: dict[str, str] = {}
    plain = True
    for line in block.split(b"\r\n") if block else ():
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            return _UNDELIMITED  # also a folded line (it starts with a space) and an empty one
        key = name.decode("ascii").lower()
        if key in _DELIMITING:
            return _UNDELIMITED
        if key in fields or key in _UNUSUAL:
            plain = False  # delimited all the same: aiohttp answers it
        fields[key] = value.strip(b" \t").decode("ascii")
    if not plain or fields.get("connection", "keep-alive").lower() != "keep-alive":
        return _NOT_PLAIN  # with `Connection: close`, aiohttp closes after its answer
    return fields


class _Route:
    __slots__ = ("answer", "later", "name", "pattern", "resource", "scope")

    def __init__(
        self, resource: web.Resource, answer: ExpressAnswer, later: ExpressLater | None
    ) -> None:
        pattern = resource.get_info().get("pattern")
        if not isinstance(pattern, re.Pattern):
            raise TypeError(f"{resource.canonical}: an express route needs a dynamic path")
        self.pattern = pattern
        """The pattern aiohttp's router matches the route's paths with (its decoded path:
        the same as ours, which `_PATH` keeps to unreserved characters)."""
        self.resource = resource
        self.answer = answer
        self.later = later
        self.name = resource.name
        self.scope = ROUTE_SCOPES.get(resource.name or "")
        """The signed-URL scope that opens the route, if any."""


class _HttpDate:
    """The Date header's value, formatted once a second (as aiohttp does)."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._text = email.utils.formatdate(now, usegmt=True)
            self._second = now
        return self._text


class Express:
    """An app's express lane: the routes that take it (`add`, as they are registered) and what
    the front's checks read, bound when the app starts (`bind`)."""

    def __init__(self) -> None:
        self._routes: list[_Route] = []
        self._date = _HttpDate()
        self._memo: dict[bytes, dict[str, str] | str] = {}
        self.answered = 0
        """Requests this lane answered (the rest went aiohttp's way)."""
        self.awaited = 0
        """Answers this lane awaited (`ExpressLater`), whatever they gave."""
        self._cors: dict[tuple[str, str | None, web.AbstractResource], str] = {}
        self.app: web.Application | None = None
        """Set by `bind`: None until the app runs, and for an app without the lane."""
        self._settings: ServerSettings | None = None
        self._hosts_seen: set[str] | None = None
        self._metrics: Metrics | None = None
        self._policy: CorsPolicy | None = None
        self._prebuilt: ResponseHeaders | None = None

    def add(
        self, resource: web.AbstractResource, answer: ExpressAnswer, later: ExpressLater | None
    ) -> None:
        if not isinstance(resource, web.Resource):
            raise TypeError("an express route needs a path resource")
        self._routes.append(_Route(resource, answer, later))

    def bind(self, app: web.Application) -> Express | None:
        """This lane bound to `app` once its routes and settings are final, or None when the
        app must see every request itself (see the module)."""
        if (
            not app[SETTINGS].express
            or app.on_response_prepare
            or app.middlewares
            or not self._routes
        ):
            return None
        self.app = app
        self._settings = app[SETTINGS]
        self._hosts_seen = app[HOSTS_SEEN]
        self._metrics = app[METRICS]
        self._policy = app[CORS_POLICY]
        self._prebuilt = app[RESPONSE_HEADERS]
        return self

    def parse(self, head: bytes) -> Head | None:
        """The request head `head` (without its final blank line), or None when this lane
        cannot say where its request ends (see the module)."""
        end = head.find(b"\r\n")
        line, block = (head, b"") if end < 0 else (head[:end], head[end + 2 :])
        read = _READ_LINE.fullmatch(line)
        if read is None:
            if _unsafe(line) or line.count(b" ") != 2:
                return None
            return Head("", "", None) if _fields(block) is not _UNDELIMITED else None
        fields = self._memo.get(block)
        if fields is None:
            fields = _fields(block)
            if len(block) <= MEMO_BLOCK:
                if len(self._memo) >= MEMO_FIELDS:
                    self._memo.clear()
                self._memo[block] = fields
        if fields is _UNDELIMITED:
            return None
        method, target = read.groups()
        if isinstance(fields, str):
            return Head("", "", None)
        return Head(_READS[method], target.decode("ascii"), fields)

    def answer(self, head: Head) -> bytes | Later | None:
        """The bytes to send for `head`; or a coroutine that makes them (or None), which the
        connection awaits before it answers anything else; or None: aiohttp answers it."""
        fields = head.fields
        app = self.app
        if fields is None or app is None:
            return None
        start = perf_counter()
        path, _, query_string = head.target.partition("?")
        if _PATH.fullmatch(path) is None:
            return None
        query: dict[str, str] = {}
        if query_string:
            if _QUERY.fullmatch(query_string) is None:
                return None
            pairs = [p.partition("=") for p in query_string.split("&")]
            query = {k: v for k, _, v in pairs}
            if len(query) != len(pairs):
                return None
        for route in self._routes:
            match = route.pattern.fullmatch(path)
            if match is not None:
                break
        else:
            return None
        info = match.groupdict()
        admitted, expires = self._admitted(head.method, route, info, fields, query)
        if not admitted:
            return None
        try:
            stored = route.answer(app, info, fields)
        except Exception:  # the full way answers it: an error as JSON, a bug logged
            return None
        if stored is None:
            if route.later is None:
                return None
            return self._later(app, head.method, route, info, fields, query, expires, start)
        return self._send(head.method, route, fields, query, stored, expires, start)

    async def _later(
        self,
        app: web.Application,
        method: str,
        route: _Route,
        info: Mapping[str, str],
        fields: Mapping[str, str],
        query: Mapping[str, str],
        expires: int | None,
        start: float,
    ) -> bytes | None:
        assert route.later is not None
        self.awaited += 1
        try:
            stored = await route.later(app, info, fields)
        except Exception:  # the full way answers it again: an error as JSON, a bug logged
            return None
        if stored is None:
            return None
        return self._send(method, route, fields, query, stored, expires, start)

    def _admitted(
        self,
        method: str,
        route: _Route,
        info: Mapping[str, str],
        fields: Mapping[str, str],
        query: Mapping[str, str],
    ) -> tuple[bool, int | None]:
        """Whether `server.front` would admit the request without a word (else aiohttp's way
        decides, and says why), and the expiry of the signed URL that admits it, if one does."""
        hosts_seen = self._hosts_seen
        if hosts_seen is not None:  # no auth: the Host must be one the front accepted
            return fields.get("host") in hosts_seen, None
        settings = self._settings
        assert settings is not None
        token = bearer(fields.get("authorization"), settings)
        if token is not None:  # one its role does not permit: the front says why (a 403)
            return permits(token[1], route.name, method), None
        try:
            expires = signed_expiry(
                settings,
                route.scope,
                info.get("slide_id"),
                query.get("exp", ""),
                query.get("sig", ""),
            )
        except InvalidArgument:  # an `exp` that is no integer: aiohttp's way says so
            return False, None
        return expires is not None, expires

    def _send(
        self,
        method: str,
        route: _Route,
        fields: Mapping[str, str],
        query: Mapping[str, str],
        stored: Stored,
        expires: int | None,
        start: float,
    ) -> bytes:
        """The response: the headers aiohttp's way sends, in its order (the ETag and
        `ResponseHeaders.fixed`, the CORS headers the front adds, then aiohttp's own)."""
        prebuilt, metrics = self._prebuilt, self._metrics
        assert prebuilt is not None and metrics is not None
        answer = prebuilt.answer(
            stored, fields.get("if-none-match"), query.get(VERSION_PARAM), expires
        )
        status, body = answer.status, answer.body
        fixed = prebuilt.fixed_text(answer.cache_control, answer.content_type)
        for name, value in stored.extra:
            fixed += f"{name}: {value}\r\n"
        length = "" if status == 304 else f"Content-Length: {len(body)}\r\n"
        head = (
            f"{_STATUS_LINES[status]}ETag: {answer.etag}\r\n{fixed}"
            f"{self._cors_text(method, fields, route.resource)}{length}"
            f"Date: {self._date()}\r\nServer: {SERVER_SOFTWARE}\r\n\r\n"
        ).encode("latin-1")
        metrics.count(route.resource, status, len(body), start)
        self.answered += 1
        return head + body if body and method != "HEAD" else head

    def _cors_text(
        self, method: str, fields: Mapping[str, str], resource: web.AbstractResource
    ) -> str:
        """The lines of `CorsPolicy.pairs`, remembered per method, origin and resource."""
        policy = self._policy
        assert policy is not None
        origin = fields.get("origin") if policy.listed else None
        key = (method, origin, resource)
        text = self._cors.get(key)
        if text is None:
            pairs = policy.pairs(method, fields, resource)
            text = "".join(f"{name}: {value}\r\n" for name, value in pairs)
            if len(self._cors) >= MEMO_FIELDS:
                self._cors.clear()
            self._cors[key] = text
        return text


EXPRESS: Final = web.AppKey("express", Express)
"""The app's express lane (its routes registered by `server.front.Routes`)."""
