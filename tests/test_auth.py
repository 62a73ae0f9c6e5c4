"""Who may read what, off loopback: Bearer tokens, signed URLs narrowed to one slide's tiles (or
its viewer page) that expire and are never extended, cache headers that keep authenticated and
patient-bearing bytes out of shared caches, and hostile credentials answered with 401, not 500."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

import wsi
from server.app import create_app
from server.auth import OPEN_PAGES, OPEN_PATHS, sign
from server.front import UNROUTED
from server.settings import ServerSettings

SOURCE = Path(__file__).resolve().parents[1] / "sample_data" / "CMU-1-Small-Region.svs"
TOKEN, KEY = "t0ken-for-the-auth-tests", "signing-key-for-the-auth-tests-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """The sample slide published under two ids: a signature for one must not open the other."""
    root = tmp_path_factory.mktemp("auth")
    target = wsi.Store(wsi.StoreSettings(str(root)))
    first = wsi.convert_slide(SOURCE, target)
    other = wsi.convert_slide(SOURCE, target, slide_id="other-slide")
    return root, first.slide_id, other.slide_id


def run(root: Path, check: Callable[[TestClient], Awaitable[Any]], **extra: Any) -> Any:
    settings = ServerSettings(
        store=str(root), host="0.0.0.0", tokens=(TOKEN,), signing_key=KEY, **extra
    )

    async def main() -> Any:
        async with TestClient(TestServer(create_app(settings))) as client:
            return await check(client)

    return asyncio.run(main())


def signed(scope: str, slide_id: str, seconds: int = 60) -> str:
    exp = int(time.time()) + seconds
    return f"exp={exp}&sig={sign(KEY, scope, slide_id, exp)}"


def tile_expiry(page: str) -> int:
    """The `exp` of the tile query in a viewer page's configuration."""
    match = re.search(r'<script type="application/json" id="slide-config">(.*?)</script>', page)
    assert match, page
    found = re.search(r"exp=(\d+)", json.loads(match.group(1))["query"])
    assert found
    return int(found.group(1))


def test_a_tile_signature_opens_that_slides_tiles_and_nothing_else(
    store: tuple[Path, str, str],
) -> None:
    root, sid, other = store

    async def check(c: TestClient) -> None:
        q = signed("tiles", sid)
        tiles = (
            f"/slides/{sid}/tiles/0/0/0",
            f"/slides/{sid}.dzi",
            f"/slides/{sid}_files/8/0_0.jpeg",
        )
        for url in tiles:
            assert (await c.get(f"{url}?{q}")).status == 200, url
        closed = [
            f"/slides/{sid}",
            f"/slides/{sid}/associated/thumbnail",
            f"/slides/{sid}/associated/label",
            f"/iiif/3/{sid}/info.json",
            f"/iiif/3/{sid}/full/max/0/default.jpg",
            f"/view/{sid}",
            "/slides",
            "/",
            f"/slides/{other}/tiles/0/0/0",  # another slide
        ]
        for url in closed:
            r = await c.get(f"{url}?{q}")
            assert r.status == 401, url
            assert (await r.json())["status"] == 401
        # A view signature opens the page only, not the tiles.
        v = signed("view", sid)
        assert (await c.get(f"/slides/{sid}/tiles/0/0/0?{v}")).status == 401
        assert (await c.get(f"/view/{sid}?{v}")).status == 200
        # Expired.
        old = int(time.time()) - 1
        stale = f"exp={old}&sig={sign(KEY, 'tiles', sid, old)}"
        assert (await c.get(f"/slides/{sid}/tiles/0/0/0?{stale}")).status == 401

    run(root, check)


