"""Pixels for responses that do not match a stored tile: edge crops, regions, scaled views.

Only these decode; a request that matches a stored tile is answered with the stored bytes.
Decoding goes through the library (which refuses a tile declaring another size than its
level's before allocating); resampling and encoding run on the app's thread pool, never on the
event loop.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from server.catalog import Catalog, ServedSlide
from wsi.codecs import jpeg
from wsi.errors import InvalidArgument

T = TypeVar("T")


MAX_SIDE = {"jpg": jpeg.MAX_SIDE, "jpeg": jpeg.MAX_SIDE, "webp": 16383}
"""The widest and tallest image of each format we encode (WebP's VP8 limit); PNG's is past any
render budget."""


def check_encodable(width: int, height: int, fmt: str) -> None:
    """A 400 before any work for an image its format cannot hold (a 1-pixel-high strip within
    the pixel budget can still be too wide for JPEG)."""
    limit = MAX_SIDE.get(fmt)
    if limit is not None and max(width, height) > limit:
        raise InvalidArgument(
            f"a {fmt} image is at most {limit} pixels a side; {width}x{height} asked for"
        )


def encode_image(pixels: np.ndarray, fmt: str, quality: int = 90) -> tuple[bytes, str]:
    """(body, content type) for jpg, png or webp."""
    check_encodable(pixels.shape[1], pixels.shape[0], fmt)
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


async def in_pool(catalog: Catalog, fn: Callable[..., T], *args: Any) -> T:
    """Blocking work on the app's thread pool."""
    return await catalog.in_pool(fn, *args)


async def region(
    catalog: Catalog,
    slide: ServedSlide,
    x: int,
    y: int,
    width: int,
    height: int,
    out_width: int,
    out_height: int,
    max_pixels: int,
    finish: Callable[[np.ndarray], T],
) -> T:
    """`finish` (rotation, quality, encoding: whatever makes the answer) of the level-0
    rectangle (x, y, width, height) scaled to (out_width, out_height) pixels, read from the
    least detailed level that still has the detail asked for.

    The whole of it holds one of the catalog's render slots, `finish` included: a render's
    memory (its source pixels, up to 4x the budget; the scaled pixels; what `finish` makes of
    them) is freed before the slot is. Were the pixels handed back for the caller to encode,
    each finished render would wait for the pool with its pixels while the slot went to the
    next one, as many as there are clients."""
    if out_width * out_height > max_pixels:
        raise InvalidArgument(f"{out_width}x{out_height} exceeds the {max_pixels} pixel budget")
    if min(width, height, out_width, out_height) <= 0:
        raise InvalidArgument("region and size must be positive")
    level = slide.best_level(max(width / out_width, height / out_height))
    # Sizes of level k are rounded down from level 0 / downsample: map coordinates by the
    # level's own downsample, not by a ratio of widths.
    f = 1.0 / level.downsample
    lx0, ly0 = math.floor(x * f), math.floor(y * f)
    lx1 = min(level.width, max(lx0 + 1, math.ceil((x + width) * f)))
    ly1 = min(level.height, max(ly0 + 1, math.ceil((y + height) * f)))
    if (lx1 - lx0) * (ly1 - ly0) > 4 * max_pixels:
        raise InvalidArgument("region needs too many source pixels")
    async with catalog.renders:
        crop = await slide.region(level.index, lx0, ly0, lx1 - lx0, ly1 - ly0)

        def scaled_and_finished() -> T:
            pixels = crop
            if crop.shape[:2] != (out_height, out_width):
                image = Image.fromarray(crop)
                resized = image.resize((out_width, out_height), Image.Resampling.LANCZOS)
                pixels = np.asarray(resized)
            return finish(pixels)

        return await catalog.in_pool(scaled_and_finished)
