"""`create_app(settings)`: the aiohttp application. Library errors become HTTP statuses in one
table here; every route module registers its own routes; blocking work runs on one bounded pool."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import hashlib
import hmac
import importlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from wsi.errors import (
    CorruptSlide,
    EncodedTileUnavailable,
    InvalidArgument,
    SlideNotFound,
    StoreError,
    UnsupportedSlide,
    WsiError,
)
from wsi.jobs import JobNotFound, JobQueue
from wsi.store import Store, StoreSettings

from .catalog import AsyncStore, Catalog
from .metrics import Metrics
from .settings import ServerSettings
from .sources import SourceSlides
from .staged import StagedSources

SETTINGS = web.AppKey("settings", ServerSettings)
CATALOG = web.AppKey("catalog", Catalog)
EXECUTOR = web.AppKey("executor", cf.ThreadPoolExecutor)
METRICS = web.AppKey("metrics", Metrics)
ROUTE_MODULES = web.AppKey("route_modules", list)
JOBS = web.AppKey("jobs", JobQueue)
JOBS_WAKE = web.AppKey("jobs_wake", asyncio.Event)
COPIES = web.AppKey("copies", StagedSources)
"""Local copies of s3:// job sources (made at submit, viewed and converted from)."""
"""Set when a job is submitted here, so this process's idle workers claim it at once."""

STATUS: list[tuple[type[Exception], int]] = [
    (SlideNotFound, 404),
    (JobNotFound, 404),
    (EncodedTileUnavailable, 404),
    (InvalidArgument, 400),
    (UnsupportedSlide, 415),
    (CorruptSlide, 422),
    (StoreError, 503),
    (WsiError, 500),
]
"""Library error -> HTTP status: the one place where the two meet."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


@web.middleware
async def front_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Errors to JSON (every error is a JSON body with a 4xx/5xx status; no stack trace ever
    leaves) and metrics, in one layer: each layer costs a coroutine per request, which shows at
    thousands of tiles per second."""
    start = time.perf_counter()
    response: web.StreamResponse
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = json_error(exc.status, exc.reason)
    except WsiError as exc:
        status = next(code for kind, code in STATUS if isinstance(exc, kind))
        response = json_error(status, str(exc))
    except (ValueError, KeyError) as exc:  # malformed input that slipped past validation
        response = json_error(400, f"bad request: {type(exc).__name__}")
    request.app[METRICS].observe(request, response, start)
    return response


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


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    executor = cf.ThreadPoolExecutor(settings.threads, thread_name_prefix="wsi-serve")
    reader = AsyncStore(Store(StoreSettings(settings.store, settings.s3_endpoint)), executor)
    await reader.start()
    app[EXECUTOR] = executor
    # Slides in watch folders are registered as sources by the ingest feed once complete, so a
    # slide is viewable from its file while it converts, but never read while being copied.
    wanted = settings.sources or settings.watch or settings.s3_sources
    sources = SourceSlides(settings.sources) if wanted else None
    catalog = Catalog(reader, settings.tile_cache_mb * 1024 * 1024, sources)
    app[CATALOG] = catalog
    app[METRICS].cache_stats = lambda: (
        catalog.tiles.hits,
        catalog.tiles.misses,
        catalog.tiles.used,
    )
    yield
    await reader.close()
    if sources is not None:
        sources.close()
    executor.shutdown(wait=False, cancel_futures=True)


