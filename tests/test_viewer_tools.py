"""The viewer's tools, driven in a real headless Chromium as a person would: search a slide by
name, open it, go to 20x (and check on the server side which DeepZoom level the tiles that
follow come from), measure with the ruler (real mouse events), share a link and reopen it,
a phone-sized screen, JavaScript off, and a slide that is still converting.

Expected values come from outside the viewer's code: the slide's MPP as the converter read it,
the screen distances the test drags over, OpenSeadragon's own coordinate transforms, and the
DeepZoom geometry (level = ceil(log2(longest side)) for 1:1).

`python -m tests.test_viewer_tools DIR` writes the README's screenshots (viewer.png,
slides.png) into DIR.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import wsi
from server.app import create_app
from server.settings import ServerSettings
from wsi.ingest.queue.sqlite import SQLiteJobQueue
from wsi.ingest.settings import IngestSettings

from .browser import AppThread, Chromium
from .conftest import sample

pytestmark = pytest.mark.slow

TOKEN = "viewer-tools-token"
KEY = "viewer-tools-signing-key"
CMU_MPP = 0.499
FORTY_X_MPP = 0.25
SCREENSHOT_LIMIT = 300 * 1024


def forty_x_tiff(path: Path, scale: float, flip: bool = False) -> Path:
    """A pyramidal JPEG TIFF at 0.25 µm/px (40x by the usual convention) made of
    CMU-1-Small-Region's tissue, resized by `scale` (and mirrored): a slide that looks like one,
    with content (so a content id) of its own."""
    import pyvips

    image = pyvips.Image.new_from_file(str(sample("CMU-1-Small-Region.svs"))).copy()
    image.remove("image-description")  # Aperio's, with its MPP and magnification
    image = image.resize(scale) if scale != 1 else image
    image = image.fliphor() if flip else image
    resolution = 1000 / FORTY_X_MPP  # pixels per millimetre
    image.tiffsave(
        str(path),
        tile=True,
        pyramid=True,
        compression="jpeg",
        Q=85,
        tile_width=256,
        tile_height=256,
        xres=resolution,
        yres=resolution,
        resunit="cm",
    )
    return path


@dataclass(frozen=True)
class Library:
    """A store of three slides: CMU-1-Small-Region (no case, 20x, 0.499 µm/px, label and
    macro), and two 40x slides (4440 x 5934 and 1110 x 1484 px) of case S24-0815, named by
    their sidecars."""

    store: Path
    ids: dict[str, str]
    """Display name -> slide id."""


def build_library(folder: Path) -> Library:
    sources = folder / "sources"
    sources.mkdir()
    store = wsi.Store(wsi.StoreSettings(str(folder / "store")))
    cmu = sources / "CMU-1-Small-Region.svs"
    shutil.copyfile(sample("CMU-1-Small-Region.svs"), cmu)
    paths = [cmu]
    for block, scale, flip in (("A1", 2.0, False), ("B1", 0.5, True)):
        path = forty_x_tiff(sources / f"block-{block.lower()}.tif", scale, flip)
        sidecar = {"accession_number": "S24-0815", "container_id": f"S24-0815-{block}"}
        path.with_name(path.name + ".json").write_text(json.dumps(sidecar))
        paths.append(path)
    ids = {}
    for path in paths:
        result = wsi.convert_slide(path, store)
        ids[path.name] = result.slide_id
    return Library(
        folder / "store",
        {
            "CMU-1-Small-Region": ids["CMU-1-Small-Region.svs"],
            "S24-0815-A1": ids["block-a1.tif"],
            "S24-0815-B1": ids["block-b1.tif"],
        },
    )


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Library:
    return build_library(tmp_path_factory.mktemp("viewer-tools"))


@pytest.fixture(scope="module")
def server(library: Library) -> Iterator[AppThread]:
    with AppThread(create_app(ServerSettings(store=str(library.store)))) as running:
        yield running


LOADED = (
    "(() => { const v = document.getElementById('viewer');"
    " return ['loaded', 'error'].includes(v.dataset.state) && v.dataset.state; })()"
)
"""Truthy once the slide is drawn (or failed): its value says which."""

SETTLED = (
    "(() => { const v = window.wsiViewer; if (!v || !v.world.getItemAt(0)) return false;"
    " const p = v.viewport, still = [p.zoomSpring, p.centerSpringX, p.centerSpringY,"
    " p.degreesSpring].every(s => !s || s.isAtTargetValue());"
    " return still && v.world.getItemAt(0).getFullyLoaded(); })()"
)
"""Truthy once no animation runs and every tile in view is drawn."""

VIEW_STATE = """(() => {
    const v = window.wsiViewer, item = v.world.getItemAt(0);
    const c = item.viewportToImageCoordinates(v.viewport.getCenter(true));
    return {x: c.x, y: c.y, zoom: item.viewportToImageZoom(v.viewport.getZoom(true)),
            rotation: v.viewport.getRotation(),
            magnification: document.getElementById('magnification').textContent};
})()"""
"""Where the viewer is, read through OpenSeadragon (level-0 pixels, screen px per level-0 px)."""


async def open_slide(browser: Chromium, url: str) -> None:
    await browser.goto(url)
    state = await browser.wait_for(LOADED)
    assert state == "loaded", browser.console
    await browser.wait_for(SETTLED)


async def settle(browser: Chromium) -> dict[str, Any]:
    await browser.wait_for(SETTLED)
    state: dict[str, Any] = await browser.evaluate(VIEW_STATE)
    return state


def tile_levels(
    requests: list[tuple[str, str, int]], slide_id: str
) -> dict[int, set[tuple[int, int]]]:
    """DeepZoom level -> (col, row) of the tiles of `slide_id` the server answered with 200."""
    found: dict[int, set[tuple[int, int]]] = {}
    pattern = re.compile(rf"/slides/{slide_id}_files/(\d+)/(\d+)_(\d+)\.jpeg")
    for _, path, status in requests:
        match = pattern.fullmatch(path)
        if match and status == 200:
            z, col, row = (int(g) for g in match.groups())
            found.setdefault(z, set()).add((col, row))
    return found


def test_search_open_and_zoom_to_20x(server: AppThread, library: Library) -> None:
    slide_id = library.ids["S24-0815-A1"]
    width, height = 4440, 5934
    top = math.ceil(math.log2(height))  # DeepZoom level of 1:1 (40x): 13

    async def scenario() -> tuple[list[str], dict[str, Any], dict[str, Any], int]:
        async with Chromium(1280, 800) as browser:
            await browser.goto(server.url + "/")
            await browser.wait_for("document.body.dataset.shown === '3'")
            groups = await browser.evaluate(
                "Array.from(document.querySelectorAll('section.case h2'), h => h.textContent)"
            )
            assert groups == ["S24-0815 2 slides", "No case 1 slide"], groups
            await browser.click("form.search input")
            await browser.type_text("0815-a")
            await browser.wait_for("document.body.dataset.shown === '1'")
            visible = await browser.evaluate(
                "Array.from(document.querySelectorAll('li[data-search]:not([hidden]) .name'),"
                " n => n.textContent)"
            )
            assert visible == ["S24-0815-A1"]
            await browser.click("li[data-search]:not([hidden]) a")
            await browser.wait_for(f"location.pathname === '/view/{slide_id}'")
            state = await browser.wait_for(LOADED)
            assert state == "loaded", browser.console
            await settle(browser)
            buttons = await browser.evaluate(
                "Object.fromEntries(Array.from(document.querySelectorAll('[data-mag]'),"
                " b => [b.dataset.mag, b.disabled]))"
            )
            before = len(server.requests)
            await browser.click("button[data-mag='20']")
            await browser.wait_for("document.getElementById('magnification').textContent === '20x'")
            at_20x = await settle(browser)
            bounds = await browser.evaluate(
                """(() => { const v = window.wsiViewer, item = v.world.getItemAt(0);
                    const r = item.viewportToImageRectangle(v.viewport.getBounds(true));
                    return [r.x, r.y, r.width, r.height]; })()"""
            )
            return buttons, at_20x, {"bounds": bounds}, before

    buttons, at_20x, extra, before = asyncio.run(scenario())
    # A 40x slide: every button is usable; 20x is half a screen pixel per level-0 pixel.
    assert buttons == {
        "1": False,
        "5": False,
        "10": False,
        "20": False,
        "40": False,
        "native": False,
    }
    assert at_20x["zoom"] == pytest.approx(0.5, rel=1e-3)
    levels = tile_levels(server.requests[before:], slide_id)
    # The tiles that follow are those of the level one below 1:1, and they cover the view.
    assert max(levels) == top - 1, sorted(levels)
    x, y, w, h = extra["bounds"]
    tile = 256 * 2  # level-0 pixels per tile of that level
    wanted = {
        (col, row)
        for col in range(max(0, int(x // tile)), math.ceil(min(width, x + w) / tile))
        for row in range(max(0, int(y // tile)), math.ceil(min(height, y + h) / tile))
    }
    assert wanted <= levels[top - 1], (sorted(wanted), sorted(levels[top - 1]))


def test_ruler_measures_micrometres(server: AppThread, library: Library) -> None:
    """A line dragged over the slide measures MPP x its length in level-0 pixels (within 1%),
    at 1:1 and at 10x rotated by 90°; it is drawn where it was dragged, and zooming afterwards
    keeps the measurement and the line on the same tissue."""
    slide_id = library.ids["CMU-1-Small-Region"]
    measured = """(() => { const l = document.getElementById('ruler-label');
        const line = document.querySelector('#ruler-layer line:not(.halo)');
        const n = (a) => Number(line.getAttribute(a));
        return {text: l.textContent, hidden: l.hidden, microns: Number(l.dataset.microns),
                line: [n('x1'), n('y1'), n('x2'), n('y2')]}; })()"""

    async def scenario() -> dict[str, Any]:
        facts: dict[str, Any] = {}
        async with Chromium(1024, 768) as browser:
            await open_slide(browser, f"{server.url}/view/{slide_id}")
            box = await browser.evaluate(
                "(() => { const r = document.getElementById('viewer').getBoundingClientRect();"
                " return [r.left, r.top, r.width, r.height]; })()"
            )
            cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
            facts["origin"] = (box[0], box[1])

            await browser.click("button[data-mag='native']")
            facts["native_state"] = await settle(browser)
            await browser.click("#ruler-button")
            facts["native_drag"] = ((cx - 200, cy - 50), (cx + 200, cy - 50))
            await browser.drag(*facts["native_drag"])
            facts["native"] = await browser.evaluate(measured)

            await browser.press("Escape")  # clears the line and leaves the ruler
            facts["cleared"] = await browser.evaluate(measured)
            await browser.press("r")
            await browser.press("3")  # 10x
            facts["rotated_state"] = await settle(browser)
            await browser.press("m")
            facts["rotated_drag"] = ((cx - 150, cy - 100), (cx + 150, cy + 100))
            await browser.drag(*facts["rotated_drag"])
            facts["rotated"] = await browser.evaluate(measured)

            await browser.press("+")
            facts["zoomed_state"] = await settle(browser)
            facts["zoomed"] = await browser.evaluate(measured)
            facts["console"] = browser.console
        return facts

    facts = asyncio.run(scenario())
    assert not [m for m in facts["console"] if "exception" in m], facts["console"]
    left, top = facts["origin"]

    def on_screen(drag: tuple[tuple[float, float], tuple[float, float]]) -> list[float]:
        (x1, y1), (x2, y2) = drag
        return [x1 - left, y1 - top, x2 - left, y2 - top]

    state, label = facts["native_state"], facts["native"]
    assert state["zoom"] == pytest.approx(1.0, rel=1e-3) and state["rotation"] == 0
    assert label["microns"] == pytest.approx(CMU_MPP * 400 / state["zoom"], rel=0.01)
    assert label["text"].endswith(" µm") and not label["hidden"], label
    assert float(label["text"].split()[0]) == pytest.approx(label["microns"], rel=1e-3)
    assert label["line"] == pytest.approx(on_screen(facts["native_drag"]), abs=1.5)
    assert facts["cleared"]["hidden"]

    state, label = facts["rotated_state"], facts["rotated"]
    assert state["rotation"] == 90 and state["magnification"] == "10x"
    assert state["zoom"] == pytest.approx(0.5, rel=1e-3)
    pixels = math.hypot(300, 200) / state["zoom"]  # level-0 pixels under the drag
    assert label["microns"] == pytest.approx(CMU_MPP * pixels, rel=0.01)
    assert label["line"] == pytest.approx(on_screen(facts["rotated_drag"]), abs=1.5)

    # Zoomed in by 1.5 about the centre: same length, a line 1.5 times as long on screen.
    state, label = facts["zoomed_state"], facts["zoomed"]
    assert state["zoom"] == pytest.approx(0.75, rel=1e-3)
    assert label["microns"] == pytest.approx(facts["rotated"]["microns"], rel=1e-6)
    x1, y1, x2, y2 = label["line"]
    rx1, ry1, rx2, ry2 = facts["rotated"]["line"]
    assert math.hypot(x2 - x1, y2 - y1) == pytest.approx(
        1.5 * math.hypot(rx2 - rx1, ry2 - ry1), rel=1e-3
    )


def test_link_reopens_the_same_view(library: Library) -> None:
    """With auth on, a shared `view` link (no token) opens the slide; its "Link" gives the
    signed view URL with the viewport in the fragment, and opening that in a fresh page shows
    the same centre, magnification and rotation."""
    slide_id = library.ids["S24-0815-A1"]
    settings = ServerSettings(
        store=str(library.store), host="0.0.0.0", tokens=(TOKEN,), signing_key=KEY
    )

    async def scenario(url: str) -> tuple[dict[str, Any], str, dict[str, Any], str]:
        async with Chromium(1024, 768) as browser:
            page = await browser.evaluate("1")  # the browser answers
            assert page == 1
            # The page a token holder gets carries the signed link (read without a browser).
            await open_slide(browser, url)
            await browser.press("3")  # 10x
            await browser.press("r")
            await browser.press("ArrowRight")
            await browser.press("ArrowUp")
            before = await settle(browser)
            await browser.click("#link-button")
            link = await browser.wait_for("document.getElementById('link-output').value")
            # The status is written once the clipboard has answered (asynchronously).
            status = await browser.wait_for("document.getElementById('link-status').textContent")
        async with Chromium(1024, 768) as fresh:
            await open_slide(fresh, link)
            after = await settle(fresh)
        return before, link, after, status

    with AppThread(create_app(settings)) as running:
        import urllib.request

        request = urllib.request.Request(
            f"{running.url}/view/{slide_id}", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            page = response.read().decode()
        found = re.search(r'id="slide-config">(.*?)</script>', page)
        assert found, page
        config = json.loads(found.group(1))
        shared = running.url + config["viewUrl"]
        before, link, after, status = asyncio.run(scenario(shared))

    assert link.startswith(shared + "#"), link
    assert TOKEN not in link and "Bearer" not in link
    assert re.fullmatch(r"x=\d+&y=\d+&mag=[0-9.]+&rot=90", link.split("#", 1)[1]), link
    assert "until" in status  # the person sharing it is told when it expires
    assert before["rotation"] == after["rotation"] == 90
    assert before["magnification"] == after["magnification"] == "10x"
    assert after["zoom"] == pytest.approx(before["zoom"], rel=1e-3)
    assert after["x"] == pytest.approx(before["x"], abs=2)
    assert after["y"] == pytest.approx(before["y"], abs=2)
    # Not the home view: the test moved away from it.
    assert abs(before["x"] - 4440 / 2) > 50 or abs(before["y"] - 5934 / 2) > 50


def test_phone_sized_screen(server: AppThread, library: Library) -> None:
    """At 390 x 844 both pages fit the width (no horizontal scroll) and every tool is a
    button one can tap, on screen."""

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with Chromium(390, 844) as browser:
            await browser.emulate_phone(390, 844)
            await browser.goto(server.url + "/")
            await browser.wait_for("document.body.dataset.shown === '3'")
            listing = await browser.evaluate(
                "({scroll: document.documentElement.scrollWidth,"
                " cards: Array.from(document.querySelectorAll('.card'),"
                " c => c.getBoundingClientRect().right)})"
            )
            await open_slide(browser, f"{server.url}/view/{library.ids['S24-0815-A1']}")
            viewer = await browser.evaluate(
                """(() => {
                  const box = (el) => { const r = el.getBoundingClientRect();
                    return [r.left, r.top, r.right, r.bottom]; };
                  return {scroll: document.documentElement.scrollWidth,
                    buttons: Array.from(document.querySelectorAll('#toolbar button'), box),
                    viewer: box(document.getElementById('viewer')),
                    panelShown: document.body.classList.contains('panel-open')};
                })()"""
            )
            await browser.click("#panel-button")
            viewer["panel"] = await browser.evaluate(
                "(() => { const r = document.getElementById('panel').getBoundingClientRect();"
                " return [r.left, r.top, r.right, r.bottom]; })()"
            )
            return listing, viewer

    listing, viewer = asyncio.run(scenario())
    assert listing["scroll"] <= 390 and max(listing["cards"]) <= 390, listing
    assert viewer["scroll"] <= 390, viewer
    for left, top, right, bottom in viewer["buttons"]:
        assert left >= 0 and right <= 390 and bottom <= 844, viewer["buttons"]
        assert bottom - top >= 30 and right - left >= 30, viewer["buttons"]
    left, top, right, bottom = viewer["viewer"]
    assert right - left == 390 and bottom - top >= 500, viewer["viewer"]
    assert not viewer["panelShown"]  # closed on a phone until asked for
    left, top, right, bottom = viewer["panel"]
    assert left == 0 and right == 390 and bottom <= 844 and bottom - top > 100, viewer["panel"]


def test_without_javascript(server: AppThread, library: Library) -> None:
    """JavaScript off: the slide page says why it shows no slide (and still lists the
    properties); the list's search is a plain form the server answers."""

    async def scenario() -> tuple[str, bool, list[str], str]:
        async with Chromium(1024, 768) as browser:
            await browser.send("Emulation.setScriptExecutionDisabled", {"value": True})
            await browser.goto(f"{server.url}/view/{library.ids['S24-0815-A1']}")
            await browser.wait_for("document.readyState === 'complete'")
            text = await browser.evaluate("document.body.innerText")
            toolbar = await browser.evaluate(
                "document.getElementById('toolbar').getBoundingClientRect().height > 0"
            )
            await browser.goto(server.url + "/")
            await browser.wait_for("document.readyState === 'complete'")
            await browser.click("form.search input")
            await browser.type_text("s24")
            await browser.press("Enter")
            await browser.wait_for("location.search === '?q=s24'")
            await browser.wait_for("document.readyState === 'complete'")
            names = await browser.evaluate(
                "Array.from(document.querySelectorAll('.card .name'), n => n.textContent)"
            )
            count = await browser.evaluate("document.getElementById('count').textContent")
            return text, toolbar, names, count

    text, toolbar, names, count = asyncio.run(scenario())
    assert "This viewer needs JavaScript" in text, text
    assert "S24-0815-A1" in text and "0.25 × 0.25 µm/px" in text  # the properties panel
    assert not toolbar  # tools that could not work are not shown
    assert names == ["S24-0815-A1", "S24-0815-B1"]
    assert count.startswith("2 of 3 slides match")


