"""The express lane (`server.express`) answers as aiohttp's way does, byte for byte but the Date:
the same requests, sent as raw bytes to a service with the lane and to one without, over the
same store; and the lane keeps HTTP/1.1's rules on a connection it shares with aiohttp
(pipelined requests in order, requests with bodies never read as requests, heads split across
packets, clients that do not read, the keep-alive timer)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import hypothesis.strategies
import pytest
import requests

import wsi
from server.api.dicomweb.instances import DICOMWEB
from server.auth import sign
from server.express import EXPRESS, MAX_HEAD, Express
from server.runner import ServiceConnection
from server.settings import ServerSettings

from .conftest import sample
from .helpers import serving_app

SOURCE = sample("CMU-1-Small-Region.svs")
SECRET = "s3cret-reader-token"
TOKEN = f"reader:{SECRET}"
KEY = "signing-key-for-the-express-tests-0123"
PIXELS_SECRET = "s3cret-pixels-token"
VIEWER_SECRET = "s3cret-viewer-token"
ORIGIN = "https://viewer.example.org"
FRAMES_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("express")
    pyramid = wsi.PyramidSettings(optimize_huffman=False)
    sid = wsi.convert_slide(
        SOURCE, wsi.Store(wsi.StoreSettings(str(root))), wsi.ConvertSettings(pyramid)
    ).slide_id
    attrs = json.loads((root / sid / "slide.zarr" / "zarr.json").read_text())["attributes"]
    dicom = attrs["wsistore"]["dicom"]
    base = next(i for i in dicom["instances"] if i["flavor"] == "VOLUME" and i["level"] == 0)
    frames = (
        f"/dicomweb/studies/{dicom['study_instance_uid']}/series/{dicom['series_instance_uid']}"
        f"/instances/{base['sop_instance_uid']}/frames"
    )
    version = slide_version(root, sid)
    return {"root": root, "sid": sid, "frames": frames, "version": version}


def slide_version(root: Path, sid: str) -> str:
    """The slide's version as the service names it (its manifest digest, read by the library)."""
    with wsi.open_published(str(root / sid)) as slide:
        return str(slide.version)


class Pair:
    """Two services over one store, one with the express lane and one without."""

    def __init__(self, lane: Any, full: Any) -> None:
        self.lane_base, self.lane_app, self.lane_loop = lane
        self.full_base, self.full_app, _ = full

    @property
    def answered(self) -> int:
        return int(self.lane_app[EXPRESS].answered)


def pair(settings: ServerSettings) -> Iterator[Pair]:
    full = dataclasses.replace(settings, express=False)
    with serving_app(settings) as lane, serving_app(full) as other:
        yield Pair(lane, other)


@pytest.fixture(scope="module")
def services(store: dict[str, Any]) -> Iterator[Pair]:
    yield from pair(ServerSettings(store=str(store["root"]), index_at_start=False))


@pytest.fixture(scope="module")
def listed(store: dict[str, Any]) -> Iterator[Pair]:
    """With an allow-listed origin (every read answer varies by Origin)."""
    yield from pair(
        ServerSettings(store=str(store["root"]), cors_origins=(ORIGIN,), index_at_start=False)
    )


@pytest.fixture(scope="module")
def authed(store: dict[str, Any]) -> Iterator[Pair]:
    """With tokens: authentication on (on loopback too)."""
    yield from pair(
        ServerSettings(
            store=str(store["root"]),
            tokens=(TOKEN,),
            read_tokens=(f"viewer:{VIEWER_SECRET}",),
            pixel_tokens=(f"ai:{PIXELS_SECRET}",),
            signing_key=KEY,
            index_at_start=False,
        )
    )


# -- a raw HTTP/1.1 client -------------------------------------------------------------------


