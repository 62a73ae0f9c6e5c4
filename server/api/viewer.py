"""The browser viewer: `/` lists slides by case with thumbnails and a search, `/view/{id}` shows
one slide in OpenSeadragon with a navigator, magnification, rotation, a ruler, a link to the
current view, the slide's properties and (when allowed) its label and macro.

OpenSeadragon comes from npm (`npm ci` at the repository root) and is served as it is from
`node_modules/openseadragon/build/openseadragon/` under `/static/osd/`; our own page assets are
`server/static/` under `/static/` (ES modules, no build step). Both are plain static folders (no
symlinks followed, no listing). Without node_modules, `/static/osd/...` answers 404 JSON and the
view page says why.

A page shows its caller no more than the APIs would serve them: a page opened through a signed
`view` link (someone without a token) shows the slide's pixels, size, levels and scale, never its
name, case, vendor, scanner, date, label or macro.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

from aiohttp import web

from server.api.dicomweb.instances import DICOMWEB, Instance
from server.api.dzi import max_level, tile_size
from server.api.slides import MAX_QUERY, count_param, text_param
from server.api.viewer_pages import (
    INDEX_PAGE,
    MISSING_OSD,
    ViewPage,
    error_page,
    index_html,
    view_html,
)
from server.auth import signed_query
from server.catalog import CONVERTING, PRIVATE_IMAGES, READY, SlideInfo
from server.catalog import status as slide_status
from server.converting import conversion_jobs
from server.errors import status_of
from server.front import routes
from server.keys import CATALOG, LISTING, SETTINGS
from server.openapi import ERROR, path_params
from server.responses import SIGNED_EXPIRES, VERSION_PARAM, json_error
from wsi.errors import StoreError, WsiError
from wsi.model import MICRONS_PER_PIXEL_AT_1X, SlideProperties
from wsi.published.slide import AsyncPublishedSlide

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
"""Our own HTML/CSS/JS assets, served under /static/."""
OSD_DIR = Path(__file__).resolve().parents[2] / "node_modules/openseadragon/build/openseadragon"
"""OpenSeadragon's build as npm installs it, served under /static/osd/."""
OSD_SCRIPT = "openseadragon.min.js"
OSD_INSTALLED = web.AppKey("osd_installed", bool)

