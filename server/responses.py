"""Response helpers every API shares: JSON errors, compact JSON, stored bytes with ETags."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


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
