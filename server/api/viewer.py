"""The browser viewer: `/` lists published slides with thumbnails, `/view/{id}` shows one slide in
OpenSeadragon (DeepZoom tiles, scale bar from the slide's MPP).

OpenSeadragon comes from npm (`npm ci` at the repository root) and is served as it is from
`node_modules/openseadragon/build/openseadragon/` under `/static/osd/`; our own page assets are
`server/static/` under `/static/`. Both are plain static folders (no symlinks followed, no
listing). Without node_modules, `/static/osd/...` answers 404 JSON and the view page says why.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from server.api.dzi import dzi_size, max_level
from server.auth import SIGNED_EXPIRES, signed_query
from server.catalog import READY, SlideInfo
from server.catalog import status as slide_status
from server.converting import conversion_jobs
from server.keys import CATALOG, SETTINGS
from server.openapi import ERROR, path_params
from server.responses import VERSION_PARAM, json_error
from wsi.errors import WsiError

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
"""Our own HTML/CSS/JS assets, served under /static/."""
OSD_DIR = Path(__file__).resolve().parents[2] / "node_modules/openseadragon/build/openseadragon"
"""OpenSeadragon's build as npm installs it, served under /static/osd/."""
OSD_SCRIPT = "openseadragon.min.js"
OSD_INSTALLED = web.AppKey("osd_installed", bool)

THUMBNAIL_PX = 256
"""Longest side (pixels) of the DeepZoom tile used as a thumbnail when a slide has none."""

