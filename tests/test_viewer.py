"""The browser viewer: slide list, OpenSeadragon page, static files; one real headless Chromium
opens a slide and we check, on the server side, that it fetched DeepZoom tiles, and, on the
screenshot, that it drew them (with a scale bar that matches the slide's MPP)."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import wsi
from server.api import viewer as routes_viewer
from server.api import viewer_pages
from server.app import create_app
from server.catalog import SourceLevel, SourcePyramid
from server.listing import Listed
from server.settings import ServerSettings

from .browser import AppThread, Chromium
from .conftest import sample

TOKEN = "viewer-test-token"
KEY = "viewer-test-signing-key-0123456789"


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A store holding CMU-1-Small-Region (2220 x 2967 px, 0.499 µm/px, with a thumbnail)."""
    store = tmp_path_factory.mktemp("viewer-store")
    source = sample("CMU-1-Small-Region.svs")
    result = wsi.convert_slide(source, wsi.Store(wsi.StoreSettings(str(store))))
    return store, result.slide_id


@pytest.fixture(scope="module")
def server(published: tuple[Path, str]) -> Iterator[AppThread]:
    with AppThread(create_app(ServerSettings(store=str(published[0])))) as running:
        yield running


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def raw_get(port: int, path: str) -> tuple[int, bytes]:
    """GET with the path sent exactly as written (no client-side normalisation of `..`)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def slide_config(page: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="slide-config">(.*?)</script>', page)
    assert match, page
    config: dict[str, Any] = json.loads(match.group(1))
    return config


def test_index_lists_slides_with_thumbnails(server: AppThread, published: tuple[Path, str]) -> None:
    slide_id = published[1]
    status, headers, body = get(server.url + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    page = body.decode()
    assert f'href="/view/{slide_id}"' in page
    thumbnails = re.findall(r'<img src="([^"]+)"', page)
    # Versioned: a re-published slide gets new URLs, so these may be cached as immutable.
    assert re.fullmatch(rf"/slides/{slide_id}/associated/thumbnail\?v=[0-9a-f]{{8}}", thumbnails[0])
    assert len(thumbnails) == 1
    status, headers, body = get(server.url + thumbnails[0])
    assert status == 200 and headers["Content-Type"].startswith("image/")
    assert min(Image.open(io.BytesIO(body)).size) > 16
    assert "2220 × 2967 px · 0.499 µm/px" in page
    # People see the slide's name (its file's stem here), not its id, in a case group.
    assert '<span class="name">CMU-1-Small-Region</span>' in page
    assert f">{slide_id}<" not in page
    assert '<section class="case"><h2>No case ' in page

    # The fallback for slides without a thumbnail is a whole-slide DeepZoom tile that exists.
    bare = Listed(slide_id, "x", None, "ready", "v", 2220, 2967, (240, 240), b"{}", False, 0.0)
    status, headers, body = get(server.url + viewer_pages.thumbnail_url(bare, ""))
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(body)).size) == 186  # 2967 / 16, rounded up

    status, _, body = get(server.url + "/openapi.json")
    assert {"/", "/view/{slide_id}"} <= set(json.loads(body)["paths"])


def test_view_page_and_bad_ids(server: AppThread, published: tuple[Path, str]) -> None:
    slide_id = published[1]
    status, headers, body = get(f"{server.url}/view/{slide_id}")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    assert '<script src="/static/osd/openseadragon.min.js"></script>' in page
    config = slide_config(page)
    assert config["width"] == 2220 and config["height"] == 2967
    assert config["tilesUrl"] == f"/slides/{slide_id}_files/"
    assert re.fullmatch(r"v=[0-9a-f]{8}", config["query"])  # no signature when auth is off
    assert config["mppX"] == pytest.approx(0.499)
    assert config["magnification"] == 20.0  # the objective power the file states
    assert config["name"] == "CMU-1-Small-Region" and config["status"] == "ready"
    assert config["viewUrl"] == f"/view/{slide_id}" and config["linkExpires"] is None
    assert config["statusUrl"] == f"/slides/{slide_id}"
    assert '<h1 id="title">CMU-1-Small-Region</h1>' in page
    assert (
        "<dt>Scanner</dt><dd>Aperio</dd>" in page
        and "<dt>Scanned</dt><dd>2009-12-29 09:59</dd>" in page
    )
    assert "<dt>Levels</dt><dd>5 (downsample 1, 2, 4, 8, 16)</dd>" in page
    # Without --allow-label the panel says why, and the page links no label or macro.
    assert "started without --allow-label" in page and "/associated/" not in page
    assert "<noscript>" in page

    status, headers, body = get(f"{server.url}/view/0123456789abcdef01234567")
    assert status == 404 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == {"error": "no slide 0123456789abcdef01234567", "status": 404}
    status, headers, body = get(f"{server.url}/view/Not..A-Slide")
    assert status == 400 and json.loads(body)["status"] == 400


def test_static_files_and_no_traversal(server: AppThread) -> None:
    for path, kind in (
        ("/static/viewer.js", "javascript"),
        ("/static/viewer.css", "text/css"),
        ("/static/osd/openseadragon.min.js", "javascript"),
        ("/static/osd/images/home_rest.png", "image/png"),
    ):
        status, headers, _ = get(server.url + path)
        assert status == 200 and kind in headers["Content-Type"], path
    for path in (
        "/static/../routes_viewer.py",
        "/static/%2e%2e/routes_viewer.py",
        "/static/..%2froutes_viewer.py",
        "/static/osd/../../../../../package.json",
        "/static/osd/..%2f..%2f..%2f..%2f..%2fpackage.json",
        "/static/osd/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/package.json",
        "/static/",
        "/static/osd/",
    ):
        status, body = raw_get(server.port, path)
        assert status in (400, 403, 404), path
        assert json.loads(body)["status"] == status, path


def test_escapes_what_it_puts_in_html() -> None:
    level = SourceLevel(300, 200, 256, 256)
    evil = "</script><script>alert(1)</script>&\"'"
    props = wsi.SlideProperties(vendor="<b>vendor</b>", mpp_x=0.25, mpp_y=0.25)
    slide = SourcePyramid(evil, (level,), props, name=evil, case=evil)
    listed = Listed.of(slide, False, 0.0)

    def page_of(query: str) -> viewer_pages.ViewPage:
        config = routes_viewer.view_config(slide, query, query)
        rows = (("Name", evil), ("Vendor", "<b>vendor</b>"))
        return viewer_pages.ViewPage(config, rows, (("label", f"/x/{evil}"),), evil)

    for page in (
        viewer_pages.index_html([listed], {evil: ("exp=1&sig=<x>", "exp=1&sig=<x>")}, q=evil),
        viewer_pages.view_html(slide, page_of("exp=1&sig=<x>")),
        viewer_pages.error_page(evil, evil),
    ):
        assert "<script>alert" not in page and "<b>" not in page
        assert page.count("</script>") == page.count("<script")
    config = slide_config(viewer_pages.view_html(slide, page_of("")))
    assert config["id"] == evil and config["name"] == evil
    assert "No slides yet" in viewer_pages.index_html([], {})
    assert "No slide matches" in viewer_pages.index_html([], {}, q="x", total=3)
    # No thumbnail image: the DeepZoom tile that holds the whole slide (150 x 100 px) instead.
    quoted = "%3C%2Fscript%3E%3Cscript%3Ealert%281%29%3C%2Fscript%3E%26%22%27"
    assert viewer_pages.thumbnail_url(listed, "") == f"/slides/{quoted}_files/8/0_0.jpeg"


def test_missing_openseadragon_is_explained(
    monkeypatch: pytest.MonkeyPatch, published: tuple[Path, str], tmp_path: Path
) -> None:
    monkeypatch.setattr(routes_viewer, "OSD_DIR", tmp_path / "no-node-modules")
    with AppThread(create_app(ServerSettings(store=str(published[0])))) as running:
        status, headers, body = get(running.url + "/static/osd/openseadragon.min.js")
        assert status == 404 and headers["Content-Type"].startswith("application/json")
        assert "npm ci" in json.loads(body)["error"]
        status, _, body = get(f"{running.url}/view/{published[1]}")
        page = body.decode()
        assert status == 200 and "npm ci" in page and 'src="/static/osd/' not in page
        status, _, _ = get(running.url + "/static/viewer.js")
        assert status == 200


def test_signed_tile_urls_when_auth_is_on(published: tuple[Path, str]) -> None:
    settings = ServerSettings(
        store=str(published[0]), host="0.0.0.0", tokens=(TOKEN,), signing_key=KEY
    )
    slide_id = published[1]
    with AppThread(create_app(settings)) as running:
        assert get(f"{running.url}/view/{slide_id}")[0] == 401
        assert get(running.url + "/static/viewer.js")[0] == 200
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        status, _, body = get(f"{running.url}/view/{slide_id}", bearer)
        assert status == 200
        config = slide_config(body.decode())
        assert re.fullmatch(r"v=[0-9a-f]{8}&exp=\d+&sig=[0-9a-f]{32}", config["query"])
        tile = f"{running.url}{config['tilesUrl']}{config['maxLevel']}/0_0.jpeg"
        assert get(tile)[0] == 401
        assert get(f"{tile}?{config['query']}")[0] == 200
        # The index (opened with a token) links to signed views and thumbnails.
        page = get(running.url + "/", bearer)[2].decode()
        links = re.findall(r'href="(/view/[^"]+)"', page) + re.findall(
            r'src="(/slides/[^"]+)"', page
        )
        assert len(links) == 2
        for link in links:
            assert get(running.url + link.replace("&amp;", "&"))[0] == 200, link

        # The link a token holder shares is the signed view route: no token in it, and it
        # opens the page without one, until it expires.
        view_url = config["viewUrl"]
        assert re.fullmatch(rf"/view/{slide_id}\?exp=(\d+)&sig=[0-9a-f]{{32}}", view_url)
        assert int(view_url.split("exp=")[1].split("&")[0]) == config["linkExpires"]
        assert TOKEN not in body.decode() and config["statusUrl"] == f"/slides/{slide_id}"
        assert "<dt>Name</dt><dd>CMU-1-Small-Region</dd>" in body.decode()
        status, _, shared = get(running.url + view_url)
        assert status == 200
        shared_page = shared.decode()
        shared_config = slide_config(shared_page)
        # A shared link shows pixels and scale, never what only a token may read.
        assert "CMU-1-Small-Region" not in shared_page and "aperio" not in shared_page.lower()
        assert "<dt>Vendor</dt>" not in shared_page and "<dt>Scanned</dt>" not in shared_page
        assert "a shared link never shows the label" in shared_page
        assert 'href="/"' not in shared_page  # the list needs a token: no link to a 401
        assert shared_config["name"] == f"Shared slide {slide_id[:8]}"
        # It polls itself (it cannot read the JSON API), and never outlives the link it came by.
        assert shared_config["statusUrl"] == shared_config["viewUrl"] == view_url
        assert shared_config["linkExpires"] == config["linkExpires"]
        assert f"exp={config['linkExpires']}&" in shared_config["query"]
        assert get(f"{running.url}/slides/{slide_id}")[0] == 401
        expired = re.sub(r"exp=\d+", "exp=1000000000", view_url)
        assert get(running.url + expired)[0] == 401


def test_label_panel_only_when_served(published: tuple[Path, str]) -> None:
    """With --allow-label a token holder's page shows the label and the macro, and those URLs
    answer; a shared link's page still withholds them (signatures never open them)."""
    settings = ServerSettings(
        store=str(published[0]),
        host="0.0.0.0",
        tokens=(TOKEN,),
        signing_key=KEY,
        allow_label=True,
    )
    slide_id = published[1]
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with AppThread(create_app(settings)) as running:
        page = get(f"{running.url}/view/{slide_id}", bearer)[2].decode()
        images = re.findall(r'<img src="([^"]+)" alt="(Label|Macro) of the slide">', page)
        assert [name for _, name in images] == ["Label", "Macro"]
        for url, _ in images:
            status, headers, data = get(running.url + url, bearer)
            assert status == 200 and headers["Cache-Control"] == "no-store"
            assert min(Image.open(io.BytesIO(data)).size) > 16
        shared = get(running.url + slide_config(page)["viewUrl"])[2].decode()
        assert "/associated/" not in shared and "a shared link never shows" in shared


