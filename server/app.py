"""`create_app(settings)`: the aiohttp application. Every route module registers its own routes,
each behind the front (`server.front`: auth, errors as JSON, CORS, metrics); blocking work runs on
one bounded pool."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType

from aiohttp import web

from server.api import admin, console, dicomweb, dzi, iiif, jobs, ops, slides, viewer
from server.api import integrity as integrity_api
from server.audit import AUDITED, AuditLog
from server.bucket_copies import StagedSources
from server.catalog import PRIVATE_IMAGES, Catalog
from server.converting import SourceSlides
from server.cors import HOSTS_SEEN
from server.front import FRONTED, Routes
from server.index_file import IndexFile, code_fingerprint
from server.integrity import IntegrityMonitor
from server.keys import (
    AUDIT,
    CATALOG,
    COPIES,
    EXECUTOR,
    INDEX_FILE,
    INGEST_TASKS,
    INTEGRITY,
    JOBS,
    JOBS_WAKE,
    LISTING,
    METRICS,
    PROBES,
    PUBLISHED_IDS,
    ROLE,
    ROUTE_MODULES,
    SETTINGS,
    WARM_UP,
    WARMED,
)
from server.listing import SlideListing
from server.metrics import Metrics
from server.probes import Probes
from server.replica import follow_ingest, follow_jobs, publish_status
from server.responses import install as install_response_headers
from server.runner import OUTSIDE_FRONT, run
from server.settings import ProcessRole, ServerSettings
from wsi.ingest.lease import dead_local_holder, run_while_held, store_lease_name
from wsi.ingest.supervise import Supervisor, describe
from wsi.published.store import PublishedStore
from wsi.published.values import ReaderSettings
from wsi.store.objects import StoreSettings

log = logging.getLogger("server.app")

ROUTES: tuple[ModuleType, ...] = (
    ops,
    dzi,
    slides,
    iiif,
    dicomweb,
    viewer,
    jobs,
    admin,
    console,
    integrity_api,
)
"""Every API, in registration order. DeepZoom before slides: `/slides/{id}.dzi` must not be read
as a slide id. A missing dependency fails the import here, loudly, instead of an API quietly
going absent."""

TILE_ROUTES: tuple[Callable[[web.Application], None], ...] = (
    slides.register_tiles,
    dzi.register_tiles,
)
"""Registered before `ROUTES`: aiohttp tries the routes under one first path segment in
registration order, each a coroutine and a regular expression (about 3% of a hot tile's
instructions per route tried before the one that matches), and tiles are what clients ask for by
the thousand. The two paths have different segment counts, so they never match each other's
requests, nor the other routes'. Plain tiles first: scripts and AI readers ask for them as fast
as the service answers; a viewer's DeepZoom tiles come a screenful at a time."""


async def _audit(app: web.Application) -> AsyncIterator[None]:
    """The access audit log, written off the event loop (see `server.audit`)."""
    path = app[SETTINGS].audit_log
    assert path is not None
    log = app[AUDIT] = AuditLog(path)
    yield
    await asyncio.to_thread(log.close)


async def _audit_record(request: web.Request, response: web.StreamResponse) -> None:
    log = request.app.get(AUDIT)
    if log is not None:
        log.record(request, response.status)


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    executor = cf.ThreadPoolExecutor(settings.threads, thread_name_prefix="wsi-serve")
    app[EXECUTOR] = executor
    readable = {"thumbnail", *(PRIVATE_IMAGES if settings.allow_label else ())}
    reading = ReaderSettings(
        allow_associated=frozenset(readable),
        tile_cache_bytes=settings.tile_cache_mb * 1024 * 1024,
        # Tile requests must not each cost a store round trip, and a re-published slide must
        # still show up within seconds.
        recheck_seconds=2.0,
        recheck_in_background=True,
        # A rendered region may read up to 4 source pixels per output pixel (`render.region`).
        max_region_pixels=4 * settings.max_render_pixels,
    )
    store = PublishedStore(
        StoreSettings(settings.store, settings.s3_endpoint), reading, executor=executor
    )
    await store.start()
    # Slides in watch folders are registered as sources by the ingest feed once complete, so a
    # slide is viewable from its file while it converts, but never read while being copied.
    wanted = settings.sources or settings.watch or settings.s3_sources or settings.ingest.jobs_db
    ids = app[PUBLISHED_IDS] = await asyncio.to_thread(settings.ingest.published_ids)
    sources = SourceSlides(settings.sources, settings.max_render_pixels, ids) if wanted else None
    catalog = Catalog(
        store, sources, render_slots=2 * settings.threads, deidentify=settings.ingest.deidentify
    )
    app[CATALOG] = catalog
    saved = await asyncio.to_thread(_index_file, settings) if settings.index_at_start else None
    if saved is not None:
        app[INDEX_FILE] = saved
    app[LISTING] = SlideListing(catalog, settings.allow_label, reading.recheck_seconds, saved=saved)
    tiles = store.tiles
    app[METRICS].cache_stats = lambda: (tiles.hits, tiles.misses, tiles.used)
    yield
    await store.close()
    if sources is not None:
        sources.close()
    if saved is not None:
        saved.close()
    executor.shutdown(wait=False, cancel_futures=True)


