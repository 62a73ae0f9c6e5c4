"""Conversion jobs: `POST /jobs`, `GET /jobs`, `GET /jobs/{id}`, `DELETE /jobs/{id}`.

Only sources inside the configured watch or source folders, or under the configured
`s3_sources` prefixes, are accepted: a request names a slide the service may read, never an
arbitrary path on the machine or an arbitrary bucket. A local source must be what the folder
watcher itself would report there as one complete slide (`wsi.ingest.scan.slide_at`): never a
watch folder, a folder of slides or one part of a slide, which a failed conversion would
quarantine, or `after_success=delete` remove, whole.
"""

from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path
from typing import Any

from aiohttp import web

from server.front import routes
from server.keys import CATALOG, COPIES, JOBS, JOBS_WAKE, PUBLISHED_IDS, SETTINGS
from server.openapi import ERROR, path_params
from server.responses import dumps, json_error
from server.url_numbers import url_int
from wsi.errors import InvalidArgument, SlideNotFound
from wsi.ingest.privacy import job_view, reference
from wsi.ingest.quarantine import without_directories, without_folders_of
from wsi.ingest.queue import Job, JobState
from wsi.ingest.scan import FolderUnavailable, SlideCandidate, slide_at
from wsi.ingest.source_files import SourceChanged, submit_slide
from wsi.ingest.staging import is_remote, parse_s3_url, remote_slide_id, strictly_below
from wsi.metadata import file_stem, neutral_name
from wsi.model import readable

NOT_A_SLIDE = (
    "source is not one slide: name a slide file (or the .mrxs/.vms of a multi-file slide, the "
    "first instance of a loose DICOM series) or a DICOM series folder, in a watch or source "
    "folder or one folder below it"
)


def allowed_source(roots: tuple[str, ...], source: object) -> SlideCandidate:
    """The complete slide `source` names in one of the folders `roots`, as the folder watcher
    would report it (blocking: it lists folders and reads a few header bytes)."""
    if not isinstance(source, str) or not source or "\x00" in source or len(source) > 4096:
        raise InvalidArgument("source must be a path")
    try:
        os.fsencode(source)  # "\udcfc" names a byte of a name that is not UTF-8; "\ud800" none
    except UnicodeEncodeError as exc:
        raise InvalidArgument("source must be a path (it holds a lone surrogate)") from exc
    path = Path(source).resolve()
    folders = [Path(r).resolve() for r in roots]
    inside = [f for f in folders if path.is_relative_to(f)]
    if not inside:
        raise InvalidArgument("source must be inside a watch or source folder of this service")
    if path in folders:
        raise InvalidArgument("source is a watch or source folder itself: name one slide in it")
    if not path.exists():
        raise InvalidArgument("source does not exist")
    for folder in inside:
        try:
            candidate = slide_at(folder, path)
        except FolderUnavailable as exc:
            raise InvalidArgument("the folder holding source cannot be read") from exc
        if candidate is not None:
            break
    else:
        raise InvalidArgument(NOT_A_SLIDE)
    if not candidate.complete:
        raise InvalidArgument(f"source is not complete yet: {'; '.join(candidate.pending)}")
    return candidate


def allowed_s3_source(request: web.Request, url: str) -> str:
    """An `s3://` URL under one of the configured prefixes, strictly parsed first (so no
    `..` or odd bucket name can pass a prefix check by spelling)."""
    bucket, key = parse_s3_url(url)
    prefixes = request.app[SETTINGS].s3_sources
    if not prefixes:
        raise InvalidArgument("s3:// sources are not enabled on this service (WSI_S3_SOURCES)")
    for prefix in prefixes:
        if strictly_below(bucket, key, prefix):
            return f"s3://{bucket}/{key}"
    raise InvalidArgument("source must be under an s3:// prefix this service converts from")