def test_store_unavailable_is_a_page(tmp_path: Path) -> None:
    """A store that cannot be reached gives people a page that says so (503), not a blank one
    or a JSON body."""
    settings = ServerSettings(store="s3://unreachable/slides", s3_endpoint="http://127.0.0.1:1")
    with AppThread(create_app(settings)) as running:
        for path in ("/", "/view/0123456789abcdef01234567"):
            status, headers, body = get(running.url + path)
            assert status == 503 and headers["Content-Type"].startswith("text/html"), path
            assert "cannot be reached" in body.decode(), path
            assert "script-src 'self'" in headers["Content-Security-Policy"]


def non_white_stats(image: Image.Image) -> tuple[float, float]:
    """(fraction of pixels that are not near-white, standard deviation of the pixel values)."""
    pixels = np.asarray(image, dtype=np.float64)
    return float((pixels.min(axis=2) < 220).mean()), float(pixels.std())


@pytest.mark.slow
def test_chromium_draws_the_slide(
    server: AppThread, published: tuple[Path, str], tmp_path: Path
) -> None:
    slide_id = published[1]
    before = len(server.requests)

    async def scenario() -> tuple[Image.Image, dict[str, Any], list[str]]:
        async with Chromium(1024, 768) as browser:
            await browser.goto(f"{server.url}/view/{slide_id}")
            state = await browser.wait_for(
                "['loaded', 'error'].includes(document.getElementById('viewer').dataset.state)"
                " && document.getElementById('viewer').dataset.state"
            )
            assert state == "loaded", browser.console
            await asyncio.sleep(0.5)  # let the last tiles' fade-in finish
            facts = await browser.evaluate(
                """(() => {
                    const r = document.getElementById('viewer').getBoundingClientRect();
                    const bar = document.querySelector('#scalebar .bar').getBoundingClientRect();
                    return {left: r.left, top: r.top, width: r.width, height: r.height,
                            bar: bar.width,
                            label: document.querySelector('#scalebar .label').textContent,
                            notice: document.getElementById('notice').hidden};
                })()"""
            )
            return await browser.screenshot(), facts, browser.console

    image, facts, console = asyncio.run(scenario())
    image.save(tmp_path / "viewer.png")
    assert not [m for m in console if "error" in m.lower()], console
    assert facts["notice"], "the page shows an error notice"

    answered = server.requests[before:]
    tiles = [(path, status) for _, path, status in answered if f"/slides/{slide_id}_files/" in path]
    assert len(tiles) >= 4, answered
    assert all(status == 200 for _, status in tiles), tiles
    assert all(status in (200, 304) for _, _, status in answered), answered

    # The home view fits the whole slide: check the scale bar against the slide's MPP.
    zoom = min(facts["width"] / 2220, facts["height"] / 2967)  # screen px per slide px
    value, unit = facts["label"].split()
    microns = float(value) * {"µm": 1.0, "mm": 1000.0}[unit]
    assert microns / facts["bar"] == pytest.approx(0.499 / zoom, rel=0.03), facts
    assert 16 <= facts["bar"] <= 160

    box = (
        int(facts["left"]),
        int(facts["top"]),
        int(facts["left"] + facts["width"]),
        int(facts["top"] + facts["height"]),
    )
    coloured, spread = non_white_stats(image.crop(box))
    assert coloured > 0.15 and spread > 20, (coloured, spread, tmp_path / "viewer.png")