def test_a_signed_view_page_never_extends_its_link(store: tuple[Path, str, str]) -> None:
    """A leaked viewer link used to mint fresh tile signatures on every visit: it worked for
    ever. The page's tiles now expire with the link that opened it."""
    root, sid, _ = store

    async def check(c: TestClient) -> None:
        exp = int(time.time()) + 30
        page = await c.get(f"/view/{sid}?exp={exp}&sig={sign(KEY, 'view', sid, exp)}")
        assert page.status == 200
        assert tile_expiry(await page.text()) == exp
        # Opened with a token instead: tiles get the configured lifetime.
        page = await c.get(f"/view/{sid}", headers=BEARER)
        assert exp < tile_expiry(await page.text()) <= int(time.time()) + 3600

    run(root, check)


@pytest.mark.parametrize("secret", ["tøken", "\u2603", "\udcff", "x" * 5000])
def test_non_ascii_credentials_are_refused_not_crashed(
    store: tuple[Path, str, str], secret: str
) -> None:
    root, sid, _ = store

    async def check(c: TestClient) -> None:
        # aiohttp's client sends header values as UTF-8 bytes; the server decodes them
        # leniently: exactly what a hostile client can make us compare.
        value = secret.encode("utf-8", "surrogatepass").decode("latin-1")
        r = await c.get("/slides", headers={"Authorization": f"Bearer {value}"})
        assert r.status == 401
        assert (await r.json())["status"] == 401
        exp = int(time.time()) + 60
        r = await c.get(f"/slides/{sid}/tiles/0/0/0", params={"exp": str(exp), "sig": secret})
        assert r.status == 401
        r = await c.get(f"/slides/{sid}/tiles/0/0/0", params={"exp": "١٢٣", "sig": "x"})
        assert r.status == 400  # Arabic-Indic digits pass str.isdigit(): no number in a URL
        assert "exp must be" in (await r.json())["error"]

    run(root, check)


def test_cache_headers_with_auth(store: tuple[Path, str, str]) -> None:
    root, sid, _ = store

    async def check(c: TestClient) -> None:
        tile = await c.get(f"/slides/{sid}/tiles/0/0/0", headers=BEARER)
        assert tile.headers["Cache-Control"] == "private, no-cache"
        version = tile.headers["ETag"].strip('"').split("-")[0]
        pinned = await c.get(f"/slides/{sid}/tiles/0/0/0?v={version}", headers=BEARER)
        assert pinned.headers["Cache-Control"] == "private, max-age=31536000, immutable"
        label = await c.get(f"/slides/{sid}/associated/label", headers=BEARER)
        assert label.status == 200
        assert label.headers["Cache-Control"] == "no-store"
        thumb = await c.get(f"/slides/{sid}/associated/thumbnail?v={version}", headers=BEARER)
        assert thumb.headers["Cache-Control"] == "private, max-age=31536000, immutable"
        # What a signed URL opened is kept no longer than the signature lives (a browser's
        # cache would otherwise show an expired link's tiles for a year).
        for url in (f"/slides/{sid}_files/8/0_0.jpeg", f"/slides/{sid}/tiles/0/0/0"):
            before = int(time.time())
            r = await c.get(f"{url}?v={version}&{signed('tiles', sid, seconds=120)}")
            assert r.status == 200
            control = r.headers["Cache-Control"]
            assert control.startswith("private, max-age=") and "immutable" not in control, url
            assert 0 < int(control.split("max-age=")[1]) <= 120 + int(time.time()) - before

    run(root, check, allow_label=True)


def guarded_routes(c: TestClient, sid: str) -> Iterator[tuple[Any, str, str]]:
    """(resource, method, URL) of every route of the app and of a path no route takes, its
    slide id `sid` and any other parameter 0, but the open pages and probes."""
    for resource in c.app.router.resources():
        path = "/no/route/takes/this" if resource.name == UNROUTED else resource.canonical
        url = re.sub(r"\{(\w+)\}", lambda m: sid if m.group(1) == "slide_id" else "0", path)
        if url.startswith(OPEN_PATHS) or url in OPEN_PAGES:
            continue
        for route in resource:
            yield resource, "GET" if route.method == "*" else route.method, url


