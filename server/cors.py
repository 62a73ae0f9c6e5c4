"""What web pages in a browser may do with the service: cross-origin reads, and on a service
without authentication, nothing from pages of other sites.

Cross-origin reads: viewers served from another origin (an OpenSeadragon page, Slim or
dicom-microscopy-viewer for DICOMweb, a IIIF viewer) may read tiles, metadata and DICOMweb when
their origin is on the allow-list (`--cors-origin`, `WSI_CORS_ORIGINS`; none by default), echoed
back with `Vary: Origin`; without auth, any origin may read the routes that answer with pixels
only (`PIXEL_ROUTES`). Read methods only (GET, HEAD). One policy for every API, in one place.
Browsers send a preflight before a read that carries `Authorization`; it is answered here for
every path, before routing can turn it into a 405.

Without authentication (loopback, no tokens) the browser of the person at the machine is the
only thing between the service and any web site they open, so (`refusal`): a request must name
the service by a loopback name (Host `localhost`, `127.x.x.x` or `[::1]`), else a site whose
name resolves to 127.0.0.1 (DNS rebinding) would read it as its own origin; and a write (`POST
/jobs`, a quarantine retry, `DELETE /jobs/...`) must come from the service's own pages, not from
a form or script of another site (cross-site request forgery). With authentication neither is
needed: credentials are Bearer tokens, which a browser never adds by itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractResource

from server.responses import json_error, target_authority
from server.settings import ServerSettings

READ_METHODS = frozenset({"GET", "HEAD"})
ALLOW_HEADERS = "Authorization, Accept, If-None-Match, Range"
EXPOSE_HEADERS = "ETag, Link, Content-Range, Content-Length, Warning"
PREFLIGHT_MAX_AGE = "86400"

PIXEL_ROUTES = frozenset(
    {"slides.tile", "dzi.tile", "dzi.descriptor"}
    | {"iiif.image", "iiif.info", "iiif.base", "iiif.other"}
)
"""Routes whose answers hold pixels and sizes only, never a name or other metadata: without auth
any origin may read them (`*`: the IIIF Image API asks for it, and viewers of other origins show
tiles). Slide ids are opaque, so a page must already know one."""


@dataclass(frozen=True)
class CorsPolicy:
    """Which origins may read which answers, decided once per app from its settings and routes:
    `listed` origins read everything, any origin the `open` resources (those of `PIXEL_ROUTES`,
    without auth). Resources, not route names: the request's resource is at hand, its name
    three lookups further."""

    listed: frozenset[str]
    open: frozenset[AbstractResource]

    @classmethod
    def of(cls, settings: ServerSettings, router: web.UrlDispatcher) -> CorsPolicy:
        """The policy of an app with `settings` whose routes are all in `router`."""
        pixels = () if settings.requires_auth else router.resources()
        return cls(
            frozenset(settings.cors_origins),
            frozenset(r for r in pixels if r.name in PIXEL_ROUTES),
        )

    @property
    def active(self) -> bool:
        """Whether any answer may carry CORS headers."""
        return bool(self.listed or self.open)

    def allowed_origin(self, origin: str | None, resource: AbstractResource | None) -> str | None:
        """Access-Control-Allow-Origin for a read from `origin` of `resource`, or None."""
        if origin and origin in self.listed:
            return origin
        return "*" if resource in self.open else None

    def add_headers(
        self,
        request: web.Request,
        response: web.StreamResponse,
        resource: AbstractResource | None,
    ) -> None:
        """CORS headers on a read's answer (`pairs`), before its headers go out; `resource`:
        the request's (None: no route's). A plain call, not an `on_response_prepare` receiver:
        the signal's dispatch cost about a tenth of a hot tile's handling."""
        if not (self.listed or self.open):
            return
        headers = response.headers
        for name, value in self.pairs(request.method, request.headers, resource):
            headers.add(name, value)  # added, not set: a handler never sets these itself

    def pairs(
        self, method: str, headers: Mapping[str, str], resource: AbstractResource | None
    ) -> tuple[tuple[str, str], ...]:
        """The CORS headers of the answer to a `method` request with `headers` (read by their
        lower-case names) of `resource`: on reads only, errors included, so a viewer can show
        why. With an allow-list every read answer varies by Origin, also one without CORS
        headers, so that no cache hands it to a listed origin; without one, the answer is the
        same for every origin and the request's Origin is not read."""
        if not (self.listed or self.open) or method not in READ_METHODS:
            return ()
        vary: tuple[tuple[str, str], ...] = ()
        if self.listed:
            vary = (("Vary", "Origin"),)
            origin = self.allowed_origin(headers.get("origin"), resource)
        else:
            origin = "*" if resource in self.open else None
        if origin is None:
            return vary
        return (
            *vary,
            ("Access-Control-Allow-Origin", origin),
            ("Access-Control-Expose-Headers", EXPOSE_HEADERS),
        )


