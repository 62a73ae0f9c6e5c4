"""The service's core API on a real aiohttp test server: slides, plain tiles, DeepZoom,
associated images, health, metrics, OpenAPI, auth, errors; a local store, sources on the fly,
and SeaweedFS."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

import wsi
from server.app import create_app
from server.auth import sign
from server.front import UNROUTED, routes
from server.settings import ServerSettings
from wsi.sources import open_slide

from .conftest import sample
from .s3server import SeaweedFS
from .s3server import seaweedfs as _seaweedfs_fixture  # noqa: F401


def run(settings: ServerSettings, check: Callable[[TestClient], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with TestClient(TestServer(create_app(settings))) as client:
            return await check(client)

    return asyncio.run(main())


TOKEN, KEY = "t0ken-for-server-tests", "k3y-for-the-server-tests-0123456789"
AS_STORED = wsi.ConvertSettings(wsi.PyramidSettings(optimize_huffman=False, keep_background=True))
"""The source's tiles as they are and every tile stored: these tests compare served bytes with
the source's and number frames over the whole grid (tests/test_sparse.py serves blank glass)."""


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("served")
    result = wsi.convert_slide(
        sample("CMU-1-Small-Region.svs"), wsi.Store(wsi.StoreSettings(str(root))), AS_STORED
    )
    return root, result.slide_id


def test_slides_tiles_and_caching(store_dir: tuple[Path, str]) -> None:
    root, sid = store_dir

    async def check(c: TestClient) -> None:
        listing = await (await c.get("/slides")).json()
        assert [s["id"] for s in listing["slides"]] == [sid]
        doc = await (await c.get(f"/slides/{sid}")).json()
        assert doc["status"] == "ready" and doc["width"] == 2220 and doc["mpp_x"] == 0.499
        assert doc["associated_images"] == ["thumbnail"]  # label/macro hidden by default
        r = await c.get(f"/slides/{sid}/tiles/0/3/2")
        assert r.status == 200 and r.content_type == "image/jpeg"
        # Unversioned URLs are revalidated (a re-conversion may change their bytes); a URL
        # naming the slide's version may be cached for good.
        assert r.headers["Cache-Control"] == "public, no-cache"
        version = r.headers["ETag"].strip('"').split("-")[0]
        pinned = await c.get(f"/slides/{sid}/tiles/0/3/2?v={version}")
        assert pinned.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        stale = await c.get(f"/slides/{sid}/tiles/0/3/2?v=00000000")
        assert stale.headers["Cache-Control"] == "public, no-cache"
        body = await r.read()
        with open_slide(sample("CMU-1-Small-Region.svs")) as src:
            assert body == src.read_encoded_tile(0, 3, 2)  # the stored bytes, as they are
        again = await c.get(
            f"/slides/{sid}/tiles/0/3/2", headers={"If-None-Match": r.headers["ETag"]}
        )
        assert again.status == 304
        thumb = await c.get(f"/slides/{sid}/associated/thumbnail")
        assert thumb.status == 200 and Image.open(io.BytesIO(await thumb.read())).size == (574, 768)

    run(ServerSettings(store=str(root)), check)


def test_deepzoom(store_dir: tuple[Path, str]) -> None:
    root, sid = store_dir

    async def check(c: TestClient) -> None:
        xml = await (await c.get(f"/slides/{sid}.dzi")).text()
        assert 'TileSize="240"' in xml and 'Width="2220"' in xml and 'Height="2967"' in xml
        top = 12  # ceil(log2(2967))
        interior = await (await c.get(f"/slides/{sid}_files/{top}/1_1.jpeg")).read()
        stored = await (await c.get(f"/slides/{sid}/tiles/0/1/1")).read()
        assert interior == stored
        edge = await c.get(f"/slides/{sid}_files/{top}/9_12.jpeg")  # 2220 = 9*240 + 60
        assert Image.open(io.BytesIO(await edge.read())).size == (60, 2967 - 12 * 240)
        smallest = await c.get(f"/slides/{sid}_files/0/0_0.jpeg")
        assert Image.open(io.BytesIO(await smallest.read())).size == (1, 1)

    run(ServerSettings(store=str(root)), check)


