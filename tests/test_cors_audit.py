"""Viewers on another origin (OpenSeadragon pages, Slim, dicom-microscopy-viewer) may read every
API, through one CORS policy with an allow-list when auth is on; and with auth on, every access to
a slide is one line of an audit log that names who (a token's name, never its secret)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

import wsi
from server.app import create_app
from server.auth import sign
from server.cors import is_loopback_host
from server.settings import ServerSettings

SOURCE = Path(__file__).resolve().parents[1] / "sample_data" / "CMU-1-Small-Region.svs"
VIEWER = "https://viewer.example.org"
TOKEN, KEY = "t0ken-for-cors-tests", "k3y-for-the-cors-and-audit-tests-0123"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("cors")
    sid = wsi.convert_slide(SOURCE, wsi.Store(wsi.StoreSettings(str(root)))).slide_id
    return root, sid


def run(settings: ServerSettings, check: Callable[[TestClient], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with TestClient(TestServer(create_app(settings))) as client:
            return await check(client)

    return asyncio.run(main())


def read_urls(sid: str) -> list[str]:
    return [
        f"/slides/{sid}",
        f"/slides/{sid}/tiles/0/0/0",
        f"/slides/{sid}.dzi",
        f"/slides/{sid}_files/8/0_0.jpeg",
        f"/iiif/3/{sid}/info.json",
        "/dicomweb/studies",
    ]


def test_on_loopback_only_listed_origins_read_names(store: tuple[Path, str]) -> None:
    """Without auth any web page the user opens could read what the service answers (patient
    names in DICOMweb): only the routes that answer with pixels alone are open to any origin
    (IIIF asks for `*`), the rest to listed origins only."""
    root, sid = store
    pixels = [f"/slides/{sid}/tiles/0/0/0", f"/slides/{sid}.dzi", f"/slides/{sid}_files/8/0_0.jpeg"]
    pixels += [f"/iiif/3/{sid}/info.json", f"/iiif/3/{sid}/full/64,/0/default.jpg"]
    names = [f"/slides/{sid}", "/slides", "/dicomweb/studies", f"/view/{sid}", "/"]

    async def unlisted(c: TestClient) -> None:
        stranger = {"Origin": "https://elsewhere.example"}
        for url in pixels:
            r = await c.get(url, headers=stranger)
            assert r.status == 200, url
            assert r.headers["Access-Control-Allow-Origin"] == "*", url
            assert "Vary" not in r.headers or "Origin" not in r.headers.getall("Vary"), url
        for url in names:
            r = await c.get(url, headers=stranger)
            assert r.status == 200, url
            assert "Access-Control-Allow-Origin" not in r.headers, url
            pre = await c.options(url, headers={**stranger, "Access-Control-Request-Method": "GET"})
            assert pre.status == 403, url

    run(ServerSettings(store=str(root)), unlisted)

    async def listed(c: TestClient) -> None:
        for url in read_urls(sid):
            r = await c.get(url, headers={"Origin": VIEWER})
            assert r.status == 200, url
            assert r.headers["Access-Control-Allow-Origin"] == VIEWER, url
            assert "ETag" in r.headers["Access-Control-Expose-Headers"]
            # A preflight (a read carrying Authorization) is answered, not a 405.
            pre = await c.options(
                url,
                headers={
                    "Origin": VIEWER,
                    "Access-Control-Request-Method": "GET",
                    "Access-Control-Request-Headers": "authorization",
                },
            )
            assert pre.status == 204, url
            assert "Authorization" in pre.headers["Access-Control-Allow-Headers"]
        # Errors carry the headers too, so a viewer can read why.
        r = await c.get("/slides/nope-nope", headers={"Origin": VIEWER})
        assert r.status == 404 and r.headers["Access-Control-Allow-Origin"] == VIEWER
        # Every read answer varies by Origin, also one without CORS headers.
        plain = await c.get(f"/slides/{sid}/tiles/0/0/0")
        assert "Origin" in plain.headers.getall("Vary")
        # Writes stay same-origin.
        pre = await c.options(
            "/jobs", headers={"Origin": VIEWER, "Access-Control-Request-Method": "POST"}
        )
        assert pre.status == 403

    run(ServerSettings(store=str(root), cors_origins=(VIEWER,)), listed)


def test_answers_that_stream_or_redirect_carry_cors_headers(store: tuple[Path, str]) -> None:
    """The headers are added where a handler returns its answer and, for the answers that
    stream (WADO-RS frames, instances) or redirect (IIIF's base URL), before they go out."""
    root, sid = store

    async def check(c: TestClient) -> None:
        docs = await (await c.get("/dicomweb/instances?includefield=all")).json()
        doc = max(docs, key=lambda d: int(d.get("00280008", {}).get("Value", [0])[0]))
        uid = {tag: doc[tag]["Value"][0] for tag in ("0020000D", "0020000E", "00080018")}
        instance = (
            f"/dicomweb/studies/{uid['0020000D']}/series/{uid['0020000E']}"
            f"/instances/{uid['00080018']}"
        )
        accept = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
        many = ",".join(str(n) for n in range(1, 21))  # past the frames sent as one body
        for url, headers in (
            (f"{instance}/frames/{many}", {"Accept": accept}),
            (instance, {"Accept": 'multipart/related; type="application/dicom"'}),
        ):
            r = await c.get(url, headers={"Origin": VIEWER, **headers})
            assert r.status == 200, url
            assert r.headers["Content-Type"].startswith("multipart/related"), url
            assert r.headers["Access-Control-Allow-Origin"] == VIEWER, url
            assert "Origin" in r.headers.getall("Vary"), url
            await r.read()
        r = await c.get(f"/iiif/3/{sid}", headers={"Origin": VIEWER}, allow_redirects=False)
        assert r.status in (302, 303) and r.headers["Access-Control-Allow-Origin"] == VIEWER

    run(ServerSettings(store=str(root), cors_origins=(VIEWER,)), check)


def test_without_auth_only_loopback_names_are_answered(store: tuple[Path, str]) -> None:
    """DNS rebinding: a site whose name resolves to 127.0.0.1 would otherwise read the service
    as its own origin."""
    root, sid = store

    async def check(c: TestClient) -> None:
        for host in ("rebind.attacker.example:8000", "127.0.0.1.nip.io", "10.0.0.1"):
            r = await c.get("/dicomweb/studies", headers={"Host": host})
            assert r.status == 403, host
            assert "Host" in (await r.json())["error"]
            assert "rebind" not in await r.text()
        for host in ("localhost:8000", "127.0.0.1", "127.3.2.1:80", "[::1]:8000", "LOCALHOST"):
            r = await c.get(f"/slides/{sid}/tiles/0/0/0", headers={"Host": host})
            assert r.status == 200, host

    run(ServerSettings(store=str(root)), check)
    # Digits are ASCII ones: int() and isdigit() took "１２７" for 127.
    assert not is_loopback_host("\uff11\uff12\uff17.0.0.1")
    assert not is_loopback_host("127.\u0660.0.1") and is_loopback_host("127.0.0.1:8000")

    async def with_auth(c: TestClient) -> None:  # a proxy's name is fine once tokens are asked
        r = await c.get(
            "/dicomweb/studies",
            headers={"Host": "pathology.example.org", "Authorization": f"Bearer {TOKEN}"},
        )
        assert r.status == 200

    run(ServerSettings(store=str(root), tokens=(TOKEN,), signing_key=KEY), with_auth)


def test_without_auth_writes_from_other_sites_are_refused(
    store: tuple[Path, str], tmp_path: Path
) -> None:
    """Cross-site request forgery: a page of any site could POST to the service on the user's
    machine (a quarantine retry, a job) even though it cannot read the answer."""
    root, _ = store
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    settings = ServerSettings(store=str(root), watch=(str(inbox),))

    async def check(c: TestClient) -> None:
        port = c.server.port
        for headers in (
            {"Origin": "https://evil.example"},
            {"Origin": "null"},
            {"Origin": f"http://localhost:{port}"},  # another name: another origin
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site", "Origin": f"http://127.0.0.1:{port}"},
        ):
            for method, path in (("POST", "/jobs"), ("POST", "/quarantine/x/retry")):
                r = await c.request(
                    method, path, data="{}", headers={"Content-Type": "text/plain", **headers}
                )
                assert r.status == 403, (path, headers)
                assert "own pages" in (await r.json())["error"]
            r = await c.delete("/jobs/abc", headers=headers)
            assert r.status == 403, headers
        # The service's own pages (the console) and scripts without an Origin go on.
        own = {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
        r = await c.post("/jobs", json={"source": "/etc/passwd"}, headers=own)
        assert r.status == 400
        r = await c.post("/jobs", json={"source": "/etc/passwd"})
        assert r.status == 400

    run(settings, check)


def test_tokens_turn_auth_on_wherever_the_service_listens(store: tuple[Path, str]) -> None:
    """An operator who sets tokens behind a proxy on the same machine must not get a service
    that ignores them."""
    root, _ = store
    settings = ServerSettings(store=str(root), tokens=(TOKEN,), signing_key=KEY)
    assert settings.host == "127.0.0.1" and settings.requires_auth

    async def check(c: TestClient) -> None:
        assert (await c.get("/dicomweb/studies")).status == 401
        r = await c.get("/dicomweb/studies", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status == 200

    run(settings, check)
    with pytest.raises(wsi.InvalidArgument, match="WSI_SIGNING_KEY"):
        ServerSettings(store=str(root), tokens=(TOKEN,))


def test_with_auth_only_listed_origins(store: tuple[Path, str]) -> None:
    root, sid = store
    settings = ServerSettings(
        store=str(root), host="0.0.0.0", tokens=(TOKEN,), signing_key=KEY, cors_origins=(VIEWER,)
    )

    async def check(c: TestClient) -> None:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        ok = await c.get(f"/slides/{sid}/tiles/0/0/0", headers={**auth, "Origin": VIEWER})
        assert ok.status == 200
        assert ok.headers["Access-Control-Allow-Origin"] == VIEWER
        assert "Origin" in ok.headers.getall("Vary")
        for url in (f"/iiif/3/{sid}/info.json", f"/slides/{sid}.dzi", "/dicomweb/studies"):
            listed = await c.get(url, headers={**auth, "Origin": VIEWER})
            assert listed.headers["Access-Control-Allow-Origin"] == VIEWER, url
            stranger = await c.get(url, headers={**auth, "Origin": "https://evil.example"})
            assert "Access-Control-Allow-Origin" not in stranger.headers, url
        other = await c.get(
            f"/slides/{sid}/tiles/0/0/0", headers={**auth, "Origin": "https://evil.example"}
        )
        assert other.status == 200 and "Access-Control-Allow-Origin" not in other.headers
        pre = {
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        }
        assert (
            await c.options(f"/slides/{sid}.dzi", headers={**pre, "Origin": VIEWER})
        ).status == 204
        refused = await c.options(
            f"/slides/{sid}.dzi", headers={**pre, "Origin": "https://evil.example"}
        )
        assert refused.status == 403

    run(settings, check)
    with pytest.raises(wsi.InvalidArgument):
        ServerSettings(cors_origins=("https://viewer.example.org/path",))


def test_an_audit_log_asked_for_without_auth_is_kept(
    store: tuple[Path, str], tmp_path: Path
) -> None:
    """`--audit-log` on loopback without tokens was silently ignored: an operator who asked
    for a record of who read what got none."""
    root, sid = store
    log = tmp_path / "audit.jsonl"

    async def check(c: TestClient) -> None:
        assert (await c.get(f"/slides/{sid}/tiles/0/0/0")).status == 200

    run(ServerSettings(store=str(root), audit_log=str(log)), check)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(d["principal"], d["slide_id"]) for d in lines] == [("anonymous", sid)]


def test_audit_log_names_who_read_what(store: tuple[Path, str], tmp_path: Path) -> None:
    root, sid = store
    log = tmp_path / "audit.jsonl"
    settings = ServerSettings(
        store=str(root),
        host="0.0.0.0",
        tokens=("alice:s3cret-alice-0123", "bare-s3cret-0123456"),
        signing_key=KEY,
        audit_log=str(log),
    )
    exp = int(time.time()) + 60

    async def check(c: TestClient) -> None:
        assert (
            await c.get(f"/slides/{sid}", headers={"Authorization": "Bearer s3cret-alice-0123"})
        ).status == 200
        assert (
            await c.get("/slides", headers={"Authorization": "Bearer bare-s3cret-0123456"})
        ).status == 200
        tile = f"/slides/{sid}/tiles/0/1/1?exp={exp}&sig={sign(KEY, 'tiles', sid, exp)}"
        assert (await c.get(tile)).status == 200
        assert (await c.get(f"/slides/{sid}/tiles/0/0/0")).status == 401

    old = os.umask(0)
    try:
        run(settings, check)
    finally:
        os.umask(old)
    text = log.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [(e["principal"], e["status"]) for e in lines] == [
        ("alice", 200),
        ("signed:tiles", 200),
        ("anonymous", 401),
    ]
    assert lines[0]["route"] == "/slides/{slide_id}" and lines[0]["slide_id"] == sid
    assert lines[1]["route"] == "/slides/{slide_id}/tiles/{level}/{col}/{row}"
    assert "s3cret" not in text and "sig=" not in text and "exp=" not in text
    assert stat.S_IMODE(log.stat().st_mode) & 0o007 == 0


def test_audit_log_names_the_slides_dicomweb_answered_with(
    store: tuple[Path, str], tmp_path: Path
) -> None:
    """DICOMweb names slides by their DICOM UIDs or searches them: each request is a line with
    the ids of the slides it answered with (none for a search that found nothing, or an unknown
    instance), and never the query, which may hold a patient's name."""
    root, sid = store
    log = tmp_path / "audit.jsonl"
    settings = ServerSettings(
        store=str(root),
        host="0.0.0.0",
        tokens=("alice:s3cret-alice-0123",),
        signing_key=KEY,
        audit_log=str(log),
    )
    alice = {"Authorization": "Bearer s3cret-alice-0123"}
    frame = {"Accept": 'multipart/related; type="image/jpeg"'}

    async def check(c: TestClient) -> list[str]:
        found = await (await c.get("/dicomweb/instances", headers=alice)).json()
        uids = [found[0][tag]["Value"][0] for tag in ("0020000D", "0020000E", "00080018")]
        study, series, sop = uids
        inst = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"
        statuses = [
            (await c.get("/dicomweb/studies?PatientName=ZZNOBODY*", headers=alice)).status,
            (await c.get(f"/dicomweb/studies/{study}/metadata", headers=alice)).status,
            (await c.get(f"{inst}/frames/1", headers={**alice, **frame})).status,
            (await c.get(f"{inst}/frames/1", headers={**alice, **frame})).status,  # memo path
            (
                await c.get(
                    f"/dicomweb/studies/{study}/series/1.2/instances/3.4/frames/1",
                    headers={**alice, **frame},
                )
            ).status,
        ]
        assert statuses == [200, 200, 200, 200, 404]
        return uids

    run(settings, check)
    text = log.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [(e.get("slide_id"), e.get("slide_ids"), e["status"]) for e in lines] == [
        (sid, None, 200),  # the search that found the instance
        (None, [], 200),  # a search that found nothing
        (sid, None, 200),
        (sid, None, 200),
        (sid, None, 200),
        (None, [], 404),
    ]
    assert all(e["principal"] == "alice" for e in lines)
    assert "ZZNOBODY" not in text and "PatientName" not in text


def test_audit_log_never_records_a_malformed_slide_id(
    store: tuple[Path, str], tmp_path: Path
) -> None:
    """A slide path whose id is no slide id (a 400) was logged with the segment as typed: a
    patient's name tried in the address bar went into the audit log. It is null now."""
    root, sid = store
    log = tmp_path / "audit.jsonl"
    settings = ServerSettings(
        store=str(root), host="0.0.0.0", tokens=("alice:s3cret-alice-0123",), signing_key=KEY,
        audit_log=str(log),
    )  # fmt: skip
    headers = {"Authorization": "Bearer s3cret-alice-0123"}

    async def check(c: TestClient) -> None:
        assert (await c.get("/slides/DOE%5EJANE", headers=headers)).status == 400
        assert (await c.get("/slides/DOE%5EJANE/tiles/0/0/0", headers=headers)).status == 400
        assert (await c.get(f"/slides/{sid}", headers=headers)).status == 200

    run(settings, check)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["slide_id"] for e in lines] == [None, None, sid]
    assert "DOE" not in log.read_text()
