"""The IIIF Image API 3.0's request parameters (region, size, rotation, quality, format) parsed
and checked against the image and the pixel budget: every error a 400 naming the parameter
(`server.api.iiif` answers the requests)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal

from server.url_numbers import url_int
from wsi.errors import InvalidArgument

FORMATS = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
QUALITIES = ("default", "color", "gray", "bitonal")

_NUMBER = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9})?")
_ROTATION = re.compile(r"(!?)([0-9]{1,3}(?:\.[0-9]{1,9})?)")


@dataclass(frozen=True)
class Region:
    """Level-0 rectangle, already cut at the image's edges."""

    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True)
class Size:
    w: int
    h: int
    derived: str = ""
    """'w' or 'h' when that side was computed from the aspect ratio (`,h` / `w,`)."""
    capped: bool = False
    """`max`, `!w,h`: already fitted to the pixel budget."""


def bad(message: str) -> InvalidArgument:
    return InvalidArgument(f"IIIF: {message}")


def _int(text: str, what: str) -> int:
    """`text` as an integer by the service's rule for URLs (`url_int`), refused as IIIF's."""
    try:
        return url_int(text, what)
    except InvalidArgument as exc:
        raise bad(str(exc)) from None


def _number(text: str, what: str) -> float:
    if not _NUMBER.fullmatch(text):
        raise bad(f"{what} must be a non-negative decimal number, got {text!r}")
    return float(text)


def parse_region(text: str, width: int, height: int) -> Region:
    """full | square | x,y,w,h | pct:x,y,w,h, cut at the image's edges (400 when empty or
    entirely outside)."""
    if text == "full":
        return Region(0, 0, width, height)
    if text == "square":
        side = min(width, height)
        return Region((width - side) // 2, (height - side) // 2, side, side)
    if text.startswith("pct:"):
        parts = text[4:].split(",")
        if len(parts) != 4:
            raise bad("region pct:x,y,w,h needs four numbers")
        px, py, pw, ph = (_number(p, "region percentage") for p in parts)
        x, y = round(px * width / 100), round(py * height / 100)
        w, h = round(pw * width / 100), round(ph * height / 100)
    else:
        parts = text.split(",")
        if len(parts) != 4:
            raise bad(f"region must be full, square, x,y,w,h or pct:x,y,w,h, got {text!r}")
        x, y, w, h = (_int(p, "region coordinate") for p in parts)
    if w <= 0 or h <= 0:
        raise bad("region width and height must be positive")
    if x >= width or y >= height:
        raise bad(f"region starts outside the {width}x{height} image")
    return Region(x, y, min(w, width - x), min(h, height - y))


def _fit_area(w: float, h: float, max_area: int) -> tuple[int, int]:
    """The largest (w, h) of this aspect ratio with w*h <= max_area (at least 1x1)."""
    scale = math.sqrt(max_area / (w * h))
    ow, oh = max(1, math.floor(w * scale)), max(1, math.floor(h * scale))
    while ow * oh > max_area and max(ow, oh) > 1:
        if ow >= oh:
            ow -= 1
        else:
            oh -= 1
    return ow, oh


def parse_size(text: str, rw: int, rh: int, max_area: int) -> Size:
    """max | w, | ,h | pct:n | w,h | !w,h, each optionally `^` (upscaling allowed)."""
    upscale = text.startswith("^")
    body = text[1:] if upscale else text
    if body == "max":
        if upscale or rw * rh > max_area:
            return Size(*_fit_area(rw, rh, max_area), capped=True)
        return Size(rw, rh, capped=True)
    if body.startswith("pct:"):
        n = _number(body[4:], "size percentage")
        if n > 100 and not upscale:
            raise bad("size above 100% needs ^ (upscaling)")
        size = Size(round(rw * n / 100), round(rh * n / 100))
    else:
        confined = body.startswith("!")
        parts = (body[1:] if confined else body).split(",")
        if len(parts) != 2 or (confined and not (parts[0] and parts[1])):
            raise bad(f"size must be max, w,, ,h, pct:n, w,h or !w,h, got {text!r}")
        w = _int(parts[0], "size width") if parts[0] else None
        h = _int(parts[1], "size height") if parts[1] else None
        if w is None and h is None:
            raise bad("size needs a width or a height")
        if w == 0 or h == 0:
            raise bad("size width and height must be positive")
        if confined:
            assert w is not None and h is not None
            scale = min(w / rw, h / rh)
            if scale > 1.0 and not upscale:
                # The best fit would be larger than the region: that is upscaling, which 3.0
                # allows only with ^ (both community validators refuse `!w,h` here).
                raise bad(f"size {text} would enlarge the {rw}x{rh} region: needs ^")
            if rw * rh * scale * scale > max_area:
                return Size(*_fit_area(rw, rh, max_area), capped=True)
            ow = min(w, max(1, round(rw * scale)))
            oh = min(h, max(1, round(rh * scale)))
            if not upscale:
                ow, oh = min(ow, rw), min(oh, rh)
            return Size(ow, oh, capped=True)
        if w is None:
            assert h is not None
            size = Size(max(1, round(rw * h / rh)), h, derived="w")
        elif h is None:
            size = Size(w, max(1, round(rh * w / rw)), derived="h")
        else:
            size = Size(w, h)
        if not upscale and (size.w > rw or size.h > rh):
            raise bad(f"size {size.w}x{size.h} is larger than the {rw}x{rh} region: needs ^")
    if size.w <= 0 or size.h <= 0:
        raise bad("size width and height must be positive")
    return size


def parse_rotation(text: str) -> tuple[bool, float]:
    """(mirror, degrees clockwise in [0, 360))."""
    match = _ROTATION.fullmatch(text)
    if not match:
        raise bad(
            f"rotation must be a number of degrees 0-360, optionally !-prefixed, got {text!r}"
        )
    degrees = float(match.group(2))
    if degrees > 360:
        raise bad("rotation must be between 0 and 360 degrees")
    return match.group(1) == "!", degrees % 360


def rotation_text(mirror: bool, degrees: float) -> str:
    """The canonical spelling of a rotation from `parse_rotation` (IIIF 3, canonical URI
    syntax): "!" when mirrored, then the degrees in plain decimal, an integer without a decimal
    point, otherwise without trailing zeros; `parse_rotation` reads it back as the same float,
    so the canonical URL names the very image. `repr` is the shortest text that reads back as
    that float (at most the 9 decimals the parser takes); the `:g` it replaces kept 6 digits
    (359.99999 became "360", another image under the same ETag) and wrote exponents ("1e-07",
    which the parser refuses)."""
    return ("!" if mirror else "") + format(Decimal(repr(degrees)).normalize(), "f")


def parse_file(quality: str, fmt: str) -> tuple[str, str]:
    if quality not in QUALITIES:
        raise bad(f"quality must be one of {', '.join(QUALITIES)}, got {quality!r}")
    if fmt not in FORMATS:
        raise bad(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return quality, fmt
