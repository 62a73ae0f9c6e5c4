"""Hostile HTTP: the service's own OpenAPI document is valid OpenAPI 3.1, and schemathesis,
generating requests from it against the real routes on a real port, finds no 5xx and no response
that contradicts the document; slow clients that hold their headers open do not starve others."""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import OpenAPIV31SpecValidator
from prometheus_client.parser import text_string_to_metric_families
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import wsi
from server.settings import ServerSettings

from .helpers import free_port, serving

SOURCE = Path(__file__).resolve().parents[1] / "sample_data" / "CMU-1-Small-Region.svs"
EXAMPLES = 25
"""Generated requests per operation (valid and invalid ones)."""


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """The service with one published slide on 127.0.0.1: (base URL, slide id)."""
    root = tmp_path_factory.mktemp("hostile")
    sid = wsi.convert_slide(SOURCE, wsi.Store(wsi.StoreSettings(str(root / "store")))).slide_id
    (root / "inbox").mkdir()  # STOW-RS stores into it: its requests are generated too
    settings = ServerSettings(store=str(root / "store"), watch=(str(root / "inbox"),))
    with serving(settings) as base:
        yield base, sid


@schemathesis.serializer("multipart/related")
def _as_sent(context: Any, value: Any) -> bytes:
    """A generated STOW-RS body (`multipart/related; type="application/dicom"`), as bytes."""
    return value if isinstance(value, bytes) else json.dumps(value).encode()


def test_openapi_document_is_valid_openapi_31(live: tuple[str, str]) -> None:
    doc = requests.get(f"{live[0]}/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.1")
    errors = [str(e).splitlines()[0] for e in OpenAPIV31SpecValidator(doc).iter_errors()]
    assert errors == []


@pytest.mark.timeout(900)
def test_generated_requests_get_no_5xx_and_conform(live: tuple[str, str]) -> None:
    """Every operation of the document, fed requests generated from it (valid and invalid)."""
    schema = schemathesis.openapi.from_url(f"{live[0]}/openapi.json")
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    operations: list[APIOperation] = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()
        operations.append(result.ok())
    assert len(operations) > 20
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            case.call_and_validate(checks=checks)

        check()


