"""Content negotiation (Accept headers) and multipart/related bodies."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from server.api.dicomweb.instances import (
    DICOM_JSON,
    EXPLICIT_VR_LE,
    JPEG2000_SYNTAXES,
    JPEG_BASELINE,
    JPEG_XL_RECOMPRESSION,
    DicomWebState,
    state,
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
    'single' (one JPEG, not multipart), 'jxl' (the JPEG XL frames of an archived instance, asked
    for by image/jxl or their transfer syntax) or 'j2k' / 'j2k:<syntax>' (the JPEG 2000 frames of
    an instance kept so, in any or in that transfer syntax); 406 otherwise."""
    for r in accepted(request):
        inner, syntax = r.type, r.params.get("transfer-syntax")
        if _asks_jxl(r):
            return "jxl"
        if _asks_jpeg2000(r):
            named = syntax if syntax in JPEG2000_SYNTAXES else ""
            return f"j2k:{named}" if named else "j2k"
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


FRAME_MODES_KEPT = 256
"""Accept headers whose frame mode is remembered (a client sends the same one every time)."""


def cached_frame_mode(request: web.Request, count: int) -> str:
    """`frame_mode`, remembered per Accept header: parsing it costs more than a frame's lookup.
    The mode depends on the header and on whether one frame is asked for, nothing else; a 406
    is not remembered."""
    modes = state(request).frame_modes
    key = (request.headers.get("Accept", ""), count == 1)
    mode = modes.get(key)
    if mode is None:
        mode = frame_mode(request, count)
        if len(modes) >= FRAME_MODES_KEPT:
            modes.clear()
        modes[key] = mode
    return mode


def _asks_jxl(r: MediaRange) -> bool:
    """A media range that asks for JPEG XL frames by name: image/jxl, or the transfer syntax of
    JPEG XL recompressed JPEG (alone or as the parts of multipart/related)."""
    syntax = r.params.get("transfer-syntax")
    inner = r.params.get("type", "").lower() if r.type == "multipart/related" else r.type
    if inner == "image/jxl":
        return syntax in (None, "*", JPEG_XL_RECOMPRESSION)
    return syntax == JPEG_XL_RECOMPRESSION and inner in ("application/octet-stream", "*/*", "")


def _asks_jpeg2000(r: MediaRange) -> bool:
    """A media range that asks for the JPEG 2000 frames of an instance kept as JPEG 2000:
    image/jp2 (PS3.18 8.7.3), or a JPEG 2000 transfer syntax by name with parts of any type;
    not as application/octet-stream, which is for uncompressed frames or `*` (the mode then
    names the syntax asked for: `frames` answers 406 when the stored one is another)."""
    syntax = r.params.get("transfer-syntax")
    inner = r.params.get("type", "").lower() if r.type == "multipart/related" else r.type
    if inner == "image/jp2":
        return syntax in (None, "*", *JPEG2000_SYNTAXES)
    return syntax in JPEG2000_SYNTAXES and inner == "*/*"


def accepts_stored_syntax(request: web.Request, syntax: str) -> bool:
    """Whether the Accept header takes DICOM instances in `syntax` (named, `*`, or no transfer
    syntax named): how instances kept as JPEG 2000 are sent, never transcoded whole."""
    for r in accepted(request):
        named = r.params.get("transfer-syntax")
        if r.type == "*/*" or (
            r.type == "multipart/related"
            and r.params.get("type", "application/dicom").lower() in ("application/dicom", "*/*")
            and named in (None, "*", syntax)
        ):
            return True
    return False


def check_dicom_accept(request: web.Request) -> str:
    """The transfer syntax of the instances to send: JPEG baseline (also for `*` and none
    named: archived instances are rebuilt in their JPEG form), or JPEG XL JPEG Recompression
    when asked for by name (archived instances as stored); 406 otherwise."""
    for r in accepted(request):
        syntax = r.params.get("transfer-syntax")
        if r.type == "*/*" or (
            r.type == "multipart/related"
            and r.params.get("type", "application/dicom").lower() in ("application/dicom", "*/*")
            and syntax in (None, "*", JPEG_BASELINE, JPEG_XL_RECOMPRESSION, *JPEG2000_SYNTAXES)
        ):
            if syntax in (JPEG_XL_RECOMPRESSION, *JPEG2000_SYNTAXES):
                return syntax
            return JPEG_BASELINE
    raise not_acceptable(
        f'multipart/related; type="application/dicom" (transfer-syntax={JPEG_BASELINE}, '
        f"{JPEG_XL_RECOMPRESSION} for archived slides, JPEG 2000 for slides kept as it, or *)"
    )


def image_format(request: web.Request) -> str:
    for r in accepted(request):
        if r.type in ("image/jpeg", "image/*", "*/*"):
            return "jpg"
        if r.type == "image/png":
            return "png"
    raise not_acceptable("image/jpeg or image/png")


def multipart_type(media_type: str, syntax: str, boundary: str) -> str:
    """The Content-Type of a multipart/related message of `media_type` parts in `syntax`."""
    return f'multipart/related; type="{media_type}"; boundary={boundary}; transfer-syntax={syntax}'


def part_head(boundary: str, media_type: str, syntax: str) -> bytes:
    """What goes before each part's bytes."""
    return f"--{boundary}\r\nContent-Type: {media_type}; transfer-syntax={syntax}\r\n\r\n".encode()


@dataclass(frozen=True)
class Framing:
    """What a multipart/related body of `media_type` parts in one syntax puts around its parts,
    built once per app for its boundary."""

    marker: bytes
    """The boundary: no part may hold it."""
    content_type: str
    head: bytes
    """Before each part."""
    tail: bytes
    """The end of the body."""
    last: bytes
    """After the last part's bytes: its CRLF, then `tail`."""

    @classmethod
    def make(cls, boundary: str, media_type: str, syntax: str) -> Framing:
        tail = f"--{boundary}--\r\n".encode()
        return cls(
            boundary.encode(),
            multipart_type(media_type, syntax, boundary),
            part_head(boundary, media_type, syntax),
            tail,
            b"\r\n" + tail,
        )

    def one(self, data: bytes) -> bytes:
        """The body of one part (a viewer's frame): one copy of `data`."""
        return b"".join((self.head, data, self.last))

    def body(self, parts: Sequence[bytes]) -> bytes:
        """The whole body: one copy of the parts."""
        pieces = [piece for data in parts for piece in (self.head, data, b"\r\n")]
        pieces.append(self.tail)
        return b"".join(pieces)


def app_framing(st: DicomWebState, media_type: str, syntax: str) -> Framing:
    """The app's framing of `media_type` parts in `syntax`, made once for its boundary."""
    found: Framing | None = st.framings.get((media_type, syntax))
    if found is None:
        found = st.framings[media_type, syntax] = Framing.make(st.boundary, media_type, syntax)
    return found


def framing(request: web.Request, media_type: str, syntax: str, parts: Sequence[bytes]) -> Framing:
    """The framing of a body of `parts`: the app's; or, where a part holds its boundary (public,
    so a slide can be made to), one whose boundary is a digest of the parts themselves (the
    next digest while a part holds that one): a part cannot be made to hold a digest of itself.
    Proven, not just unlikely; and the same parts get the same boundary, so the same request
    gets the same bytes in every process (`MULTIPART_BOUNDARY`)."""
    framed = app_framing(state(request), media_type, syntax)
    digest = hashlib.sha256(framed.marker)
    while any(framed.marker in data for data in parts):
        for data in parts:
            digest.update(len(data).to_bytes(8, "big") + data)
        framed = Framing.make(digest.hexdigest()[:32], media_type, syntax)
    return framed
