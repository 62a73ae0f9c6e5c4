"""Who may read: Bearer tokens, and signed URLs for one slide's tiles (off loopback only)."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from server.keys import SETTINGS
from server.responses import json_error
from server.settings import ServerSettings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def sign(key: str, slide_id: str, expires: int) -> str:
    """Signature of a viewer's access to one slide until `expires` (Unix time)."""
    msg = f"{slide_id}:{expires}".encode()
    return hmac.new(key.encode(), msg, hashlib.sha256).hexdigest()[:32]


def signed_query(settings: ServerSettings, slide_id: str) -> str:
    """`exp=...&sig=...` for a viewer's tile URLs (empty when auth is off)."""
    if not settings.requires_auth:
        return ""
    expires = int(time.time()) + settings.signed_url_seconds
    return f"exp={expires}&sig={sign(settings.signing_key, slide_id, expires)}"


OPEN_PATHS = ("/healthz", "/readyz", "/static/")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Off loopback: a Bearer token, or (for one slide's tiles) an unexpired signed URL."""
    settings = request.app[SETTINGS]
    if (
        not settings.requires_auth
        or request.method == "OPTIONS"  # CORS preflight carries no credentials
        or request.path.startswith(OPEN_PATHS)
    ):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer ") and any(
        hmac.compare_digest(header[7:], token) for token in settings.tokens
    ):
        return await handler(request)
    slide_id = request.match_info.get("slide_id")
    exp, sig = request.query.get("exp", ""), request.query.get("sig", "")
    if slide_id and exp.isdigit() and int(exp) >= time.time():
        expected = sign(settings.signing_key, slide_id, int(exp))
        if hmac.compare_digest(sig, expected):
            return await handler(request)
    return json_error(401, "authentication required (Bearer token or signed URL)")
