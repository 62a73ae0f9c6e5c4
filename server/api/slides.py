"""Slide list and details, plain tiles (stored bytes as they are), associated images."""

from __future__ import annotations

from aiohttp import web

from server.catalog import CONVERTING, PRIVATE_IMAGES, published, status, summary
from server.converting import conversion_jobs
from server.keys import CATALOG, SETTINGS
from server.openapi import ERROR, path_params
from server.render import encode_image, in_pool
from server.responses import etag_response
from wsi.errors import InvalidArgument, WsiError
from wsi.model import ASSOCIATED_KINDS
from wsi.published.values import JPEG, decode_tile


def int_param(request: web.Request, name: str) -> int:
    value = request.match_info[name]
    if not value.isdigit() or len(value) > 9:
        raise InvalidArgument(f"{name} must be a non-negative integer")
    return int(value)


async def list_slides(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]
    slides = []
    jobs: dict[str, dict[str, object]] | None = None
    for slide_id in await catalog.slide_ids():
        try:
            doc = summary(await catalog.slide(slide_id))
        except WsiError:  # unpublished meanwhile, or a dropped slide its reader refuses
            continue
        if doc["status"] == CONVERTING:
            jobs = await conversion_jobs(request.app) if jobs is None else jobs
            if slide_id in jobs:
                doc["job"] = jobs[slide_id]
        slides.append(doc)
    return web.json_response({"slides": slides})


async def get_slide(request: web.Request) -> web.Response:
    slide = await request.app[CATALOG].slide(request.match_info["slide_id"])
    doc = summary(slide)
    if status(slide) == CONVERTING:
        job = (await conversion_jobs(request.app)).get(slide.slide_id)
        if job is not None:
            doc["job"] = job
    if not request.app[SETTINGS].allow_label:
        doc["associated_images"] = [n for n in doc["associated_images"] if n not in PRIVATE_IMAGES]
    return web.json_response(doc)


async def get_tile(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]
    slide = await catalog.slide(request.match_info["slide_id"])
    level, col, row = (int_param(request, n) for n in ("level", "col", "row"))
    lv = slide.level(level)
    data = await slide.tile_bytes(level, col, row)
    version = slide.version
    etag = f"{version}-{level}-{col}-{row}"
    if lv.codec == JPEG:
        return etag_response(request, data, "image/jpeg", etag, version=version)
    body, content_type = await in_pool(catalog, lambda: encode_image(decode_tile(lv, data), "png"))
    return etag_response(request, body, content_type, etag, version=version)


async def get_associated(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSOCIATED_KINDS:
        raise InvalidArgument(f"associated image must be one of {', '.join(ASSOCIATED_KINDS)}")
    if name in PRIVATE_IMAGES and not request.app[SETTINGS].allow_label:
        raise web.HTTPForbidden(reason=f"{name} images may show patient data; not enabled")
    catalog = request.app[CATALOG]
    slide = published(await catalog.slide(request.match_info["slide_id"]))
    version = slide.version
    etag = f"{version}-{name}"
    storable = name not in PRIVATE_IMAGES
    image = slide.associated.get(name)
    if image is not None and image.codec == JPEG:
        data = await slide.associated_bytes(name)
        return etag_response(
            request, data, "image/jpeg", etag, version=version, storable=storable
        )
    pixels = await slide.associated_image(name)  # SlideNotFound without one
    body, content_type = await in_pool(catalog, encode_image, pixels, "png")
    return etag_response(request, body, content_type, etag, version=version, storable=storable)


def register(app: web.Application) -> None:
    app.router.add_get("/slides", list_slides)
    app.router.add_get("/slides/{slide_id}", get_slide)
    app.router.add_get(
        "/slides/{slide_id}/tiles/{level}/{col}/{row}", get_tile, name="slides.tile"
    )
    app.router.add_get("/slides/{slide_id}/associated/{name}", get_associated)


OPENAPI = {
    "/slides": {
        "get": {
            "summary": "Published slides with levels, MPP and status",
            "responses": {"200": {"description": "slide list"}},
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
