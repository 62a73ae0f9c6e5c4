"""Content negotiation (Accept headers) and multipart/related bodies."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from server.api.dicomweb.instances import (
    DICOM_JSON,
    EXPLICIT_VR_LE,
    JPEG_BASELINE,
    JPEG_XL_RECOMPRESSION,
)


@dataclass(frozen=True)
class MediaRange:
    type: str
    params: dict[str, str]
    q: float


def split_outside_quotes(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def accepted(request: web.Request) -> list[MediaRange]:
    """The Accept header's media ranges, most preferred first (an absent header: */*)."""
    header = request.headers.get("Accept", "").strip()
    if not header:
        return [MediaRange("*/*", {}, 1.0)]
    ranges = []
    for item in split_outside_quotes(header, ","):
        pieces = [p.strip() for p in split_outside_quotes(item, ";")]
        if not pieces[0]:
            continue
        params: dict[str, str] = {}
        for piece in pieces[1:]:
            name, _, value = piece.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 0.0
        if q > 0:
            ranges.append(MediaRange(pieces[0].lower(), params, q))
    return sorted(ranges, key=lambda r: -r.q)


def not_acceptable(what: str) -> web.HTTPNotAcceptable:
    return web.HTTPNotAcceptable(reason=f"{what} only")


def check_json_accept(request: web.Request) -> None:
    ok = ("application/dicom+json", "application/json", "application/*", "*/*")
    if not any(r.type in ok for r in accepted(request)):
        raise not_acceptable(DICOM_JSON)


def frame_mode(request: web.Request, count: int) -> str:
    """From the Accept header: 'jpeg' (JPEG frames, image/jpeg parts), 'octet-jpeg' (JPEG
    frames, application/octet-stream parts: `transfer-syntax=*`), 'native' (decoded RGB),
    'single' (one JPEG, not multipart) or 'jxl' (the JPEG XL frames of an archived instance, asked
    for by image/jxl or their transfer syntax); 406 otherwise."""
    for r in accepted(request):
        inner, syntax = r.type, r.params.get("transfer-syntax")
        if _asks_jxl(r):
            return "jxl"
        if r.type == "multipart/related":
            inner = r.params.get("type", "application/octet-stream").lower()
        elif r.type == "image/jpeg" and count == 1 and syntax in (None, "*", JPEG_BASELINE):
            return "single"
        elif r.type != "*/*":
            continue
        if inner in ("image/jpeg", "image/*", "*/*") and syntax in (None, "*", JPEG_BASELINE):
            return "jpeg"
        if inner in ("application/octet-stream", "*/*") and syntax == EXPLICIT_VR_LE:
            return "native"
        if inner == "application/octet-stream" and syntax in ("*", None):
            return "octet-jpeg" if syntax == "*" else "native"
    raise not_acceptable(
        f'multipart/related; type="image/jpeg" (transfer-syntax={JPEG_BASELINE}) or '
        f'type="application/octet-stream" (transfer-syntax=* or {EXPLICIT_VR_LE})'
    )


def _asks_jxl(r: MediaRange) -> bool:
    """A media range that asks for JPEG XL frames by name: image/jxl, or the transfer syntax of
    JPEG XL recompressed JPEG (alone or as the parts of multipart/related)."""
    syntax = r.params.get("transfer-syntax")
    inner = r.params.get("type", "").lower() if r.type == "multipart/related" else r.type
    if inner == "image/jxl":
        return syntax in (None, "*", JPEG_XL_RECOMPRESSION)
    return syntax == JPEG_XL_RECOMPRESSION and inner in ("application/octet-stream", "*/*", "")


def check_dicom_accept(request: web.Request) -> str:
    """The transfer syntax of the instances to send: JPEG baseline (also for `*` and none
    named: archived instances are rebuilt in their JPEG form), or JPEG XL JPEG Recompression
    when asked for by name (archived instances as stored); 406 otherwise."""
    for r in accepted(request):
        syntax = r.params.get("transfer-syntax")
        if r.type == "*/*" or (
            r.type == "multipart/related"
            and r.params.get("type", "application/dicom").lower() in ("application/dicom", "*/*")
            and syntax in (None, "*", JPEG_BASELINE, JPEG_XL_RECOMPRESSION)
        ):
            return JPEG_XL_RECOMPRESSION if syntax == JPEG_XL_RECOMPRESSION else JPEG_BASELINE
    raise not_acceptable(
        f'multipart/related; type="application/dicom" (transfer-syntax={JPEG_BASELINE}, '
        f"{JPEG_XL_RECOMPRESSION} for archived slides, or *)"
    )


def image_format(request: web.Request) -> str:
    for r in accepted(request):
        if r.type in ("image/jpeg", "image/*", "*/*"):
            return "jpg"
        if r.type == "image/png":
            return "png"
    raise not_acceptable("image/jpeg or image/png")


def multipart_boundary(media_type: str, syntax: str) -> tuple[str, str]:
    """(boundary, Content-Type) of a multipart/related message whose parts are all
    `media_type` in transfer syntax `syntax`."""
    boundary = uuid.uuid4().hex
    return boundary, (
        f'multipart/related; type="{media_type}"; boundary={boundary}; transfer-syntax={syntax}'
    )


def part_head(boundary: str, media_type: str, syntax: str) -> bytes:
    """What goes before each part's bytes."""
    return f"--{boundary}\r\nContent-Type: {media_type}; transfer-syntax={syntax}\r\n\r\n".encode()


def multipart(parts: Sequence[bytes], media_type: str, syntax: str) -> tuple[bytes, str]:
    """(body, Content-Type) of a whole multipart/related message (see `multipart_boundary`)."""
    boundary, content_type = multipart_boundary(media_type, syntax)
    head = part_head(boundary, media_type, syntax)
    body = b"".join(head + p + b"\r\n" for p in parts) + f"--{boundary}--\r\n".encode()
    return body, content_type