class Connection:
    """One keep-alive connection: requests sent as given, responses read one by one."""

    def __init__(self, base: str) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 20)
        self.buffer += chunk
        return bool(chunk)

    def response(self, head_only: bool = False) -> tuple[str, list[tuple[str, str]], bytes]:
        """(status line, headers but Date, body) of the next response."""
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError("closed before a response")
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = [tuple(x.split(": ", 1)) for x in lines[1:]]
        length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
        if head_only or lines[0].split()[1] in ("304", "204"):
            length = 0
        while len(self.buffer) < length:
            if not self._fill():
                raise ConnectionError("closed inside a body")
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        kept = [(k, v) for k, v in headers if k.lower() != "date"]
        return lines[0], kept, body

    def closed(self) -> bool:
        """Whether the service closed the connection (after what was read)."""
        self.sock.settimeout(30)
        return not self.buffer and self.sock.recv(1) == b""


def request(path: str, method: str = "GET", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def answers(base: str, raw: bytes, times: int = 2, head_only: bool = False) -> list[Any]:
    """The responses to `raw` sent `times` times, one after the other, on one connection while
    the service keeps it open (a new one after it closes it: HTTP/1.0, errors)."""
    out: list[Any] = []
    while len(out) < times:
        conn = Connection(base)
        try:
            while len(out) < times:
                conn.send(raw)
                out.append(conn.response(head_only))
                if out[-1][0].startswith("HTTP/1.0") or ("Connection", "close") in out[-1][1]:
                    break
        finally:
            conn.close()
    return out


def normalised(answer: Any, app: Any) -> Any:
    """An answer with the app's random multipart boundary replaced by a fixed word."""
    boundary = app[DICOMWEB].boundary.encode()
    status, headers, body = answer
    headers = [(k, v.replace(boundary.decode(), "BOUNDARY")) for k, v in headers]
    return status, headers, body.replace(boundary, b"BOUNDARY")


def same_answers(services: Pair, raw: bytes, head_only: bool = False) -> Any:
    """The answers of both services to `raw` (each sent twice: the first fills the caches),
    asserted equal; the lane's."""
    lane = answers(services.lane_base, raw, head_only=head_only)
    full = answers(services.full_base, raw, head_only=head_only)
    lane = [normalised(a, services.lane_app) for a in lane]
    full = [normalised(a, services.full_app) for a in full]
    assert lane == full
    return lane[-1]


# -- the same answers ------------------------------------------------------------------------


def cases(store: dict[str, Any]) -> dict[str, tuple[bytes, bool]]:
    """Requests, by name: (bytes, whether the lane answers the second of two)."""
    sid, version, frames = store["sid"], store["version"], store["frames"]
    tile = f"/slides/{sid}/tiles/0/1/1"
    dz = f"/slides/{sid}_files/12/1_1.jpeg"  # a stored tile of the base level
    etag = f'"{version}-0-1-1"'
    iiif = f"/iiif/3/{sid}"
    return {
        "tile": (request(tile), True),
        "tile versioned": (request(f"{tile}?v={version}"), True),
        "tile other version": (request(f"{tile}?v=0123"), True),
        "tile HEAD": (request(tile, "HEAD"), True),
        "tile revalidated": (request(tile, If_None_Match=etag), True),
        "tile other etag": (request(tile, If_None_Match='"other"'), True),
        "tile with browser headers": (
            request(
                tile,
                User_Agent="Mozilla/5.0",
                Accept="image/avif,image/webp,*/*",
                Accept_Encoding="gzip, deflate, br",
                Accept_Language="en",
                Referer="http://127.0.0.1/viewer",
                Sec_Fetch_Site="same-origin",
                Connection="keep-alive",
            ),
            True,
        ),
        "tile from another origin": (request(tile, Origin=ORIGIN), True),
        "deepzoom tile": (request(dz), True),
        "deepzoom edge tile": (request(f"/slides/{sid}_files/12/9_12.jpeg"), False),
        "deepzoom tile outside": (request(f"/slides/{sid}_files/12/99_1.jpeg"), False),
        "frame": (request(f"{frames}/3", Accept=FRAMES_ACCEPT), True),
        "frame jpeg": (request(f"{frames}/4", Accept="image/jpeg"), True),
        "frame out of range": (request(f"{frames}/99999", Accept=FRAMES_ACCEPT), False),
        "frame revalidated": (
            request(f"{frames}/3", Accept=FRAMES_ACCEPT, If_None_Match='"x"'),
            False,
        ),
        "iiif tile": (request(f"{iiif}/240,240,240,240/240,/0/default.jpg"), True),
        "iiif tile max": (request(f"{iiif}/0,240,240,240/max/0/default.jpg"), True),
        "iiif tile of level 1": (request(f"{iiif}/0,480,480,480/240,/0/color.jpg"), True),
        "iiif edge tile": (request(f"{iiif}/2160,0,60,240/60,/0/default.jpg"), False),
        "iiif tile as png": (request(f"{iiif}/240,240,240,240/240,/0/default.png"), False),
        "iiif tile turned": (request(f"{iiif}/240,240,240,240/240,/90/default.jpg"), False),
        "iiif region": (request(f"{iiif}/10,10,100,100/50,/0/default.jpg"), False),
        "iiif escaped id": (request(f"{iiif}%2F/0,0,240,240/240,/0/default.jpg"), False),
        "iiif from another origin": (
            request(f"{iiif}/240,0,240,240/240,/0/default.jpg", Origin=ORIGIN),
            True,
        ),
        "tile outside the level": (request(f"/slides/{sid}/tiles/0/999/1"), False),
        "level missing": (request(f"/slides/{sid}/tiles/77/0/0"), False),
        "coordinate not a number": (request(f"/slides/{sid}/tiles/0/x/1"), False),
        "slide unknown": (request("/slides/0000000000000000000000ab/tiles/0/0/0"), False),
        "escaped path": (request(f"/slides/{sid}/tiles/0/%31/1"), False),
        "dot segment": (request(f"/slides/{sid}/tiles/0/../0/1/1"), False),
        "other query": (request(f"{tile}?v={version}&v=1"), False),
        "HTTP/1.0": (request(tile).replace(b"HTTP/1.1", b"HTTP/1.0", 1), False),
        "repeated header": (request(tile, Accept="a", accept="b"), False),
        "unknown host": (request(tile).replace(b"Host: 127.0.0.1", b"Host: evil.test"), False),
        "not a tile": (request(f"/slides/{sid}"), False),
        "POST without a body": (request(tile, "POST"), False),
    }


CASES = list(cases({"sid": "s", "version": "v", "frames": "/f"}))


@pytest.mark.parametrize("name", CASES)
def test_the_lane_answers_as_aiohttp_does(services: Pair, store: dict[str, Any], name: str) -> None:
    raw, taken = cases(store)[name]
    before = services.answered
    same_answers(services, raw, head_only=b"HEAD " in raw[:5])
    # The lane answered the second request at least (the first one may have filled the
    # caches), or neither.
    taken_now = services.answered - before
    assert taken_now >= 1 if taken else taken_now == 0


def test_versioned_tiles_are_immutable_and_revalidation_is_304(
    services: Pair, store: dict[str, Any]
) -> None:
    """What the lane sends, checked for itself (not only against aiohttp's way)."""
    tile = f"/slides/{store['sid']}/tiles/0/1/1"
    status, headers, body = same_answers(services, request(f"{tile}?v={store['version']}"))
    fields = dict(headers)
    assert status == "HTTP/1.1 200 OK" and body[:2] == b"\xff\xd8"
    assert fields["Cache-Control"] == "public, max-age=31536000, immutable"
    assert fields["Access-Control-Allow-Origin"] == "*"  # a pixel route, no auth
    status, headers, body = same_answers(services, request(tile, If_None_Match=fields["ETag"]))
    assert status == "HTTP/1.1 304 Not Modified" and body == b""
    assert "Content-Length" not in dict(headers)


def test_an_allow_listed_origin_is_echoed_and_answers_vary_by_origin(
    listed: Pair, store: dict[str, Any]
) -> None:
    tile = f"/slides/{store['sid']}/tiles/0/2/1"
    before = listed.answered
    _, headers, _ = same_answers(listed, request(tile, Origin=ORIGIN))
    assert ("Access-Control-Allow-Origin", ORIGIN) in headers and ("Vary", "Origin") in headers
    # Tiles are pixels only: without auth any origin may read them.
    _, headers, _ = same_answers(listed, request(tile, Origin="https://other.example"))
    assert ("Vary", "Origin") in headers and ("Access-Control-Allow-Origin", "*") in headers
    _, headers, _ = same_answers(listed, request(tile))
    assert ("Vary", "Origin") in headers
    # Not so the slide's description: only the listed origin reads it.
    _, headers, _ = same_answers(listed, request(f"/slides/{store['sid']}", Origin=ORIGIN))
    assert ("Access-Control-Allow-Origin", ORIGIN) in headers
    _, headers, _ = same_answers(listed, request(f"/slides/{store['sid']}", Origin="https://x.y"))
    assert "Access-Control-Allow-Origin" not in dict(headers)
    assert listed.answered - before >= 3


def test_with_auth_the_lane_admits_what_the_front_admits(
    authed: Pair, store: dict[str, Any]
) -> None:
    sid = store["sid"]
    tile = f"/slides/{sid}/tiles/0/1/2"
    before = authed.answered
    status, headers, _ = same_answers(authed, request(tile, Authorization=f"Bearer {SECRET}"))
    assert status.endswith("200 OK") and dict(headers)["Cache-Control"].startswith("private")
    assert authed.answered - before >= 1
    before = authed.answered
    for bad in ("Bearer wrong", f"Basic {SECRET}"):
        status, _, _ = same_answers(authed, request(tile, Authorization=bad))
        assert status.split()[1] == "401"
    status, _, _ = same_answers(authed, request(tile))
    assert status.split()[1] == "401"
    # A signed URL for this slide's tiles: admitted, kept no longer than it lives.
    exp = int(time.time()) + 3600
    signed = f"{tile}?exp={exp}&sig={sign(KEY, 'tiles', sid, exp)}"
    lane = answers(authed.lane_base, request(signed))
    full = answers(authed.full_base, request(signed))
    for (status, headers, body), (status2, headers2, body2) in zip(lane, full, strict=True):
        assert status == status2 == "HTTP/1.1 200 OK" and body == body2
        ages = [int(dict(h)["Cache-Control"].split("max-age=")[1]) for h in (headers, headers2)]
        assert all(3590 <= age <= 3600 for age in ages)
    assert authed.answered - before == 2
    before = authed.answered
    expired = f"{tile}?exp=1000&sig={sign(KEY, 'tiles', sid, 1000)}"
    assert same_answers(authed, request(expired))[0].split()[1] == "401"
    other_slide = f"{tile}?exp={exp}&sig={sign(KEY, 'tiles', 'another', exp)}"
    assert same_answers(authed, request(other_slide))[0].split()[1] == "401"
    assert authed.answered == before


def test_the_lane_admits_what_a_tokens_role_permits_and_no_more(
    authed: Pair, store: dict[str, Any]
) -> None:
    """A pixel token reads tiles (through the lane) but not a WADO-RS frame, which DICOMweb
    serves beside the patient's name: the lane leaves it to the front, which says why (403). A
    read token reads both."""
    tile = f"/slides/{store['sid']}/tiles/0/1/2"
    frame = f"{store['frames']}/3"
    pixels, viewer = f"Bearer {PIXELS_SECRET}", f"Bearer {VIEWER_SECRET}"
    before = authed.answered
    assert same_answers(authed, request(tile, Authorization=pixels))[0].endswith("200 OK")
    assert authed.answered - before >= 1
    before = authed.answered
    status, _, body = same_answers(
        authed, request(frame, Accept=FRAMES_ACCEPT, Authorization=pixels)
    )
    assert status.split()[1] == "403" and b"token ai (pixels) may not read this" in body
    assert authed.answered == before
    status, _, _ = same_answers(authed, request(frame, Accept=FRAMES_ACCEPT, Authorization=viewer))
    assert status.endswith("200 OK") and authed.answered - before >= 1


def test_the_lane_counts_in_the_metrics(services: Pair, store: dict[str, Any]) -> None:
    tile = f"/slides/{store['sid']}/tiles/0/0/1"
    route = 'route="/slides/{slide_id}/tiles/{level}/{col}/{row}",status="200"'

    def count() -> float:
        text = requests.get(f"{services.lane_base}/metrics", timeout=10).text
        line = next(x for x in text.splitlines() if "wsi_http_requests_total{" in x and route in x)
        return float(line.rsplit(" ", 1)[1])

    before, answered = count(), services.answered
    answers(services.lane_base, request(tile), times=5)
    assert services.answered - answered >= 4
    assert count() - before == 5


# -- one connection, two ways -----------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order(services: Pair, store: dict[str, Any]) -> None:
    """Requests the lane answers and requests aiohttp answers, sent at once: each answer in its
    request's place, whichever way made it."""
    sid = store["sid"]
    names = ["tile", "not a tile", "tile versioned", "tile outside the level", "deepzoom tile"]
    names += ["frame", "slide unknown", "tile HEAD", "tile"]
    raws = [cases(store)[n][0] for n in names]
    singles = [answers(services.lane_base, r, head_only=r.startswith(b"HEAD"))[-1] for r in raws]
    assert any(sid in r.decode() for r in raws)
    for rounds in range(3):  # the caches warm: more of them taken by the lane each round
        conn = Connection(services.lane_base)
        conn.send(b"".join(raws))
        got = [conn.response(head_only=r.startswith(b"HEAD")) for r in raws]
        conn.close()
        assert [g[0] for g in got] == [s[0] for s in singles], rounds
        assert [normalised(g, services.lane_app) for g in got] == [
            normalised(s, services.lane_app) for s in singles
        ]


def test_a_head_sent_a_byte_at_a_time(services: Pair, store: dict[str, Any]) -> None:
    raw = cases(store)["tile"][0]
    expected = answers(services.lane_base, raw)[-1]
    conn = Connection(services.lane_base)
    try:
        for round_ in range(2):
            for byte in raw:
                conn.send(bytes([byte]))
            assert conn.response() == expected, round_
    finally:
        conn.close()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_is_never_read_as_a_request(
    services: Pair, store: dict[str, Any], framing: str
) -> None:
    """A request that carries a body holding what looks like a tile request: one answer for
    it, none for its body (the connection is aiohttp's from there), then the next request's."""
    tile = cases(store)["tile"][0]
    if framing == "chunked":
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(tile), tile)
        post = request("/jobs", "POST", Transfer_Encoding="chunked") + body
    else:
        post = request("/jobs", "POST", Content_Length=str(len(tile))) + tile
    expected_tile = answers(services.lane_base, tile)[-1]
    for base, app in ((services.lane_base, services.lane_app), (services.full_base, None)):
        conn = Connection(base)
        conn.send(tile + post + tile)
        first, second, third = conn.response(), conn.response(), conn.response()
        assert first == expected_tile and third == expected_tile, app
        assert second[0].split()[1] not in ("200", "304")  # the POST's own answer
        conn.sock.settimeout(1.0)
        with pytest.raises(TimeoutError):  # nothing more: the body was not answered
            conn._fill()
        conn.close()