def test_converting_slide_shows_progress_then_the_published_slide(tmp_path: Path) -> None:
    """A slide dropped into a watch folder is viewable at once from its file, with its job's
    progress (read through the API while the test plays the worker); when its conversion is
    published the page switches to the published pyramid, keeping the view."""
    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    source = forty_x_tiff(tmp_path / "incoming.tif", 0.75)
    ingest = IngestSettings(
        workers=0,
        poll_seconds=0.1,
        quiet_seconds=0.2,
        quarantine_dir=str(tmp_path / "quarantine"),
        done_dir=str(tmp_path / "done"),
    )
    settings = ServerSettings(store=str(store), watch=(str(inbox),), ingest=ingest)

    async def scenario(running: AppThread, queue: SQLiteJobQueue) -> dict[str, Any]:
        async with Chromium(1024, 768) as browser:
            shutil.copyfile(source, inbox / "S24-0999.tif")
            deadline = time.monotonic() + 30
            while not (jobs := queue.list("queued", 10)):
                assert time.monotonic() < deadline, "the watcher did not submit the slide"
                await asyncio.sleep(0.1)
            (job,) = jobs
            assert job.slide_id is not None
            url = f"{running.url}/view/{job.slide_id}"
            await open_slide(browser, url)
            facts: dict[str, Any] = {
                "queued": await browser.wait_for(
                    "!document.getElementById('progress').hidden &&"
                    " document.querySelector('#progress .text').textContent"
                )
            }
            facts["title"] = await browser.evaluate("document.getElementById('title').textContent")
            claimed = queue.claim("viewer-test", 60)
            assert claimed is not None and claimed.id == job.id
            assert queue.heartbeat(job.id, "viewer-test", 42.0)
            facts["running"] = await browser.wait_for(
                "document.querySelector('#progress progress').value === 42 &&"
                " document.querySelector('#progress .text').textContent"
            )
            await browser.press("5")  # 40x, somewhere to come back to
            before = await settle(browser)
            requests_before = len(running.requests)
            result = wsi.convert_slide(
                inbox / "S24-0999.tif", wsi.Store(wsi.StoreSettings(str(store)))
            )
            assert result.slide_id == job.slide_id
            assert queue.complete(job.id, "viewer-test", result.slide_id)
            await browser.wait_for(
                "JSON.parse(document.getElementById('slide-config').textContent).status"
                " === 'ready'",
                timeout_s=30,
            )
            state = await browser.wait_for(LOADED)
            assert state == "loaded", browser.console
            facts["after"] = await settle(browser)
            facts["before"] = before
            facts["progress_hidden"] = await browser.evaluate(
                "document.getElementById('progress').hidden"
            )
            facts["config"] = await browser.evaluate(
                "JSON.parse(document.getElementById('slide-config').textContent)"
            )
            facts["requests"] = running.requests[requests_before:]
            return facts

    with (
        AppThread(create_app(settings)) as running,
        SQLiteJobQueue(Path(ingest.jobs_path(str(store)))) as queue,
    ):
        facts = asyncio.run(scenario(running, queue))

    assert facts["title"] == "S24-0999"
    assert "queued" in facts["queued"], facts["queued"]
    assert facts["running"].startswith("Converting: 42%"), facts["running"]
    slide_id = facts["config"]["id"]
    # Polled through the JSON API, then reloaded onto the published version's tiles.
    polled = [p for _, p, s in facts["requests"] if p == f"/slides/{slide_id}" and s == 200]
    assert polled, facts["requests"]
    assert facts["config"]["status"] == "ready" and facts["progress_hidden"]
    assert not facts["config"]["query"].startswith("v=src")
    published = [p for _, p, s in facts["requests"] if "_files/" in p and s == 200]
    assert published, facts["requests"]
    for key in ("x", "y"):
        assert facts["after"][key] == pytest.approx(facts["before"][key], abs=2)
    assert facts["after"]["magnification"] == facts["before"]["magnification"] == "40x"


