"""WADO-RS: metadata, frames and the stored objects of studies, series and instances."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import uuid
from collections.abc import Mapping
from typing import Any, NoReturn

import numpy as np
from aiohttp import web

from server.api.dicomweb.instances import (
    DICOM_JSON,
    DICOMWEB,
    EXPLICIT_VR_LE,
    JPEG2000_SYNTAXES,
    JPEG_BASELINE,
    JPEG_XL_RECOMPRESSION,
    DicomWebState,
    Instance,
    find_instance,
    known_instance,
    pinned,
    scoped_instances,
    state,
)
from server.api.dicomweb.negotiation import (
    accepts_stored_syntax,
    app_framing,
    cached_frame_mode,
    check_dicom_accept,
    check_json_accept,
    framing,
    not_acceptable,
)
from server.audit import note_read
from server.cors import add_cors_headers
from server.keys import CATALOG, SETTINGS
from server.render import in_pool
from server.responses import Stored, cache_control, etag_matches, etag_response, stored_response
from server.url_numbers import url_int, url_int_or_none
from wsi.codecs import jpeg2000
from wsi.errors import InvalidArgument, SlideNotFound
from wsi.published.values import decode_tile

log = logging.getLogger(__name__)

MAX_FRAMES = 1024
"""Frames in one WADO-RS frames request."""
STREAM_CHUNK = 4 * 1024 * 1024
"""Bytes of a stored object read at a time for a retrieve (`retrieve`) from S3: each read is a
range GET, whose latency a larger part spreads over more bytes."""
LOCAL_STREAM_CHUNK = 256 * 1024
"""The same from a local store, where a read is a copy from the page cache. Each part waits in
the connection's buffer until its client takes it: with 4 MB parts, 300 clients retrieving a
study and reading nothing held 1.44 GB of one process (4.5 MB each, however slowly they read,
past any cut of a stalled client), now 0.24 GB; a 149 MB instance goes no slower (0.2-0.3 s on
loopback either way)."""


def _stream_chunk(inst: Instance) -> int:
    """Bytes of `inst`'s object read at a time by `retrieve` (`STREAM_CHUNK`)."""
    return STREAM_CHUNK if inst.slide.store.store.settings.is_s3 else LOCAL_STREAM_CHUNK


async def metadata(request: web.Request) -> web.Response:
    check_json_accept(request)
    if "instance" in request.match_info:
        instances = [await find_instance(request)]
    else:
        instances = await scoped_instances(request)
    catalog, st = request.app[CATALOG], state(request)
    docs = await asyncio.gather(*(st.metadata(catalog, i) for i in instances))
    tags = ",".join(f"{i.slide.version}:{i.sop_uid}" for i in instances)
    etag = hashlib.sha256(tags.encode()).hexdigest()[:32]
    return etag_response(request, b"[" + b",".join(docs) + b"]", DICOM_JSON, etag)


def frames_tag(request: web.Request, numbers: list[int]) -> str:
    """The part of a frames response's ETag that names the frames: the number of one frame (a
    viewer's request), else a digest of the list as asked."""
    if len(numbers) == 1:
        return str(numbers[0])
    return hashlib.sha256(request.match_info["frames"].encode()).hexdigest()[:16]


def parse_frames(text: str, count: int) -> list[int]:
    numbers = []
    for item in text.split(","):
        n = url_int(item.strip(), "frame number")
        if not 1 <= n <= count:
            raise InvalidArgument(f"frame {n} is outside 1..{count}")
        numbers.append(n)
    if len(numbers) > MAX_FRAMES:
        raise InvalidArgument(f"at most {MAX_FRAMES} frames per request")
    return numbers


ONE_FRAME_PARTS = {"jpeg": "image/jpeg", "octet-jpeg": "application/octet-stream", "single": ""}
"""Frame modes `one_frame` answers, with the media type of their part ('': not multipart)."""


