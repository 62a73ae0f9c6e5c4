"""Response helpers every API shares: JSON errors, compact JSON, stored bytes with ETags."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from server.keys import SETTINGS


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


VERSION_PARAM = "v"
"""Query parameter naming the slide version (its manifest digest) a URL was built for."""


def cache_control(request: web.Request, version: str | None, storable: bool) -> str:
    """The Cache-Control value for a response of slide bytes (see `etag_response`)."""
    if not storable:
        return "no-store"
    private = request.app[SETTINGS].requires_auth
    # The query string is parsed only when there is one (most tile URLs of scripts have none).
    if version is not None and request.query_string and request.query.get(VERSION_PARAM) == version:
        return _IMMUTABLE[private]
    return _REVALIDATE[private]


_IMMUTABLE = {
    False: "public, max-age=31536000, immutable",
    True: "private, max-age=31536000, immutable",
}
_REVALIDATE = {False: "public, no-cache", True: "private, no-cache"}


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
    quoted = f'"{etag}"'
    headers = {"ETag": quoted, "Cache-Control": cache_control(request, version, storable)}
    if request.headers.get("If-None-Match") == quoted:
        return web.Response(status=304, headers=headers)
    # As a header, not `content_type=`: aiohttp's setter parses and rebuilds it (1 us a tile).
    headers["Content-Type"] = content_type
    return web.Response(body=body, headers=headers)


def dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))
