"""Response helpers every API shares: JSON errors, compact JSON, stored bytes with ETags."""

from __future__ import annotations

import json
import re
import time
from typing import Any, NamedTuple

from aiohttp import web

from wsi.errors import InvalidArgument


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


SIGNED_EXPIRES = web.RequestKey("signed_expires", int)
"""Set on a request admitted by a signed URL (`server.auth`): that URL's expiry (Unix time).
Pages reached this way sign their own links with the same expiry, never a later one, and what
it opened may be cached until then only."""

VERSION_PARAM = "v"
"""Query parameter naming the slide version (its manifest digest) a URL was built for."""


MAX_PREBUILT = 64
"""(Cache-Control, Content-Type) pairs kept: the service's own content types make a dozen."""


_LISTED_TAG = re.compile(r'[ \t,]*(?:W/)?("[^"]*")[ \t]*(?:,|\Z)')
"""One member of an If-None-Match list from where the last one ended: empty members and
whitespace before it, its weakness marker, its opaque tag with quotes (group 1), the comma after
it. Every repetition is bounded by a character the next part cannot start with, so a match costs
at most the characters it consumes plus one run of spaces: a list is read in linear time."""


def etag_matches(if_none_match: str | None, quoted: str) -> bool:
    """Whether an If-None-Match field value names the representation whose strong ETag is
    `quoted` (with its quotes), so that a GET is answered 304 (RFC 9110 13.1.2): `*`, or a
    comma-separated list of entity tags, each compared weakly (`W/"x"` matches `"x"`: a client
    may send a weak tag for a strong one). A malformed member ends the list: what precedes it is
    compared, the rest ignored, and never an error (a 200 is always a correct answer).

    The first test is the common case, a client sending back the one ETag it was sent, at the
    cost of a string comparison (the express lane answers hot tiles with it); the second, a
    substring search, dismisses any other header that cannot match without reading its list,
    since every member that matches holds `quoted` whole."""
    if if_none_match is None:
        return False
    if if_none_match == quoted:
        return True
    if quoted not in if_none_match:
        return if_none_match.strip(" \t") == "*"
    pos = 0
    while (member := _LISTED_TAG.match(if_none_match, pos)) is not None:
        if member.group(1) == quoted:
            return True
        pos = member.end()
    return False


class Stored(NamedTuple):
    """A response of stored bytes before its headers, as a route makes it for either lane
    (aiohttp's, or the express lane's: `server.express`). A named tuple: one is made per tile
    request, and a frozen dataclass costs several times as much to make."""

    body: bytes
    content_type: str
    etag: str
    """Without quotes; strong."""
    version: str | None = None
    """The slide version the bytes belong to (a URL naming it makes them immutable)."""
    storable: bool = True
    """False for what may show patient data (labels, macros): `no-store`."""
    extra: tuple[tuple[str, str], ...] = ()
    """Headers after the ETag, Cache-Control and Content-Type (IIIF's Link), 304s included."""


class ResponseHeaders:
    """The headers every response of stored bytes shares, built once per app instead of per
    response: Cache-Control (private or public, immutable or revalidated, no-store) with each
    content type. Only the ETag, and whether the URL names the slide's current version, differ
    from one response to the next, so a re-published slide needs nothing rebuilt here."""

    __slots__ = ("_fixed", "_immutable", "_revalidate", "private")

    def __init__(self, private: bool) -> None:
        self.private = private
        """Auth is on: a shared cache must not keep answers, and signed URLs exist."""
        scope = "private" if private else "public"
        self._immutable = f"{scope}, max-age=31536000, immutable"
        self._revalidate = f"{scope}, no-cache"
        self._fixed: dict[tuple[str, str | None], tuple[dict[str, str], str]] = {}

    def cache_control(
        self, version: str | None, storable: bool, named: str | None, expires: int | None
    ) -> str:
        """Cache-Control of bytes of slide `version`; `named`: the version the URL names (its
        `VERSION_PARAM`), `expires`: the expiry of the signed URL that admitted the request."""
        if not storable:
            return "no-store"
        if expires is not None:  # kept no longer than the signature that opened it lives
            return f"private, max-age={max(0, expires - int(time.time()))}"
        if version is not None and named == version:
            return self._immutable
        return self._revalidate

    def fixed(self, cache_control: str, content_type: str | None) -> dict[str, str]:
        """The headers of an answer after its ETag: {Cache-Control, Content-Type} (a 304's
        has no Content-Type: None), one shared dict per pair: never modify it."""
        return self._prebuilt(cache_control, content_type)[0]

    def fixed_text(self, cache_control: str, content_type: str | None) -> str:
        """`fixed` as the lines of a response head (`Name: value\r\n` each)."""
        return self._prebuilt(cache_control, content_type)[1]

    def _prebuilt(self, cache_control: str, content_type: str | None) -> tuple[dict[str, str], str]:
        key = (cache_control, content_type)
        found = self._fixed.get(key)
        if found is None:
            headers = {"Cache-Control": cache_control}
            if content_type is not None:
                headers["Content-Type"] = content_type
            found = (headers, "".join(f"{k}: {v}\r\n" for k, v in headers.items()))
            if len(self._fixed) < MAX_PREBUILT:
                self._fixed[key] = found
        return found

    def answer(
        self,
        stored: Stored,
        if_none_match: str | None,
        named: str | None,
        expires: int | None,
    ) -> Answer:
        """The answer of `stored`: 304 when the client has it already (`If-None-Match`).

        Cache-Control: `no-store` when not storable (labels and macros carry patient names);
        otherwise `private` when auth is on (a shared cache must not hand out what needed
        credentials), else `public`; and `immutable` for a year only when the URL names the
        version the bytes belong to. A re-conversion (say with --deidentify) changes the bytes
        behind an unversioned URL, so those are revalidated with the ETag (`no-cache`)."""
        quoted = f'"{stored.etag}"'
        control = self.cache_control(stored.version, stored.storable, named, expires)
        if etag_matches(if_none_match, quoted):
            return Answer(304, quoted, control, None, b"")
        return Answer(200, quoted, control, stored.content_type, stored.body)


