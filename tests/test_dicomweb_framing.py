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
