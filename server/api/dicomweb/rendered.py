"""Rendered images and thumbnails of instances, frames, series and studies (JPEG or PNG)."""

from __future__ import annotations

import hashlib

import numpy as np
from aiohttp import web
from PIL import Image

from server.api.dicomweb.instances import (
    Instance,
    find_instance,
    pinned,
    scoped_instances,
)
from server.api.dicomweb.negotiation import image_format
from server.api.dicomweb.wado import parse_frames
from server.keys import CATALOG, SETTINGS
from server.render import encode_image, in_pool, region, sent
from server.responses import etag_response
from server.url_numbers import url_int
from wsi.errors import InvalidArgument, SlideNotFound
from wsi.published.values import decode_tile

THUMBNAIL = 256
"""Default thumbnail viewport (pixels, both sides)."""


def render_params(
    request: web.Request, default_box: int | None
) -> tuple[tuple[int, int] | None, int | None]:
    viewport: tuple[int, int] | None = (default_box, default_box) if default_box else None
    if "viewport" in request.query:
        parts = request.query["viewport"].split(",")
        if len(parts) != 2:
            raise InvalidArgument("viewport must be width,height")
        w, h = (url_int(p.strip(), "viewport") for p in parts)
        if w < 1 or h < 1:
            raise InvalidArgument("viewport must be positive")
        viewport = (w, h)
    quality = None
    if "quality" in request.query:
        quality = url_int(request.query["quality"], "quality")
        if not 1 <= quality <= 100:
            raise InvalidArgument("quality must be 1..100")
    return viewport, quality


def fit(width: int, height: int, viewport: tuple[int, int] | None) -> tuple[int, int]:
    """(width, height) scaled down to fit the viewport, aspect ratio kept."""
    if viewport is None:
        return width, height
    scale = min(1.0, viewport[0] / width, viewport[1] / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


async def render_instance(
    request: web.Request, inst: Instance, frame: int | None, default_box: int | None
) -> web.StreamResponse:
    viewport, quality = render_params(request, default_box)
    fmt = image_format(request)
    catalog = request.app[CATALOG]
    budget = request.app[SETTINGS].max_render_pixels
    what = f"{inst.sop_uid}-{frame}-{viewport}-{quality}-{fmt}"
    etag = f"{inst.slide.version}-{hashlib.sha256(what.encode()).hexdigest()[:24]}"
    caching = pinned(inst)
    single = frame is not None or not inst.is_level
    if single:
        view = inst.image
        width, height = (
            (view.tile_width, view.tile_height) if frame is not None else (view.width, view.height)
        )
        out = fit(width, height, viewport)
        if out[0] * out[1] > budget:
            raise InvalidArgument(f"{out[0]}x{out[1]} exceeds the {budget} pixel budget")
        data = await inst.frame(frame or 1)
        if out == (width, height) and fmt == "jpg" and quality is None:
            return etag_response(request, data, "image/jpeg", etag, **caching)

        def draw() -> tuple[bytes, str]:
            pixels = decode_tile(view, data)[:height, :width]
            if out != (width, height):
                image = Image.fromarray(np.ascontiguousarray(pixels))
                pixels = np.asarray(image.resize(out, Image.Resampling.LANCZOS))
            return encode_image(pixels, fmt, quality or 90)

        body, content_type = await in_pool(catalog, draw)
        return etag_response(request, body, content_type, etag, **caching)
    slide = inst.slide
    out = fit(inst.image.width, inst.image.height, viewport)
    if out[0] * out[1] > budget:
        raise InvalidArgument(
            f"{out[0]}x{out[1]} exceeds the {budget} pixel budget: ask for a smaller viewport"
        )

    async def deliver(answer: tuple[bytes, str]) -> web.StreamResponse:
        body, content_type = answer
        rendered = etag_response(request, body, content_type, etag, **caching)
        return await sent(request, rendered, len(body))

    return await region(
        catalog,
        slide,
        *(0, 0, slide.width, slide.height, *out, budget),
        lambda pixels: encode_image(pixels, fmt, quality or 90),
        deliver,
    )


async def rendered(request: web.Request) -> web.StreamResponse:
    inst = await find_instance(request)
    frame = None
    if "frames" in request.match_info:
        numbers = parse_frames(request.match_info["frames"], await inst.frame_count())
        if len(numbers) != 1:
            raise InvalidArgument("rendered frames: one frame at a time")
        frame = numbers[0]
    box = THUMBNAIL if request.path.endswith("/thumbnail") else None
    return await render_instance(request, inst, frame, box)


async def series_thumbnail(request: web.Request) -> web.StreamResponse:
    instances = await scoped_instances(request)
    volumes = [i for i in instances if i.is_level]
    if not volumes:
        raise SlideNotFound("no image to make a thumbnail of")
    return await render_instance(request, volumes[0], None, THUMBNAIL)