class Answer(NamedTuple):
    """A response of stored bytes as `ResponseHeaders.answer` decides it: its headers are the
    ETag, then `ResponseHeaders.fixed(cache_control, content_type)`."""

    status: int
    etag: str
    """Quoted."""
    cache_control: str
    content_type: str | None
    """None for a 304 (no body)."""
    body: bytes


RESPONSE_HEADERS = web.AppKey("response_headers", ResponseHeaders)
"""The app's `ResponseHeaders` (set by `install`)."""


def install(app: web.Application, private: bool) -> None:
    """Give `app` its prebuilt headers (at creation: an app's state is frozen once it runs)."""
    app[RESPONSE_HEADERS] = ResponseHeaders(private)


def _named_version(request: web.Request) -> str | None:
    # The query string is parsed only when there is one (most tile URLs of scripts have none).
    return request.query.get(VERSION_PARAM) if request.query_string else None


def _signed_expiry(request: web.Request, prebuilt: ResponseHeaders) -> int | None:
    # Signed URLs exist only where auth is on (`private`): a tile of a service without auth
    # skips the lookup, a Mapping.get that raises and catches a KeyError each time.
    return request.get(SIGNED_EXPIRES) if prebuilt.private else None


def cache_control(request: web.Request, version: str | None, storable: bool) -> str:
    """The Cache-Control value for a response of slide bytes (see `ResponseHeaders.answer`)."""
    prebuilt = request.app[RESPONSE_HEADERS]
    expires = _signed_expiry(request, prebuilt)
    return prebuilt.cache_control(version, storable, _named_version(request), expires)


def stored_response(request: web.Request, stored: Stored) -> web.Response:
    """`stored` with a strong ETag; 304 when the client has it already (see
    `ResponseHeaders.answer`, which the express lane answers with too)."""
    prebuilt = request.app[RESPONSE_HEADERS]
    answer = prebuilt.answer(
        stored,
        request.headers.get("If-None-Match"),
        _named_version(request),
        _signed_expiry(request, prebuilt),
    )
    headers = {"ETag": answer.etag, **prebuilt.fixed(answer.cache_control, answer.content_type)}
    headers.update(stored.extra)
    if answer.status == 304:
        return web.Response(status=304, headers=headers)
    # Content-Type as a header, not `content_type=`: aiohttp's setter parses and rebuilds it.
    return web.Response(body=answer.body, headers=headers)


def etag_response(
    request: web.Request,
    body: bytes,
    content_type: str,
    etag: str,
    *,
    version: str | None = None,
    storable: bool = True,
) -> web.Response:
    """Stored bytes with a strong ETag (`stored_response`)."""
    return stored_response(request, Stored(body, content_type, etag, version, storable))


_HOST = re.compile(r"[A-Za-z0-9.\-]{1,253}(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](?::[0-9]{1,5})?")
"""A Host value links may name: a name or IPv4 address, or a bracketed IPv6 one, and a port."""

FORWARDED_VARY = "X-Forwarded-Host, X-Forwarded-Proto"
"""What an answer holding absolute links (`public_origin`) varies by besides its URL: Vary
names these, so that no cache hands links made for one proxy's clients to another's."""


def target_authority(request: web.Request) -> str | None:
    """The authority (`host[:port]`) of an absolute-form request target (`GET http://host/path`),
    or None for a target that is a path (or `*`). RFC 9112 3.2.2: the target's authority then
    replaces the Host header. Links (`public_origin`) are built from it, and the Host check of
    a service without auth (`server.cors.refusal`) judges it, so that the two never disagree.
    Read from the URL, not `request.host`: aiohttp's is then the target's host without its
    port, which links need."""
    target = request.raw_path
    if target[:1] == "/" or target == "*":  # the usual origin form costs this one test
        return None
    return request.url.host_port_subcomponent or ""


def public_origin(request: web.Request) -> str:
    """`scheme://host` as the client sees the service, for the absolute links some protocols
    require (an IIIF image service's id, DICOMweb's RetrieveURL): a reverse proxy's
    X-Forwarded-Proto and X-Forwarded-Host first, else the request's own (an absolute-form
    target's authority, else the Host header: `target_authority`). A host is taken only
    when it is a host name, an address and a port (`_HOST`), never text a link could be bent
    by; with no valid one the request is refused (400)."""
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    scheme = proto if proto in ("http", "https") else request.scheme
    host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()
    if not _HOST.fullmatch(host):
        authority = target_authority(request)
        host = request.host if authority is None else authority
    if not _HOST.fullmatch(host):
        raise InvalidArgument("the Host header is not a valid host name")
    return f"{scheme}://{host}"


def dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))