async def _ingest(app: web.Application) -> AsyncIterator[None]:
    """With watch folders or s3:// sources: the job table, the watcher feeding it, and the
    workers."""
    settings = app[SETTINGS]
    if not (settings.watch or settings.s3_sources):
        yield
        return
    from wsi.ingest import KILL_GRACE_SECONDS, IngestSettings, Worker, feed, purge_jobs
    from wsi.jobs import SQLiteJobQueue
    from wsi.staging import sweep_orphans
    from wsi.watch import FolderWatcher

    from .staged import keep_copies

    catalog = app[CATALOG]
    Path(settings.jobs_path).parent.mkdir(parents=True, exist_ok=True)
    queue = SQLiteJobQueue(settings.jobs_path)
    await asyncio.to_thread(queue.recover)  # jobs of a crashed run are taken back
    app[JOBS] = queue
    wake = app[JOBS_WAKE] = asyncio.Event()
    stop = asyncio.Event()
    ingest = IngestSettings(
        store=settings.store,
        s3_endpoint=settings.s3_endpoint,
        after_success=settings.after_success,  # type: ignore[arg-type]
        lease_seconds=settings.lease_seconds,
        poll_seconds=settings.poll_seconds,
        stop_timeout=settings.stop_timeout,
        job_timeout=settings.job_timeout,
        stall_timeout=settings.stall_timeout,
        spool_dir=settings.spool_path,
        done_dir=settings.done_dir,
        quarantine_dir=settings.quarantine_dir,
    )
    tasks: list[asyncio.Task[None]] = []
    watcher = None
    if settings.watch:
        watcher = FolderWatcher(
            settings.watch, settings.quiet_seconds, settings.poll_seconds, stop_event=stop
        )
        sources = catalog.sources

        def submitted(slide_id: str, path: Path) -> None:
            if sources is not None:  # viewable from its file while it converts
                sources.register(slide_id, path)
            wake.set()

        tasks.append(asyncio.create_task(feed(watcher, queue, submitted)))
    # s3:// sources: one local copy each, made at submit, viewed and converted from.
    await asyncio.to_thread(sweep_orphans, settings.spool_path)
    copies = app[COPIES] = StagedSources(
        Path(settings.spool_path) / "copies",
        settings.s3_endpoint,
        catalog.sources.register if catalog.sources is not None else None,
    )
    tasks.append(asyncio.create_task(keep_copies(queue, copies, stop)))
    tasks += [
        asyncio.create_task(Worker(queue, ingest, wake=wake, copies=copies).run(stop))
        for _ in range(settings.workers)
    ]
    if settings.keep_jobs_days:
        tasks.append(asyncio.create_task(purge_jobs(queue, settings.keep_jobs_days, stop)))
    yield
    stop.set()
    if watcher is not None:
        watcher.stop()
    # Running conversions get stop_timeout, then SIGTERM and, KILL_GRACE_SECONDS later, SIGKILL.
    await asyncio.wait(tasks, timeout=ingest.stop_timeout + KILL_GRACE_SECONDS + 5)
    await copies.close()
    queue.close()


async def conversion_jobs(app: web.Application) -> dict[str, dict[str, Any]]:
    """Slide id -> `{"id", "state", "progress"}` of its queued or running job, for slides shown
    as converting (empty without ingest, or when the job table cannot be read: the listing
    does not depend on it)."""
    queue = app.get(JOBS)
    if queue is None:
        return {}
    found: dict[str, dict[str, Any]] = {}
    try:
        for state in ("running", "queued"):
            for job in await asyncio.to_thread(queue.list, state, 1000):
                if job.slide_id is not None:
                    found.setdefault(
                        job.slide_id,
                        {"id": job.id, "state": job.state.value, "progress": job.progress},
                    )
    except WsiError:
        return {}
    return found


def create_app(settings: ServerSettings) -> web.Application:
    from . import routes_dzi, routes_ops, routes_slides

    metrics = Metrics()
    middlewares: list[Any] = [front_middleware]
    if settings.requires_auth:  # on loopback there is nothing to check on the hot path
        middlewares.append(auth_middleware)
    app = web.Application(middlewares=middlewares)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app.cleanup_ctx.append(_resources)
    app.cleanup_ctx.append(_ingest)
    # DeepZoom before slides: `/slides/{id}.dzi` must not be read as a slide id.
    modules: list[Any] = [routes_ops, routes_dzi, routes_slides]
    for name in ("routes_iiif", "routes_dicomweb", "routes_viewer", "routes_jobs"):
        try:
            modules.append(importlib.import_module(f"server.{name}"))
        except ModuleNotFoundError:  # an API still being built is simply absent
            continue
    for module in modules:
        module.register(app)
    app[ROUTE_MODULES] = modules
    return app


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (its transports cut the per-request cost of small responses by a
    fifth), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(settings: ServerSettings) -> None:
    """Run the service until interrupted."""
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        print=None,
        access_log=None,
        loop=new_event_loop(),
    )


def etag_response(
    request: web.Request, body: bytes, content_type: str, etag: str, immutable: bool = True
) -> web.Response:
    """Stored bytes with a strong ETag; 304 when the client has them already."""
    quoted = f'"{etag}"'
    headers = {
        "ETag": quoted,
        "Cache-Control": "public, max-age=31536000, immutable" if immutable else "no-cache",
    }
    if request.headers.get("If-None-Match") == quoted:
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type=content_type, headers=headers)


def dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))
