"""JPEG streams cut at their restart markers, without decoding a pixel.

A baseline JPEG written with a restart interval of N MCUs resets its DC predictions every N MCUs
and marks the place with RSTn. When a row of MCUs is a whole number of intervals, every interval
is a self-contained run of entropy-coded data covering an (N * MCU width) x (MCU height)
rectangle: a rectangle of whole intervals is a valid image of its own once it gets a frame header
of its size and its restart markers renumbered from RST0. That is how Hamamatsu NDPI levels (one
JPEG stream per level, with the offset of every interval in a TIFF tag) become tiles.

Where a tile must be narrower than an interval, the frame of the intervals it lies in is cropped
losslessly on DCT coefficients by libjpeg-turbo's `tjTransform` (the same coefficients, so the
same pixels in every decoder, away from chroma upsampling at the crop's edges). Where a tile
reaches past the image, the frame is padded with *white intervals*: entropy-coded runs of blocks
whose DC gives white and whose AC are all zero, coded with the stream's own Huffman tables.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from wsi.codecs import jpeg
from wsi.errors import CorruptSlide

_SOF0, _SOF1, _DHT, _DQT, _DRI, _SOS = 0xC0, 0xC1, 0xC4, 0xDB, 0xDD, 0xDA
_APP0, _APP14 = 0xE0, 0xEE
_RST0, _EOI = 0xD0, 0xD9
_KEPT_MARKERS = (_DQT, _DHT)
"""Header segments carried into every tile besides the frame, restart and scan headers; other
APPn and COM segments are dropped (scanners put free text there)."""


@dataclass(frozen=True)
class Component:
    ident: int
    h: int
    v: int
    quant_table: int


@dataclass(frozen=True)
class RestartHeader:
    """What a baseline JPEG header says about cutting its scan at restart markers."""

    width: int
    """Declared in the frame header, pixels (0 when the stream's real size exceeds 65535)."""
    height: int
    restart_interval: int
    """MCUs between restart markers (0: none)."""
    components: tuple[Component, ...]
    rgb: bool
    """The components are R, G, B (Adobe transform 0, or ids 'RGB'), not YCbCr."""
    tables: bytes
    """DQT and DHT segments as found, and a JFIF or Adobe marker: copied into every tile."""
    scan: bytes
    """The SOS segment (one scan of every component)."""
    dc_quant: tuple[int, ...]
    """The DC quantiser of each component."""
    huffman: tuple[tuple[dict[int, tuple[int, int]], dict[int, tuple[int, int]]], ...]
    """Per component: (DC, AC) Huffman codes, symbol -> (code, length)."""

    @property
    def mcu_width(self) -> int:
        return 8 * max(c.h for c in self.components)

    @property
    def mcu_height(self) -> int:
        return 8 * max(c.v for c in self.components)

    @property
    def interval_width(self) -> int:
        """Pixels across one restart interval, when intervals lie within MCU rows."""
        return self.restart_interval * self.mcu_width

    def frame_header(self, width: int, height: int) -> bytes:
        """SOI and every header segment of a stream of `width` x `height` pixels."""
        if not (0 < width <= 65535 and 0 < height <= 65535):
            raise CorruptSlide(f"a JPEG frame cannot be {width}x{height} pixels")
        n = len(self.components)
        sof = bytes([0xFF, _SOF0]) + (8 + 3 * n).to_bytes(2, "big") + b"\x08"
        sof += height.to_bytes(2, "big") + width.to_bytes(2, "big") + bytes([n])
        for c in self.components:
            sof += bytes([c.ident, c.h << 4 | c.v, c.quant_table])
        dri = b"\xff\xdd\x00\x04" + self.restart_interval.to_bytes(2, "big")
        return jpeg.SOI + self.tables + sof + dri + self.scan


def _segments(stream: bytes) -> list[tuple[int, bytes]]:
    """(marker, payload) of each header segment up to and including the SOS."""
    out: list[tuple[int, bytes]] = []
    pos = 2
    if stream[:2] != jpeg.SOI:
        raise CorruptSlide("the JPEG stream does not start with SOI")
    while True:
        if pos + 4 > len(stream) or stream[pos] != 0xFF:
            raise CorruptSlide("the JPEG header is truncated or malformed")
        marker = stream[pos + 1]
        length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        if length < 2 or pos + 2 + length > len(stream):
            raise CorruptSlide("a JPEG header segment runs past the header")
        out.append((marker, stream[pos + 4 : pos + 2 + length]))
        pos += 2 + length
        if marker == _SOS:
            return out


def _huffman_tables(payload: bytes) -> list[tuple[int, int, dict[int, tuple[int, int]]]]:
    """(class, id, symbol -> (code, length)) of each table of a DHT segment (canonical codes)."""
    tables = []
    pos = 0
    while pos < len(payload):
        if pos + 17 > len(payload):
            raise CorruptSlide("truncated Huffman table")
        cls, ident = payload[pos] >> 4, payload[pos] & 15
        counts = payload[pos + 1 : pos + 17]
        pos += 17
        codes: dict[int, tuple[int, int]] = {}
        code = 0
        for length, count in enumerate(counts, start=1):
            for _ in range(count):
                if pos >= len(payload):
                    raise CorruptSlide("truncated Huffman table")
                codes[payload[pos]] = (code, length)
                code += 1
                pos += 1
            code <<= 1
        tables.append((cls, ident, codes))
    return tables


def _dc_quantisers(payload: bytes) -> dict[int, int]:
    """Table id -> its DC quantiser, from a DQT segment."""
    out = {}
    pos = 0
    while pos < len(payload):
        precision, ident = payload[pos] >> 4, payload[pos] & 15
        size = 128 if precision else 64
        if pos + 1 + size > len(payload):
            raise CorruptSlide("truncated quantisation table")
        out[ident] = (
            int.from_bytes(payload[pos + 1 : pos + 3], "big") if precision else payload[pos + 1]
        )
        pos += 1 + size
    return out


def parse_header(stream: bytes) -> RestartHeader:
    """Read a baseline JPEG header (SOI .. SOS). CorruptSlide when it is malformed; a stream
    that is not baseline sequential Huffman (progressive, arithmetic, 12-bit, several scans)
    also raises CorruptSlide: it cannot be cut at restart markers."""
    segments = _segments(stream)
    found = _read_segments(segments)
    width, height, comps = _frame(found.frame)
    scan = segments[-1][1]
    coding, quant = _scan_tables(scan, comps, found)
    n = len(comps)
    ids = bytes(c.ident for c in comps)
    rgb = n == 3 and (found.rgb_marker if found.rgb_marker is not None else ids == b"RGB")
    sos = bytes([0xFF, _SOS]) + (len(scan) + 2).to_bytes(2, "big") + scan
    return RestartHeader(width, height, found.restart, comps, rgb, found.tables, sos, quant, coding)


_Codes = dict[int, tuple[int, int]]
"""A Huffman table's codes: symbol -> (code, length)."""


@dataclass(frozen=True)
class _HeaderSegments:
    """What the segments of a JPEG header before its scan say, as `parse_header` needs it."""

    tables: bytes
    """The DQT and DHT segments, after a JFIF or Adobe marker (`RestartHeader.tables`)."""
    frame: bytes | None
    """The SOF0 or SOF1 payload (None: no baseline frame header)."""
    restart: int
    rgb_marker: bool | None
    """The components' colour as a JFIF (False) or Adobe (transform 0: True) marker says."""
    dc_quant: dict[int, int]
    """Quantisation table id -> its DC quantiser."""
    huffman: dict[tuple[int, int], _Codes]
    """(class, id) -> the table's codes."""


def _read_segments(segments: list[tuple[int, bytes]]) -> _HeaderSegments:
    """Collect the tables, frame, restart interval and colour markers of a header's segments;
    CorruptSlide at a frame that is not baseline sequential Huffman."""
    tables = bytearray()
    frame: bytes | None = None
    restart = 0
    rgb_marker: bool | None = None
    dc_quant: dict[int, int] = {}
    huff: dict[tuple[int, int], _Codes] = {}
    for marker, payload in segments:
        raw = bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload
        if marker in _KEPT_MARKERS:
            tables += raw
        if marker == _DQT:
            dc_quant.update(_dc_quantisers(payload))
        elif marker == _DHT:
            for cls, ident, codes in _huffman_tables(payload):
                huff[cls, ident] = codes
        elif marker in (_SOF0, _SOF1):
            frame = payload
        elif 0xC0 <= marker <= 0xCF and marker not in (_DHT, 0xC8, 0xCC):
            raise CorruptSlide("the JPEG stream is not baseline sequential")
        elif marker == _DRI and len(payload) >= 2:
            restart = int.from_bytes(payload[:2], "big")
        elif marker == _APP0 and payload[:5] == b"JFIF\x00":
            rgb_marker = False
            tables[:0] = raw
        elif marker == _APP14 and payload[:5] == b"Adobe" and len(payload) >= 12:
            rgb_marker = payload[11] == 0
            tables[:0] = raw
    return _HeaderSegments(bytes(tables), frame, restart, rgb_marker, dc_quant, huff)


def _frame(frame: bytes | None) -> tuple[int, int, tuple[Component, ...]]:
    """(width, height, components) of an 8-bit frame header of 1 or 3 components sampled at
    most 2x2 (what can be cut here); CorruptSlide otherwise."""
    if frame is None or len(frame) < 6 or frame[0] != 8:
        raise CorruptSlide("the JPEG stream has no 8-bit baseline frame header")
    height, width, n = (
        int.from_bytes(frame[1:3], "big"),
        int.from_bytes(frame[3:5], "big"),
        frame[5],
    )
    if n not in (1, 3) or len(frame) < 6 + 3 * n:
        raise CorruptSlide(f"a JPEG frame of {n} components cannot be cut here")
    comps = tuple(
        Component(frame[6 + 3 * i], frame[7 + 3 * i] >> 4, frame[7 + 3 * i] & 15, frame[8 + 3 * i])
        for i in range(n)
    )
    if any(not (1 <= c.h <= 2 and 1 <= c.v <= 2) for c in comps):
        raise CorruptSlide("unusual JPEG sampling factors")
    return width, height, comps


def _scan_tables(
    scan: bytes, comps: tuple[Component, ...], found: _HeaderSegments
) -> tuple[tuple[tuple[_Codes, _Codes], ...], tuple[int, ...]]:
    """Per component, the (DC, AC) Huffman codes its scan selects and its DC quantiser;
    CorruptSlide unless the one scan holds every component and its tables are all there."""
    n = len(comps)
    if not scan or scan[0] != n or len(scan) < 1 + 2 * n:
        raise CorruptSlide("the JPEG scan does not hold every component at once")
    selectors = {scan[1 + 2 * i]: scan[2 + 2 * i] for i in range(n)}
    huff = found.huffman
    try:
        coding = tuple(
            (huff[0, selectors[c.ident] >> 4], huff[1, selectors[c.ident] & 15]) for c in comps
        )
        quant = tuple(found.dc_quant[c.quant_table] for c in comps)
    except KeyError as exc:
        raise CorruptSlide("the JPEG header lacks a table its scan uses") from exc
    return coding, quant


class BitWriter:
    """Entropy-coded bits as a JPEG scan holds them: 0xFF bytes stuffed, the last byte padded
    with 1-bits."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.acc = 0
        self.bits = 0

    def put(self, code: int, length: int) -> None:
        self.acc = (self.acc << length) | code
        self.bits += length
        while self.bits >= 8:
            self.bits -= 8
            byte = (self.acc >> self.bits) & 0xFF
            self.out.append(byte)
            if byte == 0xFF:
                self.out.append(0)  # byte stuffing
        self.acc &= (1 << self.bits) - 1

    def flush(self) -> bytes:
        if self.bits:
            self.put((1 << (8 - self.bits)) - 1, 8 - self.bits)  # pad with 1-bits
        return bytes(self.out)


def white_interval(header: RestartHeader) -> bytes:
    """Entropy-coded data of one restart interval of white (no marker): in each component, the
    first block's DC difference gives white and every other difference and every AC is zero.
    CorruptSlide when the stream's Huffman tables cannot code it."""
    white = [255] * len(header.components)
    if len(white) == 3 and not header.rgb:
        white = [255, 128, 128]  # YCbCr
    bits = BitWriter()
    first = [True] * len(header.components)
    for _ in range(header.restart_interval):
        for i, comp in enumerate(header.components):
            dc_codes, ac_codes = header.huffman[i]
            for _ in range(comp.h * comp.v):
                diff = round(8 * (white[i] - 128) / header.dc_quant[i]) if first[i] else 0
                first[i] = False
                size = abs(diff).bit_length()
                if size not in dc_codes or 0 not in ac_codes:
                    raise CorruptSlide("the stream's Huffman tables cannot code a white block")
                bits.put(*dc_codes[size])
                if size:
                    bits.put(diff if diff > 0 else diff + (1 << size) - 1, size)
                bits.put(*ac_codes[0])  # end of block: every AC coefficient is zero
    return bits.flush()


def assemble(header: RestartHeader, width: int, height: int, intervals: Sequence[bytes]) -> bytes:
    """A complete JPEG of `width` x `height` pixels from its restart intervals in scan order
    (each one's entropy-coded data without its trailing marker): restart markers renumbered
    from RST0, EOI at the end."""
    parts = [header.frame_header(width, height)]
    last = len(intervals) - 1
    for k, data in enumerate(intervals):
        parts.append(data)
        parts.append(bytes([0xFF, _RST0 + k % 8]) if k < last else jpeg.EOI)
    return b"".join(parts)


def strip_marker(data: bytes) -> bytes:
    """An interval as stored (entropy-coded data, then RSTn or EOI) without its marker;
    CorruptSlide when it does not end with one (the offsets do not point at intervals)."""
    if len(data) < 2 or data[-2] != 0xFF or not (_RST0 <= data[-1] <= _EOI):
        raise CorruptSlide("restart interval offsets do not point at restart intervals")
    return data[:-2]


# -- lossless crops (libjpeg-turbo's tjTransform) ------------------------------------------------

_TJXOPT_PERFECT, _TJXOPT_CROP, _TJXOPT_COPYNONE = 1, 4, 64
_TJFLAG_STOPONWARNING = 8192


class _Region(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


class _Transform(ctypes.Structure):
    _fields_ = [
        ("r", _Region),
        ("op", ctypes.c_int),
        ("options", ctypes.c_int),
        ("data", ctypes.c_void_p),
        ("customFilter", ctypes.c_void_p),
    ]


def _declare() -> ctypes.CDLL:
    lib = jpeg._lib
    p = ctypes.c_void_p
    lib.tjInitTransform.restype = p
    lib.tjTransform.argtypes = [
        p,
        p,
        ctypes.c_ulong,
        ctypes.c_int,
        ctypes.POINTER(p),
        ctypes.POINTER(ctypes.c_ulong),
        ctypes.POINTER(_Transform),
        ctypes.c_int,
    ]
    lib.tjFree.argtypes = [p]
    return lib


_tj = _declare()


class _Transformer(threading.local):
    def __init__(self) -> None:
        self.handle = _tj.tjInitTransform()


_transformer = _Transformer()


def crop(stream: bytes, regions: Sequence[tuple[int, int, int, int]]) -> list[bytes]:
    """Lossless crops (x, y, width, height in pixels; x and y on MCU boundaries, inside the
    image) of a JPEG, all from one read of its coefficients. Any libjpeg warning (corrupt data)
    raises CorruptSlide."""
    n = len(regions)
    transforms = (_Transform * n)()
    for t, (x, y, w, h) in zip(transforms, regions, strict=True):
        t.r = _Region(x, y, w, h)
        t.options = _TJXOPT_PERFECT | _TJXOPT_CROP | _TJXOPT_COPYNONE
    bufs = (ctypes.c_void_p * n)()
    sizes = (ctypes.c_ulong * n)()
    handle = _transformer.handle
    status = _tj.tjTransform(
        handle, stream, len(stream), n, bufs, sizes, transforms, _TJFLAG_STOPONWARNING
    )
    try:
        if status != 0:
            message = (_tj.tjGetErrorStr2(handle) or b"").decode(errors="replace")
            raise CorruptSlide(f"cannot crop JPEG: {message}")
        out = []
        for i in range(n):
            address = bufs[i]
            if not address:
                raise CorruptSlide("cannot crop JPEG: libjpeg-turbo gave no output")
            out.append(ctypes.string_at(address, sizes[i]))
        return out
    finally:
        for i in range(n):
            if bufs[i]:
                _tj.tjFree(bufs[i])
