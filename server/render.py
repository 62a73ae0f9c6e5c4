"""Pixels for responses that do not match a stored tile: edge crops, regions, scaled views.

Only these decode; a request that matches a stored tile is answered with the stored bytes.
Decoding goes through the library (which refuses a tile declaring another size than its
level's before allocating); resampling and encoding run on the app's thread pool, never on the
event loop.
"""

from __future__ import annotations

import asyncio
import io
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
from aiohttp import web
from PIL import Image

from server.catalog import Catalog, ServedSlide
from server.cors import add_cors_headers
from wsi.codecs import jpeg
from wsi.errors import InvalidArgument

T = TypeVar("T")
R = TypeVar("R")


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


SEND_FLOOR_SECONDS = 30.0
SEND_BYTES_PER_SECOND = 1_000_000
"""A rendered answer must reach the client within SEND_FLOOR_SECONDS plus its size at this
rate (1 MB/s: a 40 MB PNG gets 70 s), or the connection is closed: its render slot, and the
answer's memory, go to the next render."""


async def sent(request: web.Request, response: web.StreamResponse, size: int) -> web.StreamResponse:
    """`response` (`size` bytes of body) written out now, as far as the kernel's socket buffer:
    within the send deadline, else the connection is aborted (ConnectionResetError, which the
    front passes on). For a render, inside its slot (`region`'s `deliver`): a client that does
    not read keeps its answer in our memory, and with the slot it is counted there."""
    add_cors_headers(request, response)
    try:
        async with asyncio.timeout(SEND_FLOOR_SECONDS + size / SEND_BYTES_PER_SECOND):
            await response.prepare(request)
            await response.write_eof()
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("the client did not take the answer in time") from None
    return response


async def as_made(answer: T) -> T:
    """`region`'s `deliver` for an answer the caller sends itself (a small one)."""
    return answer


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
    deliver: Callable[[T], Awaitable[R]],
) -> R:
    """`deliver` (sending it: `sent`) of `finish` (rotation, quality, encoding: whatever makes
    the answer) of the level-0 rectangle (x, y, width, height) scaled to (out_width,
    out_height) pixels, read from the least detailed level that still has the detail asked
    for.

    The whole of it holds one of the catalog's render slots: a render's memory (its source
    pixels, up to 4x the budget; the scaled pixels; the answer, until the client has it) is
    freed before the slot is. Had the slot been given back with the pixels or the answer, each
    finished render would have kept them while it waited for the pool or for its client to
    read, as many as there are clients."""
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
        # The source pixels are held by the pool's call only: gone while the answer is sent.
        answer = await catalog.in_pool(
            _scaled_then,
            await slide.region(level.index, lx0, ly0, lx1 - lx0, ly1 - ly0),
            (out_width, out_height),
            finish,
        )
        return await deliver(answer)


def _scaled_then(pixels: np.ndarray, size: tuple[int, int], finish: Callable[[np.ndarray], T]) -> T:
    """`finish` of `pixels` scaled to `size` (width, height), when they are not that size."""
    if pixels.shape[:2] != (size[1], size[0]):
        pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))
    return finish(pixels)
