"""WADO-RS frames bodies made whole with the app's prebuilt framing: the parts are the stored
frames, byte for byte, and a frame that holds the app's boundary gets a body with another one."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

import wsi
from server.api.dicomweb.instances import DICOMWEB
from server.app import create_app
from server.settings import ServerSettings

from .conftest import sample
from .test_serve_caching import AS_STORED, FRAMES_ACCEPT, level0_frames, parts


def test_frames_bodies_never_hold_their_boundary(tmp_path: Path) -> None:
    store = wsi.Store(wsi.StoreSettings(str(tmp_path)))
    sid = wsi.convert_slide(sample("CMU-1-Small-Region.svs"), store, AS_STORED).slide_id
    path, slide, inst = level0_frames(tmp_path, sid)
    stored = [slide.frame_bytes(inst, n) for n in (1, 2, 3)]
    # A run of boundary characters that frame 2 holds: made the app's boundary below.
    held = next(
        m.group() for m in re.finditer(rb"[0-9A-Za-z]{3,}", stored[1]) if m.group() not in stored[0]
    )

    async def main() -> None:
        app = create_app(ServerSettings(store=str(tmp_path)))
        async with TestClient(TestServer(app)) as c:
            accept = {"Accept": FRAMES_ACCEPT}
            first = await c.get(path + "1", headers=accept)
            assert await parts(first) == stored[:1]
            usual = first.headers["Content-Type"]
            again = await c.get(path + "3", headers=accept)
            assert again.headers["Content-Type"] == usual  # the app's framing, built once
            assert await parts(again) == stored[2:]
            state = app[DICOMWEB]
            state.boundary = held.decode()
            state.framings.clear()
            for frames, expected in (("2", stored[1:2]), ("1,2,3", stored)):
                response = await c.get(path + frames, headers=accept)
                content_type = response.headers["Content-Type"]
                assert f"boundary={held.decode()};" not in content_type
                assert await parts(response) == expected
            response = await c.get(path + "1", headers=accept)  # holds no `held`
            assert f"boundary={held.decode()};" in response.headers["Content-Type"]
            assert await parts(response) == stored[:1]

    asyncio.run(main())


def test_one_frame_the_short_way_answers_as_the_general_way(tmp_path: Path) -> None:
    """A frame asked for again with an Accept header already seen takes `wado.one_frame`: the
    same status, headers and bytes as the first answer (the general way), its 304, and the
    general way's 400 for a frame outside the instance."""
    store = wsi.Store(wsi.StoreSettings(str(tmp_path)))
    sid = wsi.convert_slide(sample("CMU-1-Small-Region.svs"), store, AS_STORED).slide_id
    path, slide, inst = level0_frames(tmp_path, sid)
    count = len(slide.frame_chunks(inst))
    stored = {n: slide.frame_bytes(inst, n) for n in (1, 4, count)}
    slide.close()
    accepts = (
        FRAMES_ACCEPT,
        'multipart/related; type="image/jpeg"',
        "image/jpeg",
    )
    kept = ("ETag", "Cache-Control", "Content-Type", "Content-Length")

    async def main() -> None:
        app = create_app(ServerSettings(store=str(tmp_path)))
        async with TestClient(TestServer(app)) as c:
            for accept in accepts:
                headers = {"Accept": accept}
                answers = []
                for n in (1, 4, count, 4):
                    r = await c.get(path + str(n), headers=headers)
                    body = await r.read()
                    if accept == "image/jpeg":
                        assert r.headers["Content-Type"] == "image/jpeg" and body == stored[n]
                    else:
                        assert await parts(r) == [stored[n]]
                    answers.append((r.status, {k: r.headers[k] for k in kept}, body))
                assert (accept, True) in app[DICOMWEB].frame_modes
                assert answers[1] == answers[3]  # general way, then the short way
                etag = answers[1][1]["ETag"]
                r = await c.get(path + "4", headers={**headers, "If-None-Match": etag})
                assert r.status == 304 and r.headers["ETag"] == etag
                for bad in ("0", str(count + 1), "007x"):
                    r = await c.get(path + bad, headers=headers)
                    assert r.status == 400 and (await r.json())["status"] == 400
                beyond = etag.strip('"').split("-")  # version-SOP-frame-mode: a frame too far
                beyond[2] = str(count + 1)
                forged = '"' + "-".join(beyond) + '"'
                r = await c.get(path + str(count + 1), headers={**headers, "If-None-Match": forged})
                assert r.status == 400
                r = await c.get(path + "04", headers=headers)  # the frame number, as a number
                assert r.headers["ETag"] == etag

    asyncio.run(main())
