"""WADO-RS: metadata, frames and the stored objects of studies, series and instances."""

from __future__ import annotations

import asyncio
import hashlib
import uuid

import numpy as np
from aiohttp import web

from server.api.dicomweb.instances import (
    DICOM_JSON,
    EXPLICIT_VR_LE,
    JPEG_BASELINE,
    NUMBER,
    PRIVATE_FLAVORS,
    find_instance,
    pinned,
    scoped_instances,
    state,
)
from server.api.dicomweb.negotiation import (
    check_dicom_accept,
    check_json_accept,
    frame_mode,
    multipart,
)
from server.keys import CATALOG, SETTINGS
from server.render import decode_chunk, in_pool
from server.responses import cache_control, dumps, etag_response
from wsi.errors import InvalidArgument, SlideNotFound

MAX_FRAMES = 1024
"""Frames in one WADO-RS frames request."""
STREAM_CHUNK = 4 * 1024 * 1024


async def metadata(request: web.Request) -> web.Response:
    check_json_accept(request)
    if "instance" in request.match_info:
        instances = [await find_instance(request)]
    else:
        instances = await scoped_instances(request)
    catalog, st = request.app[CATALOG], state(request)
    docs = await asyncio.gather(*(st.metadata(catalog, i) for i in instances))
    tags = ",".join(f"{i.slide.manifest_crc}:{i.sop_uid}" for i in instances)
    etag = hashlib.sha256(tags.encode()).hexdigest()[:32]
    return etag_response(request, dumps(docs).encode(), DICOM_JSON, etag)


def parse_frames(text: str, count: int) -> list[int]:
    numbers = []
    for item in text.split(","):
        if not NUMBER.fullmatch(item.strip()):
            raise InvalidArgument("frames must be comma-separated positive integers")
        n = int(item)
        if not 1 <= n <= count:
            raise InvalidArgument(f"frame {n} is outside 1..{count}")
        numbers.append(n)
    if len(numbers) > MAX_FRAMES:
        raise InvalidArgument(f"at most {MAX_FRAMES} frames per request")
    return numbers


async def frames(request: web.Request) -> web.Response:
    inst = await find_instance(request)
    numbers = parse_frames(request.match_info["frames"], inst.frames)
    mode = frame_mode(request, len(numbers))
    if mode == "native":
        pixels = len(numbers) * inst.view.tile_width * inst.view.tile_height
        budget = request.app[SETTINGS].max_render_pixels
        if pixels > budget:
            raise InvalidArgument(f"{pixels} decoded pixels exceed the {budget} pixel budget")
    catalog = request.app[CATALOG]
    data = await asyncio.gather(*(inst.frame(catalog, n) for n in numbers))
    digest = hashlib.sha256(request.match_info["frames"].encode()).hexdigest()[:16]
    etag = f"{inst.slide.manifest_crc}-{inst.sop_uid}-{digest}-{mode}"
    caching = pinned(inst)
    if mode == "single":
        return etag_response(request, data[0], "image/jpeg", etag, **caching)
    if mode == "native":

        def decode() -> list[bytes]:
            return [np.ascontiguousarray(decode_chunk(inst.view, d)).tobytes() for d in data]

        body, content_type = multipart(
            await in_pool(catalog, decode), "application/octet-stream", EXPLICIT_VR_LE
        )
    else:
        media_type = "image/jpeg" if mode == "jpeg" else "application/octet-stream"
        body, content_type = multipart(data, media_type, JPEG_BASELINE)
    response = etag_response(request, body, "application/octet-stream", etag, **caching)
    if response.status == 200:
        response.headers["Content-Type"] = content_type
    return response


async def retrieve(request: web.Request) -> web.StreamResponse:
    """Stored objects as they are, one part each, streamed with range reads."""
    check_dicom_accept(request)
    if "instance" in request.match_info:
        instances = [await find_instance(request)]
    else:
        instances = await scoped_instances(request)
    if not instances:
        raise SlideNotFound("no instances to retrieve")
    reader = request.app[CATALOG].reader
    boundary = uuid.uuid4().hex
    head = f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={JPEG_BASELINE}"
    heads = [f"{head}\r\n\r\n".encode() for _ in instances]
    tail = f"--{boundary}--\r\n".encode()
    length = sum(len(h) + i.view.size + 2 for h, i in zip(heads, instances, strict=True))
    first = await reader.get_range(instances[0].key, 0, min(STREAM_CHUNK, instances[0].view.size))
    response = web.StreamResponse(
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Cache-Control": cache_control(
                request, None, not any(i.flavor in PRIVATE_FLAVORS for i in instances)
            ),
        }
    )
    response.content_length = length + len(tail)
    await response.prepare(request)
    for i, inst in enumerate(instances):
        await response.write(heads[i])
        start = 0
        while start < inst.view.size:
            end = min(start + STREAM_CHUNK, inst.view.size)
            chunk = first if i == 0 and start == 0 else await reader.get_range(inst.key, start, end)
            await response.write(chunk)
            start = end
        await response.write(b"\r\n")
    await response.write(tail)
    await response.write_eof()
    return response
