"""What the people who run the service need besides the jobs: the quarantine (`GET /quarantine`,
`POST /quarantine/{ref}/retry`), what the watch folders hold that is not converted yet
(`GET /watch`), and the storage the published slides take (`GET /storage`). The console page
(`/console`) uses these routes and nothing else; scripts use the same ones.

Like every route they need a Bearer token when auth is on. No answer shows where the service
keeps slides: quarantined slides are named by an opaque reference and, except under
de-identification, the name the slide had in its watch folder (bytes that are not UTF-8 as
U+FFFD; the reference still leads to the exact file); paths in reasons lose their directories.
De-identifying, no file name is shown at all (file names are often patients').
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from server.api.jobs import job_json
from server.catalog import READY, Catalog, published, status
from server.front import routes
from server.keys import CATALOG, JOBS, JOBS_WAKE, PUBLISHED_IDS, SETTINGS
from server.openapi import ERROR, path_params
from server.responses import dumps
from wsi.errors import UnsupportedSlide, WsiError
from wsi.ingest.privacy import redact, source_names
from wsi.ingest.quarantine import (
    QuarantineConflict,
    QuarantinedSlide,
    QuarantineUnavailable,
    find_entry,
    list_quarantine,
    release,
    without_directories,
)
from wsi.ingest.queue import Job, JobQueue
from wsi.ingest.scan import FolderUnavailable, SlideCandidate, find_candidates, slide_at
from wsi.ingest.source_files import SourceChanged, submit_slide
from wsi.metadata import file_stem
from wsi.model import readable
from wsi.pseudonyms import PublishedIds

T = TypeVar("T")

LISTED_JOBS = 1000
"""Jobs looked at to tell which watch-folder slides already have one (the newest)."""


def _quarantine_dir(request: web.Request) -> str:
    settings = request.app[SETTINGS]
    return settings.ingest.quarantine_path(settings.store)


def quarantined_view(entry: QuarantinedSlide, deidentify: bool) -> dict[str, Any]:
    """A quarantine entry as the API shows it: its reference, its reason, when, how big; and
    its name in the watch folder unless de-identifying (the reason then names it by reference
    only: the worker wrote it so, and any name left in it is replaced here too). The name as
    `readable` makes it: one that is not UTF-8 cannot be sent as JSON text as it is; `ref`,
    not the name, is what leads back to its files."""
    reason = redact(
        entry.reason, source_names(entry.name, [str(f) for f in entry.files]), "the slide"
    )
    return {
        "ref": entry.ref,
        "name": None if deidentify else readable(entry.name),
        "reason": reason if deidentify else entry.reason,
        "quarantined": _iso(entry.quarantined),
        "files": len(entry.files),
        "bytes": entry.total_bytes,
    }


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def _in_quarantine(request: web.Request, read: Callable[[str], T]) -> T:
    """`read(the quarantine folder)` on a thread; 503 when the folder is there but cannot be
    listed (an empty list would tell that no slide waits there, and hide every one that does)."""
    try:
        return await asyncio.to_thread(read, _quarantine_dir(request))
    except QuarantineUnavailable as exc:
        raise web.HTTPServiceUnavailable(reason=str(exc)) from exc


async def list_quarantined(request: web.Request) -> web.Response:
    deidentify = request.app[SETTINGS].ingest.deidentify
    entries = await _in_quarantine(request, list_quarantine)
    return web.json_response(
        {"quarantined": [quarantined_view(e, deidentify) for e in entries]}, dumps=dumps
    )


def _put_back(
    entry: QuarantinedSlide, watch: str, queue: JobQueue | None, ids: PublishedIds
) -> tuple[SlideCandidate | None, Job | None]:
    """Blocking: the entry's files back into `watch`, then a job at once when the slide there
    is complete (else, or when it cannot be submitted now, the watcher takes it later)."""
    path = release(entry, watch)
    candidate = slide_at(watch, path)
    if candidate is None or not candidate.complete or queue is None:
        return candidate, None
    try:
        return candidate, submit_slide(queue, candidate, ids=ids)
    except (SourceChanged, OSError, WsiError):
        return candidate, None


async def retry_quarantined(request: web.Request) -> web.Response:
    """Put a quarantined slide back into the first watch folder and submit it again."""
    settings = request.app[SETTINGS]
    if not settings.watch:
        raise web.HTTPConflict(reason="no watch folder to put the slide back into (--watch)")
    ref = request.match_info["ref"]
    if not (len(ref) == 16 and all(c in "0123456789abcdef" for c in ref)):
        raise web.HTTPNotFound(reason=f"no quarantined slide {ref[:40]}")
    entry = await _in_quarantine(request, functools.partial(find_entry, ref=ref))
    queue = request.app.get(JOBS)
    try:
        ids = request.app[PUBLISHED_IDS]
        candidate, job = await asyncio.to_thread(_put_back, entry, settings.watch[0], queue, ids)
    except QuarantineConflict as exc:
        raise web.HTTPConflict(reason=str(exc)) from exc
    except OSError as exc:
        raise web.HTTPConflict(
            reason=f"quarantined slide {ref} could not be moved back: {exc.strerror}"
        ) from exc
    shown = None
    if job is not None:
        sources = request.app[CATALOG].sources
        if sources is not None and candidate is not None and job.slide_id is not None:
            sources.register(job.slide_id, candidate.path)
        request.app[JOBS_WAKE].set()
        shown = job_json(request, job)
    return web.json_response({"ref": ref, "job": shown}, status=202, dumps=dumps)


def _watch_view(folders: tuple[str, ...], jobs: list[Job], deidentify: bool) -> list[Any]:
    """Blocking: every slide each watch folder holds, with what it lacks or its latest job."""
    latest: dict[str, Job] = {}
    for job in jobs:  # newest first: the first seen per source is its latest
        latest.setdefault(os.path.abspath(job.source), job)
    found = []
    for index, folder in enumerate(folders):
        # Named by its position and last component: no path reaches a page.
        shown = {"index": index + 1, "folder": Path(folder).name or folder}
        try:
            candidates = find_candidates(folder)
        except FolderUnavailable as exc:
            error = without_directories(str(exc))
            found.append({**shown, "available": False, "error": error, "slides": []})
            continue
        slides = []
        for n, c in enumerate(candidates):
            last = latest.get(os.path.abspath(c.path))
            names = source_names(str(c.path), [str(f) for f in c.files])
            ref = f"slide {index + 1}.{n + 1}"
            slides.append(
                {
                    "name": ref if deidentify else file_stem(c.path),
                    "complete": c.complete,
                    "pending": [
                        redact(p, names, ref) if deidentify else readable(without_directories(p))
                        for p in c.pending
                    ],
                    "files": len(c.files),
                    "bytes": c.total_bytes,
                    "job": {"id": last.id, "state": last.state.value} if last else None,
                }
            )
        found.append({**shown, "available": True, "slides": slides})
    return found


async def watch(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    queue = request.app.get(JOBS)
    jobs: list[Job] = []
    if queue is not None:
        try:
            jobs = await asyncio.to_thread(queue.list, None, LISTED_JOBS)
        except WsiError:  # the folders are still worth showing without the job table
            jobs = []
    folders = await asyncio.to_thread(_watch_view, settings.watch, jobs, settings.ingest.deidentify)
    return web.json_response(
        {"quiet_seconds": settings.ingest.quiet_seconds, "folders": folders}, dumps=dumps
    )


async def _dicom_only_row(
    catalog: Catalog, slide_id: str
) -> tuple[int, str, str, str | None, int | None] | None:
    """The storage row of a slide published without its Zarr view (`--format dicom`) by an
    earlier version, from its manifest: the service serves no pixels of it, but it is listed
    (`GET /slides`) and takes its bytes in the store, so it counts as stored, not as
    unreadable (which says a slide is damaged). None when its manifest cannot be read or it is
    refused for another reason."""
    try:
        manifest, _ = await catalog.store.manifest(slide_id)
    except WsiError:
        return None
    if manifest.servable:
        return None
    return (
        manifest.stored_bytes,
        manifest.slide_id,
        manifest.display_name,
        manifest.case,
        manifest.source_bytes,
    )


async def storage(request: web.Request) -> web.Response:
    """Bytes each published slide takes in the store, largest first, and in total.

    From each manifest (`stored_bytes`: every object it lists; `source_bytes` where the
    conversion recorded it), read through the catalog's reader, which keeps a slide's metadata
    while its version is unchanged: cheap enough for a page that refreshes every few seconds.
    `wsi du` (`wsi.published.usage`) gives the full report (per level and tier, background not
    stored), reading each level's shard index: too much for every refresh of a large store."""
    catalog = request.app[CATALOG]
    rows: list[tuple[int, str, str, str | None, int | None]] = []
    unreadable = 0
    for slide_id in await catalog.store.slide_ids():
        try:
            slide = await catalog.slide(slide_id)
        except UnsupportedSlide:  # published without its Zarr view: its bytes are stored too
            row = await _dicom_only_row(catalog, slide_id)
            if row is None:
                unreadable += 1
            else:
                rows.append(row)
            continue
        except WsiError:  # unpublished meanwhile, or a manifest its reader refuses
            unreadable += 1
            continue
        if status(slide) == READY:
            manifest = published(slide).manifest
            rows.append(
                (
                    manifest.stored_bytes,
                    slide.slide_id,
                    slide.name,
                    slide.case,
                    manifest.source_bytes,
                )
            )
    rows.sort(key=lambda r: (-r[0], r[1]))
    body = {
        "slides": [
            {
                "id": sid,
                "name": name,
                "case": case,
                "stored_bytes": stored,
                "source_bytes": source,
            }
            for stored, sid, name, case, source in rows
        ],
        "count": len(rows),
        "total_bytes": sum(r[0] for r in rows),
        "unreadable": unreadable,
    }
    return web.json_response(body, dumps=dumps)


