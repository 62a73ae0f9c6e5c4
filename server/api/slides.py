"""Slide list and details, plain tiles (stored bytes as they are), associated images."""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

from server.catalog import CONVERTING, SlideInfo, private_images, published, status, summary
from server.converting import conversion_jobs
from server.front import routes
from server.keys import CATALOG, LISTING, SETTINGS
from server.listing import MAX_PAGE
from server.openapi import ERROR, path_params
from server.render import encode_image, in_pool
from server.responses import Stored, etag_response, stored_response
from server.url_numbers import url_int
from wsi.errors import InvalidArgument
from wsi.model import ASSOCIATED_KINDS
from wsi.published.values import JPEG, decode_tile


def int_param(info: Mapping[str, str], name: str) -> int:
    """Path parameter `name` of the matched route as a non-negative integer (`url_int`)."""
    return url_int(info[name], name)


MAX_QUERY = 200
"""Longest `q` or `case` accepted (characters)."""


def text_param(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    if value is not None and (len(value) > MAX_QUERY or "\x00" in value):
        raise InvalidArgument(f"{name} must be at most {MAX_QUERY} characters")
    return value


def count_param(request: web.Request, name: str, default: int) -> int:
    """Query parameter `name` as a non-negative integer (`url_int`; `default` when absent)."""
    value = request.query.get(name)
    return default if value is None else url_int(value, name)


async def list_slides(request: web.Request) -> web.Response:
    text, case = text_param(request, "q"), text_param(request, "case")
    page = await request.app[LISTING].page(
        text, case, count_param(request, "offset", 0), count_param(request, "limit", MAX_PAGE)
    )
    docs = []
    jobs: dict[str, dict[str, object]] | None = None
    for entry in page.slides:
        if entry.status != CONVERTING:
            docs.append(entry.json())
            continue
        jobs = await conversion_jobs(request.app) if jobs is None else jobs
        doc = entry.summary()
        if entry.slide_id in jobs:
            doc["job"] = jobs[entry.slide_id]
        docs.append(json.dumps(doc).encode())
    # The slides' summaries are kept as JSON: joined, not encoded again.
    tail = {"cases": page.cases, "total": page.total, "offset": page.offset}
    body = b'{"slides": [' + b", ".join(docs) + b"], " + json.dumps(tail).encode()[1:]
    return web.Response(body=body, content_type="application/json")


async def get_slide(request: web.Request) -> web.Response:
    slide = await request.app[CATALOG].listed(request.match_info["slide_id"])
    doc = summary(slide, request.app[SETTINGS].allow_label)
    if status(slide) == CONVERTING:
        job = (await conversion_jobs(request.app)).get(slide.slide_id)
        if job is not None:
            doc["job"] = job
    return web.json_response(doc)


def tile_now(
    app: web.Application, info: Mapping[str, str], headers: Mapping[str, str]
) -> Stored | None:
    """A plain tile's answer when it needs no waiting: an open slide (`Catalog.opened`), a JPEG
    level, the tile's bytes at hand (`tile_bytes_now`); else None (`get_tile` awaits them).
    Bad coordinates raise as in `get_tile`. The express lane answers with it too."""
    slide = app[CATALOG].opened(info["slide_id"])
    if slide is None:
        return None
    level, col, row = int_param(info, "level"), int_param(info, "col"), int_param(info, "row")
    if slide.level(level).codec != JPEG:
        return None
    data = slide.tile_bytes_now(level, col, row)
    if data is None:
        return None
    return Stored(data, "image/jpeg", _tile_etag(slide, level, col, row), slide.version)


def _tile_etag(slide: SlideInfo, level: int, col: int, row: int) -> str:
    return f"{slide.version}-{level}-{col}-{row}"


async def tile_stored(
    app: web.Application, info: Mapping[str, str], headers: Mapping[str, str]
) -> Stored:
    """A plain tile's answer, read (or made) as needed: `tile_now`'s when its bytes are not at
    hand. The express lane awaits it too (a cold tile of an S3 store)."""
    catalog = app[CATALOG]
    slide = catalog.opened(info["slide_id"]) or await catalog.slide(info["slide_id"])
    level, col, row = int_param(info, "level"), int_param(info, "col"), int_param(info, "row")
    lv = slide.level(level)
    data = await slide.tile_bytes(level, col, row)
    etag = _tile_etag(slide, level, col, row)
    if lv.codec == JPEG:
        return Stored(data, "image/jpeg", etag, slide.version)
    body, content_type = await in_pool(catalog, lambda: encode_image(decode_tile(lv, data), "png"))
    return Stored(body, content_type, etag, slide.version)


async def get_tile(request: web.Request) -> web.Response:
    stored = tile_now(request.app, request.match_info, request.headers)
    if stored is None:
        stored = await tile_stored(request.app, request.match_info, request.headers)
    return stored_response(request, stored)


async def get_associated(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSOCIATED_KINDS:
        raise InvalidArgument(f"associated image must be one of {', '.join(ASSOCIATED_KINDS)}")
    catalog = request.app[CATALOG]
    slide = published(await catalog.slide(request.match_info["slide_id"]))
    private = name in private_images(slide)
    if private and not request.app[SETTINGS].allow_label:
        raise web.HTTPForbidden(reason=f"the {name} image may show patient data; not enabled")
    version = slide.version
    etag = f"{version}-{name}"
    storable = not private
    image = slide.associated.get(name)
    if image is not None and image.codec == JPEG:
        data = await slide.associated_bytes(name)
        return etag_response(request, data, "image/jpeg", etag, version=version, storable=storable)
    pixels = await slide.associated_image(name)  # SlideNotFound without one
    body, content_type = await in_pool(catalog, encode_image, pixels, "png")
    return etag_response(request, body, content_type, etag, version=version, storable=storable)


def register_tiles(app: web.Application) -> None:
    """The tile route, registered ahead of every other route under /slides (`server.app`)."""
    routes(app).add_get(
        "/slides/{slide_id}/tiles/{level}/{col}/{row}",
        get_tile,
        name="slides.tile",
        express=tile_now,
        later=tile_stored,
    )


def register(app: web.Application) -> None:
    routes(app).add_get("/slides", list_slides)
    routes(app).add_get("/slides/{slide_id}", get_slide)
    routes(app).add_get("/slides/{slide_id}/associated/{name}", get_associated)


OPENAPI = {
    "/slides": {
        "get": {
            "summary": "Slides (published and converting) with name, case, levels, MPP, status",
            "description": "`status` is `ready` (published), `converting` (served from its "
            "source until published) or `dicom-only` (published without its Zarr view by "
            "`wsi convert --format dicom`: listed with its name, case and size, no levels, "
            "and a `note` saying why; not served). "
            "Each slide has a `name` (from its accession number, specimen id and "
            "container id, else its source file's stem; a neutral `Slide <id>` under "
            "de-identification; its id when published before names existed) and a `case` "
            "(accession number or study id, else null). Listed grouped by case: the slides of "
            "each case together, cases in order, each case's slides by name, then the slides "
            "of no known case by name, a page at a time.",
            "parameters": [
                {
                    "name": "q",
                    "in": "query",
                    "required": False,
                    "description": "only slides whose name or case contains this text "
                    "(case-insensitive)",
                    "schema": {"type": "string", "maxLength": MAX_QUERY},
                },
                {
                    "name": "case",
                    "in": "query",
                    "required": False,
                    "description": "only the slides of this case (exact)",
                    "schema": {"type": "string", "maxLength": MAX_QUERY},
                },
                {
                    "name": "offset",
                    "in": "query",
                    "required": False,
                    "description": "skip this many of the matching slides",
                    "schema": {"type": "integer", "minimum": 0, "default": 0},
                },
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "description": "list at most this many slides",
                    "schema": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_PAGE,
                        "default": MAX_PAGE,
                    },
                },
            ],
            "responses": {
                "200": {
                    "description": '`{"slides": [...], "cases": [{"case", "slides"}], '
                    '"total", "offset"}`: `total` slides match, `slides` are those from '
                    "`offset` (at most `limit`); `cases` counts every matching slide's case"
                },
                "400": ERROR,
            },
        }
    },
    "/slides/{slide_id}": {
        "get": {
            "summary": "One slide",
            "parameters": path_params("slide_id"),
            "responses": {"200": {"description": "slide"}, "400": ERROR, "404": ERROR},
        }
    },
    "/slides/{slide_id}/tiles/{level}/{col}/{row}": {
        "get": {
            "summary": "A stored tile, as stored (JPEG; PNG for lossless levels)",
            "parameters": path_params("slide_id", "level", "col", "row"),
            "responses": {
                "200": {"description": "image/jpeg"},
                "304": {"description": "cached"},
                "400": ERROR,
                "404": ERROR,
            },
        }
    },
    "/slides/{slide_id}/associated/{name}": {
        "get": {
            "summary": "thumbnail, label or macro (label/macro only when allowed)",
            "parameters": path_params("slide_id", "name"),
            "responses": {
                "200": {"description": "image"},
                "400": ERROR,
                "403": ERROR,
                "404": ERROR,
            },
        }
    },
}
