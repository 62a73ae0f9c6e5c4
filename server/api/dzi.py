"""DeepZoom for OpenSeadragon: `/slides/{id}.dzi` and `/slides/{id}_files/{z}/{x}_{y}.jpeg`.

DeepZoom level z is the image scaled by 2^(z - max_level) with sizes rounded up; it maps onto the
stored level whose downsample (from the slide's metadata) is 2^(max_level - z). DeepZoom tiles are
square (`tile_size`): with square chunks, the chunk size, and interior tiles are the stored JPEG
bytes as they are; with other chunks (an NDPI's 2048 x 128 restart-interval strips),
`NON_SQUARE_TILE` pixels, each assembled from the chunks it covers. Edge tiles are cropped to the
level's size (OpenSeadragon stretches a full-size edge tile otherwise) and levels smaller than
our smallest are rendered from it.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
from aiohttp import web

from server.catalog import Catalog, ServedLevel, ServedSlide, SlideInfo
from server.front import routes
from server.keys import CATALOG, SETTINGS
from server.openapi import ERROR, path_params
from server.render import as_made, encode_image, in_pool, region
from server.responses import Stored, etag_response, stored_response
from server.url_numbers import url_int
from wsi.errors import InvalidArgument
from wsi.published.values import JPEG

SLIDE = "{slide_id:[a-z0-9][a-z0-9._-]{0,63}?}"


class Sized(Protocol):
    """What DeepZoom's level arithmetic needs of a slide (a `SlideInfo`, a listing's entry)."""

    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...


def max_level(slide: Sized) -> int:
    return max(0, math.ceil(math.log2(max(slide.width, slide.height))))


def dzi_size(slide: Sized, z: int) -> tuple[int, int]:
    scale = 2.0 ** (z - max_level(slide))
    return max(1, math.ceil(slide.width * scale)), max(1, math.ceil(slide.height * scale))


NON_SQUARE_TILE = 512
"""DeepZoom tile size of a slide whose chunks are not square: 2 to 4 chunks of 2048 x 128 or
1024 x 256 pixels decoded per tile, where a tile of the chunks' width would take 16."""


def tile_size(slide: SlideInfo) -> int:
    """The DeepZoom tile size (pixels, square) of `slide` (`chunk_tile_size` of level 0)."""
    level = slide.levels[0]
    return chunk_tile_size(level.tile_width, level.tile_height)


def chunk_tile_size(tile_width: int, tile_height: int) -> int:
    """The DeepZoom tile size over level-0 chunks of this size: the chunk size when they are
    square (their stored bytes are the tiles), else `NON_SQUARE_TILE`."""
    return tile_width if tile_width == tile_height else NON_SQUARE_TILE


def stored_level(slide: ServedSlide, z: int) -> ServedLevel | None:
    """The stored level whose pixels are DeepZoom level z's: the 2^(max_level - z) downsample
    (by the level's own downsample), whatever its chunks' shape."""
    scale = 2.0 ** (max_level(slide) - z)
    for level in slide.levels:
        if math.isclose(level.downsample, scale, rel_tol=1e-9):
            return level
    return None


@dataclass(frozen=True)
class DeepZoom:
    """A slide's DeepZoom geometry: its top level, tile size, and per level its size and the
    stored level with its pixels (None: rendered from a more detailed one)."""

    top: int
    size: int
    levels: tuple[tuple[int, int, ServedLevel | None], ...]


GEOMETRIES = 64
"""Slides whose DeepZoom geometry an app keeps (`Geometries`)."""


class Geometries:
    """The DeepZoom geometry of the slides last asked for, worked out once per slide object
    instead of for every tile. Keyed by identity: a slide published again is a new object (and
    a slide served from its source a new one per request, never found here)."""

    def __init__(self) -> None:
        self._kept: collections.OrderedDict[int, tuple[ServedSlide, DeepZoom]] = (
            collections.OrderedDict()
        )

    def of(self, slide: ServedSlide) -> DeepZoom:
        kept = self._kept.get(id(slide))
        if kept is not None and kept[0] is slide:
            return kept[1]
        top = max_level(slide)
        levels = tuple((*dzi_size(slide, z), stored_level(slide, z)) for z in range(top + 1))
        geometry = DeepZoom(top, tile_size(slide), levels)
        self._kept[id(slide)] = (slide, geometry)  # the slide held: its id is not reused
        if len(self._kept) > GEOMETRIES:
            self._kept.popitem(last=False)
        return geometry


GEOMETRY = web.AppKey("dzi_geometry", Geometries)


async def descriptor(request: web.Request) -> web.Response:
    slide = await request.app[CATALOG].slide(request.match_info["slide_id"])
    size = tile_size(slide)
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="jpeg" '
        f'Overlap="0" TileSize="{size}"><Size Width="{slide.width}" Height="{slide.height}"/>'
        "</Image>"
    )
    return web.Response(text=xml, content_type="application/xml")


class _Target(NamedTuple):
    """What DeepZoom tile (z, x, y) of a slide is made of."""

    z: int
    x: int
    y: int
    width: int
    height: int
    level: ServedLevel | None
    """The stored level of z's downsample, if any."""
    etag: str
    stored: bool
    """The tile is a stored tile of `level` as it is (its index there is (x, y))."""