MALFORMED = {
    "bare LF": b"GET /healthz HTTP/1.1\nHost: 127.0.0.1\r\n\r\n",
    "folded header": b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n X-Folded: yes\r\n\r\n",
    "space before colon": b"GET /healthz HTTP/1.1\r\nHost : 127.0.0.1\r\n\r\n",
    "control character": b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: \x01\r\n\r\n",
    "two lengths": (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\n"
        b"Content-Length: 2\r\n\r\nab"
    ),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_what_the_lane_cannot_judge_gets_aiohttps_answer(services: Pair, name: str) -> None:
    """Heads the lane does not take go to aiohttp, connection and all: the same answers."""
    raw = MALFORMED[name]
    lane = Connection(services.lane_base)
    full = Connection(services.full_base)
    try:
        lane.send(raw)
        full.send(raw)
        assert lane.response() == full.response()
    finally:
        lane.close()
        full.close()


def test_a_head_longer_than_the_lane_holds_is_aiohttps(
    services: Pair, store: dict[str, Any]
) -> None:
    """The lane holds at most `MAX_HEAD` bytes of an incomplete head: a longer one, valid, goes
    to aiohttp with its connection, which answers it and the requests after it."""
    filler = {f"X_Filler_{i}": "a" * 6000 for i in range(MAX_HEAD // 6000 + 1)}
    raw = request(f"/slides/{store['sid']}/tiles/0/1/1", **filler)
    before = services.answered
    assert same_answers(services, raw)[0].endswith("200 OK")
    assert services.answered == before


def test_a_client_that_does_not_read_is_answered_in_order_within_a_bounded_buffer(
    services: Pair, store: dict[str, Any]
) -> None:
    """Thousands of pipelined tile requests from a client that reads nothing for a while: the
    lane stops writing once the socket's buffer is full (aiohttp then waits for the client),
    so what waits in the service's memory stays bounded; every answer arrives, in order."""
    raws = [request(f"/slides/{store['sid']}/tiles/0/{c}/{r}") for c in range(3) for r in range(2)]
    expected = [answers(services.lane_base, raw)[-1] for raw in raws]
    count = 3000
    conn = Connection(services.lane_base)
    before = services.answered
    try:
        conn.send(b"".join(raws[i % len(raws)] for i in range(count)))

        async def buffered() -> list[int]:
            return [
                p.transport.get_write_buffer_size()
                for p in _connections(services.lane_app)
                if p.transport is not None
            ]

        sizes = []
        for _ in range(5):
            sizes += asyncio.run_coroutine_threadsafe(buffered(), services.lane_loop).result(10)
            time.sleep(0.2)
        largest = max(len(e[2]) for e in expected) + 1024
        assert max(sizes) <= 256 * 1024 + largest
        for i in range(count):
            assert conn.response() == expected[i % len(raws)], i
        assert 0 < services.answered - before < count  # aiohttp answered while it waited
    finally:
        conn.close()


def _connections(app: Any) -> list[ServiceConnection]:
    """The open connections of the service whose app is `app` that its express lane serves."""
    lane = app[EXPRESS]
    return [
        o
        for o in gc.get_objects()
        if isinstance(o, ServiceConnection) and o._express is lane and o.transport is not None
    ]


def test_the_lane_keeps_the_keep_alive_timer_going(services: Pair, store: dict[str, Any]) -> None:
    """aiohttp closes a connection idle past the keep-alive timeout; one the lane answers on
    is not idle: each answer moves the close time on."""
    raw = cases(store)["tile"][0]
    conn = Connection(services.lane_base)
    try:
        conn.send(raw)
        conn.response()

        async def close_times() -> list[float]:
            return [p._next_keepalive_close_time for p in _connections(services.lane_app)]

        before = max(asyncio.run_coroutine_threadsafe(close_times(), services.lane_loop).result())
        answered = services.answered
        time.sleep(0.05)
        conn.send(raw)
        conn.response()
        assert services.answered == answered + 1
        after = max(asyncio.run_coroutine_threadsafe(close_times(), services.lane_loop).result())
        assert after > before
    finally:
        conn.close()


# -- when there is no lane ---------------------------------------------------------------------


def test_no_lane_when_every_request_is_audited(store: dict[str, Any], tmp_path: Path) -> None:
    """An audit log records every request that names a slide: nothing may pass it by."""
    log = tmp_path / "audit.jsonl"
    settings = ServerSettings(
        store=str(store["root"]),
        tokens=(TOKEN,),
        signing_key=KEY,
        audit_log=str(log),
        index_at_start=False,
    )
    raw = request(f"/slides/{store['sid']}/tiles/0/1/1", Authorization=f"Bearer {SECRET}")
    with serving_app(settings) as (base, app, _):
        answers(base, raw, times=3)
        assert app[EXPRESS].answered == 0
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert sum(1 for x in lines if x.get("slide_id") == store["sid"]) == 3


def test_no_lane_when_turned_off(store: dict[str, Any]) -> None:
    settings = ServerSettings(store=str(store["root"]), express=False, index_at_start=False)
    with serving_app(settings) as (base, app, _):
        answers(base, request(f"/slides/{store['sid']}/tiles/0/1/1"), times=3)
        assert app[EXPRESS].answered == 0


# -- answers the lane awaits -------------------------------------------------------------------


@pytest.fixture
def fresh(store: dict[str, Any]) -> Iterator[Pair]:
    """A pair with nothing read yet and no tile cache: each level's first tile is awaited. The
    front has seen their Host once (the lane admits only Host values it accepted)."""
    settings = ServerSettings(store=str(store["root"]), tile_cache_mb=0, index_at_start=False)
    for services in pair(settings):
        for base in (services.lane_base, services.full_base):
            answers(base, request("/healthz"), times=1)
        yield services


def test_an_awaited_answer_is_the_same_and_keeps_its_place(
    fresh: Pair, store: dict[str, Any]
) -> None:
    """Tiles not at hand (their level's index not read yet) are awaited by the lane, not handed
    to aiohttp; requests pipelined behind them wait, and every answer is aiohttp's, in order."""
    sid = store["sid"]
    raws = [
        request(f"/slides/{sid}/tiles/3/0/0"),  # awaited: level 3's index is read
        request(f"/slides/{sid}/tiles/2/1/0"),  # awaited
        request(f"/slides/{sid}/tiles/3/0/1"),  # at hand
        request(f"/slides/{sid}_files/10/1_1.jpeg"),  # level 2's: at hand
        request(f"/slides/{sid}/tiles/1/0/0", "HEAD"),  # awaited
        request(f"/slides/{sid}/tiles/2/99/0"),  # aiohttp's: outside the level
        request(f"/slides/{sid}"),  # aiohttp's (and so are those behind it)
        request("/slides/0000000000000000000000ab/tiles/0/0/0"),
        request(f"/slides/{sid}/tiles/0/0/0"),
    ]
    got = []
    for base in (fresh.lane_base, fresh.full_base):
        conn = Connection(base)
        conn.send(b"".join(raws))
        got.append([conn.response(head_only=r.startswith(b"HEAD")) for r in raws])
        conn.close()
    assert [s for s, _, _ in got[0]] == [s for s, _, _ in got[1]]
    assert got[0] == got[1]
    lane = fresh.lane_app[EXPRESS]
    assert lane.awaited == 3 and lane.answered == 5


@contextlib.contextmanager
def gated(services: Pair) -> Iterator[Gate]:
    """The lane's plain-tile route, its awaited answer behind a `Gate` while in the block."""
    lane = services.lane_app[EXPRESS]
    route = next(r for r in lane._routes if r.resource.name == "slides.tile")
    gate = route.later = Gate(route)
    try:
        yield gate
    finally:
        route.later = gate.real


class Gate:
    """A later answer that waits until opened: the route's own, once the gate opens."""

    def __init__(self, route: Any) -> None:
        self.route = route
        self.real = route.later
        self.opened = asyncio.Event()
        self.entered = 0
        self.cancelled = False

    async def __call__(self, app: Any, info: Any, fields: Any) -> Any:
        self.entered += 1
        try:
            await self.opened.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return await self.real(app, info, fields)


def test_requests_behind_an_awaited_answer_wait_within_a_bound(
    fresh: Pair, store: dict[str, Any]
) -> None:
    """While the lane awaits an answer, what the client sends after it is held (at most a head's
    worth: reading pauses beyond it) and answered after it, in order."""
    sid = store["sid"]
    loop = fresh.lane_loop
    with gated(fresh) as gate:
        first = request(f"/slides/{sid}/tiles/4/0/0")
        behind = [request(f"/slides/{sid}"), request("/healthz")] * 300  # > MAX_HEAD bytes
        assert len(b"".join(behind)) > MAX_HEAD
        conn = Connection(fresh.lane_base)
        conn.send(first + b"".join(behind))
        deadline = time.monotonic() + 30
        while not any(p._later_paused for p in on(loop, fresh.lane_app)):
            assert time.monotonic() < deadline, "reading never paused"
            time.sleep(0.02)
        assert gate.entered == 1
        held = max(len(p._held) for p in on(loop, fresh.lane_app))
        assert MAX_HEAD < held <= MAX_HEAD + len(b"".join(behind))
        loop.call_soon_threadsafe(gate.opened.set)
        status, _, body = conn.response()
        assert status.endswith("200 OK") and body[:2] == b"\xff\xd8"
        for raw in behind:
            status, _, body = conn.response()
            assert status.endswith("200 OK")
            assert (body == b'{"status": "ok"}') == raw.startswith(b"GET /healthz")
        conn.close()


def test_a_client_gone_while_its_answer_is_awaited(fresh: Pair, store: dict[str, Any]) -> None:
    """The awaited answer is cancelled with its connection; the service goes on."""
    sid = store["sid"]
    loop = fresh.lane_loop
    with gated(fresh) as gate:
        conn = Connection(fresh.lane_base)
        conn.send(request(f"/slides/{sid}/tiles/4/0/0"))
        deadline = time.monotonic() + 30
        while gate.entered == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        conn.close()
        while on(loop, fresh.lane_app) or not gate.cancelled:  # gone, its answer cancelled
            assert time.monotonic() < deadline, "the connection or its awaited answer stayed"
            time.sleep(0.02)
    assert answers(fresh.lane_base, request(f"/slides/{sid}/tiles/4/0/0"))[-1][0].endswith("OK")


def on(loop: asyncio.AbstractEventLoop, app: Any) -> list[ServiceConnection]:
    """`_connections(app)`, read on the service's loop."""

    async def read() -> list[ServiceConnection]:
        return _connections(app)

    return asyncio.run_coroutine_threadsafe(read(), loop).result(10)


# -- the parser alone ------------------------------------------------------------------------


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(
    hypothesis.strategies.lists(
        hypothesis.strategies.sampled_from(
            [
                b"GET",
                b"HEAD",
                b"POST",
                b" ",
                b"/slides/x/tiles/0/0/0",
                b"?v=1",
                b"HTTP/1.1",
                b"HTTP/1.0",
                b"\r\n",
                b"\n",
                b"\r",
                b"Host: 127.0.0.1",
                b"Content-Length: 5",
                b"Transfer-Encoding: chunked",
                b"Connection: close",
                b": x",
                b"\t",
                b"\x00",
                b"\xff",
                b"X-A: b",
            ]
        ),
        max_size=12,
    )
)
def test_the_parser_never_fails_and_never_delimits_a_request_with_a_body(
    parts: list[bytes],
) -> None:
    """Whatever bytes come, `Express.parse` answers (no exception: it runs in the connection's
    `data_received`), and a head it delimits has no header that gives its request a body."""
    raw = b"".join(parts)
    head = Express().parse(raw)
    if head is None:
        return
    names = [line.split(b":", 1)[0].strip().lower() for line in raw.split(b"\r\n")[1:]]
    assert b"content-length" not in names and b"transfer-encoding" not in names
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    if head.fields is not None:
        assert head.method in ("GET", "HEAD") and head.target.startswith("/")
        assert raw.split(b"\r\n", 1)[0].endswith(b" HTTP/1.1")
