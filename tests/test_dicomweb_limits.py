"""DICOMweb answers stay bounded in memory whatever a client asks for: many frames are streamed
as they are read (FRAME_WINDOW read ahead), not gathered into one body first."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

import wsi
from server.api.dicomweb.wado import FRAME_WINDOW
from server.app import create_app
from server.keys import CATALOG
from server.settings import ServerSettings

SOURCE = Path(__file__).resolve().parents[1] / "sample_data" / "CMU-1-Small-Region.svs"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wado")
    # Every tile stored, so frame n is tile n - 1 (the frames of sparse instances, which skip
    # blank tiles, are checked in test_sparse.py).
    settings = wsi.ConvertSettings(wsi.PyramidSettings(keep_background=True))
    wsi.convert_slide(SOURCE, wsi.Store(wsi.StoreSettings(str(root))), settings)
    return root


def split_parts(body: bytes, boundary: bytes) -> list[bytes]:
    chunks = body.split(b"--" + boundary)[1:-1]
    return [c.split(b"\r\n\r\n", 1)[1][:-2] for c in chunks]


def test_many_frames_are_streamed_and_equal_the_stored_tiles(store: Path) -> None:
    async def main() -> None:
        async with TestClient(TestServer(create_app(ServerSettings(store=str(store))))) as c:
            series = (await (await c.get("/dicomweb/series")).json())[0]
            study = series["0020000D"]["Value"][0]
            uid = series["0020000E"]["Value"][0]
            found = await (await c.get(f"/dicomweb/studies/{study}/series/{uid}/instances")).json()
            level0 = next(i for i in found if i["00280008"]["Value"][0] > FRAME_WINDOW * 2)
            sop = level0["00080018"]["Value"][0]
            count = level0["00280008"]["Value"][0]
            numbers = ",".join(str(n) for n in range(1, count + 1))
            url = f"/dicomweb/studies/{study}/series/{uid}/instances/{sop}/frames/{numbers}"
            accept = f'multipart/related; type="image/jpeg"; transfer-syntax={JPEG_BASELINE}'
            r = await c.get(url, headers={"Accept": accept})
            assert r.status == 200
            assert r.headers.get("Transfer-Encoding") == "chunked"  # written as read
            boundary = r.headers["Content-Type"].split("boundary=")[1].split(";")[0].encode()
            parts = split_parts(await r.read(), boundary)
            assert len(parts) == count
            slide = await c.app[CATALOG].slide(
                (await (await c.get("/slides")).json())["slides"][0]["id"]
            )
            cols = slide.levels[0].cols
            for n in (1, count // 2, count):
                col, row = (n - 1) % cols, (n - 1) // cols
                assert parts[n - 1] == await slide.tile_bytes(0, col, row)
            again = await c.get(url, headers={"Accept": accept, "If-None-Match": r.headers["ETag"]})
            assert again.status == 304

    asyncio.run(main())


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six slides, each its own study and series (placeholder UIDs from their slide ids)."""
    from tests.conftest import make_tiff

    root = tmp_path_factory.mktemp("studies")
    source = make_tiff(root.parent / f"{root.name}.tif", 300, 200)
    store = wsi.Store(wsi.StoreSettings(str(root)))
    for i in range(6):
        wsi.convert_slide(source, store, slide_id=f"study-{i}")
    return root


@pytest.mark.parametrize("level", ["studies", "series"])
def test_a_search_makes_the_results_of_its_page_only(
    studies: Path, level: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page of a study or series search decodes the index records of its results only: one
    of 10 studies made the result of every study of the store, then kept 10 (5 s a search on
    2,000 slides of 700 studies)."""
    from server.api.dicomweb import series_index

    decoded: list[bytes] = []
    decode = series_index.SlideAttributes.decode

    def counted(data: bytes) -> series_index.SlideAttributes:
        decoded.append(data)
        return decode(data)

    async def main() -> None:
        async with TestClient(TestServer(create_app(ServerSettings(store=str(studies))))) as c:
            everything = await (await c.get(f"/dicomweb/{level}")).json()
            assert len(everything) == 6
            monkeypatch.setattr(series_index.SlideAttributes, "decode", staticmethod(counted))
            r = await c.get(f"/dicomweb/{level}", params={"limit": "2", "offset": "3"})
            assert await r.json() == everything[3:5]
            assert len(decoded) == 2
            r = await c.get(f"/dicomweb/{level}", params={"limit": "5000", "offset": "4"})
            assert await r.json() == everything[4:]
            assert "Warning" not in r.headers

    asyncio.run(main())
