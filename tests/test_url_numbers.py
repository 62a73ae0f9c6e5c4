"""A number in a URL has one spelling (`server.url_numbers`): ASCII digits, no leading zeros, a
bounded length. Any other (fullwidth "１", Arabic-Indic "١", "00", 5,000 digits) is a 400 that
says what is wrong, on every API and whether the express lane (`server.express`) or aiohttp's
way answers: before, `int()` read them, and the same tile answered under many URLs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

import wsi
from server.app import create_app
from server.settings import ServerSettings
from server.url_numbers import MAX_DIGITS, url_int, url_int_or_none

from .conftest import sample
from .helpers import serving_app

FULLWIDTH_1 = "%EF%BC%91"  # "１", which int() reads as 1
ARABIC_1 = "%D9%A1"  # "١"
LONG = "1" * 5000  # int() refuses 4,301 digits and more with a ValueError
DICOM_ACCEPT = 'multipart/related; type="image/jpeg"'


@pytest.mark.parametrize(
    "text", ["\uff11", "\u0661", "01", "00", "+1", "-1", " 1", "1 ", "", "1_0"]
)
def test_only_the_canonical_ascii_spelling_is_a_number(text: str) -> None:
    assert url_int_or_none(text) is None
    with pytest.raises(wsi.InvalidArgument, match="ASCII digits without leading zeros"):
        url_int(text, "level")


def test_numbers_and_their_length() -> None:
    assert [url_int(t, "n") for t in ("0", "7", "10", "9" * MAX_DIGITS)] == [0, 7, 10, 999999999]
    for text in ("1" * (MAX_DIGITS + 1), "1" * 10_000, "0" * 10_000):
        with pytest.raises(
            wsi.InvalidArgument, match=f"n must be an integer of at most {MAX_DIGITS}"
        ):
            url_int(text, "n")
    assert url_int("1" * 12, "exp", 12) == 111111111111


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("numbers")
    sid = wsi.convert_slide(
        sample("CMU-1-Small-Region.svs"), wsi.Store(wsi.StoreSettings(str(root)))
    ).slide_id
    attrs = json.loads((root / sid / "slide.zarr" / "zarr.json").read_text())["attributes"]
    dicom = attrs["wsistore"]["dicom"]
    base = next(i for i in dicom["instances"] if i["flavor"] == "VOLUME" and i["level"] == 0)
    study, series = dicom["study_instance_uid"], dicom["series_instance_uid"]
    frames = f"/dicomweb/studies/{study}/series/{series}/instances/{base['sop_instance_uid']}"
    return {"root": root, "sid": sid, "frames": frames + "/frames/", "study": study}


@pytest.fixture(scope="module", params=[True, False], ids=["express", "aiohttp"])
def base(request: pytest.FixtureRequest, store: dict[str, Any]) -> Iterator[str]:
    """A service on a port, with the express lane on (it answers tiles and DeepZoom tiles from
    the connection) or off."""
    settings = ServerSettings(store=str(store["root"]), express=request.param, index_at_start=False)
    with serving_app(settings) as (url, _, _):
        yield url


def get(url: str, **headers: str) -> requests.Response:
    """GET `url` as written (percent escapes kept), twice: the first fills the caches the
    express lane answers from, the second is the one it would answer."""
    requests.get(url, headers=headers, timeout=60)
    return requests.get(url, headers=headers, timeout=60)


def refused(response: requests.Response, says: str) -> None:
    assert response.status_code == 400, response.text[:200]
    assert response.headers["Content-Type"].startswith("application/json")
    doc = response.json()
    assert doc["status"] == 400 and says in doc["error"], doc


NOT_CANONICAL = "ASCII digits without leading zeros"
TOO_LONG = f"at most {MAX_DIGITS} digits"


def test_plain_tiles(base: str, store: dict[str, Any]) -> None:
    tiles = f"{base}/slides/{store['sid']}/tiles"
    assert get(f"{tiles}/0/1/0").status_code == 200
    for level, col, row in (
        ("0", FULLWIDTH_1, "0"),
        ("0", ARABIC_1, "0"),
        ("0", "01", "0"),
        ("00", "1", "0"),
        ("0", "1", "00"),
    ):
        refused(get(f"{tiles}/{level}/{col}/{row}"), NOT_CANONICAL)
    refused(get(f"{tiles}/0/{LONG}/0"), TOO_LONG)


def test_deepzoom_tiles(base: str, store: dict[str, Any]) -> None:
    files = f"{base}/slides/{store['sid']}_files"
    assert get(f"{files}/12/1_1.jpeg").status_code == 200
    for z, x, y in (
        (FULLWIDTH_1 * 2, "1", "1"),
        ("12", FULLWIDTH_1, "1"),
        ("012", "1", "1"),
        ("12", "01", "1"),
        ("12", "1", "01"),
    ):
        refused(get(f"{files}/{z}/{x}_{y}.jpeg"), NOT_CANONICAL)
    refused(get(f"{files}/{LONG}/1_1.jpeg"), TOO_LONG)


def test_slide_listing_and_index_pages(base: str) -> None:
    assert get(f"{base}/slides?limit=1&offset=0").status_code == 200
    for query in (f"limit={FULLWIDTH_1}", "limit=01", "offset=00", f"offset={ARABIC_1}"):
        refused(get(f"{base}/slides?{query}"), NOT_CANONICAL)
    refused(get(f"{base}/slides?limit=99999999999999999999999"), TOO_LONG)
    refused(get(f"{base}/slides?offset={LONG}"), TOO_LONG)
    assert get(f"{base}/?page=1").status_code == 200
    refused(get(f"{base}/?page={FULLWIDTH_1}"), NOT_CANONICAL)
    refused(get(f"{base}/?page=01"), NOT_CANONICAL)


def test_iiif_and_dicomweb(base: str, store: dict[str, Any]) -> None:
    """The standard APIs take the same rule: a region's integers, a frame number, a search's
    limit and offset."""
    iiif = f"{base}/iiif/3/{store['sid']}"
    assert get(f"{iiif}/0,0,240,120/max/0/default.jpg").status_code == 200
    for region in ("0,0,0240,120", f"0,0,24{FULLWIDTH_1},120", f"0,0,{LONG},120"):
        assert get(f"{iiif}/{region}/max/0/default.jpg").status_code == 400
    refused(get(f"{iiif}/0,0,0240,120/max/0/default.jpg"), NOT_CANONICAL)
    refused(get(f"{iiif}/0,0,{LONG},120/max/0/default.jpg"), TOO_LONG)
    frames = base + store["frames"]
    assert get(f"{frames}4", Accept=DICOM_ACCEPT).status_code == 200
    for frame in ("04", FULLWIDTH_1, "1,02"):
        refused(get(f"{frames}{frame}", Accept=DICOM_ACCEPT), NOT_CANONICAL)
    refused(get(f"{frames}{LONG}", Accept=DICOM_ACCEPT), TOO_LONG)
    studies = f"{base}/dicomweb/studies"
    assert get(f"{studies}?limit=1").status_code == 200
    refused(get(f"{studies}?limit=01"), NOT_CANONICAL)
    refused(get(f"{studies}?offset={FULLWIDTH_1}"), NOT_CANONICAL)


def test_job_listing_paging(tmp_path: Path) -> None:
    """`GET /jobs` (ingest on: a watch folder) pages by the same rule."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    settings = ServerSettings(store=str(tmp_path / "store"), watch=(str(inbox),))

    async def main() -> None:
        async with TestClient(TestServer(create_app(settings))) as c:
            assert (await c.get("/jobs?limit=5&offset=0")).status == 200
            for query, says in (
                ("limit=05", NOT_CANONICAL),
                (f"offset={FULLWIDTH_1}", NOT_CANONICAL),
                (f"limit={LONG}", TOO_LONG),
            ):
                r = await c.get(URL(f"/jobs?{query}", encoded=True))
                doc = await r.json()
                assert r.status == 400 and says in doc["error"], doc
            r = await c.get("/jobs?state=bogus")
            assert r.status == 400 and "state must be a job state" in (await r.json())["error"]

    asyncio.run(main())
