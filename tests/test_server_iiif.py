"""IIIF Image API 3.0 on a real aiohttp test server: info.json, declared tiles (stored bytes),
regions against OpenSlide, rotation/quality/format, the pixel budget, and 4xx JSON errors."""

from __future__ import annotations

import asyncio
import io
import math
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

import wsi
from server.app import create_app
from server.render import encode_image
from server.settings import ServerSettings

from .conftest import area_reference, psnr, sample

SLIDE = sample("CMU-1-Small-Region.svs")
W, H, TILE = 2220, 2967, 240
FACTORS = [1, 2, 4, 8, 16]
LD_JSON = 'application/ld+json;profile="http://iiif.io/api/image/3/context.json"'


def run(settings: ServerSettings, check: Callable[[TestClient], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with TestClient(TestServer(create_app(settings))) as client:
            return await check(client)

    return asyncio.run(main())


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    assert SLIDE.exists(), f"missing sample slide {SLIDE}"
    root = tmp_path_factory.mktemp("iiif")
    # Derived levels as RGB 4:4:4 JPEG: the default 4:2:0 alone costs this dense tissue ~6 dB
    # against an exact area downsample (~29 dB; see test_convert), more than rendering may.
    settings = wsi.ConvertSettings(wsi.PyramidSettings(subsample_420=False))
    result = wsi.convert_slide(SLIDE, wsi.Store(wsi.StoreSettings(str(root))), settings)
    return root, result.slide_id


def decode(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)))


def openslide_region(x: int, y: int, w: int, h: int) -> np.ndarray:
    with openslide.OpenSlide(str(SLIDE)) as s:
        rgba = np.asarray(s.read_region((x, y), 0, (w, h)))
    alpha = rgba[..., 3:4].astype(np.float64) / 255
    return np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)


async def get_image(c: TestClient, url: str) -> np.ndarray:
    r = await c.get(url)
    assert r.status == 200, (url, await r.text())
    return decode(await r.read())


def test_info_json(store_dir: tuple[Path, str]) -> None:
    root, sid = store_dir

    async def check(c: TestClient) -> None:
        r = await c.get(f"/iiif/3/{sid}/info.json")
        assert r.status == 200 and r.content_type == "application/json"
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        doc = await r.json()
        assert doc["@context"] == "http://iiif.io/api/image/3/context.json"
        assert doc["id"] == f"http://{r.url.host}:{r.url.port}/iiif/3/{sid}"
        assert doc["type"] == "ImageService3" and doc["protocol"] == "http://iiif.io/api/image"
        assert doc["profile"] == "level2"
        assert (doc["width"], doc["height"]) == (W, H)
        assert doc["tiles"] == [{"width": TILE, "height": TILE, "scaleFactors": FACTORS}]
        assert doc["maxArea"] == 16_000_000
        assert {"width": 138, "height": 185} in doc["sizes"]
        assert all(s["width"] * s["height"] <= doc["maxArea"] for s in doc["sizes"])
        assert "webp" in doc["extraFormats"] and "gray" in doc["extraQualities"]

        ld = await c.get(f"/iiif/3/{sid}/info.json", headers={"Accept": "application/ld+json"})
        assert ld.headers["Content-Type"] == LD_JSON
        forwarded = await c.get(
            f"/iiif/3/{sid}/info.json",
            headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "tiles.example.org"},
        )
        assert (await forwarded.json())["id"] == f"https://tiles.example.org/iiif/3/{sid}"
        spoof = await c.get(
            f"/iiif/3/{sid}/info.json", headers={"X-Forwarded-Host": "evil/<script>"}
        )
        assert (await spoof.json())["id"].startswith("http://127.0.0.1")

        base = await c.get(f"/iiif/3/{sid}", allow_redirects=False)
        assert base.status == 303
        assert base.headers["Location"] == f"{doc['id']}/info.json"
        assert "X-Forwarded-Host" in base.headers["Vary"]

        preflight = await c.options(
            f"/iiif/3/{sid}/info.json",
            headers={"Origin": "http://viewer", "Access-Control-Request-Method": "GET"},
        )
        assert preflight.status == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == "*"

        spec = await (await c.get("/openapi.json")).json()
        assert "/iiif/3/{slide_id}/info.json" in spec["paths"]
        assert "/iiif/3/{slide_id}/{region}/{size}/{rotation}/{quality}.{format}" in spec["paths"]

    run(ServerSettings(store=str(root)), check)


