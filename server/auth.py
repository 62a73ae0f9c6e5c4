"""Who may read: Bearer tokens, each with what its role permits, and signed URLs for one
slide's tiles (off loopback only)."""

from __future__ import annotations

import hashlib
import hmac
import time

from aiohttp import web

from server.audit import PRINCIPAL
from server.keys import SETTINGS
from server.responses import SIGNED_EXPIRES, json_error
from server.settings import ADMIN, PIXELS, READ, ServerSettings, TokenRole, token_entry
from server.url_numbers import url_int

ROUTE_SCOPES: dict[str, str] = {
    "dzi.descriptor": "tiles",
    "dzi.tile": "tiles",
    "slides.tile": "tiles",
    "viewer.view": "view",
}
"""Route name -> the signature scope that opens it. Only these routes take signed URLs: a tile
signature reads one slide's pyramid tiles and nothing else (not its metadata, its associated
images or another API); a view signature opens one slide's viewer page. Everything else needs a
Bearer token."""


PIXEL_ROUTES = frozenset(
    {"slides.tile", "dzi.descriptor", "dzi.tile", "iiif.image", "iiif.info", "iiif.base"}
)
"""The routes a pixel token reads: a slide's tiles and IIIF images, given its id. Nothing else
answers with pixels alone: the listings and slide documents carry names and cases, DICOMweb the
patient's name, the viewer page the slide's name, associated images may show the label."""
READING = frozenset({"GET", "HEAD"})


def permits(role: TokenRole, route: str | None, method: str) -> bool:
    """Whether a token of `role` may send `method` to the route named `route` (None: no route
    matched): an admin token anything, a read token any read, a pixel token a read of
    `PIXEL_ROUTES`."""
    if role == ADMIN:
        return True
    if method not in READING:
        return False
    return role == READ or (role == PIXELS and route in PIXEL_ROUTES)


EXPIRY_DIGITS = 12
"""Digits of a signed URL's `exp` (Unix seconds): 10 until the year 2286, room for any
`signed_url_seconds`."""


def sign(key: str, scope: str, slide_id: str, expires: int) -> str:
    """Signature of access to one slide's routes of `scope` until `expires` (Unix time)."""
    msg = f"{scope}\n{slide_id}\n{expires}".encode()
    return hmac.new(key.encode(), msg, hashlib.sha256).hexdigest()[:32]


def signed_query(
    settings: ServerSettings, slide_id: str, scope: str, expires: int | None = None
) -> str:
    """`exp=...&sig=...` for URLs of one slide's `scope` routes (empty when auth is off). Expires
    `settings.signed_url_seconds` from now unless `expires` says earlier."""
    if not settings.requires_auth:
        return ""
    latest = int(time.time()) + settings.signed_url_seconds
    exp = latest if expires is None else min(expires, latest)
    return f"exp={exp}&sig={sign(settings.signing_key, scope, slide_id, exp)}"


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison that takes any text a client sends (`hmac.compare_digest`
    refuses non-ASCII str with a TypeError, which was a 500)."""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


OPEN_PATHS = ("/healthz", "/readyz", "/static/")
OPEN_PAGES = frozenset({"/console"})
"""Pages that hold no data: they ask for a token and read the APIs with it, so anyone may load
them (exact paths)."""


def admission(request: web.Request) -> web.Response | None:
    """Off loopback: None when `request` carries a Bearer token, or, for the routes of
    `ROUTE_SCOPES`, an unexpired URL signed for that scope and that slide (who it was admitted
    as goes on the request for the audit log); else the 401 to answer."""
    settings = request.app[SETTINGS]
    if (
        not settings.requires_auth
        or request.method == "OPTIONS"  # CORS preflight carries no credentials
        or request.path.startswith(OPEN_PATHS)
        or request.path in OPEN_PAGES
    ):
        return None
    token = bearer(request.headers.get("Authorization"), settings)
    if token is not None:
        name, role = token
        request[PRINCIPAL] = name
        if permits(role, request.match_info.route.name, request.method):
            return None
        return json_error(403, f"token {name} ({role}) may not {_what(request.method)}")
    scope = ROUTE_SCOPES.get(request.match_info.route.name or "")
    query = request.query
    expires = signed_expiry(
        settings,
        scope,
        request.match_info.get("slide_id"),
        query.get("exp", ""),
        query.get("sig", ""),
    )
    if expires is not None:
        request[SIGNED_EXPIRES] = expires
        request[PRINCIPAL] = f"signed:{scope}"
        return None
    return json_error(401, "authentication required (Bearer token or signed URL)")


def _what(method: str) -> str:
    """What a refused token asked to do, in the words of its 403."""
    return "read this" if method in READING else "change anything"


def bearer(header: str | None, settings: ServerSettings) -> tuple[str, TokenRole] | None:
    """The name and role of the configured token an `Authorization` header value carries,
    else None.
    The scheme is matched whatever its case (`bearer`, `BEARER`: RFC 9110 11.1), and may be
    followed by more than one space (`1*SP`)."""
    if header is None:
        return None
    scheme, space, credentials = header.partition(" ")
    if not space or scheme.lower() != "bearer":
        return None
    return _token(credentials.lstrip(" "), settings.all_tokens)


def _token(given: str, tokens: tuple[tuple[str, TokenRole], ...]) -> tuple[str, TokenRole] | None:
    """The name and role of the token `given` matches, compared with every one in constant
    time (no secret is given twice: `ServerSettings`)."""
    found = None
    for entry, role in tokens:
        name, secret = token_entry(entry)
        if _same(given, secret):
            found = name, role
    return found


def signed_expiry(
    settings: ServerSettings, scope: str | None, slide_id: str | None, exp: str, sig: str
) -> int | None:
    """The expiry of a valid, unexpired signature (`exp`, `sig`: the URL's query values) for a
    route of `scope` (None: a route no signature opens) and slide `slide_id`, else None (no
    `exp`: no signed URL). InvalidArgument (a 400) for an `exp` that is no integer (`url_int`):
    the client is told what is wrong with its URL."""
    if not (scope and slide_id and exp):
        return None
    expires = url_int(exp, "exp", EXPIRY_DIGITS)
    if expires < time.time():
        return None
    return expires if _same(sig, sign(settings.signing_key, scope, slide_id, expires)) else None
