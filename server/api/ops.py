"""Operations: liveness, readiness (the store answers), Prometheus metrics, OpenAPI."""

from __future__ import annotations

from aiohttp import web

from server.keys import CATALOG, INGEST_TASKS, METRICS
from server.openapi import openapi_document
from server.responses import json_error


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: the store answers and no ingest loop is down (dead, waiting for its restart)."""
    if not await request.app[CATALOG].reachable():
        return json_error(503, "store unreachable")
    tasks = request.app.get(INGEST_TASKS)
    down = sorted(tasks.down) if tasks is not None else []
    if down:
        body = {"error": f"ingest tasks down: {', '.join(down)}", "status": 503, "down": down}
        return web.json_response(body, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(request.app))


def register(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)


OPENAPI = {
    "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
    "/readyz": {
        "get": {
            "summary": "Readiness: the store answers",
            "responses": {
                "200": {"description": "ready"},
                "503": {"description": "store unreachable"},
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