def job_json(request: web.Request, job: Job) -> dict[str, Any]:
    """The job as this service shows it: with `WSI_DEIDENTIFY`, no file name of its source
    (`wsi.ingest.privacy.job_view`); its source and files without the folders above the slide
    (`/in/Doe Jane/a.svs` -> `a.svs`, a series' files `series/a.dcm`: scanners name folders
    after patients, and no answer shows where the service's folders are; bytes of a name that
    are not UTF-8 as U+FFFD), its error and warning
    without the directories of any path; and a `name`: its source file's stem, or
    de-identifying a neutral name made from its slide id."""
    deidentify = request.app[SETTINGS].ingest.deidentify
    shown = job_view(job, deidentify)
    if not deidentify:
        shown["source"] = readable(without_folders_of(job.source, job.source))
        shown["files"] = [readable(without_folders_of(f.path, job.source)) for f in job.files]
    for key in ("error", "warning"):
        if isinstance(shown.get(key), str):
            shown[key] = without_directories(shown[key])
    if deidentify:
        shown["name"] = neutral_name(job.slide_id) if job.slide_id else reference(None, job.id)
    else:
        shown["name"] = file_stem(Path(job.source))
    return shown


def _queue(request: web.Request):  # type: ignore[no-untyped-def]
    queue = request.app.get(JOBS)
    if queue is None:
        raise web.HTTPNotFound(reason="ingest is not enabled (start with --watch or --s3-source)")
    return queue


async def _submit_remote(request: web.Request, source: str) -> Job:
    """Queue an `s3://` source under an allowed prefix, and start its local copy."""
    url = allowed_s3_source(request, source)
    try:
        settings = request.app[SETTINGS]
        content_id = await asyncio.to_thread(
            remote_slide_id, url, settings.s3_endpoint, settings.ingest.staging_limits
        )
        slide_id = request.app[PUBLISHED_IDS].of(content_id)
    except SlideNotFound as exc:
        raise InvalidArgument("source does not exist") from exc
    job = await asyncio.to_thread(_queue(request).submit, url, slide_id)
    # Absent where another process runs ingest: its worker downloads it when taking the job.
    copies = request.app.get(COPIES)
    if copies is not None and not job.state.terminal:
        # Downloaded now: viewable from the copy while it waits, and converted from it.
        copies.ensure(slide_id, url)
    request.app[JOBS_WAKE].set()
    return job


async def _submit_local(request: web.Request, source: object) -> Job:
    """Queue a complete slide in a watch or source folder, with its files as they are now."""
    settings = request.app[SETTINGS]
    candidate = await asyncio.to_thread(
        allowed_source, (*settings.watch, *settings.sources), source
    )
    try:
        ids = request.app[PUBLISHED_IDS]
        job = await asyncio.to_thread(
            functools.partial(submit_slide, _queue(request), candidate, ids=ids)
        )
    except SourceChanged as exc:
        raise InvalidArgument("source is still changing: submit it once it is complete") from exc
    except OSError as exc:
        raise InvalidArgument(f"cannot read source: {exc.strerror}") from exc
    sources = request.app[CATALOG].sources
    if sources is not None and job.slide_id is not None and not job.state.terminal:
        # Viewable from its file while it converts (every part of it is there).
        sources.register(job.slide_id, candidate.path)
    request.app[JOBS_WAKE].set()
    return job


BODY_SECONDS = 30.0
"""A request body must arrive within this: a client sending it a byte at a time would hold its
connection, and the handler, for as long as it liked (aiohttp sets no limit)."""


async def submit(request: web.Request) -> web.Response:
    _queue(request)
    try:
        async with asyncio.timeout(BODY_SECONDS):
            body = await request.json()
    except TimeoutError:
        late = json_error(408, f"the request body did not arrive within {BODY_SECONDS:g} s")
        late.force_close()  # the rest of the body is not waited for either
        return late
    except ValueError as exc:
        raise InvalidArgument('body must be JSON: {"source": "/path/in/a/watch/folder"}') from exc
    if not isinstance(body, dict):
        raise InvalidArgument("body must be a JSON object")
    source = body.get("source")
    if isinstance(source, str) and is_remote(source):
        job = await _submit_remote(request, source)
    else:
        job = await _submit_local(request, source)
    return web.json_response(job_json(request, job), status=202, dumps=dumps)


