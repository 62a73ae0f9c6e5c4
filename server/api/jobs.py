"""Conversion jobs: `POST /jobs`, `GET /jobs`, `GET /jobs/{id}`, `DELETE /jobs/{id}`.

Only sources inside the configured watch or source folders, or under the configured
`s3_sources` prefixes, are accepted: a request names a slide the service may read, never an
arbitrary path on the machine or an arbitrary bucket.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from server.keys import CATALOG, COPIES, JOBS, JOBS_WAKE, SETTINGS
from server.openapi import ERROR, path_params
from server.responses import dumps
from wsi.errors import InvalidArgument, SlideNotFound
from wsi.ingest.queue import JobState
from wsi.ingest.staging import is_remote, parse_s3_url, remote_slide_id
from wsi.slide_id import content_slide_id


def allowed_source(request: web.Request, source: object) -> Path:
    settings = request.app[SETTINGS]
    if not isinstance(source, str) or not source or "\x00" in source or len(source) > 4096:
        raise InvalidArgument("source must be a path")
    path = Path(source).resolve()
    roots = [Path(r).resolve() for r in (*settings.watch, *settings.sources)]
    if not any(path.is_relative_to(root) for root in roots):
        raise InvalidArgument("source must be inside a watch or source folder of this service")
    if not path.exists():
        raise InvalidArgument("source does not exist")
    return path


def allowed_s3_source(request: web.Request, url: str) -> str:
    """An `s3://` URL under one of the configured prefixes, strictly parsed first (so no
    `..` or odd bucket name can pass a prefix check by spelling)."""
    bucket, key = parse_s3_url(url)
    prefixes = request.app[SETTINGS].s3_sources
    if not prefixes:
        raise InvalidArgument("s3:// sources are not enabled on this service (WSI_S3_SOURCES)")
    for prefix in prefixes:
        p_bucket, _, p_key = prefix[len("s3://") :].partition("/")
        p_key = p_key.strip("/")
        if bucket == p_bucket and (not p_key or key.startswith(p_key + "/")):
            return f"s3://{bucket}/{key}"
    raise InvalidArgument("source must be under an s3:// prefix this service converts from")


def _queue(request: web.Request):  # type: ignore[no-untyped-def]
    queue = request.app.get(JOBS)
    if queue is None:
        raise web.HTTPNotFound(reason="ingest is not enabled (start with --watch or --s3-source)")
    return queue


async def submit(request: web.Request) -> web.Response:
    queue = _queue(request)
    try:
        body = await request.json()
    except ValueError as exc:
        raise InvalidArgument('body must be JSON: {"source": "/path/in/a/watch/folder"}') from exc
    if not isinstance(body, dict):
        raise InvalidArgument("body must be a JSON object")
    source = body.get("source")
    if isinstance(source, str) and is_remote(source):
        url = allowed_s3_source(request, source)
        try:
            slide_id = await asyncio.to_thread(
                remote_slide_id, url, request.app[SETTINGS].s3_endpoint
            )
        except SlideNotFound as exc:
            raise InvalidArgument("source does not exist") from exc
        job = await asyncio.to_thread(queue.submit, url, slide_id)
        if not job.state.terminal:
            # Downloaded now: viewable from the copy while it waits, and converted from it.
            request.app[COPIES].ensure(slide_id, url)
        request.app[JOBS_WAKE].set()
        return web.json_response(job.to_dict(), status=202, dumps=dumps)
    path = allowed_source(request, source)
    try:
        slide_id = await asyncio.to_thread(content_slide_id, path)
    except OSError as exc:
        raise InvalidArgument(f"cannot read source: {exc.strerror}") from exc
    job = await asyncio.to_thread(queue.submit, str(path), slide_id)
    sources = request.app[CATALOG].sources
    if sources is not None and job.state.value in ("queued", "running"):
        # Viewable from its file while it converts (the caller vouches the file is complete).
        sources.register(slide_id, path)
    request.app[JOBS_WAKE].set()
    return web.json_response(job.to_dict(), status=202, dumps=dumps)


async def list_jobs(request: web.Request) -> web.Response:
    queue = _queue(request)
    state_name = request.query.get("state")
    try:
        state = JobState(state_name) if state_name else None
        limit = int(request.query.get("limit", "100"))
        offset = int(request.query.get("offset", "0"))
    except ValueError as exc:
        raise InvalidArgument("state must be a job state; limit and offset integers") from exc
    if not (1 <= limit <= 1000 and offset >= 0):
        raise InvalidArgument("limit must be 1-1000 and offset >= 0")
    jobs = await asyncio.to_thread(queue.list, state, limit, offset)
    return web.json_response({"jobs": [j.to_dict() for j in jobs]}, dumps=dumps)


async def get_job(request: web.Request) -> web.Response:
    job = await asyncio.to_thread(_queue(request).get, request.match_info["job_id"])
    return web.json_response(job.to_dict(), dumps=dumps)


async def cancel_job(request: web.Request) -> web.Response:
    job = await asyncio.to_thread(_queue(request).cancel, request.match_info["job_id"])
    return web.json_response(job.to_dict(), dumps=dumps)


def register(app: web.Application) -> None:
    app.router.add_post("/jobs", submit)
    app.router.add_get("/jobs", list_jobs)
    app.router.add_get("/jobs/{job_id}", get_job)
    app.router.add_delete("/jobs/{job_id}", cancel_job)


OPENAPI = {
    "/jobs": {
        "post": {
            "summary": "Convert a slide: a path inside a watch/source folder, or an s3:// URL "
            "under an allowed prefix (WSI_S3_SOURCES)",
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
            "summary": "Cancel a job",
            "parameters": path_params("job_id"),
            "responses": {"200": {"description": "job"}, "404": ERROR},
        },
    },
}
