"""Conversion jobs: `POST /jobs`, `GET /jobs`, `GET /jobs/{id}`, `DELETE /jobs/{id}`.

Only sources inside the configured watch or source folders are accepted: a request names a
file the service may read, never an arbitrary path on the machine.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from wsi.errors import InvalidArgument
from wsi.jobs import JobState
from wsi.slide_id import content_slide_id

from .app import JOBS, SETTINGS, dumps
from .openapi import ERROR, path_params


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


def _queue(request: web.Request):  # type: ignore[no-untyped-def]
    queue = request.app.get(JOBS)
    if queue is None:
        raise web.HTTPNotFound(reason="ingest is not enabled (start with --watch)")
    return queue


async def submit(request: web.Request) -> web.Response:
    queue = _queue(request)
    try:
        body = await request.json()
    except ValueError as exc:
        raise InvalidArgument('body must be JSON: {"source": "/path/in/a/watch/folder"}') from exc
    if not isinstance(body, dict):
        raise InvalidArgument("body must be a JSON object")
    path = allowed_source(request, body.get("source"))
    try:
        slide_id = await asyncio.to_thread(content_slide_id, path)
    except OSError as exc:
        raise InvalidArgument(f"cannot read source: {exc.strerror}") from exc
    job = await asyncio.to_thread(queue.submit, str(path), slide_id)
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
            "summary": "Convert a slide inside a watch/source folder",
            "requestBody": {
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["source"],
                            "properties": {"source": {"type": "string"}},
                        }
                    }
                }
            },
            "responses": {"202": {"description": "job"}, "400": ERROR, "404": ERROR},
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
