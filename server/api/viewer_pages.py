"""The HTML of the viewer's two pages: the slide list (`/`) and one slide (`/view/{id}`).

Everything a page shows is escaped here; what `viewer.js` needs travels as JSON in
`<script type="application/json">` (the CSP allows no inline script). Both pages say something
useful without JavaScript: the list is a plain GET form and links, the slide page shows its
properties and a `<noscript>` notice.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from server.api.dzi import chunk_tile_size, dzi_size, max_level
from server.api.slides import MAX_QUERY
from server.catalog import DICOM_ONLY, READY, SlideInfo
from server.listing import Listed

THUMBNAIL_PX = 256
"""Longest side (pixels) of the DeepZoom tile used as a thumbnail when a slide has none."""

MISSING_OSD = (
    "The viewer cannot start: OpenSeadragon is not installed on this server "
    "(node_modules is missing). Run `npm ci` in the wsistore checkout, then restart the server."
)
NO_SCRIPT = (
    "This viewer needs JavaScript to show the slide's pixels. Turn JavaScript on for this site, "
    "or open the slide in a desktop viewer (QuPath, or any DICOMweb or IIIF client)."
)
NO_CASE = "No case"


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def with_query(url: str, query: str) -> str:
    return f"{url}?{query}" if query else url


def script_json(doc: Any) -> str:
    """JSON safe inside <script type="application/json">: no `<`, `>` or `&` left to end it."""
    text = json.dumps(doc, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def page(title: str, body_class: str, body: str, script: str = "") -> str:
    """A whole page; `script` is one of our ES modules under /static/."""
    module = f'<script type="module" src="/static/{e(script)}"></script>' if script else ""
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title>"
        '<link rel="icon" href="data:,">'
        '<link rel="stylesheet" href="/static/viewer.css">'
        f'</head><body class="{e(body_class)}">{body}{module}</body></html>\n'
    )


def error_page(title: str, message: str) -> str:
    """What a person sees instead of a page that cannot be made (the store is down)."""
    body = (
        f'<header><a href="/">Slides</a><h1>{e(title)}</h1></header>'
        f'<div id="notice" role="alert">{e(message)}</div>'
    )
    return page(f"{title} · wsistore", "error", body)


def mpp_text(slide: SlideInfo) -> str:
    return mpp_words(slide.properties.mpp_x)


def mpp_words(mpp: float | None) -> str:
    return f"{mpp:.4g} µm/px" if mpp else "MPP unknown"


def thumbnail_url(slide: Listed, query: str, signed: bool = False) -> str:
    """The slide's thumbnail image, or else the DeepZoom tile holding the whole slide in at most
    THUMBNAIL_PX pixels. Always that tile when `signed` (signatures open pyramid tiles only) or
    when the thumbnail may show the label (`Listed.card_thumbnail`)."""
    sid = quote(slide.slide_id, safe="")
    if slide.card_thumbnail and not signed:
        return with_query(f"/slides/{sid}/associated/thumbnail", query)
    limit = min(THUMBNAIL_PX, chunk_tile_size(*slide.chunk))
    z = max_level(slide)
    while z > 0 and max(dzi_size(slide, z)) > limit:
        z -= 1
    return with_query(f"/slides/{sid}_files/{z}/0_0.jpeg", query)


# ---- the slide list ----


DICOM_ONLY_CARD = "DICOM only: not served here (wsi export-dicom writes its .dcm files)"
"""What a card says of a slide published without its Zarr view, which has no page or tiles."""


def _card(slide: Listed, queries: tuple[str, str], job: dict[str, Any] | None) -> str:
    search = f"{slide.name} {slide.case or ''}".casefold()
    if slide.status == DICOM_ONLY:  # no page to open, no thumbnail to show
        return (
            f'<li data-search="{e(search)}"><div class="card">'
            f'<span class="name">{e(slide.name)}</span>'
            f'<span class="details">{e(f"{slide.width} × {slide.height} px")} · '
            f"{e(DICOM_ONLY_CARD)}</span></div></li>"
        )
    view_query, tile_query = queries
    view = with_query(f"/view/{quote(slide.slide_id, safe='')}", view_query)
    doc = slide.summary()
    details = f"{slide.width} × {slide.height} px · {mpp_words(doc['mpp_x'])}"
    if doc["vendor"]:
        details += f" · {doc['vendor']}"
    if slide.status != READY:
        details += f" · {slide.status}"
        if job is not None:
            running = job["state"] == "running"
            details += f" {float(job['progress']):.0f}%" if running else " (queued)"
    return (
        f'<li data-search="{e(search)}"><a class="card" href="{e(view)}">'
        f'<img src="{e(thumbnail_url(slide, tile_query, bool(view_query)))}" alt="" '
        'loading="lazy">'
        f'<span class="name">{e(slide.name)}</span>'
        f'<span class="details">{e(details)}</span></a></li>'
    )


def _groups(slides: Sequence[Listed]) -> list[tuple[str | None, list[Listed]]]:
    """Slides by case, in the order given (the listing's), each case once, where it first
    appears."""
    groups: dict[str | None, list[Listed]] = {}
    for slide in slides:
        groups.setdefault(slide.case, []).append(slide)
    return list(groups.items())


def _count(n: int) -> str:
    return f"{n} slide{'' if n == 1 else 's'}"


INDEX_PAGE = 200
"""Slide cards on one page of the index (`?page=`)."""


def index_html(
    slides: Sequence[Listed],
    queries: dict[str, tuple[str, str]],
    jobs: dict[str, dict[str, Any]] | None = None,
    q: str = "",
    total: int | None = None,
    matched: int | None = None,
    page_number: int = 1,
) -> str:
    """The slide list, grouped by case: one card per slide with its thumbnail, name, size, MPP,
    and for a slide being converted its job's state and progress (a slide published as DICOM
    only: a card without link or thumbnail that says so). `slides` are page `page_number`
    (`INDEX_PAGE` cards a page) of the `matched` slides that match `q`, in listing order, out
    of `total`. `queries`: slide id -> (signed query of its view page, signed query of its
    tiles), both empty when auth is off."""
    jobs = jobs or {}
    total = len(slides) if total is None else total
    matched = len(slides) if matched is None else matched
    sections = []
    for case, members in _groups(slides):
        cards = "".join(
            _card(s, queries.get(s.slide_id, ("", "")), jobs.get(s.slide_id)) for s in members
        )
        sections.append(
            f'<section class="case"><h2>{e(case or NO_CASE)} '
            f'<span class="count">{_count(len(members))}</span></h2>'
            f'<ul class="slides">{cards}</ul></section>'
        )
    if q:
        shown = f"{matched} of {_count(total)} match “{q}”"
        status = f'{e(shown)} · <a href="/">show all</a>'
    else:
        status = e(_count(total))
    empty = "" if slides else ' class="shown"'
    if total == 0:
        message = "No slides yet. Convert one with <code>wsi convert SLIDE --out STORE</code>."
    else:
        message = "No slide matches your search."
    body = (
        "<header><h1>Slides</h1>"
        '<form class="search" role="search" method="get" action="/">'
        f'<input type="search" name="q" value="{e(q)}" maxlength="{MAX_QUERY}" '
        'placeholder="Search by name or case" aria-label="Search slides by name or case">'
        '<button type="submit">Search</button></form>'
        f'<span id="count">{status}</span></header>'
        f'<main id="slides">{"".join(sections)}'
        f'<p id="empty"{empty}>{message}</p>{_pages(q, matched, page_number)}</main>'
    )
    return page("Slides · wsistore", "index", body, "slides.js")


def _pages(q: str, matched: int, number: int) -> str:
    """Links to the index's other pages, when the matching slides take more than one."""
    last = max(1, -(-matched // INDEX_PAGE))
    if last == 1:
        return ""

    def link(n: int, text: str, rel: str) -> str:
        query = urlencode({**({"q": q} if q else {}), "page": n})
        return f'<a href="/?{e(query)}" rel="{rel}">{text}</a>'

    parts = [link(number - 1, "‹ previous", "prev")] if number > 1 else []
    parts.append(f"page {number} of {last}")
    if number < last:
        parts.append(link(number + 1, "next ›", "next"))
    return f'<nav class="pages" aria-label="Pages">{" · ".join(parts)}</nav>'


# ---- one slide ----


@dataclass(frozen=True)
class ViewPage:
    """What the slide page shows besides the slide itself, as the handler decided it for this
    caller (see `server.api.viewer.view`)."""

    config: dict[str, Any]
    """For viewer.js (`server.api.viewer.view_config`)."""
    properties: tuple[tuple[str, str], ...]
    """(label, value) rows of the properties panel, only what this caller may see."""
    associated: tuple[tuple[str, str], ...]
    """(name, URL) of the label and macro images to show; empty when withheld."""
    associated_note: str
    """Why none are shown, or empty."""
    osd_installed: bool = True
    listed: bool = True
    """Whether the caller may open the slide list (not through a shared link: it needs a token
    when auth is on)."""


def _properties(rows: Sequence[tuple[str, str]]) -> str:
    items = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in rows)
    return f'<section id="properties"><h2>Properties</h2><dl>{items}</dl></section>'


def _associated(images: Sequence[tuple[str, str]], note: str) -> str:
    figures = "".join(
        f'<figure><img src="{e(url)}" alt="{e(name.capitalize())} of the slide">'
        f"<figcaption>{e(name.capitalize())}</figcaption></figure>"
        for name, url in images
    )
    text = f'<p class="note">{e(note)}</p>' if note else ""
    return f'<section id="associated"><h2>Label and macro</h2>{figures}{text}</section>'


TOOLBAR = (
    '<nav id="toolbar" aria-label="Viewer tools" hidden>'
    '<output id="magnification" title="Current magnification">–</output>'
    '<span class="group" role="group" aria-label="Magnification">'
    '<button type="button" data-mag="1">1x</button>'
    '<button type="button" data-mag="5">5x</button>'
    '<button type="button" data-mag="10">10x</button>'
    '<button type="button" data-mag="20">20x</button>'
    '<button type="button" data-mag="40">40x</button>'
    '<button type="button" data-mag="native" '
    'title="One screen pixel per slide pixel">1:1</button></span>'
    '<span class="group" role="group" aria-label="Rotation">'
    '<button type="button" id="rotate-left" title="Rotate left">⟲</button>'
    '<button type="button" id="rotate-right" title="Rotate right">⟳</button></span>'
    '<button type="button" id="ruler-button" aria-pressed="false">Ruler</button>'
    '<button type="button" id="link-button">Link</button>'
    '<button type="button" id="panel-button" aria-controls="panel" '
    'aria-expanded="false">Info</button>'
    '<button type="button" id="help-button" title="Keyboard shortcuts">?</button>'
    "</nav>"
)
"""The tools; hidden until viewer.js runs (without it they would do nothing)."""

OVERLAYS = (
    '<div id="scalebar" hidden><div class="bar"></div><span class="label"></span></div>'
    '<svg id="ruler-layer" aria-hidden="true"><line class="halo"></line><line></line></svg>'
    '<output id="ruler-label" hidden></output>'
)
"""Drawn over the slide inside #viewer: the scale bar and the ruler."""

DIALOGS = (
    '<div id="link-box" role="dialog" aria-label="Link to this view" hidden>'
    '<input id="link-output" readonly aria-label="Link to this view">'
    '<span id="link-status"></span>'
    '<button type="button" id="link-close">Close</button></div>'
    '<dialog id="help"><h2>Keyboard shortcuts</h2><dl id="shortcuts"></dl>'
    '<form method="dialog"><button>Close</button></form></dialog>'
)


def view_html(slide: SlideInfo, view: ViewPage) -> str:
    """One slide in OpenSeadragon with its tools, properties and label panel; the notice is
    shown at once when OpenSeadragon is missing."""
    scripts = ""
    notice = f'<div id="notice" role="alert">{e(MISSING_OSD)}</div>'
    if view.osd_installed:
        notice = '<div id="notice" role="alert" hidden></div>'
        scripts = '<script src="/static/osd/openseadragon.min.js"></script>'
    title = view.config["name"]
    back = '<a href="/">Slides</a>' if view.listed else ""
    body = (
        f"<header>{back}"
        f'<h1 id="title">{e(title)}</h1>'
        f"<span>{e(f'{slide.width} × {slide.height} px · {mpp_text(slide)}')}</span></header>"
        f'<noscript><div class="notice">{e(NO_SCRIPT)}</div></noscript>'
        f"{notice}"
        '<div id="progress" role="status" hidden><span class="text"></span>'
        '<progress max="100"></progress></div>'
        f"{TOOLBAR}"
        '<div id="workspace">'
        f'<main id="viewer" data-state="loading">{OVERLAYS}</main>'
        '<aside id="panel" aria-label="Slide details">'
        f"{_properties(view.properties)}{_associated(view.associated, view.associated_note)}"
        "</aside></div>"
        f"{DIALOGS}"
        '<script type="application/json" id="slide-config">'
        f"{script_json(view.config)}</script>"
        f"{scripts}"
    )
    return page(f"{title} · wsistore", "view", body, "viewer.js")