def declared_tiles(
    width: int, height: int, tile: int, factors: list[int]
) -> Iterator[tuple[int, int, int, int, int, int, int]]:
    """Every tile request a IIIF client derives from info.json (the spec's algorithm)."""
    for s in factors:
        step = tile * s
        for y in range(0, height, step):
            for x in range(0, width, step):
                rw, rh = min(step, width - x), min(step, height - y)
                yield s, x, y, rw, rh, -(-rw // s), -(-rh // s)


def test_declared_tiles_are_stored_bytes(store_dir: tuple[Path, str]) -> None:
    root, sid = store_dir

    async def check(c: TestClient) -> None:
        # Interior tiles: the stored JPEG as it is, in the `w,` and the `w,h` forms.
        for level, col, row in [(0, 1, 2), (0, 0, 0), (1, 2, 3), (2, 1, 1)]:
            s = 2**level
            region = f"{col * TILE * s},{row * TILE * s},{TILE * s},{TILE * s}"
            stored: bytes | np.ndarray = await (
                await c.get(f"/slides/{sid}/tiles/{level}/{col}/{row}")
            ).read()
            for size in (f"{TILE},", f"{TILE},{TILE}", f",{TILE}"):
                r = await c.get(f"/iiif/3/{sid}/{region}/{size}/0/default.jpg")
                assert r.status == 200 and r.content_type == "image/jpeg"
                assert await r.read() == stored, (level, col, row, size)
                assert r.headers["Cache-Control"] == "public, no-cache"  # unversioned URL
                assert r.headers["ETag"].startswith('"') and 'rel="canonical"' in r.headers["Link"]
        level0 = f"/iiif/3/{sid}/240,480,240,240/max/0/color.jpg"
        stored = await (await c.get(f"/slides/{sid}/tiles/0/1/2")).read()
        first = await c.get(level0)
        assert await first.read() == stored
        again = await c.get(level0, headers={"If-None-Match": first.headers["ETag"]})
        assert again.status == 304

        # Every declared tile, edges included, has the size IIIF clients compute.
        for s, x, y, rw, rh, tw, th in declared_tiles(W, H, TILE, FACTORS):
            for size in (f"{tw},", f"{tw},{th}"):
                pixels = await get_image(c, f"/iiif/3/{sid}/{x},{y},{rw},{rh}/{size}/0/default.jpg")
                assert pixels.shape == (th, tw, 3), (s, x, y, size)

        # Edge tiles are the stored tile cropped (an extra IIIF row/column repeats the edge).
        stored = decode(await (await c.get(f"/slides/{sid}/tiles/0/9/12")).read())
        edge = await get_image(c, f"/iiif/3/{sid}/2160,2880,60,87/60,/0/default.png")
        assert np.array_equal(edge, stored[:87, :60])
        stored = decode(await (await c.get(f"/slides/{sid}/tiles/1/4/6")).read())  # 1110x1483
        edge = await get_image(c, f"/iiif/3/{sid}/1920,2880,300,87/150,44/0/default.png")
        assert edge.shape == (44, 150, 3)
        assert np.array_equal(edge[:43], stored[:43, :150])
        assert np.array_equal(edge[43], edge[42])

    run(ServerSettings(store=str(root)), check)


def test_regions_match_openslide(store_dir: tuple[Path, str]) -> None:
    root, sid = store_dir

    async def check(c: TestClient) -> None:
        # Full resolution, not aligned to tiles: lossless PNG is OpenSlide's pixels exactly;
        # JPEG differs from them only by the service's encoding (quality 90, 4:2:0), which on
        # this dense tissue alone costs a mean error of ~6.6.
        x, y, w, h = 1013, 1207, 301, 203
        ref = openslide_region(x, y, w, h)
        png = await get_image(c, f"/iiif/3/{sid}/{x},{y},{w},{h}/max/0/default.png")
        assert np.array_equal(png, ref)
        jpg = await get_image(c, f"/iiif/3/{sid}/{x},{y},{w},{h}/{w},{h}/0/default.jpg")
        assert jpg.shape == ref.shape
        encoded_ref = decode(encode_image(ref, "jpg")[0])
        assert np.abs(jpg.astype(np.float64) - encoded_ref).mean() < 0.5
        error = np.abs(jpg.astype(np.float64) - ref).mean()
        assert error < np.abs(encoded_ref.astype(np.float64) - ref).mean() + 0.1
        assert psnr(jpg, ref) >= 27  # ~28.9 dB: 4:2:0 chroma on tissue

        # Scaled: against an exact area downsample of OpenSlide's level 0.
        await check_scaled(c, sid, 200, 0)

        # pct region = the same pixels as its x,y,w,h equivalent.
        a = await get_image(c, f"/iiif/3/{sid}/pct:10,20,50,25/200,/0/default.png")
        rx, ry = round(0.1 * W), round(0.2 * H)
        rw, rh = round(0.5 * W), round(0.25 * H)
        b = await get_image(c, f"/iiif/3/{sid}/{rx},{ry},{rw},{rh}/200,/0/default.png")
        assert np.array_equal(a, b)

        # Square is centred in the long dimension; full/max is the whole image.
        sq = await get_image(c, f"/iiif/3/{sid}/square/300,/0/default.png")
        ref_sq = area_reference(openslide_region(0, (H - W) // 2, W, W), 0)
        small = np.asarray(Image.fromarray(ref_sq.astype(np.uint8)).resize((300, 300), 1))
        assert sq.shape == (300, 300, 3) and psnr(sq, small) >= 30
        thumb = await get_image(c, f"/iiif/3/{sid}/full/138,185/0/default.png")
        assert thumb.shape == (185, 138, 3)

        # Regions reaching past the image are cut at its edge.
        cut = await get_image(c, f"/iiif/3/{sid}/2000,2900,1000,1000/max/0/default.png")
        assert cut.shape == (H - 2900, W - 2000, 3)
        assert np.array_equal(cut, openslide_region(2000, 2900, W - 2000, H - 2900))

        # Upscaling with ^ only.
        up = await get_image(c, f"/iiif/3/{sid}/0,0,100,50/^200,/0/default.png")
        assert up.shape == (100, 200, 3)
        up = await get_image(c, f"/iiif/3/{sid}/0,0,100,50/^pct:150/0/default.png")
        assert up.shape == (75, 150, 3)
        confined = await get_image(c, f"/iiif/3/{sid}/0,0,100,50/^!400,400/0/default.png")
        assert confined.shape == (200, 400, 3)  # best fit in 400 x 400, enlarged
        # Without ^ a best fit larger than the region is upscaling: refused (the validators'
        # size_noup test), while a best fit inside it is a plain reduction.
        r = await c.get(f"/iiif/3/{sid}/0,0,100,50/!400,400/0/default.png")
        assert r.status == 400 and "needs ^" in (await r.json())["error"]
        inside = await get_image(c, f"/iiif/3/{sid}/0,0,100,50/!50,400/0/default.png")
        assert inside.shape == (25, 50, 3)

    run(ServerSettings(store=str(root)), check)


async def check_scaled(c: TestClient, sid: str, x: int, y: int) -> None:
    w, h = 1600, 1200
    ref = openslide_region(x, y, w, h)
    ref4 = area_reference(ref, 2)
    for size in ("400,", "pct:25", "!400,400", "400,300"):
        got = await get_image(c, f"/iiif/3/{sid}/{x},{y},{w},{h}/{size}/0/default.png")
        assert got.shape == ref4.shape, size
        assert psnr(got, ref4) >= 35, (size, psnr(got, ref4))
    jpg = await get_image(c, f"/iiif/3/{sid}/{x},{y},{w},{h}/400,/0/default.jpg")
    png = await get_image(c, f"/iiif/3/{sid}/{x},{y},{w},{h}/400,/0/default.png")
    encoded = decode(encode_image(png, "jpg")[0])
    assert np.abs(jpg.astype(np.float64) - encoded).mean() < 0.5  # only the JPEG encoding


def test_scaled_region_registration(store_dir: tuple[Path, str]) -> None:
    root, sid = store_dir
    run(ServerSettings(store=str(root)), lambda c: check_scaled(c, sid, 200, 400))


def test_rotation_quality_format(store_dir: tuple[Path, str]) -> None:
    root, sid = store_dir

    async def check(c: TestClient) -> None:
        base = f"/iiif/3/{sid}/500,600,120,80/max"
        plain = await get_image(c, f"{base}/0/default.png")
        assert np.array_equal(await get_image(c, f"{base}/90/default.png"), np.rot90(plain, -1))
        assert np.array_equal(await get_image(c, f"{base}/180/color.png"), np.rot90(plain, 2))
        assert np.array_equal(await get_image(c, f"{base}/270/default.png"), np.rot90(plain, 1))
        assert np.array_equal(await get_image(c, f"{base}/!0/default.png"), plain[:, ::-1])
        mirrored = await get_image(c, f"{base}/!90/default.png")
        assert np.array_equal(mirrored, np.rot90(plain[:, ::-1], -1))
        turned = await get_image(c, f"{base}/45/default.png")
        side = math.ceil((120 + 80) * math.sqrt(0.5))
        assert turned.shape[2] == 4 and abs(turned.shape[0] - side) <= 1
        assert turned[0, 0, 3] == 0  # outside the rotated image: transparent
        assert (await get_image(c, f"{base}/22.5/default.jpg")).ndim == 3

        gray = await get_image(c, f"{base}/0/gray.png")
        assert gray.shape == (80, 120)
        expected = np.asarray(Image.fromarray(plain).convert("L"))
        assert np.array_equal(gray, expected)
        assert (await get_image(c, f"{base}/0/gray.jpg")).shape == (80, 120)
        bitonal = np.asarray(await get_image(c, f"{base}/0/bitonal.png"), np.uint8)
        assert set(np.unique(bitonal)) <= {0, 1, 255}
        r = await c.get(f"{base}/0/default.webp")
        assert r.status == 200 and r.content_type == "image/webp"
        assert decode(await r.read()).shape == (80, 120, 3)
        # A declared tile with a transform is decoded, not passed through.
        tile = f"/iiif/3/{sid}/0,0,240,240/240,/90/default.jpg"
        stored = await (await c.get(f"/slides/{sid}/tiles/0/0/0")).read()
        r = await c.get(tile)
        assert r.status == 200 and await r.read() != stored
        # Percent-encoded parameters; the canonical Link names the same image.
        r = await c.get(f"/iiif/3/{sid}/pct%3A0,0,10,10/%5Epct%3A200/%2190/gray.png")
        assert r.status == 200
        link = r.headers["Link"]
        assert '<http://iiif.io/api/image/3/level2.json>;rel="profile"' in link
        canonical = link.split("<")[2].split(">")[0]
        assert canonical == f"/iiif/3/{sid}/0,0,222,297/^444,594/!90/gray.png"
        again = await c.get(canonical)
        assert again.status == 200 and await again.read() == await r.read()

    run(ServerSettings(store=str(root)), check)


BAD = [
    "/iiif/3/{sid}/full/max/0/default.gif",
    "/iiif/3/{sid}/full/max/0/default",
    "/iiif/3/{sid}/full/max/0/sepia.jpg",
    "/iiif/3/{sid}/full/max/0/.jpg",
    "/iiif/3/{sid}/full/max/361/default.jpg",
    "/iiif/3/{sid}/full/max/-90/default.jpg",
    "/iiif/3/{sid}/full/max/abc/default.jpg",
    "/iiif/3/{sid}/full/max/!!90/default.jpg",
    "/iiif/3/{sid}/0,0,0,10/max/0/default.jpg",
    "/iiif/3/{sid}/0,0,10,0/max/0/default.jpg",
    "/iiif/3/{sid}/2220,0,10,10/max/0/default.jpg",
    "/iiif/3/{sid}/0,2967,10,10/max/0/default.jpg",
    "/iiif/3/{sid}/-1,0,10,10/max/0/default.jpg",
    "/iiif/3/{sid}/a,b,c,d/max/0/default.jpg",
    "/iiif/3/{sid}/1,2,3/max/0/default.jpg",
    "/iiif/3/{sid}/pct:1,2,3/max/0/default.jpg",
    "/iiif/3/{sid}/pct:0,0,0,10/max/0/default.jpg",
    "/iiif/3/{sid}/pct:100,0,10,10/max/0/default.jpg",
    "/iiif/3/{sid}/pct:1e3,0,10,10/max/0/default.jpg",
    "/iiif/3/{sid}/pct:nan,0,10,10/max/0/default.jpg",
    "/iiif/3/{sid}/everything/max/0/default.jpg",
    "/iiif/3/{sid}/full/0,/0/default.jpg",
    "/iiif/3/{sid}/full/,0/0/default.jpg",
    "/iiif/3/{sid}/full/,/0/default.jpg",
    "/iiif/3/{sid}/full/0,0/0/default.jpg",
    "/iiif/3/{sid}/full/!0,10/0/default.jpg",
    "/iiif/3/{sid}/full/!10,/0/default.jpg",
    "/iiif/3/{sid}/full/pct:0/0/default.jpg",
    "/iiif/3/{sid}/full/pct:0.001/0/default.jpg",
    "/iiif/3/{sid}/full/pct:101/0/default.jpg",
    "/iiif/3/{sid}/full/3000,/0/default.jpg",
    "/iiif/3/{sid}/full/,3000/0/default.jpg",
    "/iiif/3/{sid}/full/2221,10/0/default.jpg",
    "/iiif/3/{sid}/full/99999999999,/0/default.jpg",
    "/iiif/3/{sid}/full/^9999,9999/0/default.jpg",
    "/iiif/3/{sid}/full/big/0/default.jpg",
    "/iiif/3/{sid}/full/max/0",
    "/iiif/3/{sid}/full/max/0/default.jpg/more",
    "/iiif/3/UPPER/info.json",
    "/iiif/3/UPPER/full/max/0/default.jpg",
]


def test_errors_are_json_4xx(store_dir: tuple[Path, str]) -> None:
    root, sid = store_dir

    async def check(c: TestClient) -> None:
        for url in BAD:
            r = await c.get(url.format(sid=sid))
            assert r.status == 400, (url, r.status)
            body = await r.json()
            assert body["status"] == 400 and body["error"], url
            assert "Traceback" not in body["error"]
        # An escaped slash never joins segments into another resource: no such image.
        for url in ("/iiif/3/..%2f..%2fetc/info.json", f"/iiif/3/{sid}%2Finfo.json"):
            r = await c.get(url)
            assert r.status == 404, (url, r.status)
            assert (await r.json())["status"] == 404
            assert r.headers["Access-Control-Allow-Origin"] == "*"
        for url in ("/iiif/3/nope/info.json", "/iiif/3/nope/full/max/0/default.jpg"):
            r = await c.get(url)
            assert r.status == 404 and (await r.json())["status"] == 404
        r = await c.get("/iiif/3/nope", allow_redirects=False)
        assert r.status == 404

    run(ServerSettings(store=str(root)), check)


def test_pixel_budget(store_dir: tuple[Path, str]) -> None:
    root, sid = store_dir
    budget = 50_000

    async def check(c: TestClient) -> None:
        doc = await (await c.get(f"/iiif/3/{sid}/info.json")).json()
        assert doc["maxArea"] == budget
        assert all(s["width"] * s["height"] <= budget for s in doc["sizes"])
        # max is fitted to the budget, keeping the aspect ratio.
        full = await get_image(c, f"/iiif/3/{sid}/full/max/0/default.jpg")
        fh, fw = full.shape[:2]
        assert fw * fh <= budget and fw * fh > 0.95 * budget
        assert abs(fw / fh - W / H) < 0.01
        up = await get_image(c, f"/iiif/3/{sid}/0,0,10,10/^max/0/default.png")
        assert up.shape[0] * up.shape[1] <= budget and up.shape[0] > 200
        fitted = await get_image(c, f"/iiif/3/{sid}/full/!1000,1000/0/default.png")
        assert fitted.shape[0] * fitted.shape[1] <= budget
        for url in (
            "full/300,300/0/default.jpg",
            "full/pct:50/0/default.jpg",
            "0,0,600,600/300,/0/default.jpg",
            "0,0,200,200/^,300/0/default.jpg",
            "0,0,220,220/220,/45/default.jpg",  # fits, but its rotated bounding box does not
        ):
            r = await c.get(f"/iiif/3/{sid}/{url}")
            assert r.status == 400, url
            assert "budget" in (await r.json())["error"]
        # Declared tiles are always served (240x240 > budget): the stored bytes.
        stored = await (await c.get(f"/slides/{sid}/tiles/1/0/0")).read()
        r = await c.get(f"/iiif/3/{sid}/0,0,480,480/240,/0/default.jpg")
        assert r.status == 200 and await r.read() == stored

    run(ServerSettings(store=str(root), max_render_pixels=budget), check)
