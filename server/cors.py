"""Cross-origin reads: viewers served from another origin (an OpenSeadragon page, Slim or
dicom-microscopy-viewer for DICOMweb, a IIIF viewer) may read tiles, metadata and DICOMweb.

One policy for every API, in one place: read methods only (GET, HEAD; writes such as `POST /jobs`
stay same-origin), any origin while the service answers on loopback only, and with auth on only
the origins of an explicit allow-list (`--cors-origin`, `WSI_CORS_ORIGINS`), each echoed back with
`Vary: Origin`. Browsers send a preflight before a read that carries `Authorization`; it is
answered here for every path, before routing can turn it into a 405.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from server.keys import SETTINGS
from server.responses import json_error

READ_METHODS = frozenset({"GET", "HEAD"})
ALLOW_HEADERS = "Authorization, Accept, If-None-Match, Range"
EXPOSE_HEADERS = "ETag, Link, Content-Range, Content-Length, Warning"
PREFLIGHT_MAX_AGE = "86400"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def allowed_origin(request: web.Request) -> str | None:
    """The value of Access-Control-Allow-Origin for this request, or None (no CORS)."""
    settings = request.app[SETTINGS]
    if not settings.requires_auth:
        return "*"  # also without an Origin header: the same bytes suit every cache
    origin = request.headers.get("Origin")
    return origin if origin and origin in settings.cors_origins else None


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answers CORS preflights for read methods; everything else goes on."""
    wanted = request.headers.get("Access-Control-Request-Method")
    if request.method != "OPTIONS" or wanted is None or "Origin" not in request.headers:
        return await handler(request)
    origin = allowed_origin(request)
    if origin is None or wanted not in READ_METHODS:
        return json_error(403, "cross-origin request not allowed for this origin or method")
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
            "Vary": "Origin",
        },
    )


async def cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: CORS headers on every read response (errors included, so a viewer
    can show why), set before the headers go out (streamed responses too)."""
    if request.method not in READ_METHODS:
        return
    origin = allowed_origin(request)
    if origin is None:
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
    if origin != "*":
        response.headers.add("Vary", "Origin")