async def one_frame(request: web.Request) -> web.Response | None:
    """A viewer's request, answered with the least work per frame, or None for `frames` to
    answer: one frame of a pyramid level, as a JPEG (alone or as the one part of a multipart
    body), asked for with an Accept header whose mode `cached_frame_mode` remembers. The
    instance comes from `find_instance` (its slide still current), the frame's bounds are
    checked by the read, and the framing is the app's prebuilt one; every other request (several
    frames, decoded ones, a frame holding the boundary, an unseen Accept header) goes the
    general way, which gives the same answers. `frame_now` answers the same requests without a
    coroutine when it can (the express lane's way too)."""
    info = request.match_info
    headers = request.headers
    app = request.app
    known = known_instance(app, info)
    if known is not None:
        stored = _frame_now(app, known, info["frames"], headers)
        if stored is not None:
            note_read(request, (known.slide.slide_id,))
            return stored_response(request, stored)
    text = info["frames"]
    st = state(request)
    mode = st.frame_modes.get((headers.get("Accept", ""), True))
    media_type = ONE_FRAME_PARTS.get(mode) if mode is not None else None
    if mode is None or media_type is None:
        return None
    number = url_int_or_none(text)
    if number is None:
        return None
    inst = await find_instance(request)
    if not inst.is_level:
        return None
    slide = inst.slide
    etag = _frame_etag(inst, number, mode)
    if etag_matches(headers.get("If-None-Match"), f'"{etag}"'):
        if not 1 <= number <= await inst.frame_count():
            return None  # the general way says which frames there are
        return etag_response(request, b"", "", etag, version=slide.version)
    data = await slide.frame_bytes(inst.stored, number)
    stored = _framed(st, inst, number, mode, data)
    return None if stored is None else stored_response(request, stored)


def frame_now(
    app: web.Application, info: Mapping[str, str], headers: Mapping[str, str]
) -> Stored | None:
    """`one_frame`'s answer when it needs no waiting: the instance known (`known_instance`),
    the frame's bytes cached or in the page cache; else None. Frames raise as `frames` does
    for a frame number out of range."""
    known = known_instance(app, info)
    return None if known is None else _frame_now(app, known, info["frames"], headers)


async def frame_later(
    app: web.Application, info: Mapping[str, str], headers: Mapping[str, str]
) -> Stored | None:
    """`frame_now`'s answer with the frame read as needed (a frame of an S3 store, cold): the
    express lane awaits it when the instance is known; else None (`frames` answers)."""
    known = known_instance(app, info)
    mode = None if known is None else _one_frame_mode(app, known, info["frames"], headers)
    if known is None or mode is None:
        return None
    number = int(info["frames"])
    data = await known.slide.frame_bytes(known.stored, number)
    return _framed(app[DICOMWEB], known, number, mode, data)


def _frame_now(
    app: web.Application, inst: Instance, text: str, headers: Mapping[str, str]
) -> Stored | None:
    mode = _one_frame_mode(app, inst, text, headers)
    if mode is None:
        return None
    number = int(text)
    data = inst.slide.frame_bytes_now(inst.stored, number)
    return None if data is None else _framed(app[DICOMWEB], inst, number, mode, data)


def _one_frame_mode(
    app: web.Application, inst: Instance, text: str, headers: Mapping[str, str]
) -> str | None:
    """The frame mode of a request for one frame (`text`) of a level (`inst`) that
    `frame_now` and `frame_later` answer, else None."""
    mode = app[DICOMWEB].frame_modes.get((headers.get("accept", ""), True))
    if (
        mode not in ONE_FRAME_PARTS
        or not inst.is_level
        or url_int_or_none(text) is None
        or headers.get("if-none-match") is not None  # a 304 needs the frame count checked
    ):
        return None
    return mode


def _frame_etag(inst: Instance, number: int, mode: str) -> str:
    return f"{inst.slide.version}-{inst.sop_uid}-{number}-{mode}"


def _framed(
    st: DicomWebState, inst: Instance, number: int, mode: str, data: bytes
) -> Stored | None:
    """Frame `number`'s answer in `mode` (of `ONE_FRAME_PARTS`), or None when its bytes hold
    the boundary of the app's framing (the general way draws another)."""
    media_type = ONE_FRAME_PARTS[mode]
    etag, version = _frame_etag(inst, number, mode), inst.slide.version
    if not media_type:
        return Stored(data, "image/jpeg", etag, version)
    framed = app_framing(st, media_type, JPEG_BASELINE)
    if framed.marker in data:
        return None
    return Stored(framed.one(data), framed.content_type, etag, version)


