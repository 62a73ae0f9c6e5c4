"""What every request passes through around its handler: the browser checks of a service without
auth (`server.cors.refusal`), authentication, every error as a JSON body with its status (no
stack trace ever leaves), CORS headers, and the request's metrics.

Each route's handler is wrapped as it is registered (`Routes`), rather than put behind an
aiohttp middleware: an app with a middleware runs two more coroutines per request (the
middleware's and aiohttp's own `_fix_request_current_app`) and a cache look-up of the chain,
and the wrapper binds what it reads (the resource it serves, the CORS policy, the metrics) once
instead of looking each up in the request and the app per request: 7% of a hot tile's
instructions (`bench/serve_instructions.py`). Requests no route takes reach a catch-all
registered last (`Routes.finish`), which answers CORS preflights and the 404s and 405s the
router would otherwise answer in plain text. The app refuses to start with a route added around
the front, which would answer without authentication. The express lane (`server.express`)
answers some requests before they reach aiohttp, with the same checks from the same functions."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Awaitable, Callable, Iterator
from time import perf_counter
from typing import TYPE_CHECKING, NoReturn

from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import AbstractResource
from yarl import URL

from server.auth import admission
from server.cors import CORS_POLICY, HOSTS_SEEN, CorsPolicy, preflight, refusal
from server.errors import status_of
from server.express import EXPRESS, Express, ExpressAnswer, ExpressLater
from server.keys import METRICS, SETTINGS
from server.responses import json_error
from wsi.errors import WsiError

if TYPE_CHECKING:
    from aiohttp.web_urldispatcher import _InfoDict

log = logging.getLogger("server.app")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

UNROUTED = "unrouted"
"""The catch-all's resource name (it is no API: the OpenAPI document leaves it out)."""


class _Front:
    """The app's state the wrappers read on every request, bound when the app is made (a
    look-up in the app's mapping through `request.app` costs more than the check it feeds)."""

    __slots__ = ("auth", "hosts_seen", "metrics", "policy")

    def __init__(self, app: web.Application) -> None:
        self.auth = app[SETTINGS].requires_auth
        self.hosts_seen = app[HOSTS_SEEN]
        self.metrics = app[METRICS]
        self.policy = CorsPolicy(frozenset(), frozenset())
        """Set by `Routes.finish`: the policy depends on every route registered."""


class _Served:
    """The resource a wrapper serves, known once aiohttp has made it (None: the catch-all, whose
    answers are counted and given CORS headers as no route's)."""

    __slots__ = ("resource",)

    def __init__(self) -> None:
        self.resource: AbstractResource | None = None


def _fronted(handler: Handler, front: _Front, served: _Served) -> Handler:
    async def fronted(request: web.Request) -> web.StreamResponse:
        start = perf_counter()
        response: web.StreamResponse
        try:
            hosts_seen = front.hosts_seen
            why = refusal(request, hosts_seen) if hosts_seen is not None else None
            refused = admission(request) if front.auth and why is None else None
            if why is not None:
                response = json_error(403, why)
            elif refused is not None:
                response = refused
            else:
                response = await handler(request)
        except Exception as exc:
            response = _error_answer(request, exc, front, served)
        if not response.prepared:  # one that streamed added them before it started
            front.policy.add_headers(request, response, served.resource)
        front.metrics.observe(served.resource, response, start)
        return response

    return fronted


def _error_answer(
    request: web.Request, exc: Exception, front: _Front, served: _Served
) -> web.StreamResponse:
    """The JSON answer of a failed request, or `exc` raised on: a redirect (aiohttp sends it as
    it is), a client gone. A handler that failed once part of its streamed answer was out (a
    store error between two frames of a WADO-RS answer) has its connection cut instead
    (`_cut`): aiohttp would write this answer behind the partial body, a second status line
    where the client reads the rest of the first body, under the first's ETag."""
    if isinstance(exc, ConnectionError):  # the client went away: nothing to answer
        raise exc
    if request.writer.output_size:
        _cut(request, exc)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            front.policy.add_headers(request, exc, served.resource)
            raise exc
        response = json_error(exc.status, exc.reason)
        allow = exc.headers.get("Allow")
        if allow is not None:  # a 405 says what the path takes (RFC 9110)
            response.headers["Allow"] = allow
        return response
    if isinstance(exc, WsiError):
        return json_error(status_of(exc), str(exc))
    if isinstance(exc, ValueError | KeyError):  # malformed input that slipped past validation
        return json_error(400, f"bad request: {type(exc).__name__}")
    _log_internal(request, exc)  # a bug: still a JSON answer, and a log line naming no file
    return json_error(500, "internal error")


