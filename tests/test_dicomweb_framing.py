"""WADO-RS frames bodies made whole with the app's prebuilt framing: the parts are the stored
frames, byte for byte, and a frame that holds the app's boundary gets a body with another one."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest
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
                for alias in ("04", "\uff14"):  # a frame has one URL (`url_int`): no alias
                    r = await c.get(path + alias, headers=headers)
                    assert r.status == 400 and "ETag" not in r.headers

    asyncio.run(main())


NATIVE_ACCEPT = 'multipart/related; type="application/octet-stream"'
"""Decoded frames (Explicit VR Little Endian): a body made whole of decoded pixels."""


def test_frames_bodies_are_the_same_bytes_in_every_process(tmp_path: Path) -> None:
    """`wsi serve --processes N` answers a request from any of its processes, each with its own
    app: the same request must get the same bytes under its strong ETag from every one (a
    boundary drawn at random per app, or per streamed body, made them differ), and no part may
    hold the boundary. Two apps stand for two processes; each request is sent twice to each
    (the first answer takes the general way, the second the short one when there is one)."""
    store = wsi.Store(wsi.StoreSettings(str(tmp_path)))
    sid = wsi.convert_slide(sample("CMU-1-Small-Region.svs"), store, AS_STORED).slide_id
    path, slide, inst = level0_frames(tmp_path, sid)
    many = list(range(1, 21))  # more than `wado.FRAME_WINDOW`: a streamed body
    stored = {n: slide.frame_bytes(inst, n) for n in many}
    slide.close()
    requests = [
        ("1", FRAMES_ACCEPT, [stored[1]]),
        ("1", 'multipart/related; type="image/jpeg"', [stored[1]]),
        ("1,2,3", FRAMES_ACCEPT, [stored[n] for n in (1, 2, 3)]),
        (",".join(map(str, many)), FRAMES_ACCEPT, [stored[n] for n in many]),
        ("2,3", NATIVE_ACCEPT, None),
    ]

    async def answers(app_settings: ServerSettings) -> list[tuple[int, str, str, bytes]]:
        out = []
        async with TestClient(TestServer(create_app(app_settings))) as c:
            for frames, accept, expected in requests:
                for _ in range(2):
                    r = await c.get(path + frames, headers={"Accept": accept})
                    body = await r.read()
                    found = await parts(r)
                    if expected is not None:
                        assert found == expected
                    boundary = r.headers["Content-Type"].split("boundary=")[1].split(";")[0]
                    assert not any(boundary.encode() in part for part in found)
                    out.append((r.status, r.headers["ETag"], r.headers["Content-Type"], body))
        return out

    settings = ServerSettings(store=str(tmp_path))
    first = asyncio.run(answers(settings))
    second = asyncio.run(answers(settings))
    assert first == second


def test_a_frame_that_holds_the_boundary_gets_the_same_other_one_everywhere(
    tmp_path: Path,
) -> None:
    """The boundary is public: a slide can be made to hold it. A body made whole then gets a
    boundary derived from its parts, the same in every process; a streamed body, whose headers
    are sent before its later frames are read, is cut short (the connection closed) rather than
    sent whole with a part that holds its boundary."""
    store = wsi.Store(wsi.StoreSettings(str(tmp_path)))
    sid = wsi.convert_slide(sample("CMU-1-Small-Region.svs"), store, AS_STORED).slide_id
    path, slide, inst = level0_frames(tmp_path, sid)
    many = list(range(1, 21))
    stored = [slide.frame_bytes(inst, n) for n in many]
    slide.close()
    # A run of boundary characters that a late frame holds and no frame before it.
    index, held = next(
        (k, m.group().decode())
        for k in range(len(many) - 1, 0, -1)
        for m in re.finditer(rb"[0-9A-Za-z]{3,}", stored[k])
        if not any(m.group() in data for data in stored[:k])
    )

    async def answer(frames: str) -> tuple[str, bytes, list[bytes]]:
        app = create_app(ServerSettings(store=str(tmp_path)))
        async with TestClient(TestServer(app)) as c:
            app[DICOMWEB].boundary = held
            r = await c.get(path + frames, headers={"Accept": FRAMES_ACCEPT})
            body = await r.read()
            return r.headers["Content-Type"], body, await parts(r)

    whole = f"{index},{index + 1}"  # frame numbers start at 1
    content_type, body, found = asyncio.run(answer(whole))
    assert found == stored[index - 1 : index + 1]
    assert f"boundary={held};" not in content_type
    assert asyncio.run(answer(whole)) == (content_type, body, found)

    async def streamed() -> None:
        app = create_app(ServerSettings(store=str(tmp_path)))
        async with TestClient(TestServer(app)) as c:
            app[DICOMWEB].boundary = held
            r = await c.get(path + ",".join(map(str, many)), headers={"Accept": FRAMES_ACCEPT})
            assert r.status == 200 and f"boundary={held};" in r.headers["Content-Type"]
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()

    asyncio.run(streamed())