@pytest.mark.timeout(120)
def test_slow_clients_do_not_starve_others(live: tuple[str, str]) -> None:
    """Hundreds of connections that send half a request line and stall (slowloris) while a
    normal client keeps being answered."""
    base, sid = live
    host, port = base.removeprefix("http://").split(":")
    slow = []
    try:
        for _ in range(300):
            s = socket.create_connection((host, int(port)), timeout=5)
            s.sendall(b"GET /slides HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            slow.append(s)
        for _ in range(20):
            start = time.monotonic()
            r = requests.get(f"{base}/slides/{sid}/tiles/0/0/0", timeout=10)
            assert r.status_code == 200
            assert time.monotonic() - start < 5
    finally:
        for s in slow:
            s.close()


def test_a_request_head_past_64_kb_is_refused_before_it_ends(live: tuple[str, str]) -> None:
    """aiohttp bounds each header line (8 KB) and their number (128), not their sum: a client
    that sent 120 lines of 8 KB and never ended its head was read to the end and held about
    1.9 MB per connection until the keep-alive timeout (500 such connections took one process
    from 90 MB to 1 GB, before any token is asked for). Such a head is now refused once past
    64 KB with a JSON 431, and the connection closed; a head of 48 KB is still answered."""
    host, port = live[0].removeprefix("http://").split(":")
    line = b"X-Big: " + b"a" * 8000 + b"\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + line * 6 + b"\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        with contextlib.suppress(OSError):  # the service stops reading once it refuses
            for _ in range(120):  # never the blank line that ends the head
                sock.sendall(line)
        answer = b""
        with contextlib.suppress(ConnectionResetError):  # it closes with our bytes unread
            while chunk := sock.recv(65536):
                answer += chunk
    status, content_type, body = _status_type_body(answer)
    assert (status, content_type) == (431, "application/json; charset=utf-8")
    assert json.loads(body) == {"error": "request head over 64 KB (HeadTooLarge)", "status": 431}


MALFORMED = {
    "space in the path": b"GET /slides/DOE JANE HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad header name": b"GET /slides HTTP/1.1\r\nHost: x\r\nX DOE JANE: 1\r\n\r\n",
    "header too long": b"GET /slides HTTP/1.1\r\nHost: x\r\nX: DOE JANE"
    + b"a" * 9000
    + b"\r\n\r\n",
    "bad method": b"G\x01T /slides/DOE-JANE HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad chunk size": (
        b"POST /slides HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nDOE\r\n"
    ),
}


def _answer(base: str, request: bytes) -> bytes:
    """Everything the service sends back to `request` on a new connection, until it closes it."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):  # the service closes the connection after a 400
            received += chunk
    return received


@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_request_that_cannot_be_parsed_gets_a_json_400(
    live: tuple[str, str], request_bytes: bytes
) -> None:
    """aiohttp answers what it cannot parse before any route sees it, in plain text quoting the
    request's bytes; the service's protocol answers like every other error, quoting nothing,
    and counts it in its metrics (it was invisible there)."""
    counted = _outside_front_400s(live[0])
    head, _, body = _answer(live[0], request_bytes).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].split()[1] == "400"
    assert "content-type: application/json; charset=utf-8" in [x.lower() for x in lines]
    doc = json.loads(body)
    assert doc["status"] == 400 and doc["error"].startswith("malformed HTTP request")
    assert b"DOE" not in body
    ok = requests.get(f"{live[0]}/healthz", timeout=10)  # and the service goes on
    assert ok.status_code == 200
    assert _outside_front_400s(live[0]) == counted + 1


def _outside_front_400s(base: str) -> float:
    """`wsi_http_requests_total` of the answers made outside the front with status 400."""
    text = requests.get(f"{base}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            wanted = {"route": "(outside the front)", "status": "400"}
            if sample.name == "wsi_http_requests_total" and sample.labels == wanted:
                return sample.value
    return 0.0


def _status_type_body(answer: bytes) -> tuple[int, str, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(x.lower().split(": ", 1) for x in lines[1:] if ": " in x)
    return int(lines[0].split()[1]), fields.get("content-type", ""), body


def test_a_request_target_without_a_path_is_one_for_the_root(live: tuple[str, str]) -> None:
    """aiohttp's router tries no route for an empty path: the absolute form without one (which a
    server must accept, RFC 9112) and CONNECT's authority form got a plain-text 404 from past
    the front. The empty path means `/` (RFC 9110 4.2.3), which takes no CONNECT."""
    host = live[0].removeprefix("http://")
    close = f"Host: {host}\r\nConnection: close\r\n\r\n".encode()
    root = _status_type_body(_answer(live[0], b"GET / HTTP/1.1\r\n" + close))
    absolute = _status_type_body(_answer(live[0], f"GET {live[0]} HTTP/1.1\r\n".encode() + close))
    assert absolute[0] == 200 and absolute[1].startswith("text/html")
    assert absolute == root
    status, content_type, body = _status_type_body(
        _answer(live[0], f"CONNECT {host} HTTP/1.1\r\n".encode() + close)
    )
    assert (status, content_type) == (405, "application/json; charset=utf-8")
    assert json.loads(body)["status"] == 405


IDLE_CLIENTS = 1500
"""Connections held open by clients that send half a request: more than the usual soft limit of
open files (1024)."""


@pytest.mark.timeout(300)
def test_more_idle_clients_than_the_usual_file_limit_starve_no_one(tmp_path: Path) -> None:
    """`wsi serve` started with the common soft limit of 1,024 open files (a hard one above it,
    as systemd gives): a thousand slow or idle clients left no descriptor for a new connection,
    which was reset. Each serving process now raises its soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or hard > IDLE_CLIENTS + 500, (
        f"the hard limit of open files ({hard}) leaves no room for this test"
    )
    wanted = IDLE_CLIENTS + 500
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))  # the test's sockets
    port = free_port()
    args = ["serve", "--store", str(tmp_path), "--port", str(port), "--processes", "1"]
    with (tmp_path / "serve.log").open("wb") as log:
        lowered = 'ulimit -Sn 1024 && exec "$0" "$@"'  # by a shell: no preexec_fn with threads
        proc = subprocess.Popen(
            ["sh", "-c", lowered, sys.executable, "-m", "server.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    idle: list[socket.socket] = []
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # until it answers (start-up), not a guess at how long that takes
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if requests.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the service did not start"
            time.sleep(0.1)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        assert int(line.split()[3]) > IDLE_CLIENTS + 100, line
        for _ in range(IDLE_CLIENTS):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /slides HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            idle.append(s)
        # The last one is accepted (its request is answered) once the service took them all.
        r = requests.get(f"{base}/slides", timeout=30)
        assert r.status_code == 200 and r.json()["slides"] == []
    finally:
        for s in idle:
            s.close()
        proc.terminate()
        proc.wait(60)


def test_a_malformed_request_is_logged_without_its_bytes(
    live: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's own log line for a request it cannot parse quoted the request's bytes (with a
    traceback): a header value may name a patient."""
    caplog.set_level(logging.DEBUG)
    host, port = live[0].removeprefix("http://").split(":")
    bad = (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"X-Patient: DOE^JANE\nFoo: bar\r\n\r\n"  # a bare LF ends a header: not HTTP
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(bad)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]

    def logged() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "aiohttp.server"]

    deadline = time.monotonic() + 10
    while not logged() and time.monotonic() < deadline:  # the server's thread logs it
        time.sleep(0.05)
    assert logged(), "the malformed request was not logged at all"
    assert "DOE" not in caplog.text
    assert all(r.exc_info is None for r in logged())
    assert "BadHttpMessage" in caplog.text
