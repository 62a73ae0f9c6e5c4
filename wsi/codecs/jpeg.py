"""JPEG stream surgery and libjpeg-turbo calls used on the hot path.

Tiled TIFF files (Aperio SVS, generic tiled TIFF) store *abbreviated* JPEG streams whose tables
live once in the TIFF `JPEGTables` tag; DICOM, browsers and Zarr readers need *complete* streams.
We build those without decoding.

Pixels go through libjpeg-turbo's TurboJPEG API, bound here with ctypes (the same library
PyTurboJPEG loads; ctypes releases the GIL during each call). A thin binding of our own lets the
pyramid builder decode straight into a slice of a larger strip and encode straight from one
(TurboJPEG takes a row pitch), reuse one handle and one output buffer per thread, and decode at
1/2 scale in the DCT domain, which is how the first derived level is made cheaply. On tiles of
~15 KB that per-call overhead was 15% of a conversion with PyTurboJPEG's general wrapper.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

import imagecodecs
import numpy as np

from wsi.codecs import _jpeglib
from wsi.errors import CorruptSlide, InvalidArgument, WsiError

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
# APP14 "Adobe" segment, version 100, flags 0/0, transform 0: the components are RGB, not YCbCr.
APP14_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"

_TJPF_RGB = 0
_TJSAMP_444, _TJSAMP_420 = 0, 2
_TJFLAG_NOREALLOC = 1024
_TJERR_WARNING = 0
_LIB_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libturbojpeg.so.0",
    "/usr/lib/aarch64-linux-gnu/libturbojpeg.so.0",
    "/usr/lib/libturbojpeg.so.0",
    "/usr/lib64/libturbojpeg.so.0",
    "/opt/homebrew/opt/jpeg-turbo/lib/libturbojpeg.dylib",
)


def _load() -> ctypes.CDLL:
    found = ctypes.util.find_library("turbojpeg")
    for path in (found, *_LIB_CANDIDATES):
        if path and (path == found or os.path.exists(path)):
            try:
                return _declare(ctypes.CDLL(path))
            except OSError:
                continue
    raise WsiError("libturbojpeg not found: install the system package libturbojpeg0")


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, ul = ctypes.c_void_p, ctypes.c_int, ctypes.c_ulong
    ip = ctypes.POINTER(ctypes.c_int)
    lib.tjInitDecompress.restype = p
    lib.tjInitCompress.restype = p
    lib.tjDestroy.argtypes = [p]
    lib.tjGetErrorStr2.argtypes = [p]
    lib.tjGetErrorStr2.restype = ctypes.c_char_p
    lib.tjGetErrorCode.argtypes = [p]
    lib.tjDecompressHeader3.argtypes = [p, p, ul, ip, ip, ip, ip]
    lib.tjDecompress2.argtypes = [p, p, ul, p, i, i, i, i, i]
    lib.tjCompress2.argtypes = [p, p, i, i, i, i, ctypes.POINTER(p), ctypes.POINTER(ul), i, i, i]
    lib.tjBufSize.argtypes = [i, i, i]
    lib.tjBufSize.restype = ul
    return lib


_lib = _load()


class _Codec(threading.local):
    """Per-thread TurboJPEG handles and output buffer (a handle serves one call at a time)."""

    def __init__(self) -> None:
        self.decompressor = _lib.tjInitDecompress()
        self.compressor = _lib.tjInitCompress()
        self.out = ctypes.create_string_buffer(0)

    def out_buffer(self, size: int) -> ctypes.Array[ctypes.c_char]:
        if len(self.out) < size:
            self.out = ctypes.create_string_buffer(size)
        return self.out

    def reset_decompressor(self) -> None:
        """A fresh decompressor after a failed call: libjpeg-turbo 2.1 can leave the handle
        unusable (after "Bogus marker length" in a header, every later stream on the thread
        failed with "Bogus DQT index 15"), so one corrupt tile would break a thread for good."""
        _lib.tjDestroy(self.decompressor)
        self.decompressor = _lib.tjInitDecompress()


_codec = _Codec()


def _check(status: int, handle: int, what: str) -> None:
    if status != 0 and _lib.tjGetErrorCode(handle) != _TJERR_WARNING:
        message = (_lib.tjGetErrorStr2(handle) or b"").decode(errors="replace")
        raise CorruptSlide(f"cannot {what} JPEG: {message}")


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


def header_length(stream: bytes) -> int:
    """Bytes of `stream` through its first SOS segment: all that a decoder reads before the
    entropy-coded data, so two streams that start with the same such bytes declare the same
    size and colours. A header that is not segment after segment (fill bytes, which decoders
    skip) counts as the whole stream."""
    for marker, pos in _segments(stream):
        if marker == 0xFF:
            break
        if marker == 0xDA:
            return min(len(stream), pos + 2 + int.from_bytes(stream[pos + 2 : pos + 4], "big"))
    return len(stream)


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


def adobe_transform(stream: bytes) -> int | None:
    """The colour transform of an Adobe APP14 segment (0 = RGB, 1 = YCbCr), None without one."""
    for marker, pos in _segments(stream):
        if marker == 0xEE and stream[pos + 4 : pos + 9] == b"Adobe":
            return stream[pos + 15]
    return None


def components(stream: bytes) -> tuple[bytes, list[int]]:
    """Component ids and sampling factors (h << 4 | v) from the frame header."""
    for marker, pos in _segments(stream):
        if marker in (0xC0, 0xC1, 0xC2):
            n = stream[pos + 9]
            ids = bytes(stream[pos + 10 + 3 * i] for i in range(n))
            return ids, [stream[pos + 11 + 3 * i] for i in range(n)]
    raise CorruptSlide("JPEG stream has no frame header")


def without_text(stream: bytes) -> bytes:
    """`stream` without the header segments that hold free text rather than pixels: comments
    (COM) and application segments (APPn: EXIF, XMP, a vendor's own) but a JFIF or Adobe one,
    which say the colour space. Scanners and cameras put names, barcodes, dates and file paths
    there; a stored tile never keeps them (`jpegtran.transcode`), so a source tile handed out or
    kept as it is must not either. Tables, frame, scan and entropy-coded data are kept byte for
    byte; `stream` itself is returned when there is nothing to drop. A header that is not one
    segment after another is read as far as it is (no decoder reads the rest either). In C
    (`_jpeglib.without_text`): it runs on every tile a conversion keeps."""
    return _jpeglib.without_text(stream)


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


def decoded_size(stream: bytes, half: bool = False) -> tuple[int, int]:
    """(height, width) that `decode` will return."""
    handle = _codec.decompressor
    w, h, sub, cs = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    status = _lib.tjDecompressHeader3(
        handle,
        stream,
        len(stream),
        ctypes.byref(w),
        ctypes.byref(h),
        ctypes.byref(sub),
        ctypes.byref(cs),
    )
    if status != 0 or w.value <= 0 or h.value <= 0:  # a header error is never just a warning
        message = (_lib.tjGetErrorStr2(handle) or b"").decode(errors="replace")
        _codec.reset_decompressor()
        raise CorruptSlide(f"cannot read JPEG header: {message}")
    if half:
        return (h.value + 1) // 2, (w.value + 1) // 2
    return h.value, w.value


def check_size(stream: bytes, height: int, width: int) -> None:
    """Refuse a JPEG whose header declares another size than (height, width) pixels.

    Tiles are copied from sources without decoding, and a decoder allocates whatever a header
    declares (up to 65500 x 65500: 12 GiB): one crafted tile of a few KB would cost that on every
    crop, region or rendered frame. Every tile of a level has the level's tile size (edge tiles
    are padded), so any other declared size is a corrupt or hostile tile."""
    found = decoded_size(stream)
    if found != (height, width):
        raise CorruptSlide(
            f"JPEG tile declares {found[1]}x{found[0]} pixels; the level's tiles are "
            f"{width}x{height}"
        )


def decode_into(stream: bytes, out: np.ndarray, half: bool = False) -> None:
    """Decode into `out`, an (h, w, 3) uint8 view whose rows may be strided (a slice of a strip);
    (h, w) must be `decoded_size(stream, half)`: a stream of another size is refused, as
    TurboJPEG would leave part of `out` as it was (or pick another scale)."""
    size = decoded_size(stream, half)
    if out.shape[:2] != size:
        raise CorruptSlide(f"JPEG tile decodes to {size}, not {out.shape[:2]}")
    _decode_into(stream, out)


def _decode_into(stream: bytes, out: np.ndarray) -> None:
    if out.dtype != np.uint8 or out.ndim != 3 or out.strides[1:] != (3, 1):
        raise ValueError("decode target must be an (h, w, 3) uint8 view with packed pixels")
    handle = _codec.decompressor
    h, w = out.shape[:2]
    # Asking for the scaled size makes libjpeg-turbo pick the 1/2 DCT scaling.
    status = _lib.tjDecompress2(
        handle, stream, len(stream), out.ctypes.data, w, out.strides[0], h, _TJPF_RGB, 0
    )
    try:
        _check(status, handle, "decode")
    except CorruptSlide:
        _codec.reset_decompressor()
        raise


def decode(
    stream: bytes, half: bool = False, expected: tuple[int, int] | None = None
) -> np.ndarray:
    """Decode to an (h, w, 3) uint8 RGB array; `half` decodes at 1/2 scale in the DCT domain.
    With `expected` (height, width at full scale), a stream declaring another size is refused
    before anything is allocated (see `check_size`)."""
    if expected is not None:
        check_size(stream, *expected)
    out = np.empty((*decoded_size(stream, half), 3), np.uint8)
    _decode_into(stream, out)
    return out


MAX_SIDE = 65500
"""The widest and tallest image libjpeg encodes (JPEG_MAX_DIMENSION)."""


def _check_encodable(pixels: np.ndarray) -> None:
    """A size libjpeg would refuse is the caller's mistake (InvalidArgument), not a damaged
    stream (libjpeg's errors here otherwise come back as CorruptSlide)."""
    h, w = pixels.shape[:2]
    if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
        raise InvalidArgument(f"a JPEG image is 1 to {MAX_SIDE} pixels a side, not {w}x{h}")


def encode(pixels: np.ndarray, quality: int, subsample_420: bool = True) -> bytes:
    """Encode an (h, w, 3) uint8 RGB array (rows may be strided) as a baseline JPEG.

    4:2:0 tiles are YCbCr (DICOM: YBR_FULL_422). Tiles without subsampling are RGB-coded (Adobe
    marker, no colour transform, as Aperio does; DICOM: RGB): DICOM-WSI has no photometric
    interpretation for non-subsampled YCbCr JPEG. libjpeg-turbo's TurboJPEG 2 API cannot write
    RGB-coded JPEG, so those go through imagecodecs (the same libjpeg-turbo underneath).
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.strides[1:] != (3, 1):
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    _check_encodable(pixels)
    if not subsample_420:
        data = imagecodecs.jpeg8_encode(
            np.ascontiguousarray(pixels), level=quality, outcolorspace="RGB", subsampling="444"
        )
        return bytes(data)
    handle = _codec.compressor
    h, w = pixels.shape[:2]
    sub = _TJSAMP_420 if subsample_420 else _TJSAMP_444
    size = int(_lib.tjBufSize(w, h, sub))
    buf = _codec.out_buffer(size)
    dest = ctypes.c_void_p(ctypes.addressof(buf))
    length = ctypes.c_ulong(size)
    status = _lib.tjCompress2(
        handle,
        pixels.ctypes.data,
        w,
        pixels.strides[0],
        h,
        _TJPF_RGB,
        ctypes.byref(dest),
        ctypes.byref(length),
        sub,
        quality,
        _TJFLAG_NOREALLOC,
    )
    _check(status, handle, "encode")
    return ctypes.string_at(ctypes.addressof(buf), length.value)  # NOREALLOC: still `buf`


def encode_optimized(pixels: np.ndarray, quality: int, subsample_420: bool = True) -> bytes:
    """`encode` with optimal Huffman tables: byte for byte what `jpegtran.transcode` makes of
    `encode`'s output (the same settings, hence the same quantised coefficients and pixels in
    every decoder), in one libjpeg call: half the CPU time of encoding then transcoding (0.23
    vs 0.46 ms a 256-px 4:2:0 tissue tile, 0.43 vs 0.95 ms RGB 4:4:4; plain `encode`: 0.18 and
    0.34 ms).

    The encoder is libjpeg's with `optimize_coding` (C extension `wsi.codecs._jpeglib`), its
    symbol-gathering pass replaced by the non-zero-coefficient walk that `transcode` uses."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.strides[1:] != (3, 1):
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    return _jpeglib.encode(pixels, quality, subsample_420)