def test_a_dicom_only_slide_is_served_like_any_other(
    store_dir: tuple[Path, str], tmp_path: Path
) -> None:
    """A slide converted with `--format dicom` (no Zarr view) was listed (status `dicom-only`)
    but not served: its tiles, DeepZoom, IIIF and viewer answered 415 and DICOMweb left it out,
    though its level objects are the very ones a conversion with both views writes. Its
    manifest now keeps the root attributes, and it is served as the same slide converted with
    both views is: the same listing entry, tiles, DeepZoom, IIIF, viewer and DICOMweb frames."""
    ready_root, _ = store_dir
    path = sample("openslide-python-fixtures/small.svs")
    roots = {}
    for formats in (("zarr", "dicom"), ("dicom",)):
        root = roots[formats] = tmp_path / "-".join(formats)
        shutil.copytree(ready_root, root)
        sid = wsi.convert_slide(
            path, wsi.Store(wsi.StoreSettings(str(root))), wsi.ConvertSettings(formats=formats)
        ).slide_id
    paths = [
        f"/slides/{sid}", f"/slides/{sid}/tiles/0/0/0", f"/slides/{sid}.dzi",
        f"/slides/{sid}_files/4/0_0.jpeg", f"/iiif/3/{sid}/full/max/0/default.png",
        f"/slides/{sid}/associated/thumbnail", f"/view/{sid}",
    ]  # fmt: skip

    async def answers(c: TestClient) -> list[tuple[int, bytes]]:
        got = []
        for url in paths:
            r = await c.get(url)
            body = await r.read()
            if r.content_type == "text/html":  # the version in its URLs is the manifest's
                body = re.sub(rb"v=[0-9a-f]{8}", b"v=VERSION", body)
            got.append((r.status, body))
        text = await (await c.get("/dicomweb/studies")).text()
        got.append((200, re.sub(r"127\.0\.0\.1:[0-9]+", "HOST", text).encode()))
        studies = json.loads(text)
        for study in studies:
            base = f"/dicomweb/studies/{study['0020000D']['Value'][0]}/series"
            for one in await (await c.get(base)).json():
                uid = one["0020000E"]["Value"][0]
                for inst in await (await c.get(f"{base}/{uid}/instances")).json():
                    url = f"{base}/{uid}/instances/{inst['00080018']['Value'][0]}/frames/1"
                    accept = {"Accept": "multipart/related; type=image/jpeg"}
                    r = await c.get(url, headers=accept)
                    got.append((r.status, await r.read()))
        assert len(got) == len(paths) + 1 + sum(s["00201208"]["Value"][0] for s in studies)
        return got

    both = run(ServerSettings(store=str(roots[("zarr", "dicom")])), answers)
    dicom_only = run(ServerSettings(store=str(roots[("dicom",)])), answers)
    assert [status for status, _ in dicom_only] == [status for status, _ in both]
    assert all(status == 200 for status, _ in both), [status for status, _ in both]
    assert dicom_only == both


