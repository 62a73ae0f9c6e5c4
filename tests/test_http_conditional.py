"""If-None-Match as RFC 9110 13.1.2 has it, one rule for every answer with an ETag
(`server.responses.etag_matches`): `*`, or a list of entity tags compared weakly, so a client
sending its cached tags as a list, or a weak tag, or `*`, gets a 304, with the express lane
(`server.express`) and without it, for tiles, DeepZoom tiles, IIIF images and DICOMweb frames
and metadata; a list that names none of them, or a malformed field, gets the 200 (never a 500)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests

import wsi
from server.express import EXPRESS
from server.responses import etag_matches
from server.settings import ServerSettings

from .conftest import sample
from .helpers import serving_app

SOURCE = sample("CMU-1-Small-Region.svs")
FRAMES_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
DICOM_JSON = "application/dicom+json"
ETAG = '"070ccdf6-0-1-1"'


# -- the rule ----------------------------------------------------------------------------------

MATCHING = [
    ETAG,
    f'"x", {ETAG}',
    f'{ETAG}, "y"',
    f"W/{ETAG}",
    f'W/"x" , W/{ETAG}',
    f",, {ETAG} ,",  # empty list members are allowed (RFC 9110 5.6.1)
    f'"x",{ETAG}',
    "*",
    " * ",
]
NOT_MATCHING = [
    '"x", "y"',
    'W/"x"',
    ETAG.strip('"'),  # no quotes: malformed
    "070ccdf6-0-1-1, other",
    "W/",
    '"unclosed',
    f'"x" junk, {ETAG}',  # the list ends at a malformed member
    f'"a, "{ETAG.strip(chr(34))}""',  # the tag is inside another member
    f'"a"{ETAG}',
    f"{ETAG}junk",
    f"*, {ETAG}",  # `*` alone, or a list
    '"x", *',
    "",
]


@pytest.mark.parametrize("field", MATCHING)
def test_a_field_that_names_the_etag_matches(field: str) -> None:
    assert etag_matches(field, ETAG)


@pytest.mark.parametrize("field", NOT_MATCHING)
def test_a_field_that_does_not_name_it_does_not(field: str) -> None:
    assert not etag_matches(field, ETAG)


def test_no_field_matches_nothing() -> None:
    assert not etag_matches(None, ETAG)


def test_a_long_list_is_read_whole() -> None:
    """A list of 50,000 members, the match last or absent (far more than a header may hold:
    read in one pass, as `etag_matches` does, it takes milliseconds)."""
    others = ", ".join(f'"{i:08x}-0-1-1"' for i in range(50_000))
    assert etag_matches(f"{others}, W/{ETAG}", ETAG)
    assert not etag_matches(f"{others}, W/{ETAG[:-2]}", ETAG)
    assert not etag_matches("," * 100_000 + '"', ETAG)


# -- every route with an ETag, with and without the express lane ---------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("conditional")
    pyramid = wsi.PyramidSettings(optimize_huffman=False)
    sid = wsi.convert_slide(
        SOURCE, wsi.Store(wsi.StoreSettings(str(root))), wsi.ConvertSettings(pyramid)
    ).slide_id
    with wsi.open_published(str(root / sid)) as slide:
        dicom = slide.dicom
        assert dicom is not None
        inst = next(i for i in dicom.instances if i.level == 0)
        instance = (
            f"/dicomweb/studies/{dicom.study_instance_uid}/series/{dicom.series_instance_uid}"
            f"/instances/{inst.sop_instance_uid}"
        )
    return {"root": str(root), "sid": sid, "instance": instance}


@dataclasses.dataclass(frozen=True)
class Service:
    base: str
    app: Any
    lane: bool

    @property
    def answered(self) -> int:
        """Requests the express lane answered."""
        return int(self.app[EXPRESS].answered)


@pytest.fixture(scope="module", params=[True, False], ids=["lane", "no lane"])
def service(request: pytest.FixtureRequest, store: dict[str, str]) -> Iterator[Service]:
    settings = ServerSettings(store=store["root"], index_at_start=False, express=request.param)
    with serving_app(settings) as (base, app, _):
        yield Service(base, app, request.param)


def routes(store: dict[str, str]) -> dict[str, tuple[str, dict[str, str], bool]]:
    """Requests by name: (path, headers, whether the express lane answers its 304s)."""
    sid, instance = store["sid"], store["instance"]
    frames = f"{instance}/frames"
    iiif = f"/iiif/3/{sid}"
    return {
        "tile": (f"/slides/{sid}/tiles/0/1/1", {}, True),
        "deepzoom tile": (f"/slides/{sid}_files/12/1_1.jpeg", {}, True),
        "iiif tile": (f"{iiif}/240,240,240,240/240,/0/default.jpg", {}, True),
        "iiif region": (f"{iiif}/10,10,100,100/50,/0/default.jpg", {}, False),
        "frame": (f"{frames}/3", {"Accept": FRAMES_ACCEPT}, False),
        "frame as jpeg": (f"{frames}/4", {"Accept": "image/jpeg"}, False),
        "frames": (f"{frames}/1,2,3", {"Accept": FRAMES_ACCEPT}, False),
        "frames streamed": (
            f"{frames}/{','.join(str(n) for n in range(1, 21))}",
            {"Accept": FRAMES_ACCEPT},
            False,
        ),
        "instance metadata": (f"{instance}/metadata", {"Accept": DICOM_JSON}, False),
    }


ROUTES = list(routes({"sid": "s", "instance": "/i"}))


def _variants(etag: str) -> tuple[list[str], list[str]]:
    """(If-None-Match values that name `etag`, values that do not)."""
    bare = etag.strip('"')
    matching = [f'"x", {etag}', f"W/{etag}", "*", f'W/"x", W/{etag}, "y"']
    other = ['"x", "y"', f'"{bare}x"', bare, f"{bare}, other", 'W/"x", "', "W/ junk"]
    return matching, other


@pytest.mark.parametrize("name", ROUTES)
def test_if_none_match_is_a_list_compared_weakly(
    service: Service, store: dict[str, str], name: str
) -> None:
    path, headers, by_lane = routes(store)[name]
    with requests.Session() as session:

        def get(if_none_match: str | None = None) -> requests.Response:
            sent = (
                dict(headers)
                if if_none_match is None
                else {**headers, "If-None-Match": if_none_match}
            )
            return session.get(service.base + path, headers=sent, timeout=60)

        first = get()
        assert first.status_code == 200, first.text
        again = get()  # the caches filled: the lane has it at hand
        etag = again.headers["ETag"]
        assert etag == first.headers["ETag"] and etag.startswith('"')
        matching, other = _variants(etag)
        before = service.answered
        for field in matching:
            response = get(field)
            assert response.status_code == 304, field
            assert response.headers["ETag"] == etag and response.content == b""
        if service.lane and by_lane:
            assert service.answered == before + len(matching)
        for field in other:
            response = get(field)
            assert response.status_code == 200, field
            # The same length: a streamed multipart body draws its boundary per response.
            assert len(response.content) == len(again.content) > 0
            if response.headers["Content-Type"].startswith(DICOM_JSON):
                json.loads(response.content)