async def retry_job(request: web.Request) -> web.Response:
    """A failed or cancelled job's source, submitted again as a new job (the checks of
    `POST /jobs`, its files recorded as they are now); 409 for a job in another state, or one
    whose local source is gone (a slide that failed for good waits in quarantine)."""
    queue = _queue(request)
    job = await asyncio.to_thread(queue.get, request.match_info["job_id"])
    if job.state not in (JobState.FAILED, JobState.CANCELLED):
        raise web.HTTPConflict(
            reason=f"job {job.id} is {job.state.value}: only a failed or cancelled job is retried"
        )
    if is_remote(job.source):
        again = await _submit_remote(request, job.source)
    elif await asyncio.to_thread(os.path.lexists, job.source):
        again = await _submit_local(request, job.source)
    else:
        raise web.HTTPConflict(
            reason=f"the source of job {job.id} is no longer where it was: a slide that failed "
            "for good is in quarantine (retry it there: POST /quarantine/{ref}/retry)"
        )
    return web.json_response(job_json(request, again), status=202, dumps=dumps)


async def list_jobs(request: web.Request) -> web.Response:
    queue = _queue(request)
    state_name = request.query.get("state")
    try:
        state = JobState(state_name) if state_name else None
    except ValueError as exc:
        raise InvalidArgument("state must be a job state") from exc
    limit = url_int(request.query.get("limit", "100"), "limit")
    offset = url_int(request.query.get("offset", "0"), "offset")
    if not (1 <= limit <= 1000 and offset >= 0):
        raise InvalidArgument("limit must be 1-1000 and offset >= 0")
    jobs = await asyncio.to_thread(queue.list, state, limit, offset)
    return web.json_response({"jobs": [job_json(request, j) for j in jobs]}, dumps=dumps)


async def get_job(request: web.Request) -> web.Response:
    job = await asyncio.to_thread(_queue(request).get, request.match_info["job_id"])
    return web.json_response(job_json(request, job), dumps=dumps)


async def cancel_job(request: web.Request) -> web.Response:
    job = await asyncio.to_thread(_queue(request).cancel, request.match_info["job_id"])
    return web.json_response(job_json(request, job), dumps=dumps)


def register(app: web.Application) -> None:
    routes(app).add_post("/jobs", submit)
    routes(app).add_get("/jobs", list_jobs)
    routes(app).add_get("/jobs/{job_id}", get_job)
    routes(app).add_delete("/jobs/{job_id}", cancel_job)
    routes(app).add_post("/jobs/{job_id}/retry", retry_job)


OPENAPI = {
    "/jobs": {
        "post": {
            "summary": "Convert a slide: a complete slide inside a watch/source folder (never "
            "the folder itself or a folder of slides), or an s3:// URL under an allowed prefix "
            "(WSI_S3_SOURCES)",
            "requestBody": {
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["source"],
                            "properties": {
                                "source": {
                                    "type": "string",
                                    "description": "a path, or s3://bucket/key "
                                    "(a key ending in / is a folder slide, e.g. DICOM)",
                                }
                            },
                        }
                    }
                }
            },
            "responses": {
                "202": {"description": "job"},
                "400": ERROR,
                "404": ERROR,
                "408": ERROR,
                "413": ERROR,
                "503": ERROR,
            },
        },
        "get": {
            "summary": "Jobs (state, limit, offset)",
            "responses": {"200": {"description": "jobs"}, "400": ERROR},
        },
    },
    "/jobs/{job_id}": {
        "get": {
            "summary": "One job",
            "parameters": path_params("job_id"),
            "responses": {"200": {"description": "job"}, "404": ERROR},
        },
        "delete": {
            "summary": "Cancel a queued or running job (a job already ended is returned as it is)",
            "parameters": path_params("job_id"),
            "responses": {"200": {"description": "job"}, "404": ERROR},
        },
    },
    "/jobs/{job_id}/retry": {
        "post": {
            "summary": "Run a failed or cancelled job again: its source is submitted as a new "
            "job (the checks of POST /jobs; files recorded as they are now)",
            "description": "409 when the job is queued, running or done, or when its local "
            "source is no longer there (a slide that failed for good is in quarantine: "
            "POST /quarantine/{ref}/retry).",
            "parameters": path_params("job_id"),
            "responses": {"202": {"description": "the new job"}, "404": ERROR, "409": ERROR},
        }
    },
}