def _target(app: web.Application, slide: ServedSlide, info: Mapping[str, str]) -> _Target:
    """The tile the path parameters `info` name; InvalidArgument outside the slide."""
    z_ = url_int(info["z"], "DeepZoom level")
    x_, y_ = url_int(info["x"], "DeepZoom column"), url_int(info["y"], "DeepZoom row")
    dz = app[GEOMETRY].of(slide)
    if z_ > dz.top:
        raise InvalidArgument(f"DeepZoom level {z_} > {dz.top}")
    size = dz.size
    width, height, level = dz.levels[z_]
    if x_ * size >= width or y_ * size >= height:
        raise InvalidArgument(f"tile ({x_}, {y_}) is outside DeepZoom level {z_}")
    tw, th = min(size, width - x_ * size), min(size, height - y_ * size)
    stored = (
        level is not None
        and x_ * size < level.width
        and y_ * size < level.height
        and (level.tile_width, level.tile_height, tw, th) == (size,) * 4
        and level.codec == JPEG
    )
    return _Target(z_, x_, y_, tw, th, level, f"{slide.version}-dz{z_}-{x_}-{y_}", stored)


def tile_now(
    app: web.Application, info: Mapping[str, str], headers: Mapping[str, str]
) -> Stored | None:
    """A DeepZoom tile's answer when it is a stored tile at hand (an open slide, the tile's
    bytes from `tile_bytes_now`), else None (`tile` awaits it). The express lane's too."""
    slide = app[CATALOG].opened(info["slide_id"])
    if slide is None:
        return None
    target = _target(app, slide, info)
    if not target.stored or target.level is None:
        return None
    data = slide.tile_bytes_now(target.level.index, target.x, target.y)
    return None if data is None else _stored(slide, target, data)


async def stored_tile(
    app: web.Application, info: Mapping[str, str], headers: Mapping[str, str]
) -> Stored | None:
    """A DeepZoom tile's answer when it is a stored tile, read as needed; None when it is
    assembled or rendered (`tile` makes it). The express lane awaits it too."""
    catalog = app[CATALOG]
    slide = catalog.opened(info["slide_id"]) or await catalog.slide(info["slide_id"])
    target = _target(app, slide, info)
    if not target.stored or target.level is None:
        return None
    return _stored(slide, target, await slide.tile_bytes(target.level.index, target.x, target.y))


def _stored(slide: ServedSlide, target: _Target, data: bytes) -> Stored:
    return Stored(data, "image/jpeg", target.etag, slide.version)


async def tile(request: web.Request) -> web.Response:
    info, app = request.match_info, request.app
    catalog = app[CATALOG]
    slide = catalog.opened(info["slide_id"]) or await catalog.slide(info["slide_id"])
    t = _target(app, slide, info)
    version, etag, level = slide.version, t.etag, t.level
    if t.stored and level is not None:  # as `tile_now` and `stored_tile` answer it
        data = slide.tile_bytes_now(level.index, t.x, t.y)
        if data is None:
            data = await slide.tile_bytes(level.index, t.x, t.y)
        return stored_response(request, _stored(slide, t, data))
    size = request.app[GEOMETRY].of(slide).size
    if level is not None and t.x * size < level.width and t.y * size < level.height:
        corner = (t.x * size, t.y * size)
        body = await assembled(catalog, slide, level, corner, (t.width, t.height))
        return etag_response(request, body, "image/jpeg", etag, version=version)
    scale = slide.width / request.app[GEOMETRY].of(slide).levels[t.z][0]
    x0, y0 = int(t.x * size * scale), int(t.y * size * scale)
    body = await region(
        catalog,
        slide,
        x0,
        y0,
        max(1, round(t.width * scale)),
        max(1, round(t.height * scale)),
        t.width,
        t.height,
        request.app[SETTINGS].max_render_pixels,
        lambda pixels: encode_image(np.asarray(pixels), "jpg")[0],
        as_made,  # a tile's size: sent by aiohttp, after the slot
    )
    return etag_response(request, body, "image/jpeg", etag, version=version)


async def assembled(
    catalog: Catalog,
    slide: ServedSlide,
    level: ServedLevel,
    corner: tuple[int, int],
    size: tuple[int, int],
) -> bytes:
    """The DeepZoom tile at `corner` (pixels of `level`) of `size` (width, height) pixels, as
    JPEG, from the chunks of `level` it covers (one, when the chunks are the tiles). DeepZoom
    sizes round up, ours down: where the DeepZoom tile is a pixel wider or taller than the
    stored level, that pixel repeats the level's edge (the stored tile's padding there is
    whatever the source had past its edge, often black)."""
    x, y = corner
    tw, th = size
    w, h = min(tw, level.width - x), min(th, level.height - y)
    pixels = await slide.region(level.index, x, y, w, h)

    def encode() -> bytes:
        padded = pixels
        if (h, w) != (th, tw):
            padded = np.pad(pixels, ((0, th - h), (0, tw - w), (0, 0)), mode="edge")
        return encode_image(padded, "jpg")[0]

    return await in_pool(catalog, encode)


def register_tiles(app: web.Application) -> None:
    """The tile route, registered ahead of every other route under /slides (`server.app`)."""
    routes(app).add_get(
        f"/slides/{SLIDE}_files/{{z:\\d+}}/{{x:\\d+}}_{{y:\\d+}}.jpeg",
        tile,
        name="dzi.tile",
        express=tile_now,
        later=stored_tile,
    )


def register(app: web.Application) -> None:
    app[GEOMETRY] = Geometries()
    routes(app).add_get(f"/slides/{SLIDE}.dzi", descriptor, name="dzi.descriptor")


OPENAPI = {
    "/slides/{slide_id}.dzi": {
        "get": {
            "summary": "DeepZoom descriptor",
            "parameters": path_params("slide_id"),
            "responses": {"200": {"description": "application/xml"}, "404": ERROR},
        }
    },
    "/slides/{slide_id}_files/{z}/{x}_{y}.jpeg": {
        "get": {
            "summary": "DeepZoom tile",
            "parameters": path_params("slide_id", "z", "x", "y"),
            "responses": {"200": {"description": "image/jpeg"}, "400": ERROR, "404": ERROR},
        }
    },
}
