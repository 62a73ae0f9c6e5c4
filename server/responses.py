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
    audience = "private" if request.app[SETTINGS].requires_auth else "public"
    if version is not None and request.query.get(VERSION_PARAM) == version:
        return f"{audience}, max-age=31536000, immutable"
    return f"{audience}, no-cache"


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
    return web.Response(body=body, content_type=content_type, headers=headers)


def dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))