async def _ingest(app: web.Application) -> AsyncIterator[None]:
    """With watch folders or s3:// sources: the job table, the watcher feeding it, and the
    workers, all run as `settings.ingest` says, each loop supervised (restarted when it dies,
    listed by `/readyz` while it is down)."""
    settings = app[SETTINGS]
    if not (settings.watch or settings.s3_sources):
        yield
        return
    from wsi.ingest.queue import open_queue
    from wsi.ingest.roles import shutdown_seconds
    from wsi.ingest.supervise import Supervisor

    ingest = settings.ingest
    await asyncio.to_thread(ingest.make_state, settings.store)  # private, whatever the umask
    queue = await asyncio.to_thread(open_queue, ingest.jobs_path(settings.store))
    # Jobs of a crashed run are taken back: those of this host's dead processes at once.
    await asyncio.to_thread(queue.recover, None, dead_local_holder)
    app[JOBS] = queue
    app[JOBS_WAKE] = asyncio.Event()
    stop = asyncio.Event()
    tasks = app[INGEST_TASKS] = Supervisor(stop)
    if settings.watch:
        _start_watcher(app, tasks, stop)
    copies = await _start_copies(app, tasks, stop)
    _start_workers(app, tasks, copies, stop)
    if settings.verify_every_hours:
        _start_integrity_check(app, tasks, stop)
    yield
    stop.set()
    await tasks.wait(shutdown_seconds(ingest))
    await copies.close()
    queue.close()


def _start_watcher(app: web.Application, tasks: Supervisor, stop: asyncio.Event) -> None:
    """The watch folders' loop: each complete slide becomes a job, viewable from its file while
    it converts, and wakes the workers."""
    from wsi.ingest.roles import watch_folders

    settings, sources, wake = app[SETTINGS], app[CATALOG].sources, app[JOBS_WAKE]

    def submitted(slide_id: str, path: Path) -> None:
        if sources is not None:  # viewable from its file while it converts
            sources.register(slide_id, path)
        wake.set()

    watch = functools.partial(
        watch_folders, settings.watch, app[JOBS], settings.ingest, stop, submitted,
        store=StoreSettings(settings.store, settings.s3_endpoint).url,
    )  # fmt: skip
    tasks.start("watcher", watch)


async def _start_copies(
    app: web.Application, tasks: Supervisor, stop: asyncio.Event
) -> StagedSources:
    """s3:// sources: one local copy each, made at submit, viewed and converted from (copies
    left by a dead process swept first); and the slides other services (or machines) submitted
    to the shared job table, viewable here too."""
    from server.bucket_copies import keep_copies
    from wsi.ingest.spool import COPIES_FOLDER, sweep_orphans

    settings, catalog = app[SETTINGS], app[CATALOG]
    spool = Path(settings.ingest.spool_path(settings.store))
    await asyncio.to_thread(sweep_orphans, spool)
    copies = app[COPIES] = StagedSources(
        spool / COPIES_FOLDER,
        settings.s3_endpoint,
        catalog.sources.register if catalog.sources is not None else None,
        limits=settings.ingest.staging_limits,
    )
    tasks.start("copies", functools.partial(keep_copies, app[JOBS], copies, stop))
    tasks.start("follow", functools.partial(follow_jobs, app, copies, stop))
    return copies


def _start_workers(
    app: web.Application, tasks: Supervisor, copies: StagedSources, stop: asyncio.Event
) -> None:
    """The conversion workers, and the store-wide loops: old jobs purged; old slides archived
    (CPU work: only where conversions run, by one service of those sharing the job table at a
    time)."""
    from wsi.ingest.roles import purge_jobs
    from wsi.ingest.worker import Worker

    settings, queue = app[SETTINGS], app[JOBS]
    ingest = settings.ingest
    store = StoreSettings(settings.store, settings.s3_endpoint)
    keep = (*settings.watch, *settings.sources)
    for i in range(ingest.workers):
        worker = Worker(queue, store, ingest, wake=app[JOBS_WAKE], copies=copies, keep=keep)
        tasks.start(f"worker-{i + 1}", functools.partial(worker.run, stop))
    if ingest.keep_jobs_days:
        tasks.start("purge", functools.partial(purge_jobs, queue, ingest.keep_jobs_days, stop))
    if ingest.archive_after_days and ingest.workers:
        from wsi.published.archive import archive_policy

        policy = functools.partial(archive_policy, store, ingest.archive_after_days)
        name = store_lease_name("archive", settings.store)
        held = functools.partial(run_while_held, queue, name, ingest.lease_seconds, policy, stop)
        tasks.start("archive", held)


