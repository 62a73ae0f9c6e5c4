"""DeepZoom edge tiles: DeepZoom rounds level sizes up, our levels round down, so an edge tile of
a small DeepZoom level may be one pixel wider or taller than what the stored level holds. That
pixel must look like the slide's edge, not like the stored tile's padding (which is black where
the source had nothing)."""

from __future__ import annotations

import asyncio
import io
import math
from pathlib import Path

import numpy as np
import pyvips
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

import wsi
from server.app import create_app
from server.settings import ServerSettings

GREY = 200
WIDTH, HEIGHT = 1110, 901
"""Odd sizes: at several levels ceil(size / 2^k) > floor(size / 2^k)."""


def _flat_slide(path: Path) -> Path:
    noise = pyvips.Image.gaussnoise(WIDTH, HEIGHT, sigma=30, mean=GREY, seed=1)
    image = noise.bandjoin([noise, noise]).cast("uchar")  # tissue-like: never blank background
    image.tiffsave(str(path), tile=True, tile_width=256, tile_height=256, compression="jpeg", Q=95)
    return path


def test_edge_tiles_of_rounded_up_levels_show_the_edge_not_the_padding(tmp_path: Path) -> None:
    source = _flat_slide(tmp_path / "flat.tif")
    store = wsi.Store(wsi.StoreSettings(str(tmp_path / "store")))
    sid = wsi.convert_slide(source, store).slide_id
    top = math.ceil(math.log2(max(WIDTH, HEIGHT)))
    checked = 0

    async def main() -> None:
        nonlocal checked
        settings = ServerSettings(store=str(tmp_path / "store"))
        async with TestClient(TestServer(create_app(settings))) as client:
            for z in range(top - 5, top):
                k = top - z
                dz_w, dz_h = math.ceil(WIDTH / 2**k), math.ceil(HEIGHT / 2**k)
                if dz_w == WIDTH // 2**k and dz_h == HEIGHT // 2**k:
                    continue
                x, y = (dz_w - 1) // 256, (dz_h - 1) // 256
                resp = await client.get(f"/slides/{sid}_files/{z}/{x}_{y}.jpeg")
                assert resp.status == 200
                pixels = np.asarray(Image.open(io.BytesIO(await resp.read())).convert("RGB"))
                assert pixels.shape[:2] == (dz_h - 256 * y, dz_w - 256 * x)
                # The last column and row are the slide's edge (mean grey), within
                # JPEG error and the noise's spread over a column.
                assert abs(float(pixels[:, -1].mean()) - GREY) < 8, (z, pixels[:, -1].mean())
                assert abs(float(pixels[-1, :].mean()) - GREY) < 8, (z, pixels[-1, :].mean())
                checked += 1

    asyncio.run(main())
    assert checked >= 3