def test_every_route_needs_credentials_but_the_open_ones(store: tuple[Path, str, str]) -> None:
    """Each handler is wrapped with the front as it is registered (`server.front`): every route
    there is, each of its methods, and a path no route takes, answers 401 without credentials,
    except the pages and probes that hold no data (`OPEN_PATHS`, `OPEN_PAGES`)."""
    root, sid, _ = store

    async def check(c: TestClient) -> None:
        tried = 0
        for resource, method, url in guarded_routes(c, sid):
            found = await c.app.router.resolve(make_mocked_request(method, url))
            assert found.route.resource is resource, (method, url)
            r = await c.request(method, url)
            assert r.status == 401, (method, url)
            if method != "HEAD":
                assert (await r.json())["status"] == 401
            tried += 1
        assert tried > 40

    run(root, check)


def test_links_are_never_made_from_a_host_that_is_not_one(store: tuple[Path, str, str]) -> None:
    """Off loopback any Host reaches the app: one that is not a host name and port is refused
    where a link would be made from it (IIIF ids, DICOMweb RetrieveURLs), never echoed."""
    root, sid, _ = store

    async def check(c: TestClient) -> None:
        for url in (f"/iiif/3/{sid}/info.json", "/dicomweb/studies"):
            r = await c.get(url, headers={**BEARER, "Host": "evil.example/<x>"})
            assert r.status == 400, url
            assert (await r.json())["error"] == "the Host header is not a valid host name"

    run(root, check)


READER, PIXELS = "reader-token-for-the-auth-tests", "pixels-token-for-the-auth-tests"


def test_each_token_role_opens_what_it_may_and_no_more(store: tuple[Path, str, str]) -> None:
    """Every token could do everything: an AI pipeline given a token to read tiles could read
    every slide's name and case, DICOMweb's patient names, the labels (with --allow-label) and
    cancel jobs. Now, route by route and method by method: an admin token (`WSI_TOKENS`) is
    refused nothing, a read token (`WSI_READ_TOKENS`) every change, and a pixel token
    (`WSI_PIXEL_TOKENS`) everything but the tiles and IIIF images of a slide it names; each
    refusal a 403 that says which token and why (the audit log names it too)."""
    root, sid, _ = store

    async def check(c: TestClient) -> dict[str, set[tuple[str, str]]]:
        opened: dict[str, set[tuple[str, str]]] = {"admin": set(), "read": set(), "pixels": set()}
        for resource, method, url in guarded_routes(c, sid):
            if method == "HEAD":  # its GET's answer without the body that says why
                continue
            for role, secret in (("admin", TOKEN), ("read", READER), ("pixels", PIXELS)):
                r = await c.request(method, url, headers={"Authorization": f"Bearer {secret}"})
                body = await r.read()
                refused = r.status == 403 and b"may not" in body
                assert r.status != 401, (role, method, url)
                if not refused:
                    opened[role].add((method, str(resource.name or url)))
                else:  # says which token and why, never its secret
                    error = (await r.json())["error"]
                    assert error.startswith("token ") and f"({role})" in error, error
                    assert secret not in error
        return opened

    opened = run(root, check, read_tokens=(f"reader:{READER}",), pixel_tokens=(f"ai:{PIXELS}",))
    everything = opened["admin"]
    reads = {(m, n) for m, n in everything if m == "GET"}
    assert len(everything) > 40 and len(reads) < len(everything)  # there are writes to refuse
    assert opened["read"] == reads
    pixel_routes = {"slides.tile", "dzi.descriptor", "dzi.tile", "iiif.image", "iiif.info"}
    assert {n for _, n in opened["pixels"]} == pixel_routes | {"iiif.base"}
    assert {(m, n) for m, n in reads if n in pixel_routes | {"iiif.base"}} == opened["pixels"]
