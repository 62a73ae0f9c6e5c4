"""The viewer's tools, driven in a real headless Chromium as a person would: search a slide by
name, open it, go to 20x (and check on the server side which DeepZoom level the tiles that
follow come from), measure with the ruler (real mouse events), share a link and reopen it.
The viewer on a phone-sized screen, with JavaScript off and for a slide that is still converting
is `tests/test_viewer_conditions.py`'s; both read the library of slides of `tests/helpers.py`.

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
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from server.app import create_app
from server.settings import ServerSettings

from .browser import AppThread, Chromium
from .viewer_pages import LOADED, SETTLED, Library, build_library, open_slide, settle
from .viewer_pages import viewer_library as _library_fixture  # noqa: F401
from .viewer_pages import viewer_server as _server_fixture  # noqa: F401

pytestmark = pytest.mark.slow

TOKEN = "viewer-tools-token"
KEY = "viewer-tools-signing-key-0123456789"
CMU_MPP = 0.499
SCREENSHOT_LIMIT = 300 * 1024


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


SHOWN = """(() => { const v = window.wsiViewer, item = v.world.getItemAt(0);
    const view = v.viewport.getBounds(true), slide = item.getBounds(true);
    const w = Math.min(view.x + view.width, slide.x + slide.width) - Math.max(view.x, slide.x);
    return w / slide.width; })()"""
"""The fraction of the slide's width in view."""


def test_keyboard_stays_within_the_slide(server: AppThread, library: Library) -> None:
    """Held + never zooms past the deepest the mouse reaches (2 screen pixels per level-0 pixel,
    OpenSeadragon's maxZoomPixelRatio), held - never below its minimum, and held arrows never
    carry the slide off the screen: keys follow the constraints the mouse does. So does the
    view a link's fragment names."""
    slide_id = library.ids["CMU-1-Small-Region"]  # 20x: the deepest is 40x

    async def scenario() -> dict[str, Any]:
        async with Chromium(1024, 768) as browser:
            await open_slide(browser, f"{server.url}/view/{slide_id}")
            limits = await browser.evaluate(
                """(() => { const v = window.wsiViewer.viewport, i = window.wsiViewer.world
                    .getItemAt(0); return {max: i.viewportToImageZoom(v.getMaxZoom()),
                    min: i.viewportToImageZoom(v.getMinZoom())}; })()"""
            )
            for _ in range(12):
                await browser.press("+")
            deepest = await settle(browser)
            for _ in range(20):
                await browser.press("-")
            widest = await settle(browser)
            await browser.press("h")
            await settle(browser)
            for _ in range(30):
                await browser.press("ArrowRight")
            await settle(browser)
            shown = await browser.evaluate(SHOWN)
            facts = {"limits": limits, "deepest": deepest, "widest": widest, "shown": shown}
            for view in ("x=99999999&y=5&mag=100000", "x=1110&y=1400&mag=0.0001"):
                await browser.goto("about:blank")  # else only the fragment changes: no load
                await browser.goto(f"{server.url}/view/{slide_id}#{view}")
                state = await browser.wait_for(LOADED)
                facts[view] = {"state": state, "view": await settle(browser)}
            return facts

    facts = asyncio.run(scenario())
    assert facts["limits"]["max"] == pytest.approx(2.0, rel=1e-3)
    # A link's view is held to the same zooms, centred on the slide (one beyond them opened
    # on blank screen, and never finished loading).
    for view, zoom in (("x=99999999&y=5&mag=100000", 2.0), ("x=1110&y=1400&mag=0.0001", None)):
        shown = facts[view]["view"]
        assert facts[view]["state"] == "loaded", facts[view]
        assert shown["zoom"] == pytest.approx(zoom or facts["limits"]["min"], rel=1e-3), shown
        assert 0 <= shown["x"] <= 2220 and 0 <= shown["y"] <= 2967, shown
        assert (round(shown["x"]), round(shown["y"])) == ((2220, 5) if zoom else (1110, 1400))
    assert facts["deepest"]["zoom"] == pytest.approx(2.0, rel=1e-3), facts
    assert facts["deepest"]["magnification"] == "40x"
    assert facts["widest"]["zoom"] == pytest.approx(facts["limits"]["min"], rel=1e-3), facts
    # visibilityRatio 0.5: at least half the slide's width stays in view.
    assert facts["shown"] >= 0.5 - 1e-6, facts


def test_shortcuts_work_after_the_link_box(server: AppThread, library: Library) -> None:
    """`l` selects the link in its read-only field (the focus goes there); Esc still closes
    the box and the shortcuts still move the slide, as the help list says. The search box of
    the list, a field people type in, keeps its keys (`test_search_open_and_zoom_to_20x`)."""
    slide_id = library.ids["CMU-1-Small-Region"]

    async def scenario() -> dict[str, Any]:
        async with Chromium(1024, 768) as browser:
            await open_slide(browser, f"{server.url}/view/{slide_id}")
            await browser.press("l")
            await browser.wait_for("document.getElementById('link-output').value")
            facts: dict[str, Any] = {
                "focus": await browser.evaluate("document.activeElement.id"),
            }
            await browser.press("Escape")
            facts["box_hidden"] = await browser.evaluate(
                "document.getElementById('link-box').hidden"
            )
            await browser.press("l")
            await browser.wait_for("!document.getElementById('link-box').hidden")
            await browser.press("3")  # 10x, from the link's field
            facts["state"] = await settle(browser)
            return facts

    facts = asyncio.run(scenario())
    assert facts["focus"] == "link-output"  # where the browser puts it: the link is selected
    assert facts["box_hidden"], facts
    assert facts["state"]["magnification"] == "10x", facts


def test_link_opened_in_the_same_tab_moves_the_view(server: AppThread, library: Library) -> None:
    """A link to the slide a tab already shows (a colleague's, pasted into its address bar)
    differs only in its fragment, which the browser follows without loading the page: the view
    goes where the link says all the same."""
    slide_id = library.ids["CMU-1-Small-Region"]

    async def scenario() -> dict[str, Any]:
        async with Chromium(1024, 768) as browser:
            await open_slide(browser, f"{server.url}/view/{slide_id}")
            await browser.goto(f"{server.url}/view/{slide_id}#x=500&y=2400&mag=10&rot=90")
            await browser.wait_for("document.getElementById('magnification').textContent === '10x'")
            return await settle(browser)

    state = asyncio.run(scenario())
    assert state["magnification"] == "10x" and state["rotation"] == 90, state
    assert state["x"] == pytest.approx(500, abs=2) and state["y"] == pytest.approx(2400, abs=2)


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
