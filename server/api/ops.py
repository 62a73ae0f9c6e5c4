"""Operations: liveness, readiness (the store answers), Prometheus metrics, OpenAPI."""

from __future__ import annotations

import asyncio
import functools
import os
import stat

from aiohttp import web

from server.front import routes
from server.integrity import integrity_readiness
from server.keys import CATALOG, INTEGRITY, JOBS, PROBES, ROLE, SETTINGS
from server.openapi import openapi_document
from server.replica import ingest_down, metrics_text, shared_status
from wsi.errors import WsiError


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


READY_SECONDS = 2.0
"""How long `/readyz` waits for each of its checks (the store, the job table, a watch folder,
the status files), measured from that check's start: one that has not answered by then (a hung
network mount, a database host gone silent) is reported "not answering", and `/readyz` still
answers a load balancer within its timeout. Checks run as `server.probes` runs them."""

NOT_ANSWERING = "not answering"


async def _job_table(request: web.Request) -> str:
    """Whether the job table answers a read: ok, unavailable, not answering, or off (no
    ingest)."""
    queue = request.app.get(JOBS)
    if queue is None:
        return "off"
    try:
        read = await request.app[PROBES].run(
            "job table", lambda: queue.list(None, 1), READY_SECONDS
        )
    except WsiError:
        return "unavailable"
    return "ok" if read is not None else NOT_ANSWERING


_WATCH_FOLDER_OK = "ok"


def _watch_folder_state(folder: str) -> str:
    """Blocking: whether the watcher can list `folder`: "ok", "missing", "not a folder" or
    "unreadable". Lists one entry at most: `/readyz` is asked every few seconds, and a
    scanner's inbox may hold thousands."""
    try:
        mode = os.stat(folder).st_mode
    except (FileNotFoundError, NotADirectoryError):  # renamed away, unmounted, a parent gone
        return "missing"
    except OSError:
        return "unreadable"
    if not stat.S_ISDIR(mode):
        return "not a folder"
    try:
        with os.scandir(folder) as entries:
            next(entries, None)
    except OSError:
        return "unreadable"
    return _WATCH_FOLDER_OK


async def _watch_folders(app: web.Application) -> list[tuple[int, str]]:
    """(position, `_watch_folder_state`) of each watch folder, each checked on its own (one
    folder's hung mount does not hide the state of the others). By position, counted from 1 as
    `GET /watch` counts them: `/readyz` needs no credentials, so it names no folder."""
    folders = app[SETTINGS].watch

    async def state(i: int) -> tuple[int, str]:
        check = functools.partial(_watch_folder_state, folders[i])
        found = await app[PROBES].run(f"watch folder {i + 1}", check, READY_SECONDS)
        return i + 1, found if found is not None else NOT_ANSWERING

    return list(await asyncio.gather(*(state(i) for i in range(len(folders)))))


async def readyz(request: web.Request) -> web.Response:
    """Ready: the store answers, no ingest loop is down (dead, waiting for its restart) and
    every watch folder can be listed. The body tells each part apart: `store`, `job_table` (a
    job table that cannot be read stops ingest, not serving: it is reported, not a reason to be
    unready), the ingest loops `down` and `watch_folders` (each one's `index` and `status`). A
    watch folder renamed away, unmounted or replaced by a file makes the service unready, as a
    dead loop does: the watcher keeps polling it, so no slide a scanner drops is converted,
    and only a log line would say so. Damage found by the integrity check is reported
    (`integrity.status` "damaged"), never a reason to be unready: one bad slide must not take
    the service out of its load balancer, where every other slide is still served. A check
    that has not answered within `READY_SECONDS` (a hung network mount, a silent database) is
    "not answering" (the store's, a watch folder's or the ingest status's makes the service
    unready) and holds one thread while it hangs, however often `/readyz` is asked.

    With several serving processes any of them answers for the whole service: the ingest loops
    and the integrity check as the process that runs them last reported (that whole process is
    down while its report is stale), and `processes`, how many answer."""
    app = request.app
    probes = app[PROBES]
    reachable, down_now, watch, job_table, integrity = await asyncio.gather(
        probes.run("store", app[CATALOG].reachable, READY_SECONDS),
        probes.run("ingest status", functools.partial(ingest_down, app), READY_SECONDS),
        _watch_folders(app),
        _job_table(request),
        probes.run(
            "integrity status",
            functools.partial(integrity_readiness, app.get(INTEGRITY)),
            READY_SECONDS,
        ),
    )
    down = sorted(down_now) if down_now is not None else ["ingest status (not answering)"]
    detail: dict[str, object] = {
        "store": {True: "reachable", False: "unreachable", None: NOT_ANSWERING}[reachable],
        "job_table": job_table,
        "down": down,
        "watch_folders": [{"index": i, "status": state} for i, state in watch],
        "integrity": integrity if integrity is not None else {"status": NOT_ANSWERING},
    }
    if app[ROLE].shared is not None:
        others = await probes.run("process status", shared_status(app).others, READY_SECONDS)
        if others is not None:
            detail["processes"] = 1 + sum(1 for doc in others.values() if doc.get("live"))
    if not reachable:
        error = "store unreachable" if reachable is False else "store not answering"
        return web.json_response({"error": error, "status": 503, **detail}, status=503)
    if down:
        body = {"error": f"ingest tasks down: {', '.join(down)}", "status": 503, **detail}
        return web.json_response(body, status=503)
    unavailable = [f"{i} ({state})" for i, state in watch if state != _WATCH_FOLDER_OK]
    if unavailable:
        body = {"error": f"watch folders down: {', '.join(unavailable)}", "status": 503, **detail}
        return web.json_response(body, status=503)
    return web.json_response({"status": "ready", **detail})


async def metrics(request: web.Request) -> web.Response:
    body = await metrics_text(request.app)
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(request.app))


def register(app: web.Application) -> None:
    routes(app).add_get("/healthz", healthz)
    routes(app).add_get("/readyz", readyz)
    routes(app).add_get("/metrics", metrics)
    routes(app).add_get("/openapi.json", openapi)


OPENAPI = {
    "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
    "/readyz": {
        "get": {
            "summary": "Readiness: the store answers, no ingest loop is down and every watch "
            "folder can be listed; the body says how the store, the job table, the ingest loops "
            "and the watch folders (`watch_folders`: `index`, `status`) are",
            "responses": {
                "200": {"description": "ready"},
                "503": {"description": "store unreachable, ingest loops or watch folders down"},
            },
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics",
            "responses": {"200": {"description": "text exposition format"}},
        }
    },
    "/openapi.json": {
        "get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}
    },
}
