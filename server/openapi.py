"""The OpenAPI document: each route module contributes the paths it serves (`OPENAPI`)."""

from __future__ import annotations

import copy
from typing import Any

from aiohttp import web

from server.errors import ERROR_STATUSES
from server.keys import ROUTE_MODULES
from wsi import __version__

ERROR = {
    "description": "error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def openapi_document(app: web.Application) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for module in app[ROUTE_MODULES]:
        paths.update(copy.deepcopy(getattr(module, "OPENAPI", {})))
    for operations in paths.values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for code in ERROR_STATUSES:
                responses.setdefault(str(code), ERROR)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "wsistore",
            "version": __version__,
            "description": "Whole-slide image tiles: plain, DeepZoom, IIIF Image 3, DICOMweb.",
        },
        "paths": paths,
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "status"],
                    "properties": {"error": {"type": "string"}, "status": {"type": "integer"}},
                },
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def path_params(*names: str) -> list[dict[str, Any]]:
    """OpenAPI parameter objects for path segments."""
    return [
        {"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names
    ]
