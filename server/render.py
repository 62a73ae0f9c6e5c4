"""Pixels for responses that do not match a stored tile: edge crops, regions, scaled views.

Only these decode; a request that matches a stored tile is answered with the stored bytes.
Decoding, resampling and encoding run on the app's thread pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import io
import math

import numcodecs
import numpy as np
from PIL import Image

from server.catalog import Catalog, LevelView, SlideView
from wsi.codecs import jpeg
from wsi.errors import InvalidArgument


def decode_chunk(level: LevelView, data: bytes) -> np.ndarray:
    """A stored chunk -> (tile_height, tile_width, 3) uint8."""
    if level.codec == "jpeg":
        return jpeg.decode(data, expected=(level.tile_height, level.tile_width))
    raw = numcodecs.Zstd().decode(data)
    return np.frombuffer(raw, np.uint8).reshape(level.tile_height, level.tile_width, 3)


def encode_image(pixels: np.ndarray, fmt: str, quality: int = 90) -> tuple[bytes, str]:
    """(body, content type) for jpg, png or webp."""
    if fmt in ("jpg", "jpeg"):
        return jpeg.encode(np.ascontiguousarray(pixels), quality, True), "image/jpeg"
    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if fmt == "png":
        image.save(buffer, "PNG", compress_level=3)
        return buffer.getvalue(), "image/png"
    if fmt == "webp":
        image.save(buffer, "WEBP", quality=quality)
        return buffer.getvalue(), "image/webp"
    raise InvalidArgument(f"unsupported image format {fmt!r}")


async def in_pool(catalog: Catalog, fn, *args):  # type: ignore[no-untyped-def]
    return await asyncio.get_running_loop().run_in_executor(catalog.reader.executor, fn, *args)


def best_level(slide: SlideView, scale: float) -> LevelView:
    """The smallest stored level still at least as detailed as `scale` (output/level-0 px)."""
    chosen = slide.levels[0]
    for level in slide.levels:
        # Level k is an exact 2^k downsample: compare scales, not sizes rounded down.
        if 2.0**-level.index >= scale * (1 - 1e-9):
            chosen = level
    return chosen


async def region(
    catalog: Catalog,
    slide: SlideView,
    x: int,
    y: int,
    width: int,
    height: int,
    out_width: int,
    out_height: int,
    max_pixels: int,
) -> np.ndarray:
    """Level-0 rectangle (x, y, width, height) scaled to (out_width, out_height) pixels."""
    if out_width * out_height > max_pixels:
        raise InvalidArgument(f"{out_width}x{out_height} exceeds the {max_pixels} pixel budget")
    if min(width, height, out_width, out_height) <= 0:
        raise InvalidArgument("region and size must be positive")
    level = best_level(slide, min(out_width / width, out_height / height))
    # Level k is an exact 2^k area downsample (sizes rounded down), not a width ratio.
    fx = fy = 2.0**-level.index
    lx0, ly0 = math.floor(x * fx), math.floor(y * fy)
    lx1 = min(level.width, max(lx0 + 1, math.ceil((x + width) * fx)))
    ly1 = min(level.height, max(ly0 + 1, math.ceil((y + height) * fy)))
    if (lx1 - lx0) * (ly1 - ly0) > 4 * max_pixels:
        raise InvalidArgument("region needs too many source pixels")
    tw, th = level.tile_width, level.tile_height
    cols = range(lx0 // tw, (lx1 - 1) // tw + 1)
    rows = range(ly0 // th, (ly1 - 1) // th + 1)
    chunks = await asyncio.gather(
        *(catalog.chunk(slide, level, c, r, level.index) for r in rows for c in cols)
    )

    def assemble() -> np.ndarray:
        canvas = np.full((len(rows) * th, len(cols) * tw, 3), 255, np.uint8)
        for i, data in enumerate(chunks):
            r, c = divmod(i, len(cols))
            canvas[r * th : (r + 1) * th, c * tw : (c + 1) * tw] = decode_chunk(level, data)
        ox, oy = lx0 - cols.start * tw, ly0 - rows.start * th
        crop = canvas[oy : oy + (ly1 - ly0), ox : ox + (lx1 - lx0)]
        if crop.shape[1] == out_width and crop.shape[0] == out_height:
            return np.ascontiguousarray(crop)
        image = Image.fromarray(np.ascontiguousarray(crop))
        return np.asarray(image.resize((out_width, out_height), Image.Resampling.LANCZOS))

    return await in_pool(catalog, assemble)