CSP = (
    "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
    "style-src 'self' 'unsafe-inline'; worker-src 'self' blob:; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""OpenSeadragon injects one <style> element and decodes tiles in a blob: worker."""

MISSING_OSD = (
    "The viewer cannot start: OpenSeadragon is not installed on this server "
    "(node_modules is missing). Run `npm ci` in the wsistore checkout, then restart the server."
)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def versioned(slide: SlideInfo, query: str) -> str:
    """`query` with the slide's version, so tile responses may be cached as immutable."""
    pin = f"{VERSION_PARAM}={slide.version}"
    return f"{pin}&{query}" if query else pin


def _with_query(url: str, query: str) -> str:
    return f"{url}?{query}" if query else url


def _script_json(doc: Any) -> str:
    """JSON safe inside <script type="application/json">: no `<`, `>` or `&` left to end it."""
    text = json.dumps(doc, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _page(title: str, body_class: str, body: str) -> str:
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title>"
        '<link rel="icon" href="data:,">'
        '<link rel="stylesheet" href="/static/viewer.css">'
        f'</head><body class="{_e(body_class)}">{body}</body></html>\n'
    )


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(
        text=text,
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers={
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin",
            "Cache-Control": "no-store",
        },
    )


def _mpp_text(slide: SlideInfo) -> str:
    mpp = slide.properties.mpp_x
    return f"{mpp:.4g} µm/px" if mpp else "MPP unknown"


def thumbnail_url(slide: SlideInfo, query: str, signed: bool = False) -> str:
    """The slide's thumbnail image, or else the DeepZoom tile holding the whole slide in at most
    THUMBNAIL_PX pixels. Always that tile when `signed`: signatures open pyramid tiles only, and a
    scanner's thumbnail may show the label."""
    sid = quote(slide.slide_id, safe="")
    if "thumbnail" in slide.associated_names and not signed:
        return _with_query(f"/slides/{sid}/associated/thumbnail", query)
    limit = min(THUMBNAIL_PX, slide.levels[0].tile_width)
    z = max_level(slide)
    while z > 0 and max(dzi_size(slide, z)) > limit:
        z -= 1
    return _with_query(f"/slides/{sid}_files/{z}/0_0.jpeg", query)


def index_html(
    slides: list[SlideInfo],
    queries: dict[str, tuple[str, str]],
    jobs: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The slide list: one card per slide with its thumbnail, size, MPP, and for a slide being
    converted its job's state and progress. `queries`: slide id -> (signed query of its view
    page, signed query of its tiles), both empty when auth is off."""
    jobs = jobs or {}
    cards = []
    for slide in slides:
        view_query, tile_query = queries.get(slide.slide_id, ("", ""))
        view = _with_query(f"/view/{quote(slide.slide_id, safe='')}", view_query)
        details = f"{slide.width} × {slide.height} px · {_mpp_text(slide)}"
        if slide.properties.vendor:
            details += f" · {slide.properties.vendor}"
        if slide_status(slide) != READY:
            details += f" · {slide_status(slide)}"
            job = jobs.get(slide.slide_id)
            if job is not None:
                details += (
                    f" {float(job['progress']):.0f}%" if job["state"] == "running" else " (queued)"
                )
        cards.append(
            f'<li><a class="card" href="{_e(view)}">'
            f'<img src="{_e(thumbnail_url(slide, tile_query, bool(view_query)))}" alt="" '
            'loading="lazy">'
            f'<span class="name">{_e(slide.slide_id)}</span>'
            f'<span class="details">{_e(details)}</span></a></li>'
        )
    if cards:
        listing = f'<ul class="slides">{"".join(cards)}</ul>'
    else:
        listing = (
            '<p class="empty">No slides yet. Convert one with '
            "<code>wsi convert SLIDE --out STORE</code>.</p>"
        )
    count = f"{len(slides)} slide{'' if len(slides) == 1 else 's'}"
    body = f"<header><h1>Slides</h1><span>{count}</span></header>{listing}"
    return _page("Slides · wsistore", "index", body)


def view_config(slide: SlideInfo, query: str) -> dict[str, Any]:
    """What viewer.js needs: the DeepZoom geometry, where tiles are, the signed query, MPP."""
    sid = quote(slide.slide_id, safe="")
    return {
        "id": slide.slide_id,
        "width": slide.width,
        "height": slide.height,
        "tileSize": slide.levels[0].tile_width,
        "maxLevel": max_level(slide),
        "tilesUrl": f"/slides/{sid}_files/",
        "query": query,
        "mppX": slide.properties.mpp_x,
        "osdPrefix": "/static/osd/images/",
    }


def view_html(slide: SlideInfo, query: str, osd_installed: bool) -> str:
    """One slide in OpenSeadragon; the notice is shown at once when OpenSeadragon is missing."""
    notice = f'<div id="notice" role="alert">{_e(MISSING_OSD)}</div>'
    scripts = '<script src="/static/viewer.js"></script>'
    if osd_installed:
        notice = '<div id="notice" role="alert" hidden></div>'
        scripts = f'<script src="/static/osd/{OSD_SCRIPT}"></script>{scripts}'
    body = (
        '<header><a href="/">Slides</a>'
        f"<h1>{_e(slide.slide_id)}</h1>"
        f"<span>{_e(f'{slide.width} × {slide.height} px · {_mpp_text(slide)}')}</span></header>"
        f"{notice}"
        '<main id="viewer" data-state="loading">'
        '<div id="scalebar" hidden><div class="bar"></div><span class="label"></span></div>'
        "</main>"
        f'<script type="application/json" id="slide-config">'
        f"{_script_json(view_config(slide, query))}</script>"
        f"{scripts}"
    )
    return _page(f"{slide.slide_id} · wsistore", "view", body)


async def index(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]
    settings = request.app[SETTINGS]
    slides: list[SlideInfo] = []
    for slide_id in await catalog.slide_ids():
        try:
            slides.append(await catalog.slide(slide_id))
        except WsiError:  # unpublished meanwhile, or a dropped slide its reader refuses
            continue
    queries = {
        s.slide_id: (
            signed_query(settings, s.slide_id, "view"),
            versioned(s, signed_query(settings, s.slide_id, "tiles")),
        )
        for s in slides
    }
    converting = any(slide_status(s) != READY for s in slides)
    jobs = await conversion_jobs(request.app) if converting else {}
    return _html(index_html(slides, queries, jobs))


async def view(request: web.Request) -> web.Response:
    slide = await request.app[CATALOG].slide(request.match_info["slide_id"])
    # Reached through a signed link: the tiles expire with that link, never later.
    expires = request.get(SIGNED_EXPIRES)
    query = versioned(slide, signed_query(request.app[SETTINGS], slide.slide_id, "tiles", expires))
    return _html(view_html(slide, query, request.app[OSD_INSTALLED]))


async def osd_missing(request: web.Request) -> web.Response:
    return json_error(404, MISSING_OSD)


def register(app: web.Application) -> None:
    installed = (OSD_DIR / OSD_SCRIPT).is_file()
    app[OSD_INSTALLED] = installed
    app.router.add_get("/", index)
    app.router.add_get("/view/{slide_id}", view, name="viewer.view")
    if installed:
        app.router.add_static("/static/osd", OSD_DIR, follow_symlinks=False)
    else:
        app.router.add_get("/static/osd/{tail:.*}", osd_missing)
    app.router.add_static("/static", STATIC_DIR, follow_symlinks=False)


OPENAPI = {
    "/": {
        "get": {
            "summary": "Viewer: published slides with thumbnails (HTML)",
            "responses": {"200": {"description": "text/html"}},
        }
    },
    "/view/{slide_id}": {
        "get": {
            "summary": "Viewer: one slide in OpenSeadragon with a scale bar (HTML)",
            "parameters": path_params("slide_id"),
            "responses": {"200": {"description": "text/html"}, "400": ERROR, "404": ERROR},
        }
    },
}
