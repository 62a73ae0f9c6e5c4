"""JPEG stream surgery and libjpeg-turbo calls used on the hot path.

Tiled TIFF files (Aperio SVS, generic tiled TIFF) store *abbreviated* JPEG streams whose tables
live once in the TIFF `JPEGTables` tag; DICOM, browsers and Zarr readers need *complete* streams.
We build those without decoding. libjpeg-turbo (through PyTurboJPEG, which releases the GIL)
decodes at 1/2 scale directly in the DCT domain, which is how the first derived level is made
cheaply.
"""

from __future__ import annotations

import threading

import numpy as np
import turbojpeg

from .errors import CorruptSlide

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
# APP14 "Adobe" segment, version 100, flags 0/0, transform 0: the components are RGB, not YCbCr.
APP14_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"

_local = threading.local()


def _tj() -> turbojpeg.TurboJPEG:
    # One wrapper per thread: PyTurboJPEG creates a libjpeg-turbo handle per call, but the wrapper
    # object itself is cheap to keep and avoids re-loading the library for every call.
    tj = getattr(_local, "tj", None)
    if tj is None:
        tj = _local.tj = turbojpeg.TurboJPEG()
    return tj


def _segments(stream: bytes) -> list[tuple[int, int]]:
    """(marker, offset) of each header segment up to the first SOS."""
    out: list[tuple[int, int]] = []
    pos = 2
    while pos + 4 <= len(stream):
        if stream[pos] != 0xFF:
            break
        marker = stream[pos + 1]
        out.append((marker, pos))
        if marker == 0xDA:  # SOS: entropy-coded data follows
            break
        pos += 2 + int.from_bytes(stream[pos + 2 : pos + 4], "big")
    return out


def needs_rgb_marker(stream: bytes) -> bool:
    """True when libjpeg would wrongly treat this RGB-coded stream as YCbCr.

    Without a JFIF or Adobe marker, libjpeg assumes YCbCr unless the component ids spell
    'R','G','B'. Aperio writes component ids 0,1,2 for RGB tiles, so they decode with wrong
    colours elsewhere.
    """
    for marker, pos in _segments(stream):
        if marker in (0xE0, 0xEE):  # JFIF or Adobe: the stream says what it is
            return False
        if marker in (0xC0, 0xC1, 0xC2):
            ncomp = stream[pos + 9]
            ids = bytes(stream[pos + 10 + 3 * i] for i in range(ncomp))
            return ncomp == 3 and ids != b"RGB"
    return False


def complete_tile(tile: bytes, tables: bytes | None, rgb: bool) -> bytes:
    """Abbreviated TIFF JPEG tile + JPEGTables -> a complete JPEG stream, without decoding.

    `rgb` says the TIFF photometric interpretation is RGB (the JPEG carries RGB, not YCbCr); an
    Adobe APP14 marker with transform 0 is then added so every decoder agrees on the colours.
    """
    if tile[:2] != SOI:
        raise CorruptSlide("tile does not start with a JPEG SOI marker")
    head = SOI
    if rgb and needs_rgb_marker(tile):
        head += APP14_RGB
    if tables:
        if tables[:2] != SOI or tables[-2:] != EOI:
            raise CorruptSlide("JPEGTables is not an abbreviated table-only JPEG stream")
        return head + tables[2:-2] + tile[2:]
    return head + tile[2:]


def decode(stream: bytes, half: bool = False) -> np.ndarray:
    """Decode to an (h, w, 3) uint8 RGB array; `half` decodes at 1/2 scale in the DCT domain."""
    try:
        return _tj().decode(
            stream,
            pixel_format=turbojpeg.TJPF_RGB,
            scaling_factor=(1, 2) if half else None,
        )
    except OSError as exc:
        raise CorruptSlide(f"cannot decode JPEG tile: {exc}") from exc


def encode(pixels: np.ndarray, quality: int, subsample_420: bool = True) -> bytes:
    """Encode an (h, w, 3) uint8 RGB array as a baseline JPEG (YCbCr, 4:2:0 or 4:4:4)."""
    sub = turbojpeg.TJSAMP_420 if subsample_420 else turbojpeg.TJSAMP_444
    result = _tj().encode(
        np.ascontiguousarray(pixels),
        quality=quality,
        pixel_format=turbojpeg.TJPF_RGB,
        jpeg_subsample=sub,
    )
    return bytes(result)
