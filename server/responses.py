"""Response helpers every API shares: JSON errors, compact JSON, stored bytes with ETags."""

from __future__ import annotations

import json
import re
import time
from typing import Any

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


class ResponseHeaders:
    """The headers every response of stored bytes shares, built once per app instead of per
    response: Cache-Control (private or public, immutable or revalidated, no-store) with each
    content type. Only the ETag, and whether the URL names the slide's current version, differ
    from one response to the next, so a re-published slide needs nothing rebuilt here."""

    __slots__ = ("_fixed", "_immutable", "_private", "_revalidate")

    def __init__(self, private: bool) -> None:
        self._private = private
        scope = "private" if private else "public"
        self._immutable = f"{scope}, max-age=31536000, immutable"
        self._revalidate = f"{scope}, no-cache"
        self._fixed: dict[tuple[str, str], dict[str, str]] = {}

    def cache_control(self, request: web.Request, version: str | None, storable: bool) -> str:
        if not storable:
            return "no-store"
        # Signed URLs exist only where auth is on (`private`): a tile of a service without auth
        # skips the lookup, a Mapping.get that raises and catches a KeyError each time.
        expires = request.get(SIGNED_EXPIRES) if self._private else None
        if expires is not None:  # kept no longer than the signature that opened it lives
            return f"private, max-age={max(0, expires - int(time.time()))}"
        # The query string is parsed only when there is one (most tile URLs of scripts have none).
        if (
            version is not None
            and request.query_string
            and request.query.get(VERSION_PARAM) == version
        ):
            return self._immutable
        return self._revalidate

    def fixed(self, cache_control: str, content_type: str) -> dict[str, str]:
        """{Cache-Control, Content-Type}, one shared dict per pair: never modify it."""
        key = (cache_control, content_type)
        headers = self._fixed.get(key)
        if headers is None:
            headers = {"Cache-Control": cache_control, "Content-Type": content_type}
            if len(self._fixed) < MAX_PREBUILT:
                self._fixed[key] = headers
        return headers


RESPONSE_HEADERS = web.AppKey("response_headers", ResponseHeaders)
"""The app's `ResponseHeaders` (set by `install`)."""


def install(app: web.Application, private: bool) -> None:
    """Give `app` its prebuilt headers (at creation: an app's state is frozen once it runs)."""
    app[RESPONSE_HEADERS] = ResponseHeaders(private)


def cache_control(request: web.Request, version: str | None, storable: bool) -> str:
    """The Cache-Control value for a response of slide bytes (see `etag_response`)."""
    return request.app[RESPONSE_HEADERS].cache_control(request, version, storable)


def etag_response(
    request: web.Request,
    body: bytes,
    content_type: str,
    etag: str,
    *,
    version: str | None = None,
    storable: bool = True,
) -> web.Response:
    """Stored bytes with a strong ETag; 304 when the client has them already.

    Cache-Control: `no-store` when not `storable` (labels and macros carry patient names);
    otherwise `private` when auth is on (a shared cache must not hand out what needed
    credentials), else `public`; and `immutable` for a year only when the URL names the `version`
    the bytes belong to. A re-conversion (say with --deidentify) changes the bytes behind an
    unversioned URL, so those are revalidated with the ETag (`no-cache`)."""
    prebuilt = request.app[RESPONSE_HEADERS]
    quoted = f'"{etag}"'
    control = prebuilt.cache_control(request, version, storable)
    if request.headers.get("If-None-Match") == quoted:
        return web.Response(status=304, headers={"ETag": quoted, "Cache-Control": control})
    # Content-Type as a header, not `content_type=`: aiohttp's setter parses and rebuilds it.
    return web.Response(
        body=body, headers={"ETag": quoted, **prebuilt.fixed(control, content_type)}
    )


_HOST = re.compile(r"[A-Za-z0-9.\-]{1,253}(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](?::[0-9]{1,5})?")
"""A Host value links may name: a name or IPv4 address, or a bracketed IPv6 one, and a port."""

FORWARDED_VARY = "X-Forwarded-Host, X-Forwarded-Proto"
"""What an answer holding absolute links (`public_origin`) varies by besides its URL: Vary
names these, so that no cache hands links made for one proxy's clients to another's."""


def public_origin(request: web.Request) -> str:
    """`scheme://host` as the client sees the service, for the absolute links some protocols
    require (an IIIF image service's id, DICOMweb's RetrieveURL): a reverse proxy's
    X-Forwarded-Proto and X-Forwarded-Host first, else the request's own. A host is taken only
    when it is a host name, an address and a port (`_HOST`), never text a link could be bent
    by; with no valid one the request is refused (400)."""
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    scheme = proto if proto in ("http", "https") else request.scheme
    host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()
    if not _HOST.fullmatch(host):
        host = request.host
    if not _HOST.fullmatch(host):
        raise InvalidArgument("the Host header is not a valid host name")
    return f"{scheme}://{host}"


def dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))