async def frames(request: web.Request) -> web.StreamResponse:
    fast = await one_frame(request)
    if fast is not None:
        return fast
    inst = await find_instance(request)
    numbers = parse_frames(request.match_info["frames"], await inst.frame_count())
    mode = cached_frame_mode(request, len(numbers))
    if mode == "native":
        pixels = len(numbers) * inst.image.tile_width * inst.image.tile_height
        budget = request.app[SETTINGS].max_render_pixels
        if pixels > budget:
            raise InvalidArgument(f"{pixels} decoded pixels exceed the {budget} pixel budget")
    catalog = request.app[CATALOG]
    etag = f"{inst.slide.version}-{inst.sop_uid}-{frames_tag(request, numbers)}-{mode}"
    caching = pinned(inst)
    if mode in ("jpeg", "octet-jpeg"):
        media_type = "image/jpeg" if mode == "jpeg" else "application/octet-stream"
        return await stream_frames(request, inst, numbers, media_type, etag, caching)
    if mode == "jxl":
        if not inst.archived:
            raise not_acceptable(f"JPEG (transfer-syntax={JPEG_BASELINE}) for this instance")
        return await stream_frames(request, inst, numbers, "image/jxl", etag, caching, True)
    if mode.startswith("j2k"):
        if not inst.kept_jpeg2000:
            raise not_acceptable(f"JPEG (transfer-syntax={JPEG_BASELINE}) for this instance")
        syntax = await _stored_syntax(inst)
        if mode.partition(":")[2] not in ("", syntax):  # lossless asked, lossy stored, or back
            raise not_acceptable(f'multipart/related; type="image/jp2"; transfer-syntax={syntax}')
        return await stream_frames(request, inst, numbers, "image/jp2", etag, caching, True, syntax)
    data = await asyncio.gather(*(inst.frame(n) for n in numbers))
    if mode == "single":
        return etag_response(request, data[0], "image/jpeg", etag, **caching)
    if mode == "native":

        def decode() -> list[bytes]:
            return [np.ascontiguousarray(decode_tile(inst.image, d)).tobytes() for d in data]

        decoded = await in_pool(catalog, decode)
        framed = framing(request, "application/octet-stream", EXPLICIT_VR_LE, decoded)
        body, content_type = framed.body(decoded), framed.content_type
    response = etag_response(request, body, "application/octet-stream", etag, **caching)
    if response.status == 200:
        response.headers["Content-Type"] = content_type
    return response


FRAME_WINDOW = 16
"""Stored frames read ahead while a multipart response is written: its memory, whatever the
number of frames asked for (up to MAX_FRAMES)."""


async def stream_frames(
    request: web.Request,
    inst: Instance,
    numbers: list[int],
    media_type: str,
    etag: str,
    caching: dict[str, Any],
    stored: bool = False,
    stored_syntax: str = JPEG_XL_RECOMPRESSION,
) -> web.StreamResponse:
    """Frames as multipart/related, written as they are read (at most FRAME_WINDOW in memory):
    JPEG, or with `stored` the frames as stored in `stored_syntax` (the JPEG XL of an archived
    instance, the JPEG 2000 of one kept as it). The first frame is read before anything is
    sent, so a bad instance is still a JSON error; a store failure later can only cut the
    response short."""
    syntax = stored_syntax if stored else JPEG_BASELINE
    if len(numbers) <= FRAME_WINDOW:
        return await frames_at_once(
            request, inst, numbers, media_type, syntax, etag, caching, stored
        )
    quoted = f'"{etag}"'
    headers = {"ETag": quoted, "Cache-Control": cache_control(request, **caching)}
    if etag_matches(request.headers.get("If-None-Match"), quoted):
        return web.Response(status=304, headers=headers)
    ahead: collections.deque[asyncio.Task[bytes]] = collections.deque()
    upcoming = iter(numbers)

    def read_ahead() -> None:
        while len(ahead) < FRAME_WINDOW and (n := next(upcoming, None)) is not None:
            ahead.append(asyncio.ensure_future(inst.frame(n, stored)))

    read_ahead()
    framed = app_framing(state(request), media_type, syntax)
    try:
        first: bytes | None = await ahead[0]
        response = web.StreamResponse(headers={**headers, "Content-Type": framed.content_type})
        add_cors_headers(request, response)
        await response.prepare(request)
        for number in numbers:
            data = first if first is not None else await ahead[0]
            first = None
            ahead.popleft()
            read_ahead()
            if framed.marker in data:
                _cut(number)
            await response.write(framed.head + data + b"\r\n")
        await response.write(framed.tail)
        await response.write_eof()
        return response
    finally:
        for task in ahead:
            task.cancel()


def _cut(number: int) -> NoReturn:
    """End a streamed body whose frame `number` holds its boundary, which only a frame made to
    hold the published `MULTIPART_BOUNDARY` does (a body made whole gets another boundary; this
    one's headers are sent). As aiohttp ends a response that fails once started: a
    ConnectionError, and the connection is closed, so that no client or cache takes the bytes
    sent for the whole body under its ETag."""
    log.warning("WADO-RS: frame %d holds the multipart boundary; response cut short", number)
    raise ConnectionAbortedError(f"frame {number} holds the multipart boundary")