CSP = (
    "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
    "style-src 'self' 'unsafe-inline'; worker-src 'self' blob:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
"""OpenSeadragon injects one <style> element and decodes tiles in a blob: worker; the list's
search is a same-origin GET form."""


STORE_DOWN = (
    "The slide store cannot be reached right now, so nothing can be shown. Try again in a "
    "minute; if it lasts, the service's /readyz says what is wrong."
)


STORE_DOWN_RESPONSE = {
    "description": "the store cannot be reached (a page that says so)",
    "content": {"text/html": {"schema": {"type": "string"}}},
}


def versioned(slide: SlideInfo, query: str) -> str:
    """`query` with the slide's version, so tile responses may be cached as immutable."""
    return pinned(slide.version, query)


def pinned(version: str, query: str) -> str:
    """`query` with a slide's `version` (`versioned`)."""
    pin = f"{VERSION_PARAM}={version}"
    return f"{pin}&{query}" if query else pin


def native_magnification(props: SlideProperties) -> float | None:
    """The magnification at one screen pixel per level-0 pixel: the objective power when the
    slide says, else from its MPP by `MICRONS_PER_PIXEL_AT_1X`; None when neither is known."""
    if props.objective_power:
        return props.objective_power
    if props.mpp_x:
        return MICRONS_PER_PIXEL_AT_1X / props.mpp_x
    return None


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


def _store_down(title: str, exc: StoreError) -> web.Response:
    return _html(error_page(title, STORE_DOWN), status_of(exc))


async def index(request: web.Request) -> web.Response:
    q = (text_param(request, "q") or "").strip()
    number = max(count_param(request, "page", 1), 1)
    settings = request.app[SETTINGS]
    listing = request.app[LISTING]
    try:
        found = await listing.page(q, None, (number - 1) * INDEX_PAGE, INDEX_PAGE)
        last = max(1, -(-found.total // INDEX_PAGE))
        if number > last:  # past the end (a link from when there were more): the last page
            number = last
            found = await listing.page(q, None, (number - 1) * INDEX_PAGE, INDEX_PAGE)
    except StoreError as exc:
        return _store_down("Slides", exc)
    queries = {
        s.slide_id: (
            signed_query(settings, s.slide_id, "view"),
            pinned(s.version, signed_query(settings, s.slide_id, "tiles")),
        )
        for s in found.slides
    }
    converting = any(s.status == CONVERTING for s in found.slides)
    jobs = await conversion_jobs(request.app) if converting else {}
    page_html = index_html(found.slides, queries, jobs, q, found.of_all, found.total, number)
    return _html(page_html)


def _dicom_date(value: str) -> str:
    """DICOM DA/DT `YYYYMMDD[HHMM...]` -> `YYYY-MM-DD[ HH:MM]` (as given when not digits)."""
    if len(value) < 8 or not value[:8].isdigit():
        return value
    text = f"{value[:4]}-{value[4:6]}-{value[6:8]}"
    return f"{text} {value[8:10]}:{value[10:12]}" if value[8:12].isdigit() else text


async def _equipment(request: web.Request, slide: SlideInfo) -> tuple[str | None, str | None]:
    """(scanner, scan date) of a slide: a converting slide's from its source's properties (no
    date when ingest de-identifies), a published slide's from its DICOM header (the same values
    WADO-RS metadata serves; no date when its identity was removed)."""
    props = slide.properties
    if not isinstance(slide, AsyncPublishedSlide):
        scanner = " ".join(p for p in (props.manufacturer, props.model) if p) or None
        hide_date = request.app[CATALOG].deidentify
        return scanner, None if hide_date or not props.scan_datetime else props.scan_datetime
    base = next((i for i in (slide.dicom.instances if slide.dicom else ()) if i.level == 0), None)
    if base is None:
        return None, None
    try:
        ds = await request.app[DICOMWEB].header(request.app[CATALOG], Instance(slide, base))
    except WsiError:  # the pixels may still be fine: the panel just says less
        return None, None
    known = [str(ds.get(k, "")) for k in ("Manufacturer", "ManufacturerModelName")]
    scanner = " ".join(v for v in known if v and v != "Unknown") or None
    removed = str(ds.get("PatientIdentityRemoved", "")) == "YES"
    date = str(ds.get("AcquisitionDateTime", "") or ds.get("ContentDate", ""))
    return scanner, None if removed or not date else date


def _level_text(slide: SlideInfo) -> str:
    downsamples = ", ".join(f"{lv.downsample:g}" for lv in slide.levels)
    return f"{len(slide.levels)} (downsample {downsamples})"


async def property_rows(
    request: web.Request, slide: SlideInfo, signed: bool
) -> tuple[tuple[str, str], ...]:
    """The properties panel: geometry and scale for everyone who may view the slide; name,
    case, vendor, scanner and date only for callers who may read `GET /slides/{id}`."""
    props = slide.properties
    rows: list[tuple[str, str]] = []
    if not signed:
        scanner, date = await _equipment(request, slide)
        rows += [("Name", slide.name), ("Case", slide.case or "—")]
        rows += [("Vendor", props.vendor or "—"), ("Scanner", scanner or "—")]
        rows.append(("Scanned", _dicom_date(date) if date else "—"))
    rows.append(("Status", slide_status(slide)))
    size = f"{slide.width:,} × {slide.height:,} px"
    if props.mpp_x:
        mm_x, mm_y = (
            slide.width * props.mpp_x / 1000,
            slide.height * (props.mpp_y or props.mpp_x) / 1000,
        )
        size += f" ({mm_x:.2f} × {mm_y:.2f} mm)"
    rows += [("Size", size), ("Levels", _level_text(slide))]
    mpp = f"{props.mpp_x:.4g} × {props.mpp_y or props.mpp_x:.4g} µm/px" if props.mpp_x else "—"
    rows += [
        ("MPP", mpp),
        ("Objective", f"{props.objective_power:g}x" if props.objective_power else "—"),
    ]
    native = native_magnification(props)
    rows.append(("At 1:1", f"{native:.3g}x" if native else "magnification unknown"))
    if not signed:
        rows.append(("Slide id", slide.slide_id))
    return tuple(rows)


def associated_panel(
    request: web.Request, slide: SlideInfo, signed: bool
) -> tuple[tuple[tuple[str, str], ...], str]:
    """(images to show, note): the label and macro only when the service serves them to this
    caller (`--allow-label`, and never under a signature, as `GET /slides/{id}/associated/...`
    decides); otherwise a note saying why they are withheld."""
    if signed:
        return (), "Withheld: a shared link never shows the label or the macro."
    if not request.app[SETTINGS].allow_label:
        return (), (
            "Withheld: label and macro images may show patient names, and this service does not "
            "serve them (it was started without --allow-label)."
        )
    if slide_status(slide) != READY:
        return (), "Shown once the conversion is published."
    sid = quote(slide.slide_id, safe="")
    images = tuple(
        (name, f"/slides/{sid}/associated/{name}")
        for name in PRIVATE_IMAGES
        if name in slide.associated_names
    )
    return images, "" if images else "This slide has no label or macro image."


def view_config(
    slide: SlideInfo,
    query: str,
    view_query: str = "",
    signed: bool = False,
    job: dict[str, Any] | None = None,
    expires: int | None = None,
) -> dict[str, Any]:
    """What viewer.js needs: the DeepZoom geometry, where tiles are, the signed query, the scale,
    where to poll a converting slide's progress, and the shareable URL of this page."""
    sid = quote(slide.slide_id, safe="")
    view_url = f"/view/{sid}?{view_query}" if view_query else f"/view/{sid}"
    props = slide.properties
    return {
        "id": slide.slide_id,
        "name": f"Shared slide {slide.slide_id[:8]}" if signed else slide.name,
        "width": slide.width,
        "height": slide.height,
        "tileSize": tile_size(slide),
        "maxLevel": max_level(slide),
        "tilesUrl": f"/slides/{sid}_files/",
        "query": query,
        "mppX": props.mpp_x,
        "mppY": props.mpp_y or props.mpp_x,
        "magnification": native_magnification(props),
        "osdPrefix": "/static/osd/images/",
        "status": slide_status(slide),
        "job": job,
        # A signed page cannot read the JSON API: it polls itself, which says the same.
        "statusUrl": view_url if signed else f"/slides/{sid}",
        "viewUrl": view_url,
        "linkExpires": expires,
    }


async def view(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    try:
        slide = await request.app[CATALOG].slide(request.match_info["slide_id"])
    except StoreError as exc:
        return _store_down("Slide", exc)
    # Reached through a signed link: the tiles and the shared link expire with that link.
    expires = request.get(SIGNED_EXPIRES)
    signed = expires is not None
    query = versioned(slide, signed_query(settings, slide.slide_id, "tiles", expires))
    view_query = signed_query(settings, slide.slide_id, "view", expires)
    link_expires = int(dict(parse_qsl(view_query))["exp"]) if view_query else None
    job = None
    if slide_status(slide) != READY:
        with contextlib.suppress(WsiError):
            job = (await conversion_jobs(request.app)).get(slide.slide_id)
    images, note = associated_panel(request, slide, signed)
    page = ViewPage(
        config=view_config(slide, query, view_query, signed, job, link_expires),
        properties=await property_rows(request, slide, signed),
        associated=images,
        associated_note=note,
        osd_installed=request.app[OSD_INSTALLED],
        listed=not signed,
    )
    return _html(view_html(slide, page))


async def osd_missing(request: web.Request) -> web.Response:
    return json_error(404, MISSING_OSD)


def static_folder(folder: Path) -> Callable[[web.Request], Awaitable[web.FileResponse]]:
    """A folder's files under a route's `{tail}`, as aiohttp's static routes serve them (no
    listing; a link may point only inside the folder), except that a missing file is a JSON 404
    like every error: aiohttp's FileResponse finds it missing only when it sends, and answers
    with an empty body."""
    root = folder.resolve()

    def find(tail: str) -> Path:
        try:
            path = (root / tail).resolve()
            path.relative_to(root)
            if path.is_file():
                return path
        except (ValueError, OSError):  # outside the folder, a loop of links, a bad name
            pass
        raise web.HTTPNotFound(reason="no such file")

    async def handler(request: web.Request) -> web.FileResponse:
        path = await asyncio.to_thread(find, request.match_info["tail"])
        return web.FileResponse(path)

    return handler


def register(app: web.Application) -> None:
    installed = (OSD_DIR / OSD_SCRIPT).is_file()
    app[OSD_INSTALLED] = installed
    routes(app).add_get("/", index)
    routes(app).add_get("/view/{slide_id}", view, name="viewer.view")
    osd = static_folder(OSD_DIR) if installed else osd_missing
    routes(app).add_get("/static/osd/{tail:.*}", osd)
    routes(app).add_get("/static/{tail:.*}", static_folder(STATIC_DIR))


OPENAPI = {
    "/": {
        "get": {
            "summary": "Viewer: slides grouped by case, with thumbnails and a search (HTML)",
            "parameters": [
                {
                    "name": "q",
                    "in": "query",
                    "required": False,
                    "description": "only slides whose name or case contains this text "
                    "(case-insensitive), as `GET /slides?q=`",
                    "schema": {"type": "string", "maxLength": MAX_QUERY},
                }
            ],
            "responses": {
                "200": {"description": "text/html"},
                "400": ERROR,
                "503": STORE_DOWN_RESPONSE,
            },
        }
    },
    "/view/{slide_id}": {
        "get": {
            "summary": "Viewer: one slide in OpenSeadragon with navigator, magnification, "
            "rotation, ruler, shareable view link and properties (HTML)",
            "parameters": path_params("slide_id"),
            "responses": {
                "200": {"description": "text/html"},
                "400": ERROR,
                "404": ERROR,
                "503": STORE_DOWN_RESPONSE,
            },
        }
    },
}
