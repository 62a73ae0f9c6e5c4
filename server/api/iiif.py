"""IIIF Image API 3.0 at compliance level 2: `/iiif/3/{id}/info.json` and
`/iiif/3/{id}/{region}/{size}/{rotation}/{quality}.{format}`.

info.json declares the stored pyramid as IIIF tiles (each stored level whose downsample, as the
slide's metadata says, is a whole number gives that scale factor). A request for exactly such a tile
is answered from the stored chunk: interior tiles of JPEG levels are the stored bytes as they are
(no decoding); edge tiles are decoded and cropped (IIIF sizes round up, our levels round down: the
at most one missing row/column repeats the edge). Every other request is rendered by `render.region`
within the pixel budget, which info.json publishes as `maxArea`. Beyond level 2: square regions, `^`
upscaling, mirroring, arbitrary rotation, gray and bitonal qualities, webp, and profile/canonical
Link headers. CORS is the service's one policy (`server.cors`): the origins of its allow-list.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from aiohttp import web
from PIL import Image

from server.api.iiif_params import (
    FORMATS,
    Region,
    Size,
    bad,
    parse_file,
    parse_region,
    parse_rotation,
    parse_size,
    rotation_text,
)
from server.catalog import ServedLevel, ServedSlide, SlideInfo
from server.front import routes
from server.keys import CATALOG, SETTINGS
from server.openapi import ERROR, path_params
from server.render import check_encodable, encode_image, in_pool, region, sent
from server.responses import (
    FORWARDED_VARY,
    Stored,
    dumps,
    etag_matches,
    etag_response,
    public_origin,
    stored_response,
)
from wsi.errors import SlideNotFound
from wsi.published.values import JPEG, decode_tile

PREFIX = "/iiif/3"
CONTEXT = "http://iiif.io/api/image/3/context.json"
PROFILE = "http://iiif.io/api/image/3/level2.json"
LD_JSON = f'application/ld+json;profile="{CONTEXT}"'
EXTRA_FEATURES = [
    "canonicalLinkHeader",
    "mirroring",
    "profileLinkHeader",
    "rotationArbitrary",
    "sizeUpscaling",
]
JPEG_QUALITY = 90


@dataclass(frozen=True)
class TileMatch:
    level: ServedLevel
    col: int
    row: int
    valid_w: int
    """Pixels of the stored tile inside the level (less than the tile at the right edge)."""
    valid_h: int
    out_w: int
    out_h: int


def scale_factor(slide: ServedSlide, level: ServedLevel) -> int | None:
    """The level's downsample when it is a whole number and the level is that downsample of
    level 0 (sizes rounded either way): IIIF scale factors are integers."""
    s = round(level.downsample)
    if s < 1 or not math.isclose(level.downsample, s, rel_tol=1e-9):
        return None
    ok_w = level.width in (slide.width // s, -(-slide.width // s))
    ok_h = level.height in (slide.height // s, -(-slide.height // s))
    return s if ok_w and ok_h else None


def tile_groups(slide: ServedSlide) -> list[dict[str, object]]:
    """info.json `tiles`: one entry per stored tile shape, with the scale factors using it."""
    groups: dict[tuple[int, int], list[int]] = {}
    for level in slide.levels:
        s = scale_factor(slide, level)
        if s is not None:
            groups.setdefault((level.tile_width, level.tile_height), []).append(s)
    return [{"width": w, "height": h, "scaleFactors": f} for (w, h), f in groups.items()]


def full_sizes(slide: ServedSlide, max_area: int) -> list[dict[str, int]]:
    """A few small full-image sizes: the stored levels up to 4096 px (each rendered from itself)
    and up to two halvings of the smallest (rendered from it, within `region`'s source limit)."""
    smallest = slide.levels[-1]
    candidates = [(lv.width, lv.height) for lv in slide.levels]
    w, h = smallest.width, smallest.height
    for _ in range(2 if w * h <= 4 * max_area else 0):
        w, h = w // 2, h // 2
        if min(w, h) < 32:
            break
        candidates.append((w, h))
    sizes = {(w, h) for w, h in candidates if max(w, h) <= 4096 and w * h <= max_area}
    return [{"width": w, "height": h} for w, h in sorted(sizes)]


def match_tile(slide: ServedSlide, r: Region, size: Size) -> TileMatch | None:
    """The stored tile that is exactly this request at its level's scale factor, if any."""
    for level in slide.levels:
        s = scale_factor(slide, level)
        if s is None:
            continue
        tw, th = level.tile_width * s, level.tile_height * s
        if r.x % tw or r.y % th:
            continue
        col, row = r.x // tw, r.y // th
        if col >= level.cols or row >= level.rows:
            continue
        if r.w != min(tw, slide.width - r.x) or r.h != min(th, slide.height - r.y):
            continue
        valid_w = min(level.tile_width, level.width - col * level.tile_width)
        valid_h = min(level.tile_height, level.height - row * level.tile_height)
        want_w, want_h = -(-r.w // s), -(-r.h // s)  # the IIIF tile size: rounded up
        # `w,` / `,h` of a declared tile's region and size mean that tile, whichever way the
        # client's rounded-up size would tilt the aspect ratio.
        ok_w = size.w in (want_w, valid_w) or size.derived == "w"
        ok_h = size.h in (want_h, valid_h) or size.derived == "h"
        if ok_w and ok_h:
            out_w = size.w if size.w in (want_w, valid_w) else want_w
            out_h = size.h if size.h in (want_h, valid_h) else want_h
            return TileMatch(level, col, row, valid_w, valid_h, out_w, out_h)
    return None


def tile_pixels(match: TileMatch, data: bytes) -> np.ndarray:
    """The stored tile cut to the level's edge, the edge repeated up to the IIIF size."""
    pixels = decode_tile(match.level, data)[: match.valid_h, : match.valid_w]
    pad_h, pad_w = match.out_h - pixels.shape[0], match.out_w - pixels.shape[1]
    if pad_h < 0 or pad_w < 0:
        pixels = pixels[: match.out_h, : match.out_w]
    if pad_h > 0 or pad_w > 0:
        pixels = np.pad(pixels, ((0, max(0, pad_h)), (0, max(0, pad_w)), (0, 0)), mode="edge")
    return pixels


def rotated_size(w: int, h: int, degrees: float) -> tuple[int, int]:
    if degrees % 180 == 0:
        return w, h
    if degrees % 90 == 0:
        return h, w
    a = math.radians(degrees)
    c, s = abs(math.cos(a)), abs(math.sin(a))
    return math.ceil(w * c + h * s), math.ceil(w * s + h * c)


def finish(pixels: np.ndarray, mirror: bool, degrees: float, quality: str, fmt: str) -> bytes:
    """Rotation (mirror first), quality, format: the last steps of the IIIF order of work."""
    if mirror:
        pixels = pixels[:, ::-1]
    arbitrary = degrees % 90 != 0
    if not arbitrary and degrees:
        pixels = np.rot90(pixels, -round(degrees) // 90)
    if not arbitrary and quality in ("default", "color"):
        return encode_image(np.ascontiguousarray(pixels), fmt, JPEG_QUALITY)[0]
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if arbitrary:
        transparent = fmt != "jpg" and quality != "bitonal"
        if transparent:
            image = image.convert("RGBA")
        fill = (255, 255, 255, 0) if transparent else (255, 255, 255)
        image = image.rotate(
            -degrees, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=fill
        )
    if quality == "gray":
        image = image.convert("LA" if image.mode == "RGBA" else "L")
    elif quality == "bitonal":
        image = image.convert("L").point(lambda v: 255 if v >= 128 else 0).convert("1")
    if image.mode == "RGB":
        return encode_image(np.asarray(image), fmt, JPEG_QUALITY)[0]
    buffer = io.BytesIO()
    if fmt == "jpg":
        image.convert("L" if image.mode == "1" else image.mode).save(
            buffer, "JPEG", quality=JPEG_QUALITY
        )
    elif fmt == "png":
        image.save(buffer, "PNG", compress_level=3)
    else:
        image.convert("RGBA" if "A" in image.mode else "RGB").save(
            buffer, "WEBP", quality=JPEG_QUALITY
        )
    return buffer.getvalue()


def base_url(request: web.Request, slide_id: str) -> str:
    """The image service's id, as the client sees the service (`public_origin`)."""
    return f"{public_origin(request)}{PREFIX}/{slide_id}"


def info_document(slide: ServedSlide, base: str, max_area: int) -> dict[str, object]:
    doc: dict[str, object] = {
        "@context": CONTEXT,
        "id": base,
        "type": "ImageService3",
        "protocol": "http://iiif.io/api/image",
        "profile": "level2",
        "width": slide.width,
        "height": slide.height,
        "maxArea": max_area,
    }
    sizes = full_sizes(slide, max_area)
    if sizes:
        doc["sizes"] = sizes
    doc.update(
        {
            "tiles": tile_groups(slide),
            "preferredFormats": ["jpg"],
            "extraFormats": ["webp"],
            "extraQualities": ["gray", "bitonal"],
            "extraFeatures": EXTRA_FEATURES,
        }
    )
    return doc


async def named_slide(request: web.Request) -> ServedSlide:
    """The slide an image request names. An identifier is one path segment: an escaped `/`
    (%2F) in it names no image here (404). The router has decoded it already, so without this
    check `{id}%2Finfo.json` would be answered as `{id}/info.json`."""
    if "%2f" in request.raw_path.split("?", 1)[0].lower():
        raise SlideNotFound("no image with that identifier")
    return await request.app[CATALOG].slide(request.match_info["slide_id"])


async def info(request: web.Request) -> web.Response:
    slide = await named_slide(request)
    doc = info_document(
        slide, base_url(request, slide.slide_id), request.app[SETTINGS].max_render_pixels
    )
    wants_ld = "application/ld+json" in request.headers.get("Accept", "")
    headers = {
        "Content-Type": LD_JSON if wants_ld else "application/json",
        "Cache-Control": "no-cache",
        "Vary": f"Accept, {FORWARDED_VARY}",
        "Link": f'<{PROFILE}>;rel="profile"',
    }
    return web.Response(body=dumps(doc).encode(), headers=headers)


async def base_redirect(request: web.Request) -> web.Response:
    slide = await named_slide(request)
    location = f"{base_url(request, slide.slide_id)}/info.json"
    raise web.HTTPSeeOther(location=location, headers={"Vary": FORWARDED_VARY})


def canonical(
    slide: SlideInfo, r: Region, ow: int, oh: int, mirror: bool, deg: float, quality: str, fmt: str
) -> str:
    full = (r.x, r.y, r.w, r.h) == (0, 0, slide.width, slide.height)
    region_part = "full" if full else f"{r.x},{r.y},{r.w},{r.h}"
    size_part = "max" if (ow, oh) == (r.w, r.h) else f"{ow},{oh}"
    if ow > r.w or oh > r.h:
        size_part = "^" + size_part
    return f"{region_part}/{size_part}/{rotation_text(mirror, deg)}/{quality}.{fmt}"


class _Plan(NamedTuple):
    """What an image request asks for, checked: the stored tile it is exactly (`match`), else
    a rendering of `region` at `out_w` x `out_h`."""

    quality: str
    fmt: str
    mirror: bool
    degrees: float
    region: Region
    out_w: int
    out_h: int
    match: TileMatch | None
    etag: str
    links: str

    @property
    def as_stored(self) -> bool:
        """Whether the answer is the matched stored tile's bytes as they are."""
        m = self.match
        return (
            m is not None
            and not self.mirror
            and self.degrees == 0
            and self.quality in ("default", "color")
            and self.fmt == "jpg"
            and (m.valid_w, m.valid_h, m.out_w, m.out_h)
            == (m.level.tile_width, m.level.tile_height) * 2
            and m.level.codec == JPEG
        )

    def stored(self, slide: SlideInfo, body: bytes) -> Stored:
        return Stored(body, FORMATS[self.fmt], self.etag, slide.version, extra=self.extra)

    @property
    def extra(self) -> tuple[tuple[str, str], ...]:
        return (("Link", self.links),)


def _plan(app: web.Application, slide: ServedSlide, info: Mapping[str, str]) -> _Plan:
    """The checked plan of the image request whose path parameters are `info`."""
    max_area = app[SETTINGS].max_render_pixels
    quality, fmt = parse_file(info["quality"], info["format"])
    mirror, degrees = parse_rotation(info["rotation"])
    r = parse_region(info["region"], slide.width, slide.height)
    size = parse_size(info["size"], r.w, r.h, max_area)
    match = match_tile(slide, r, size)
    ow, oh = (match.out_w, match.out_h) if match else (size.w, size.h)
    # A declared tile is always served (at most one stored chunk to decode); anything else is
    # rendered, so it must fit the budget, rotated bounding box included.
    bw, bh = rotated_size(ow, oh, degrees)
    if match is None and max(ow * oh, bw * bh) > max_area:
        raise bad(f"{bw}x{bh} exceeds the {max_area} pixel budget (maxArea in info.json)")
    check_encodable(bw, bh, fmt)
    path = canonical(slide, r, ow, oh, mirror, degrees, quality, fmt)
    etag = f"{slide.version}-iiif-{path.replace('/', '-')}"
    # Path-absolute: an immutable response must not carry a host a client chose.
    links = f'<{PROFILE}>;rel="profile", <{PREFIX}/{slide.slide_id}/{path}>;rel="canonical"'
    return _Plan(quality, fmt, mirror, degrees, r, ow, oh, match, etag, links)


def image_now(
    app: web.Application, info: Mapping[str, str], headers: Mapping[str, str]
) -> Stored | None:
    """An image request's answer when it is a stored tile as it is, at hand (an open slide,
    the tile's bytes from `tile_bytes_now`); else None (`image` answers). The express lane's
    too, whose paths hold no escapes (`named_slide`'s check)."""
    slide = app[CATALOG].opened(info["slide_id"])
    if slide is None:
        return None
    plan = _plan(app, slide, info)
    m = plan.match
    if m is None or not plan.as_stored:
        return None
    data = slide.tile_bytes_now(m.level.index, m.col, m.row)
    return None if data is None else plan.stored(slide, data)


async def image_stored(
    app: web.Application, info: Mapping[str, str], headers: Mapping[str, str]
) -> Stored | None:
    """`image_now`'s answer with the tile read as needed (the express lane awaits it)."""
    catalog = app[CATALOG]
    slide = catalog.opened(info["slide_id"]) or await catalog.slide(info["slide_id"])
    plan = _plan(app, slide, info)
    m = plan.match
    if m is None or not plan.as_stored:
        return None
    return plan.stored(slide, await slide.tile_bytes(m.level.index, m.col, m.row))


async def image(request: web.Request) -> web.StreamResponse:
    catalog = request.app[CATALOG]
    max_area = request.app[SETTINGS].max_render_pixels
    slide = await named_slide(request)
    plan = _plan(request.app, slide, request.match_info)
    m = plan.match
    if m is not None and plan.as_stored:  # as `image_now` and `image_stored` answer it
        data = slide.tile_bytes_now(m.level.index, m.col, m.row)
        if data is None:
            data = await slide.tile_bytes(m.level.index, m.col, m.row)
        return stored_response(request, plan.stored(slide, data))
    quality, fmt, mirror, degrees = plan.quality, plan.fmt, plan.mirror, plan.degrees
    r, ow, oh, etag, version = plan.region, plan.out_w, plan.out_h, plan.etag, slide.version
    content_type = FORMATS[fmt]
    if etag_matches(request.headers.get("If-None-Match"), f'"{etag}"'):
        response = etag_response(request, b"", content_type, etag, version=version)
    elif m is not None:
        match = m
        data = await slide.tile_bytes(match.level.index, match.col, match.row)
        body = await in_pool(
            catalog,
            lambda: finish(tile_pixels(match, data), mirror, degrees, quality, fmt),
        )
        response = etag_response(request, body, content_type, etag, version=version)
    else:

        async def deliver(body: bytes) -> web.StreamResponse:
            rendered = etag_response(request, body, content_type, etag, version=version)
            rendered.headers["Link"] = plan.links
            return await sent(request, rendered, len(body))

        return await region(
            catalog,
            slide,
            *(r.x, r.y, r.w, r.h, ow, oh, max_area),
            lambda pixels: finish(pixels, mirror, degrees, quality, fmt),
            deliver,
        )
    response.headers["Link"] = plan.links
    return response


async def not_iiif(request: web.Request) -> web.Response:
    await named_slide(request)  # an unknown identifier is a 404 before a malformed request
    raise bad("expected info.json or {region}/{size}/{rotation}/{quality}.{format}")


IMAGE_PATH = f"{PREFIX}/{{slide_id}}/{{region}}/{{size}}/{{rotation}}/{{quality}}.{{format}}"
MALFORMED_PATH = f"{PREFIX}/{{slide_id}}/{{tail}}"


def register(app: web.Application) -> None:
    ident = f"{PREFIX}/{{slide_id}}"
    # Images first: the router tries the routes under the prefix in this order, and a viewer
    # asks for images far more often than for the rest. Only the catch-all overlaps another
    # route (every path under an image service), so it stays last.
    paths = [
        (f"{ident}/{{region}}/{{size}}/{{rotation}}/{{quality:[^/]*}}.{{format:[^/.]*}}", image),
        (f"{ident}/info.json", info),
        (ident, base_redirect),
        (f"{ident}/{{tail:.+}}", not_iiif),  # anything else under an image service: 400
    ]
    names = ("iiif.image", "iiif.info", "iiif.base", "iiif.other")
    for (path, handler), name in zip(paths, names, strict=True):
        if handler is image:
            routes(app).add_get(path, image, name=name, express=image_now, later=image_stored)
        else:
            routes(app).add_get(path, handler, name=name)


_IMAGE_RESPONSES = {
    "200": {"description": "image/jpeg, image/png or image/webp (Link: profile, canonical)"},
    "304": {"description": "cached (strong ETag)"},
    "400": ERROR,
    "404": ERROR,
}


OPENAPI = {
    f"{PREFIX}/{{slide_id}}": {
        "get": {
            "summary": "IIIF base URI: 303 redirect to info.json",
            "parameters": path_params("slide_id"),
            "responses": {"303": {"description": "see info.json"}, "400": ERROR, "404": ERROR},
        },
    },
    f"{PREFIX}/{{slide_id}}/info.json": {
        "get": {
            "summary": "IIIF Image API 3.0 image information (level 2; tiles = stored levels, "
            "maxArea = pixel budget); application/ld+json when the Accept header asks for it",
            "parameters": path_params("slide_id"),
            "responses": {
                "200": {"description": "ImageService3 document"},
                "400": ERROR,
                "404": ERROR,
            },
        },
    },
    IMAGE_PATH: {
        "get": {
            "summary": "IIIF Image API 3.0 image request. region: full | square | x,y,w,h | "
            "pct:x,y,w,h; size: max | w, | ,h | pct:n | w,h | !w,h, ^-prefixed to upscale; "
            "rotation: [!]degrees; quality: default | color | gray | bitonal; format: jpg | "
            "png | webp. A tile declared in info.json is the stored JPEG as it is.",
            "parameters": path_params(
                "slide_id", "region", "size", "rotation", "quality", "format"
            ),
            "responses": _IMAGE_RESPONSES,
        },
    },
    MALFORMED_PATH: {
        "get": {
            "summary": "Any other path under an IIIF image service (too few or too many "
            "segments, no format): 400",
            "parameters": path_params("slide_id", "tail"),
            "responses": {"400": ERROR, "404": ERROR},
        },
    },
}