async def frames_at_once(
    request: web.Request,
    inst: Instance,
    numbers: list[int],
    media_type: str,
    syntax: str,
    etag: str,
    caching: dict[str, Any],
    stored: bool,
) -> web.Response:
    """A few frames (at most FRAME_WINDOW, a viewer's usual one) as one multipart/related body:
    read together, sent in one write with a Content-Length, with a tile's prebuilt headers
    (`etag_response`) and the app's framing (`negotiation.framing`). Writing them part by
    part as `stream_frames` does costs three socket writes for a single frame."""
    if etag_matches(request.headers.get("If-None-Match"), f'"{etag}"'):  # a 304: nothing read
        return etag_response(request, b"", "", etag, **caching)
    if len(numbers) == 1:
        frames = [await inst.frame(numbers[0], stored)]
    else:
        frames = list(await asyncio.gather(*(inst.frame(n, stored) for n in numbers)))
    framed = framing(request, media_type, syntax, frames)
    return etag_response(request, framed.body(frames), framed.content_type, etag, **caching)


async def _stored_syntax(inst: Instance) -> str:
    """The JPEG 2000 transfer syntax of an instance kept as JPEG 2000: what its codestreams
    allow (PS3.5 8.2.4), as the writer chose it, read from its first frame."""
    return jpeg2000.parse(await inst.frame(1, stored=True)).dicom(ycbcr=False)[0]


def _retrieved_size(
    request: web.Request, inst: Instance, syntax: str, stored_syntax: str | None
) -> int:
    """Bytes of an instance as sent: as stored, or an archived one in its JPEG form. One kept
    as JPEG 2000 (`stored_syntax`) is sent as stored or not at all (406)."""
    if stored_syntax is not None:
        if not accepts_stored_syntax(request, stored_syntax):
            raise not_acceptable(f"transfer-syntax={stored_syntax} for instance {inst.sop_uid}")
        return inst.size
    if syntax in JPEG2000_SYNTAXES:
        raise not_acceptable(f"transfer-syntax={JPEG_BASELINE} for instance {inst.sop_uid}")
    if inst.archived and syntax == JPEG_BASELINE:
        return inst.slide.jpeg_form_size(inst.stored)
    if not inst.archived and syntax == JPEG_XL_RECOMPRESSION:
        raise not_acceptable(f"transfer-syntax={JPEG_BASELINE} for instance {inst.sop_uid}")
    return inst.size


async def retrieve(request: web.Request) -> web.StreamResponse:
    """Stored objects as they are, one part each, streamed with range reads; archived ones in
    their JPEG form (rebuilt as `wsi restore` would) unless JPEG XL is asked for by name."""
    syntax = check_dicom_accept(request)
    if "instance" in request.match_info:
        instances = [await find_instance(request)]
    else:
        instances = await scoped_instances(request)
    if not instances:
        raise SlideNotFound("no instances to retrieve")
    kept = [await _stored_syntax(i) if i.kept_jpeg2000 else None for i in instances]
    sizes = [_retrieved_size(request, i, syntax, k) for i, k in zip(instances, kept, strict=True)]
    boundary = uuid.uuid4().hex
    head = f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax="
    sent = [
        k or (syntax if syntax == JPEG_BASELINE or not i.archived else JPEG_XL_RECOMPRESSION)
        for i, k in zip(instances, kept, strict=True)
    ]
    heads = [f"{head}{s}\r\n\r\n".encode() for s in sent]
    tail = f"--{boundary}--\r\n".encode()
    length = sum(len(h) + size + 2 for h, size in zip(heads, sizes, strict=True))
    first = await instances[0].slide.read_range(
        instances[0].key, 0, min(_stream_chunk(instances[0]), instances[0].size)
    )
    response = web.StreamResponse(
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Cache-Control": cache_control(request, None, not any(i.private for i in instances)),
        }
    )
    response.content_length = length + len(tail)
    add_cors_headers(request, response)
    await response.prepare(request)
    for i, inst in enumerate(instances):
        await response.write(heads[i])
        if inst.archived and syntax == JPEG_BASELINE:
            async for part in inst.slide.jpeg_form(inst.stored):
                await response.write(part)
            await response.write(b"\r\n")
            continue
        start, step = 0, _stream_chunk(inst)
        while start < inst.size:
            end = min(start + step, inst.size)
            chunk = (
                first
                if i == 0 and start == 0
                else await inst.slide.read_range(inst.key, start, end)
            )
            await response.write(chunk)
            start = end
        await response.write(b"\r\n")
    await response.write(tail)
    await response.write_eof()
    return response