def register(app: web.Application) -> None:
    routes(app).add_get("/quarantine", list_quarantined)
    routes(app).add_post("/quarantine/{ref}/retry", retry_quarantined)
    routes(app).add_get("/watch", watch)
    routes(app).add_get("/storage", storage)


OPENAPI = {
    "/quarantine": {
        "get": {
            "summary": 'Slides that failed for good, newest first: `{"quarantined": [{ref, '
            "name, reason, quarantined, files, bytes}]}`",
            "description": "`ref` is opaque (it names no file); `name` is the slide's name in "
            "its watch folder (bytes that are not UTF-8 as U+FFFD), null under "
            "de-identification; `reason` is REASON.txt without directories. No path is ever "
            "shown.",
            "responses": {
                "200": {"description": "quarantine entries"},
                "503": {**ERROR, "description": "the quarantine folder cannot be listed"},
            },
        }
    },
    "/quarantine/{ref}/retry": {
        "post": {
            "summary": "Move a quarantined slide back into the first watch folder and submit it "
            'again: `{"ref", "job"}` (job null when the watcher takes it later)',
            "parameters": path_params("ref"),
            "responses": {
                "202": {"description": "moved back"},
                "404": ERROR,
                "409": ERROR,
                "503": ERROR,
            },
        }
    },
    "/watch": {
        "get": {
            "summary": "What each watch folder holds: every slide with whether it is complete, "
            "what it still lacks, and its latest job",
            "description": "Folders are named by their position (`index`, as configured) and "
            "last path component (`folder`); slides by their file's stem, or under "
            "de-identification `slide <folder>.<n>`.",
            "responses": {"200": {"description": '`{"quiet_seconds", "folders": [...]}`'}},
        }
    },
    "/storage": {
        "get": {
            "summary": "Bytes each published slide takes (its manifest's stored_bytes), largest "
            "first, and the total",
            "responses": {
                "200": {
                    "description": '`{"slides": [{id, name, case, stored_bytes, '
                    'source_bytes}], "count", "total_bytes", "unreadable"}` '
                    "(source_bytes: null for slides converted before it was recorded)"
                }
            },
        }
    },
}
