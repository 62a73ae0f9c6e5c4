"""The viewer's library of slides, its server and its page states, for the browser tests
(tests/test_viewer_tools.py, tests/test_viewer_conditions.py); the fixtures are imported by the
modules that use them, as in `tests/published_fixtures.py`."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import wsi
from server.app import create_app
from server.settings import ServerSettings

from .browser import AppThread, Chromium
from .conftest import sample

FORTY_X_MPP = 0.25

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


@pytest.fixture(scope="module", name="library")
def viewer_library(tmp_path_factory: pytest.TempPathFactory) -> Library:
    return build_library(tmp_path_factory.mktemp("viewer-tools"))


@pytest.fixture(scope="module", name="server")
def viewer_server(library: Library) -> Iterator[AppThread]:
    with AppThread(create_app(ServerSettings(store=str(library.store)))) as running:
        yield running


async def open_slide(browser: Chromium, url: str) -> None:
    await browser.goto(url)
    state = await browser.wait_for(LOADED)
    assert state == "loaded", browser.console
    await browser.wait_for(SETTLED)


async def settle(browser: Chromium) -> dict[str, Any]:
    await browser.wait_for(SETTLED)
    state: dict[str, Any] = await browser.evaluate(VIEW_STATE)
    return state