def save_png(image: Image.Image, path: Path) -> int:
    """`image` as a 256-colour PNG (a screenshot of a slide stays well under SCREENSHOT_LIMIT);
    its size in bytes."""
    small = image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)
    return path.stat().st_size


async def take_screenshots(url: str, ids: dict[str, str], out: Path) -> dict[str, Any]:
    """The README's two pictures: the slide list, and CMU-1-Small-Region at 5x with the
    navigator, a measurement and the properties panel. Returns what they show."""
    async with Chromium(1280, 800) as browser:
        await browser.goto(url + "/")
        await browser.wait_for("document.body.dataset.shown === '3'")
        await browser.wait_for("Array.from(document.images).every(i => i.complete)")
        shown: dict[str, Any] = {"slides": save_png(await browser.screenshot(), out / "slides.png")}
        await open_slide(browser, f"{url}/view/{ids['CMU-1-Small-Region']}#x=1050&y=1350&mag=5")
        await browser.press("m")
        box = await browser.evaluate(
            "(() => { const r = document.getElementById('viewer').getBoundingClientRect();"
            " return [r.left, r.top, r.width, r.height]; })()"
        )
        cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
        await browser.drag((cx - 190, cy + 120), (cx + 60, cy - 110))
        await browser.wait_for(SETTLED)
        await asyncio.sleep(0.5)  # the last tiles' fade-in
        shown["label"] = await browser.evaluate(
            "document.getElementById('ruler-label').textContent"
        )
        shown["panel"] = await browser.evaluate("document.body.classList.contains('panel-open')")
        shown["navigator"] = await browser.evaluate(
            "document.querySelector('.navigator').getBoundingClientRect().width > 50"
        )
        shown["viewer"] = save_png(await browser.screenshot(), out / "viewer.png")
    return shown


def test_screenshots_for_the_readme(library: Library, tmp_path: Path) -> None:
    """The pictures `python -m tests.test_viewer_tools docs` writes: both small enough to
    commit, the viewer's with its navigator, a measurement and the properties panel."""
    settings = ServerSettings(store=str(library.store), allow_label=True)
    with AppThread(create_app(settings)) as running:
        shown = asyncio.run(take_screenshots(running.url, library.ids, tmp_path))
    assert shown["slides"] < SCREENSHOT_LIMIT and shown["viewer"] < SCREENSHOT_LIMIT, shown
    assert shown["label"].endswith("µm") and shown["panel"] and shown["navigator"], shown
    with Image.open(tmp_path / "viewer.png") as image:
        assert image.size == (1280, 800)


def main(out: Path) -> None:
    """Write the README's screenshots into `out` (a fresh store of the test slides)."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wsi-screenshots-") as folder:
        library = build_library(Path(folder))
        settings = ServerSettings(store=str(library.store), allow_label=True)
        with AppThread(create_app(settings)) as running:
            shown = asyncio.run(take_screenshots(running.url, library.ids, out))
    for name in ("slides", "viewer"):
        print(f"{out / name}.png: {shown[name]} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs"))