CORS_POLICY: web.AppKey[CorsPolicy] = web.AppKey("cors_policy", CorsPolicy)


HOSTS_SEEN: web.AppKey[set[str] | None] = web.AppKey("hosts_seen")
"""Without auth: the Host values accepted so far (see `refusal`); with auth None (no checks)."""
LOOPBACK_NAMES = frozenset({"localhost", "::1"})
MAX_HOSTS_SEEN = 64
"""Host header values remembered as accepted (a client uses one or two): past this, each is
checked again rather than remembered, so that no client can grow the set."""


def is_loopback_host(host: str) -> bool:
    """Whether a Host header value (`name[:port]`, `[v6][:port]`) names this machine's loopback:
    `localhost`, an address in 127.0.0.0/8 or `::1`."""
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else ""
    else:
        name = host.rpartition(":")[0] if ":" in host else host
    name = name.lower()
    if name in LOOPBACK_NAMES:
        return True
    parts = name.split(".")
    return (
        len(parts) == 4
        and parts[0] == "127"
        and all(p.isascii() and p.isdigit() and len(p) <= 3 and int(p) <= 255 for p in parts)
    )


def refusal(request: web.Request, hosts_seen: set[str]) -> str | None:
    """Why a request to a service without authentication is refused (see the module), or None.
    `hosts_seen`: Host values already accepted (the caller's, bounded).

    Every name the request gives the service must be a loopback one: its Host header and, for
    an absolute-form target (`GET http://host/path`), that target's authority, which replaces
    Host (RFC 9112 3.2.2) and which links are then built from (`target_authority`). Both, not
    the target's alone as the RFC would have a proxy-facing server judge it: a request whose
    two names disagree comes from no browser nor any client that follows the RFC, and
    refusing it keeps the check as strict as it is for the usual origin form."""
    host = request.headers.get("Host")
    target = target_authority(request)
    for name in (host, target):
        if name is not None and name not in hosts_seen:
            if not is_loopback_host(name):
                return (
                    "this service answers only to localhost, 127.0.0.1 or [::1]"
                    " (the Host header, or the authority of an absolute request target)"
                )
            if len(hosts_seen) < MAX_HOSTS_SEEN:
                hosts_seen.add(name)
    if request.method in READ_METHODS or request.method == "OPTIONS":
        return None
    own = host if target is None else target  # the service's authority, as the client named it
    site = request.headers.get("Sec-Fetch-Site")
    origin = request.headers.get("Origin")
    if site in ("cross-site", "same-site") or (
        origin is not None and origin.partition("://")[2] != own
    ):
        return "a write must come from this service's own pages (not another site's)"
    return None


async def preflight(request: web.Request) -> web.Response | None:
    """The answer to a CORS preflight for a read (no route takes OPTIONS: `server.front` asks
    here first), or None when `request` is not one."""
    wanted = request.headers.get("Access-Control-Request-Method")
    if request.method != "OPTIONS" or wanted is None or "Origin" not in request.headers:
        return None
    read = await request.app.router.resolve(request.clone(method="GET"))
    policy = request.app[CORS_POLICY]
    origin = policy.allowed_origin(request.headers.get("Origin"), read.route.resource)
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


def add_cors_headers(
    request: web.Request,
    response: web.StreamResponse,
) -> None:
    """CORS headers on the answer of a handler that streams, added before it calls `prepare`
    (the front adds them to every other answer: `CorsPolicy.add_headers`)."""
    request.app[CORS_POLICY].add_headers(request, response, request.match_info.route.resource)
