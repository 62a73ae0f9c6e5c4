"""`GET /integrity`: the last result of the scheduled integrity check (`server.integrity`).

The process that runs ingest runs the check; another process (a serving replica) answers with
`"scheduled": false`. Off loopback the route needs a Bearer token, like every route that is not
open to signed URLs (`server.auth`): it names slides and objects."""

from __future__ import annotations

from aiohttp import web

from server.front import routes
from server.integrity import status_json
from server.keys import INTEGRITY
from wsi.published.verify import Problem


async def integrity(request: web.Request) -> web.Response:
    return web.json_response(status_json(request.app.get(INTEGRITY)))


def register(app: web.Application) -> None:
    routes(app).add_get("/integrity", integrity, name="integrity.status")


_DAMAGED = {
    "type": "object",
    "required": ["slide", "object", "problem"],
    "properties": {
        "slide": {"type": "string"},
        "object": {"type": "string", "description": "key relative to the slide"},
        "problem": {"type": "string", "enum": [p.value for p in Problem]},
    },
}

OPENAPI = {
    "/integrity": {
        "get": {
            "summary": "The scheduled integrity check: when it last ran, whether it runs now, "
            "what it read and the damaged objects it found (latest known per slide). Bearer "
            "token when auth is on.",
            "security": [{"bearer": []}],
            "responses": {
                "200": {
                    "description": "the check's status; `scheduled` false where this process "
                    "runs no check (no ingest, or verify_every_hours 0)",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": [
                                    "last_run",
                                    "running",
                                    "slides_checked",
                                    "damaged",
                                    "bytes_read",
                                    "scheduled",
                                ],
                                "properties": {
                                    "last_run": {"type": ["string", "null"], "format": "date-time"},
                                    "running": {"type": "boolean"},
                                    "slides_checked": {"type": "integer"},
                                    "damaged": {"type": "array", "items": _DAMAGED},
                                    "bytes_read": {"type": "integer"},
                                    "next_run": {"type": ["string", "null"], "format": "date-time"},
                                    "error": {"type": ["string", "null"]},
                                    "scheduled": {"type": "boolean"},
                                    "every_hours": {"type": "number"},
                                    "rate_mb_per_s": {"type": "number"},
                                },
                            }
                        }
                    },
                }
            },
        }
    }
}
