"""Where a request head ends and whom it names, judged the same with the express lane
(`server.express`) and without it: a head ended by a bare LF is answered at once with the JSON
400 of a malformed request (the lane used to wait for a CRLF CRLF that never came, until the
keep-alive timeout), and an absolute-form target (`GET http://host/path`), whose authority
replaces Host (RFC 9112 3.2.2), passes the loopback Host check of a service without auth only
when that authority is a loopback one too, since the links of the answer are built from it."""

from __future__ import annotations

import dataclasses
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import wsi
from server.express import EXPRESS, undelimited
from server.settings import ServerSettings

from .conftest import sample
from .helpers import serving_app

SOURCE = sample("CMU-1-Small-Region.svs")
WAIT_SECONDS = 20.0
"""How long a test waits for an answer: far under the keep-alive timeout a silent connection
lasts (75 s as `wsi serve` runs, an hour as the tests' runner does), far over what an answer
takes on a loaded machine. A connection left waiting fails the test, never a slow one."""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("framing")
    pyramid = wsi.PyramidSettings(optimize_huffman=False)
    sid = wsi.convert_slide(
        SOURCE, wsi.Store(wsi.StoreSettings(str(root))), wsi.ConvertSettings(pyramid)
    ).slide_id
    return root, sid


@dataclasses.dataclass(frozen=True)
class Service:
    base: str
    app: Any
    sid: str
    lane: bool

    @property
    def authority(self) -> str:
        return self.base.removeprefix("http://")

    @property
    def answered(self) -> int:
        """Requests the express lane answered."""
        return int(self.app[EXPRESS].answered)


@pytest.fixture(scope="module", params=[True, False], ids=["lane", "no lane"])
def service(request: pytest.FixtureRequest, store: tuple[Path, str]) -> Iterator[Service]:
    root, sid = store
    settings = ServerSettings(store=str(root), index_at_start=False, express=request.param)
    with serving_app(settings) as (base, app, _):
        yield Service(base, app, sid, request.param)


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    """By lower-case name."""
    body: bytes


class Raw:
    """One connection: bytes sent as given, answers read as they come."""

    def __init__(self, service: Service) -> None:
        host, port = service.authority.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=WAIT_SECONDS)
        self.buffer = b""

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 20)  # a socket.timeout here: the service said nothing
        self.buffer += chunk
        return bool(chunk)

    def answer(self) -> Answer:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"closed before an answer: {self.buffer!r}")
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        pairs = [line.split(":", 1) for line in lines[1:]]
        headers = {name.lower(): value.strip() for name, value in pairs}
        status = int(lines[0].split()[1])
        length = 0 if status == 304 else int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            if not self._fill():
                raise ConnectionError("closed inside a body")
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Answer(status, headers, body)

    def closed(self) -> bool:
        """Whether the service closed the connection after what was read."""
        return not self.buffer and not self._fill()


# -- heads ended by a bare LF ----------------------------------------------------------------

BARE_LF = {
    "every line": b"GET /healthz HTTP/1.1\nHost: 127.0.0.1\n\n",
    "the last line": b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\n\r\n",
    "the blank line": b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\n",
    "a tile's": b"GET /slides/SID/tiles/0/1/1 HTTP/1.1\nHost: 127.0.0.1\n\n",
}


def _malformed(answer: Answer) -> None:
    assert answer.status == 400
    assert answer.headers["content-type"].startswith("application/json")
    doc = json.loads(answer.body)
    assert doc["status"] == 400 and doc["error"].startswith("malformed HTTP request")


@pytest.mark.parametrize("name", BARE_LF)
def test_a_head_ended_by_a_bare_lf_is_answered_400_at_once(service: Service, name: str) -> None:
    with Raw(service) as raw:
        raw.send(BARE_LF[name].replace(b"SID", service.sid.encode()))
        _malformed(raw.answer())
        assert raw.closed()


def test_after_an_answered_request_too(service: Service) -> None:
    """A bare-LF head behind a request the lane answers (a tile it has at hand)."""
    tile = f"GET /slides/{service.sid}/tiles/0/1/1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    with Raw(service) as raw:
        for _ in range(2):  # the first fills the caches; the lane answers the second
            raw.send(tile)
            assert raw.answer().status == 200
        before = service.answered
        raw.send(tile + BARE_LF["every line"])  # one packet, as a client pipelining sends it
        if service.lane:  # which answers the tile first (aiohttp only says the packet is bad)
            assert raw.answer().status == 200
            assert service.answered == before + 1
        _malformed(raw.answer())
        assert raw.closed()


def test_what_the_lane_holds_and_what_it_hands_on() -> None:
    """The lane holds the start of a head while it may still end at CRLF CRLF (a CR last may
    be half of a CRLF), and hands it to aiohttp once it cannot."""
    assert not undelimited(b"")
    assert not undelimited(b"GET / HTTP/1.1\r")
    assert not undelimited(b"GET / HTTP/1.1\r\nHost: a\r\n\r")
    assert undelimited(b"GET / HTTP/1.1\nHost: a\n\n")
    assert undelimited(b"GET / HTTP/1.1\nHo")  # ended by LFs or not, aiohttp judges it
    assert undelimited(b"GET / HTTP/1.1\r\nHost: a\n\r\n")
    assert undelimited(b"GET / HTTP/1.1\rHost: a")


# -- absolute-form targets -------------------------------------------------------------------


def _get(service: Service, target: str, host: str) -> Answer:
    with Raw(service) as raw:
        raw.send(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        return raw.answer()


def _refused(answer: Answer) -> None:
    assert answer.status == 403
    assert json.loads(answer.body)["status"] == 403


@pytest.mark.parametrize("path", ["/iiif/3/SID/info.json", "/slides/SID/tiles/0/1/1"])
def test_an_absolute_target_naming_another_host_is_refused(service: Service, path: str) -> None:
    """`Host: 127.0.0.1` admits an origin-form request; the target's `evil.example` replaces
    it (and would be the links' host), so the request is refused as `Host: evil.example` is."""
    path = path.replace("SID", service.sid)
    assert _get(service, path, "127.0.0.1").status == 200
    _get(service, path, "127.0.0.1")  # the lane answers a tile it has at hand
    before = service.answered
    _refused(_get(service, f"http://evil.example{path}", "127.0.0.1"))
    port = service.authority.split(":")[1]
    _refused(_get(service, f"http://evil.example:{port}{path}", f"[::1]:{port}"))
    _refused(_get(service, path, "evil.example"))
    assert service.answered == before  # the lane answers origin-form targets only


def test_an_absolute_target_with_another_host_header_is_refused(service: Service) -> None:
    """Both names a request gives the service must be loopback ones, the Host header too
    (see `server.cors.refusal`)."""
    path = f"/iiif/3/{service.sid}/info.json"
    _refused(_get(service, f"{service.base}{path}", "evil.example"))


def test_links_name_the_absolute_targets_authority(service: Service) -> None:
    """A loopback target is admitted, and the links name its host and port (the Host header
    names another loopback address, which RFC 9112 3.2.2 says to ignore)."""
    path = f"/iiif/3/{service.sid}/info.json"
    port = service.authority.split(":")[1]
    answer = _get(service, f"http://localhost:{port}{path}", "127.0.0.1")
    assert answer.status == 200
    assert json.loads(answer.body)["id"] == f"http://localhost:{port}/iiif/3/{service.sid}"
    answer = _get(service, path, f"127.0.0.1:{port}")  # origin form: the Host header's
    assert json.loads(answer.body)["id"] == f"http://127.0.0.1:{port}/iiif/3/{service.sid}"