def test_a_dicom_only_slide_of_an_earlier_version_is_listed_not_hidden(
    store_dir: tuple[Path, str], tmp_path: Path
) -> None:
    """A slide converted with `--format dicom` by an earlier version, whose manifest kept no
    description of its levels, is listed with status `dicom-only` and the reason (it was
    missing from `GET /slides` and the viewer's list without a word); its tiles say the same as
    a 415; DICOMweb leaves it out. Converting it again makes it servable."""
    ready_root, ready = store_dir
    root = tmp_path / "store"
    shutil.copytree(ready_root, root)
    store = wsi.Store(wsi.StoreSettings(str(root)))
    path = sample("openslide-python-fixtures/small.svs")
    settings = wsi.ConvertSettings(formats=("dicom",))
    dicom_only = wsi.convert_slide(path, store, settings).slide_id
    manifest = store.manifest(dicom_only)
    attributes = manifest.attributes
    assert attributes is not None
    store.publish(dicom_only, dataclasses.replace(manifest, attributes=None))

    async def check(c: TestClient) -> None:
        listing = await (await c.get("/slides")).json()
        docs = {d["id"]: d for d in listing["slides"]}
        assert sorted(docs) == sorted([ready, dicom_only])
        assert docs[ready]["status"] == "ready" and "note" not in docs[ready]
        doc = docs[dicom_only]
        shown = (doc["status"], doc["name"], doc["case"], doc["width"], doc["height"])
        assert shown == ("dicom-only", "small", None, 16, 16)
        assert doc["levels"] == [] and doc["associated_images"] == []
        assert "without its Zarr view (--format dicom)" in doc["note"]
        assert "convert it again" in doc["note"] and "wsi export-dicom" in doc["note"]
        assert await (await c.get(f"/slides/{dicom_only}")).json() == doc
        tile = await c.get(f"/slides/{dicom_only}/tiles/0/0/0")
        assert tile.status == 415 and (await tile.json())["error"] == doc["note"]
        studies = await (await c.get("/dicomweb/studies")).json()
        assert len(studies) == 1  # the ready slide's study only
        page = await (await c.get("/")).text()
        assert "small" in page and "DICOM only: not served here" in page
        assert f"/view/{ready}" in page and f"/view/{dicom_only}" not in page
        assert f"/slides/{dicom_only}_files" not in page
        # The console's storage panel counts its bytes; "unreadable" (a damaged slide, for an
        # admin to look into) was what it said of it.
        used = await (await c.get("/storage")).json()
        manifest = json.loads((root / dicom_only / "manifest.json").read_text())
        assert used["unreadable"] == 0 and used["count"] == 2, used
        row = next(r for r in used["slides"] if r["id"] == dicom_only)
        assert (row["name"], row["stored_bytes"]) == ("small", manifest["stored_bytes"])
        assert used["total_bytes"] == sum(r["stored_bytes"] for r in used["slides"])

    run(ServerSettings(store=str(root)), check)
    again = wsi.convert_slide(path, store, settings)
    assert not again.skipped and store.manifest(dicom_only).attributes == attributes

    async def served(c: TestClient) -> None:
        doc = await (await c.get(f"/slides/{dicom_only}")).json()
        assert doc["status"] == "ready" and len(doc["levels"]) == len(attributes.levels)
        assert (await c.get(f"/slides/{dicom_only}/tiles/0/0/0")).status == 200

    run(ServerSettings(store=str(root)), served)


BAD = [
    ("/slides/UPPER", 400),
    ("/slides/..%2f..%2fetc", 400),
    ("/slides/nope", 404),
    ("/slides/{sid}/tiles/9/0/0", 400),
    ("/slides/{sid}/tiles/0/99/0", 400),
    ("/slides/{sid}/tiles/0/-1/0", 400),
    ("/slides/{sid}/tiles/0/x/0", 400),
    ("/slides/{sid}/associated/label", 403),
    ("/slides/{sid}/associated/secret", 400),
    ("/slides/{sid}_files/99/0_0.jpeg", 400),
    ("/slides/{sid}_files/12/99_0.jpeg", 400),
    ("/nothing/here", 404),
    ("/nothing%0Ahere", 404),  # a line break no `.*` route pattern takes
    ("/slides/x%0A_files/1/0_0.jpeg", 404),
    ("/slides/{sid}%0a", 400),  # a slide id with a trailing newline
    ("/static/no-such-file.js", 404),  # aiohttp's own static 404 had an empty body
    ("/static/%5c..%5capp.py", 404),
    ("/static/osd/no-such-file.js", 404),
    ("/iiif/3/{sid}/full/^70000,1/0/gray.jpg", 400),  # within the budget, too wide for JPEG
    ("/iiif/3/{sid}/full/^70000,1/0/bitonal.jpg", 400),
    ("/iiif/3/{sid}/full/^99999,1/0/default.jpg", 400),  # was a 422 (a damaged slide's status)
    ("/iiif/3/{sid}/full/^20000,1/0/default.webp", 400),
]


def test_errors_are_json_4xx(store_dir: tuple[Path, str]) -> None:
    root, sid = store_dir

    async def check(c: TestClient) -> None:
        for url, status in BAD:
            r = await c.get(url.format(sid=sid))
            assert r.status == status, url
            body = await r.json()
            assert body["status"] == status and body["error"]
            assert "Traceback" not in body["error"]

    run(ServerSettings(store=str(root)), check)