def _cut(request: web.Request, exc: Exception) -> NoReturn:
    """End a connection whose answer is cut short: its bytes so far are all it gets, and no
    client or cache takes them for a whole answer (logged by the error's type alone)."""
    log.warning("an answer was cut short: %s", type(exc).__name__)
    if request.transport is not None:
        request.transport.abort()
    raise ConnectionResetError("the answer was cut short") from exc


def _log_internal(request: web.Request, exc: Exception) -> None:
    """An unexpected exception, logged by its type, route template and frames: its message is
    left out, as it may quote a file name, a path or a slide's metadata."""
    route = request.match_info.route.resource
    where = route.canonical if route is not None else "(no route)"
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("internal error in %s %s: %s\n%s", request.method, where, type(exc).__name__, frames)


async def _unrouted(request: web.Request) -> web.StreamResponse:
    """A request no route takes: a CORS preflight (no route takes OPTIONS), else 405 with the
    methods the path takes, else 404. The methods are asked of every resource again: an error's
    path, never a tile's."""
    if request.method == "OPTIONS":
        answer = await preflight(request)
        if answer is not None:
            return answer
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        match, methods = await resource.resolve(request)
        if match is None:  # the catch-all matches; no other resource can
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


class _Everything(web.AbstractResource):
    """The catch-all: every path and method, `handler` answering. Its canonical path is `/`, the
    router's last candidate for any path, so the router tries it after every other route; a
    resource rather than a route pattern, since none matches every request target (`.*` misses
    an escaped line break, `/...` the `*` of `OPTIONS *`), and aiohttp answers what no resource
    matches in plain text."""

    def __init__(self, handler: Handler) -> None:
        super().__init__(name=UNROUTED)
        self._route = web.ResourceRoute(hdrs.METH_ANY, handler, self)

    @property
    def canonical(self) -> str:
        return "/"

    def url_for(self, **kwargs: str) -> URL:
        raise RuntimeError("the catch-all has no URL")

    async def resolve(self, request: web.Request) -> tuple[web.UrlMappingMatchInfo, set[str]]:
        return web.UrlMappingMatchInfo({}, self._route), {hdrs.METH_ANY}

    def add_prefix(self, prefix: str) -> None:
        raise RuntimeError("the catch-all takes no prefix")

    def get_info(self) -> _InfoDict:
        return {}

    def raw_match(self, path: str) -> bool:
        return False

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[web.ResourceRoute]:
        return iter((self._route,))


class Routes:
    """The app's router as the route modules see it (`routes(app)`): each handler added goes
    behind the front."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._front = _Front(app)
        self._wrappers: set[Handler] = set()
        self._express = app[EXPRESS] = Express()

    def add_get(
        self,
        path: str,
        handler: Handler,
        *,
        name: str | None = None,
        express: ExpressAnswer | None = None,
        later: ExpressLater | None = None,
    ) -> None:
        """GET (and HEAD) of `path`; `express`: the function `handler` answers with first,
        which then answers on the express lane too (`server.express`), and `later` the one it
        awaits when that gives nothing, which the lane then awaits too."""
        served = self._add(self._app.router.add_get, path, handler, name)
        if express is not None:
            self._express.add(served, express, later)

    def add_post(self, path: str, handler: Handler, *, name: str | None = None) -> None:
        self._add(self._app.router.add_post, path, handler, name)

    def add_delete(self, path: str, handler: Handler, *, name: str | None = None) -> None:
        self._add(self._app.router.add_delete, path, handler, name)

    def _add(
        self,
        add: Callable[..., web.AbstractRoute],
        path: str,
        handler: Handler,
        name: str | None,
    ) -> AbstractResource:
        served = _Served()
        resource = add(path, self._wrap(handler, served), name=name).resource
        assert resource is not None
        served.resource = resource
        return resource

    def _wrap(self, handler: Handler, served: _Served) -> Handler:
        wrapper = _fronted(handler, self._front, served)
        self._wrappers.add(wrapper)
        return wrapper

    def finish(self) -> None:
        """After every route module registered: the catch-all, last, and the CORS policy, which
        reads every route. The app then refuses to start with a route added around the front
        (it would answer without authentication), checked when it starts: the router is frozen
        from then on."""
        self._app.router.register_resource(_Everything(self._wrap(_unrouted, _Served())))
        policy = CorsPolicy.of(self._app[SETTINGS], self._app.router)
        self._app[CORS_POLICY] = self._front.policy = policy
        self._app.on_startup.append(self._check)

    async def _check(self, app: web.Application) -> None:
        for route in app.router.routes():
            if route.handler not in self._wrappers:
                where = route.resource.canonical if route.resource is not None else "?"
                raise RuntimeError(f"route {route.method} {where} was added around the front")


FRONTED = web.AppKey("fronted_routes", Routes)


def routes(app: web.Application) -> Routes:
    """Where the route modules add their routes (`server.app` sets it before they register)."""
    return app[FRONTED]
