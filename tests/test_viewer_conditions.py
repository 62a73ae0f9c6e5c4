"""The viewer beyond a desktop browser and a published slide, driven in a real headless Chromium:
a phone-sized screen (no sideways scroll, every tool a button one can tap), JavaScript off (the
page says why and the list's search still answers), and a slide still converting (viewable from
its source with its job's progress, then switched to its published pyramid, keeping the view).
The tools themselves (search, zoom, ruler, links) are `tests/test_viewer_tools.py`'s; both read
the library of slides of `tests/helpers.py`.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import wsi
from server.app import create_app
from server.auth import signed_query
from server.settings import ServerSettings
from wsi.ingest.queue.sqlite import SQLiteJobQueue
from wsi.ingest.settings import IngestSettings

from .browser import AppThread, Chromium
from .viewer_pages import LOADED, Library, forty_x_tiff, open_slide, settle
from .viewer_pages import viewer_library as _library_fixture  # noqa: F401
from .viewer_pages import viewer_server as _server_fixture  # noqa: F401

pytestmark = pytest.mark.slow

TOKEN = "viewer-conditions-token"
KEY = "viewer-conditions-signing-key-0123456789"


def get_status(url: str) -> int:
    """The HTTP status of GET `url` (no credentials)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


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


NOTICE = (
    "(() => { const n = document.getElementById('notice');"
    " return !n.hidden && [document.getElementById('viewer').dataset.failure, n.textContent]; })()"
)
"""Truthy once the page shows a notice: [the cause it found, what it says]."""


def test_slide_deleted_or_republished_while_open(tmp_path: Path) -> None:
    """A page stays open while its slide changes in the store. Deleted: the tiles it asks for
    next answer 404 and the page says the slide is gone (not that a link expired: there is
    none). Converted again, here from a smaller scan under the same id: the old page's tile
    URLs name a level the new version lacks (errors), so the page reloads onto the new version
    at the same view. (Tile URLs that still fit the new geometry are answered with the new
    version's tiles: no error tells the page, which shows them where the old ones were.)"""
    store = wsi.Store(wsi.StoreSettings(str(tmp_path / "store")))
    kept = wsi.convert_slide(forty_x_tiff(tmp_path / "a.tif", 0.5), store, slide_id="s-kept")
    gone = wsi.convert_slide(forty_x_tiff(tmp_path / "b.tif", 0.5, flip=True), store).slide_id
    smaller = forty_x_tiff(tmp_path / "a-again.tif", 0.25)  # one DeepZoom level fewer
    config = "JSON.parse(document.getElementById('slide-config').textContent)"

    async def scenario(running: AppThread) -> dict[str, Any]:
        facts: dict[str, Any] = {}
        async with Chromium(1024, 768) as browser:
            await open_slide(browser, f"{running.url}/view/{gone}")
            shutil.rmtree(tmp_path / "store" / gone)
            await browser.press("n")  # 1:1: tiles the page has not asked for yet
            facts["deleted"] = await browser.wait_for(NOTICE)

            await open_slide(browser, f"{running.url}/view/{kept.slide_id}")
            facts["before"] = await browser.evaluate(config)
            # Other settings: the same ones would find the slide published and skip it.
            again = wsi.ConvertSettings(pyramid=wsi.PyramidSettings(quality=80))
            wsi.convert_slide(smaller, store, again, slide_id=kept.slide_id)
            await browser.press("n")
            facts["after"] = await browser.wait_for(f"{config}.width === 555 && {config}")
            assert await browser.wait_for(LOADED) == "loaded", browser.console
            facts["notice_hidden"] = await browser.evaluate(
                "document.getElementById('notice').hidden"
            )
        return facts

    with AppThread(create_app(ServerSettings(store=str(tmp_path / "store")))) as running:
        facts = asyncio.run(scenario(running))

    cause, text = facts["deleted"]
    assert cause == "deleted" and "no longer in the store" in text, facts["deleted"]
    assert "expired" not in text
    assert facts["before"]["width"] == 1110, facts["before"]
    assert facts["after"]["query"] != facts["before"]["query"]  # the new version's tiles
    assert facts["notice_hidden"]


def test_shared_link_expiring_while_open(library: Library) -> None:
    """A page opened through a shared link keeps that link's expiry; past it, its tiles answer
    401 and the page says the link expired and that a new one is needed (reloading the link is
    a 401 too), not to reload it."""
    slide_id = library.ids["S24-0815-B1"]
    settings = ServerSettings(
        store=str(library.store), host="0.0.0.0", tokens=(TOKEN,), signing_key=KEY
    )
    expires = int(time.time()) + 20

    async def scenario(url: str) -> tuple[Any, int]:
        async with Chromium(1024, 768) as browser:
            await open_slide(browser, url)
            await asyncio.sleep(max(0.0, expires + 1 - time.time()))
            await browser.press("n")  # tiles the page has not asked for yet
            return await browser.wait_for(NOTICE), get_status(url)

    with AppThread(create_app(settings)) as running:
        url = f"{running.url}/view/{slide_id}?{signed_query(settings, slide_id, 'view', expires)}"
        (cause, text), reloaded = asyncio.run(scenario(url))

    assert reloaded == 401  # what reloading the link would show
    assert cause == "expired" and "new link" in text and "will not help" in text, text