def test_a_bug_is_a_json_500_whose_log_quotes_nothing(
    store_dir: tuple[Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    """An exception nobody expected (a bug) is still a JSON answer, and its log line names the
    exception's type and route but not its message, which may quote a file or patient name."""
    root, _ = store_dir
    app = create_app(ServerSettings(store=str(root)))

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError(f"/slides/{request.match_info['name']}.svs")

    routes(app).add_get("/broken/{name}", broken)

    async def main() -> None:
        async with TestClient(TestServer(app)) as c:
            r = await c.get("/broken/ZZSMITH_JOHN")
            assert r.status == 500
            assert await r.json() == {"error": "internal error", "status": 500}
            assert (await c.get("/healthz")).status == 200

    caplog.set_level(logging.DEBUG)
    asyncio.run(main())
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name != "aiohttp.access")
    assert "RuntimeError" in logged and "/broken/{name}" in logged
    assert "ZZSMITH" not in logged


def test_an_answer_that_fails_part_way_is_cut_not_followed_by_another(
    store_dir: tuple[Path, str],
) -> None:
    """A handler failing once part of its streamed answer was out (a store error between two
    frames of a WADO-RS answer): the front's JSON error went out behind the partial body, a
    second status line where the client read the rest of the first body (under its ETag and
    Content-Length). The connection is cut now; a failure before any byte went out is still
    the JSON error."""
    root, _ = store_dir
    app = create_app(ServerSettings(store=str(root)))

    async def streamed(request: web.Request) -> web.StreamResponse:
        if request.match_info["when"] == "before":  # nothing sent yet
            raise wsi.StoreError("the store went away")
        response = web.StreamResponse(headers={"ETag": '"v1"'})
        response.content_length = 100
        await response.prepare(request)  # the head goes out here
        if request.match_info["when"] == "body":
            await response.write(b"a" * 10)
        raise wsi.StoreError("the store went away")

    routes(app).add_get("/streamed/{when}", streamed)

    async def main() -> None:
        async with TestClient(TestServer(app)) as c:
            for when, sent in (("head", b""), ("body", b"a" * 10)):
                reader, writer = await asyncio.open_connection("127.0.0.1", c.server.port)
                writer.write(f"GET /streamed/{when} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                received = b""
                with contextlib.suppress(ConnectionResetError):  # to the connection's end
                    received = await asyncio.wait_for(reader.read(), 30)
                writer.close()
                head, _, body = received.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200") and body == sent, received
            r = await c.get("/streamed/before")
            assert r.status == 503
            assert await r.json() == {"error": "the store went away", "status": 503}
            assert (await c.get("/healthz")).status == 200

    asyncio.run(main())


def test_a_method_a_path_does_not_take_is_a_json_405_saying_which_it_takes(
    store_dir: tuple[Path, str],
) -> None:
    """Requests no route takes get JSON like every other error (the router's own answers were
    plain text), a 405 with its Allow header, and are counted as no route's."""
    root, sid = store_dir

    async def check(c: TestClient) -> None:
        for method, url, status, allow in [
            ("POST", "/slides", 405, {"GET", "HEAD"}),
            ("PUT", "/jobs/j1", 405, {"GET", "HEAD", "DELETE"}),
            ("DELETE", f"/slides/{sid}/tiles/0/0/0", 405, {"GET", "HEAD"}),
            ("PATCH", "/nothing/here", 404, None),
            ("OPTIONS", "/slides", 405, {"GET", "HEAD"}),  # not a preflight: no Origin
        ]:
            r = await c.request(method, url)
            assert r.status == status, (method, url)
            assert await r.json() == {"error": r.reason, "status": status}
            given = r.headers.get("Allow")
            assert (set(given.split(",")) if given is not None else None) == allow, url
        text = await (await c.get("/metrics")).text()
        assert 'wsi_http_requests_total{route="unmatched",status="405"} 4.0' in text
        # A request target no path pattern can match: the server-wide `OPTIONS *`.
        reader, writer = await asyncio.open_connection("127.0.0.1", c.server.port)
        writer.write(b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        head, _, body = (await reader.read()).partition(b"\r\n\r\n")
        writer.close()
        assert head.startswith(b"HTTP/1.1 404") and b"application/json" in head
        assert json.loads(body) == {"error": "Not Found", "status": 404}

    run(ServerSettings(store=str(root)), check)


def test_a_route_added_around_the_front_stops_the_service_from_starting(
    store_dir: tuple[Path, str],
) -> None:
    """A route registered on aiohttp's router directly would answer without authentication,
    CORS checks or JSON errors: the service refuses to start with one."""
    root, _ = store_dir
    app = create_app(ServerSettings(store=str(root)))

    async def bare(request: web.Request) -> web.Response:
        return web.Response(text="unchecked")

    app.router.add_get("/bare", bare)

    async def main() -> None:
        async with TestServer(app):
            pass

    with pytest.raises(RuntimeError, match="/bare was added around the front"):
        asyncio.run(main())


def test_label_when_allowed(store_dir: tuple[Path, str]) -> None:
    root, sid = store_dir

    async def check(c: TestClient) -> None:
        r = await c.get(f"/slides/{sid}/associated/label")
        assert r.status == 200 and r.content_type == "image/jpeg"
        doc = await (await c.get(f"/slides/{sid}")).json()
        assert "label" in doc["associated_images"]

    run(ServerSettings(store=str(root), allow_label=True), check)


def test_health_metrics_openapi(store_dir: tuple[Path, str]) -> None:
    root, sid = store_dir

    async def check(c: TestClient) -> None:
        assert (await c.get("/healthz")).status == 200
        assert (await (await c.get("/readyz")).json())["status"] == "ready"
        await c.get(f"/slides/{sid}/tiles/0/0/0")
        await c.get(f"/slides/{sid}/tiles/0/0/0")
        text = await (await c.get("/metrics")).text()
        assert "wsi_http_requests_total" in text and "wsi_http_request_seconds_bucket" in text
        assert 'wsi_tile_cache_lookups_total{result="hit"}' in text
        spec = await (await c.get("/openapi.json")).json()
        documented = set(spec["paths"])
        for resource in c.app.router.resources():
            path = resource.canonical
            if path.startswith("/static") or resource.name == UNROUTED:
                continue
            assert path in documented, f"{path} missing from OpenAPI"

    run(ServerSettings(store=str(root)), check)


def test_auth_off_loopback(store_dir: tuple[Path, str]) -> None:
    root, sid = store_dir
    settings = ServerSettings(store=str(root), host="0.0.0.0", tokens=(TOKEN,), signing_key=KEY)

    async def check(c: TestClient) -> None:
        assert (await c.get("/healthz")).status == 200
        assert (await c.get("/slides")).status == 401
        ok = await c.get("/slides", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status == 200
        assert (await c.get("/slides", headers={"Authorization": "Bearer nope"})).status == 401
        exp = int(time.time()) + 60
        tile = f"/slides/{sid}/tiles/0/0/0"
        signed = await c.get(f"{tile}?exp={exp}&sig={sign(KEY, 'tiles', sid, exp)}")
        assert signed.status == 200
        old = int(time.time()) - 1
        assert (await c.get(f"{tile}?exp={old}&sig={sign(KEY, 'tiles', sid, old)}")).status == 401
        assert (await c.get(f"{tile}?exp={exp}&sig=deadbeef")).status == 401

    run(settings, check)
    with pytest.raises(wsi.InvalidArgument):
        ServerSettings(store=str(root), host="0.0.0.0")


def test_settings_from_environment() -> None:
    s = ServerSettings.from_env(
        {
            "WSI_STORE": "s3://b/p",
            "WSI_PORT": "9000",
            "WSI_ALLOW_LABEL": "yes",
            "WSI_SOURCES": "a, b",
        },
        port=9100,
    )
    assert (s.store, s.port, s.allow_label, s.sources) == ("s3://b/p", 9100, True, ("a", "b"))
    with pytest.raises(wsi.InvalidArgument):
        ServerSettings.from_env({"WSI_PORT": "eighty"})


def test_unconverted_source_served_then_store_takes_over(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(sample("openslide-python-fixtures/boxes.tiff"), inbox / "boxes.tiff")
    store = tmp_path / "store"
    settings = ServerSettings(store=str(store), sources=(str(inbox),))

    async def check(c: TestClient) -> str:
        [slide] = (await (await c.get("/slides")).json())["slides"]
        assert slide["status"] == "converting"
        r = await c.get(f"/slides/{slide['id']}/tiles/0/0/0")
        assert r.status == 200 and r.content_type == "image/jpeg"
        pixels = np.asarray(Image.open(io.BytesIO(await r.read())))
        assert pixels.shape == (256, 256, 3) and pixels.std() > 5
        return str(slide["id"])

    sid = run(settings, check)
    wsi.convert_slide(inbox / "boxes.tiff", wsi.Store(wsi.StoreSettings(str(store))))

    async def after(c: TestClient) -> None:
        [slide] = (await (await c.get("/slides")).json())["slides"]
        assert slide["id"] == sid and slide["status"] == "ready"

    run(settings, after)


@pytest.mark.s3
def test_slides_from_seaweedfs(seaweedfs: SeaweedFS, store_dir: tuple[Path, str]) -> None:
    root, sid = store_dir
    store = wsi.Store(
        wsi.StoreSettings(seaweedfs.url("served"), endpoint_url=seaweedfs.endpoint_url)
    )
    wsi.convert_slide(sample("CMU-1-Small-Region.svs"), store, AS_STORED)
    settings = ServerSettings(store=seaweedfs.url("served"), s3_endpoint=seaweedfs.endpoint_url)
    local = (root / sid / "slide.zarr/0/c/0/0/0").read_bytes()

    async def check(c: TestClient) -> None:
        assert (await (await c.get("/readyz")).json())["status"] == "ready"
        assert [s["id"] for s in (await (await c.get("/slides")).json())["slides"]] == [sid]
        body = await (await c.get(f"/slides/{sid}/tiles/0/2/2")).read()
        assert body[:2] == b"\xff\xd8" and body in local
        dzi = await c.get(f"/slides/{sid}_files/12/2_2.jpeg")
        assert await dzi.read() == body
        info = await (await c.get(f"/iiif/3/{sid}/info.json")).json()
        assert (info["width"], info["height"]) == (2220, 2967)
        iiif = await c.get(f"/iiif/3/{sid}/480,480,240,240/240,/0/default.jpg")
        assert await iiif.read() == body  # a declared tile: the stored bytes
        [study] = await (await c.get("/dicomweb/studies")).json()
        study_uid = study["0020000D"]["Value"][0]
        [series] = await (await c.get(f"/dicomweb/studies/{study_uid}/series")).json()
        series_uid = series["0020000E"]["Value"][0]
        instances = await (
            await c.get(f"/dicomweb/studies/{study_uid}/series/{series_uid}/instances")
        ).json()
        level0 = next(i for i in instances if i["00280008"]["Value"][0] == 130)
        sop = level0["00080018"]["Value"][0]
        frames = await c.get(
            f"/dicomweb/studies/{study_uid}/series/{series_uid}/instances/{sop}/frames/23",
            headers={"Accept": 'multipart/related; type="image/jpeg"'},
        )
        assert (
            frames.status == 200 and body in await frames.read()
        )  # frame 23 = tile (2, 2) of 10 columns
        for bad in (f"/iiif/3/{sid}/0,0,0,0/max/0/default.jpg", "/dicomweb/studies/1.2.x/series"):
            r = await c.get(bad)
            assert r.status == 400 and (await r.json())["status"] == 400

    run(settings, check)


@pytest.mark.s3
def test_readyz_says_when_the_store_bucket_does_not_exist(seaweedfs: SeaweedFS) -> None:
    """A bucket typed wrong (or deleted) was `/readyz` 200, "store reachable" (its probe, a HEAD
    of a key that need not exist, took the bucket's 404 for a missing key), while every listing
    answered 503 and the viewer said "/readyz says what is wrong". A load balancer kept sending
    the users to it."""
    for bucket, status, says in (
        (seaweedfs.bucket, 200, "reachable"),
        ("no-such", 503, "unreachable"),
    ):
        settings = ServerSettings(store=f"s3://{bucket}/typo", s3_endpoint=seaweedfs.endpoint_url)

        async def check(c: TestClient) -> tuple[int, str]:
            r = await c.get("/readyz")
            return r.status, (await r.json())["store"]

        assert run(settings, check) == (status, says), bucket
