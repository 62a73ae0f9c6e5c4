"""`create_app(settings)`: the aiohttp application. Library errors become HTTP statuses in one
table here; every route module registers its own routes; blocking work runs on one bounded pool."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

from aiohttp import web

from server.api import dicomweb, dzi, iiif, jobs, ops, slides, viewer
from server.auth import Handler, auth_middleware
from server.bucket_copies import StagedSources
from server.catalog import AsyncStore, Catalog
from server.converting import SourceSlides
from server.keys import CATALOG, COPIES, EXECUTOR, JOBS, JOBS_WAKE, METRICS, ROUTE_MODULES, SETTINGS
from server.metrics import Metrics
from server.responses import json_error
from server.settings import ServerSettings
from wsi.errors import (
    CorruptSlide,
    EncodedTileUnavailable,
    InvalidArgument,
    SlideNotFound,
    StoreError,
    UnsupportedSlide,
    WsiError,
)
from wsi.ingest.queue import JobNotFound
from wsi.store.objects import Store, StoreSettings

ROUTES: tuple[ModuleType, ...] = (ops, dzi, slides, iiif, dicomweb, viewer, jobs)
"""Every API, in registration order. DeepZoom before slides: `/slides/{id}.dzi` must not be read
as a slide id. A missing dependency fails the import here, loudly, instead of an API quietly
going absent."""

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


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    executor = cf.ThreadPoolExecutor(settings.threads, thread_name_prefix="wsi-serve")
    reader = AsyncStore(Store(StoreSettings(settings.store, settings.s3_endpoint)), executor)
    await reader.start()
    app[EXECUTOR] = executor
    # Slides in watch folders are registered as sources by the ingest feed once complete, so a
    # slide is viewable from its file while it converts, but never read while being copied.
    wanted = settings.sources or settings.watch or settings.s3_sources
    sources = SourceSlides(settings.sources, settings.max_render_pixels) if wanted else None
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
    from server.bucket_copies import keep_copies
    from wsi.ingest.queue import SQLiteJobQueue
    from wsi.ingest.staging import sweep_orphans
    from wsi.ingest.watcher import FolderWatcher
    from wsi.ingest.worker import KILL_GRACE_SECONDS, IngestSettings, Worker, feed, purge_jobs

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


def create_app(settings: ServerSettings) -> web.Application:
    metrics = Metrics()
    middlewares: list[Any] = [front_middleware]
    if settings.requires_auth:  # on loopback there is nothing to check on the hot path
        middlewares.append(auth_middleware)
    app = web.Application(middlewares=middlewares)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app.cleanup_ctx.append(_resources)
    app.cleanup_ctx.append(_ingest)
    for module in ROUTES:
        module.register(app)
    app[ROUTE_MODULES] = list(ROUTES)
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