def _start_integrity_check(app: web.Application, tasks: Supervisor, stop: asyncio.Event) -> None:
    """The scheduled integrity check (`server.integrity`), supervised with the ingest loops: one
    checker per store, in the process that runs ingest, not one per serving replica, and in one
    service of those sharing a job table (`_verify_once_per_store`)."""
    settings = app[SETTINGS]
    monitor = app[INTEGRITY] = IntegrityMonitor(
        StoreSettings(settings.store, settings.s3_endpoint),
        every_seconds=settings.verify_every_hours * 3600.0,
        rate=settings.verify_rate_mb * 1e6,
        state_folder=settings.ingest.state_path(settings.store),
    )
    app[METRICS].integrity = monitor.status
    tasks.start("verify", functools.partial(_verify_once_per_store, app, monitor, stop))


async def _verify_once_per_store(
    app: web.Application, monitor: IntegrityMonitor, stop: asyncio.Event
) -> None:
    """The check runs in one service of all those sharing the job table (its lease there);
    the others show the result it keeps in the state folder they share."""
    settings = app[SETTINGS]
    name = store_lease_name("integrity", settings.store)
    seconds = settings.ingest.lease_seconds
    await run_while_held(app[JOBS], name, seconds, monitor.run, stop, idle=monitor.reload)


def _index_file(settings: ServerSettings) -> IndexFile | None:
    """The file in the store's state folder where the indexes are kept between starts, for
    this code and these settings (`server.index_file`)."""
    folder = settings.ingest.state_path(settings.store)
    shown = f"labels={settings.allow_label} deidentify={settings.ingest.deidentify}"
    return IndexFile.open(folder, f"{code_fingerprint()} {shown}")


async def _warm_listing(app: web.Application) -> None:
    await app[LISTING].page(limit=1)


async def _warm_up(app: web.Application) -> AsyncIterator[None]:
    """Fills the indexes of `WARM_UP` in one background task: requests are served meanwhile (a
    listing or search arriving first waits for the refresh under way and shares it). The
    service's processes fill one at a time (`IndexFile.filling`): each after the first reads
    the entries the ones before it kept, and opens only the slides they did not describe."""

    async def fill() -> None:
        saved = app.get(INDEX_FILE)
        # One process of the service at a time: the others then read what it kept.
        async with saved.filling() if saved is not None else contextlib.nullcontext():
            for warm in app[WARM_UP]:
                try:
                    await warm(app)
                except Exception as exc:  # the first request will try again, and report it
                    log.warning("filling an index at start failed: %s", describe(exc))

    task = app[WARMED] = asyncio.create_task(fill())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def create_app(settings: ServerSettings, role: ProcessRole | None = None) -> web.Application:
    """The service, or with a `role` one of its processes (`server.processes`): only the one
    whose role says so runs the ingest roles; the others follow the job table they share."""
    role = role or ProcessRole()
    metrics = Metrics(role.index)
    app = web.Application()  # no middleware: every handler is wrapped (`server.front`)
    app[SETTINGS] = settings
    app[ROLE] = role
    app[METRICS] = metrics
    app[PROBES] = Probes()
    app[OUTSIDE_FRONT] = metrics.outside_front
    install_response_headers(app, private=settings.requires_auth)
    # Without auth, the browser-facing checks of `server.cors.refusal` (None: not needed).
    app[HOSTS_SEEN] = None if settings.requires_auth else set()
    app[AUDITED] = bool(settings.audit_log)
    if settings.audit_log:
        app.cleanup_ctx.append(_audit)
        app.on_response_prepare.append(_audit_record)
    app.cleanup_ctx.append(_resources)
    if role.shared is not None:
        app.cleanup_ctx.append(publish_status)
    runs_ingest = role.ingest and bool(settings.watch or settings.s3_sources)
    app.cleanup_ctx.append(_ingest if runs_ingest else follow_ingest)
    app[WARM_UP] = [_warm_listing]
    routes = app[FRONTED] = Routes(app)
    for register_tiles in TILE_ROUTES:
        register_tiles(app)
    for module in ROUTES:
        module.register(app)
    routes.finish()
    app[ROUTE_MODULES] = list(ROUTES)
    if settings.index_at_start:
        app.cleanup_ctx.append(_warm_up)
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
    run(create_app(settings), settings.host, settings.port, new_event_loop())
