"""What the hot path keeps between requests stays right when a slide is published again: the
prebuilt response headers (Cache-Control, versioned URLs, ETags, 304s), the DICOMweb instances
remembered by the UIDs of their paths, and the frame mode remembered per Accept header."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

import wsi
from server.app import create_app
from server.settings import ServerSettings

from .conftest import sample

AS_STORED = wsi.ConvertSettings(wsi.PyramidSettings(optimize_huffman=False, keep_background=True))
OPTIMIZED = wsi.ConvertSettings(wsi.PyramidSettings(optimize_huffman=True, keep_background=True))
"""Other stored bytes for every tile (other Huffman tables): a re-publication with new bytes."""
FRAMES_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
REPUBLISHED_WITHIN_S = 30.0
"""The service re-reads a manifest every 2 s (in the background): the new version shows by then."""


def level0_frames(store: Path, sid: str) -> tuple[str, Any, Any]:
    """(path of the level-0 instance up to `/frames/`, the reader's slide, its instance)."""
    slide = wsi.open_published(str(store / sid))
    dicom = slide.dicom
    assert dicom is not None
    inst = next(i for i in dicom.instances if i.level == 0)
    path = (
        f"/dicomweb/studies/{dicom.study_instance_uid}/series/{dicom.series_instance_uid}"
        f"/instances/{inst.sop_instance_uid}/frames/"
    )
    return path, slide, inst


async def parts(response: ClientResponse) -> list[bytes]:
    """The bodies of a multipart/related response (RFC 2046: the CRLF before a delimiter is
    the delimiter's)."""
    assert response.status == 200, await response.text()
    content_type = response.headers["Content-Type"]
    assert content_type.startswith("multipart/related")
    boundary = content_type.split("boundary=", 1)[1].split(";", 1)[0].strip('"').encode()
    body = b"\r\n" + await response.read()
    chunks = body.split(b"\r\n--" + boundary)
    assert chunks[0] == b"" and chunks[-1].startswith(b"--")
    return [chunk[2:].partition(b"\r\n\r\n")[2] for chunk in chunks[1:-1]]


def test_cached_headers_and_instances_follow_a_republication(tmp_path: Path) -> None:
    src = sample("CMU-1-Small-Region.svs")
    store = wsi.Store(wsi.StoreSettings(str(tmp_path)))
    sid = wsi.convert_slide(src, store, AS_STORED).slide_id
    tile = f"/slides/{sid}/tiles/0/1/1"
    frames, old_slide, old_inst = level0_frames(tmp_path, sid)
    old_tile = old_slide.tile_bytes(0, 1, 1)
    old_frame = old_slide.frame_bytes(old_inst, 3)
    old_slide.close()

    async def check(c: TestClient) -> None:
        r = await c.get(tile)
        old_etag = r.headers["ETag"]
        old_version = old_etag.strip('"').split("-")[0]
        assert await r.read() == old_tile and r.headers["Cache-Control"] == "public, no-cache"
        r = await c.get(f"{tile}?v={old_version}")
        assert r.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        r = await c.get(f"{tile}?v=other")
        assert r.headers["Cache-Control"] == "public, no-cache"
        r = await c.get(tile, headers={"If-None-Match": old_etag})
        assert r.status == 304 and r.headers["ETag"] == old_etag
        assert r.headers["Cache-Control"] == "public, no-cache"
        r = await c.get(f"{frames}3", headers={"Accept": FRAMES_ACCEPT})
        frame_etag = r.headers["ETag"]
        assert await parts(r) == [old_frame] and old_version in frame_etag
        assert r.headers["Content-Length"] == str(len(await r.read()))

        await asyncio.to_thread(wsi.convert_slide, src, store, OPTIMIZED)
        new_frames, new_slide, new_inst = level0_frames(tmp_path, sid)
        new_tile, new_frame = new_slide.tile_bytes(0, 1, 1), new_slide.frame_bytes(new_inst, 3)
        new_slide.close()
        assert new_tile != old_tile and new_frame != old_frame
        deadline = time.monotonic() + REPUBLISHED_WITHIN_S
        while (r := await c.get(tile)).headers["ETag"] == old_etag:
            assert time.monotonic() < deadline, "the re-published slide was never served"
            await asyncio.sleep(0.2)
        new_version = r.headers["ETag"].strip('"').split("-")[0]
        assert new_version != old_version and await r.read() == new_tile
        r = await c.get(f"{tile}?v={old_version}")  # a URL naming the old version: revalidated
        assert r.headers["Cache-Control"] == "public, no-cache" and await r.read() == new_tile
        r = await c.get(f"{tile}?v={new_version}")
        assert r.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        r = await c.get(tile, headers={"If-None-Match": old_etag})
        assert r.status == 200 and await r.read() == new_tile

        r = await c.get(f"{new_frames}3", headers={"Accept": FRAMES_ACCEPT})
        assert await parts(r) == [new_frame]
        assert new_version in r.headers["ETag"] and r.headers["ETag"] != frame_etag
        if new_frames != frames:  # new UIDs: the remembered instance must not answer
            r = await c.get(f"{frames}3", headers={"Accept": FRAMES_ACCEPT})
            assert r.status == 404

    settings = ServerSettings(store=str(tmp_path), threads=2)
    asyncio.run(_with_client(settings, check))


def test_remembered_frame_modes_and_both_multipart_paths(tmp_path: Path) -> None:
    store = wsi.Store(wsi.StoreSettings(str(tmp_path)))
    sid = wsi.convert_slide(sample("CMU-1-Small-Region.svs"), store, AS_STORED).slide_id
    frames, slide, inst = level0_frames(tmp_path, sid)
    expected = {n: slide.frame_bytes(inst, n) for n in range(1, 31)}
    slide.close()

    async def check(c: TestClient) -> None:
        jpeg = {"Accept": "image/jpeg"}
        for _ in range(2):  # the second time from the remembered mode
            r = await c.get(f"{frames}2", headers=jpeg)
            assert r.status == 200 and r.headers["Content-Type"] == "image/jpeg"
            assert await r.read() == expected[2]
            r = await c.get(f"{frames}1,2", headers=jpeg)  # one JPEG cannot hold two frames
            assert r.status == 406 and (await r.json())["status"] == 406
        few = list(range(1, 17))  # at most 16: one body with a Content-Length
        r = await c.get(f"{frames}{','.join(map(str, few))}", headers={"Accept": FRAMES_ACCEPT})
        assert "Content-Length" in r.headers
        assert await parts(r) == [expected[n] for n in few]
        many = [30, *range(1, 20), 5]  # more: streamed as they are read
        r = await c.get(f"{frames}{','.join(map(str, many))}", headers={"Accept": FRAMES_ACCEPT})
        assert "Content-Length" not in r.headers
        assert await parts(r) == [expected[n] for n in many]

    settings = ServerSettings(store=str(tmp_path), threads=2)
    asyncio.run(_with_client(settings, check))


async def _with_client(settings: ServerSettings, check: Any) -> None:
    async with TestClient(TestServer(create_app(settings))) as client:
        await check(client)
