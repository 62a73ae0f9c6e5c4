"""Associated images that may show patient names (labels, macros, and thumbnails of the whole
glass) are served only where labels are: one rule for the library, the slide list, the slide's
details, its associated image URLs, DICOMweb and the viewer's cards."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

import wsi
from server.app import create_app
from server.settings import ServerSettings
from wsi.published.layout import AssociatedEntry
from wsi.published.values import ReaderSettings

from .conftest import sample
from .helpers import dicom_series


def run(settings: ServerSettings, check: Callable[[TestClient], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with TestClient(TestServer(create_app(settings))) as client:
            return await check(client)

    return asyncio.run(main())


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """label_in_thumbnail YES / NO -> (store, slide id), converted without de-identification."""
    out = {}
    for shown in ("YES", "NO"):
        root = tmp_path_factory.mktemp(f"thumb-{shown}")
        series = dicom_series(root / "series", shown)
        store = root / "store"
        result = wsi.convert_slide(series, wsi.Store(wsi.StoreSettings(str(store))))
        out[shown] = (store, result.slide_id)
    return out


def test_a_thumbnail_of_the_label_is_read_only_where_labels_are(
    stores: dict[str, tuple[Path, str]],
) -> None:
    store, sid = stores["YES"]

    def read(allowed: set[str]) -> bytes:
        reading = ReaderSettings(allow_associated=frozenset(allowed))
        with wsi.open_published(str(store / sid), settings=reading) as slide:
            assert slide.associated["thumbnail"].shows_label
            return slide.associated_bytes("thumbnail")

    with pytest.raises(wsi.AssociatedImageRefused, match="label"):
        read({"thumbnail"})
    assert read({"thumbnail", "label"})[:2] == b"\xff\xd8"
    clean_store, clean_sid = stores["NO"]
    reading = ReaderSettings(allow_associated=frozenset({"thumbnail"}))
    with wsi.open_published(str(clean_store / clean_sid), settings=reading) as slide:
        assert slide.associated_bytes("thumbnail")[:2] == b"\xff\xd8"
        assert slide.associated["thumbnail"].shows_label is False


def test_older_attributes_without_the_flag_read_as_showing_the_label() -> None:
    doc = {"name": "thumbnail", "path": "associated/thumbnail", "width": 8, "height": 8}
    assert AssociatedEntry.from_json(doc).shows_label is True
    assert AssociatedEntry.from_json({**doc, "shows_label": False}).shows_label is False
    with pytest.raises(wsi.CorruptSlide):
        AssociatedEntry.from_json({**doc, "shows_label": "no"})


def test_the_service_withholds_a_thumbnail_of_the_label(
    stores: dict[str, tuple[Path, str]],
) -> None:
    store, sid = stores["YES"]

    async def without_labels(c: TestClient) -> None:
        listed = (await (await c.get("/slides")).json())["slides"]
        assert [s["associated_images"] for s in listed] == [[]]
        assert (await (await c.get(f"/slides/{sid}")).json())["associated_images"] == []
        assert (await c.get(f"/slides/{sid}/associated/thumbnail")).status == 403
        instances = await (await c.get("/dicomweb/instances?includefield=all")).json()
        types = [doc["00080008"]["Value"] for doc in instances]
        assert types and all("THUMBNAIL" not in t for t in types)
        page = await (await c.get("/")).text()
        assert "associated/thumbnail" not in page

    run(ServerSettings(store=str(store)), without_labels)

    async def with_labels(c: TestClient) -> None:
        assert (await (await c.get(f"/slides/{sid}")).json())["associated_images"] == ["thumbnail"]
        r = await c.get(f"/slides/{sid}/associated/thumbnail")
        assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
        instances = await (await c.get("/dicomweb/instances?includefield=all")).json()
        thumbs = [d for d in instances if "THUMBNAIL" in d["00080008"]["Value"]]
        assert len(thumbs) == 1
        meta = await (
            await c.get(
                f"/dicomweb/studies/{thumbs[0]['0020000D']['Value'][0]}/series/"
                f"{thumbs[0]['0020000E']['Value'][0]}/instances/"
                f"{thumbs[0]['00080018']['Value'][0]}/metadata"
            )
        ).json()
        assert meta[0]["00480010"]["Value"] == ["YES"]  # Specimen Label In Image

    run(ServerSettings(store=str(store), allow_label=True), with_labels)

    clean_store, clean_sid = stores["NO"]

    async def clean(c: TestClient) -> None:
        doc = await (await c.get(f"/slides/{clean_sid}")).json()
        assert doc["associated_images"] == ["thumbnail"]
        r = await c.get(f"/slides/{clean_sid}/associated/thumbnail")
        assert r.status == 200 and r.headers["Cache-Control"] != "no-store"

    run(ServerSettings(store=str(clean_store)), clean)


def test_the_list_and_the_details_show_the_same_associated_images(tmp_path: Path) -> None:
    """`GET /slides` listed the label and the macro that `GET /slides/{id}` withholds."""
    store = tmp_path / "store"
    source = sample("CMU-1-Small-Region.svs")
    sid = wsi.convert_slide(source, wsi.Store(wsi.StoreSettings(str(store)))).slide_id

    async def check(c: TestClient) -> list[str]:
        listed = (await (await c.get("/slides")).json())["slides"][0]["associated_images"]
        detail = (await (await c.get(f"/slides/{sid}")).json())["associated_images"]
        assert listed == detail
        return list(listed)

    assert run(ServerSettings(store=str(store)), check) == ["thumbnail"]
    assert sorted(run(ServerSettings(store=str(store), allow_label=True), check)) == [
        "label",
        "macro",
        "thumbnail",
    ]
