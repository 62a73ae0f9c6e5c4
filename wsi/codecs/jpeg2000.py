"""JPEG 2000 codestreams as Aperio stores them: decoding (full and at 1/2 resolution), the
codestream facts DICOM needs, and the transcode to JPEG that viewers can show.

Aperio writes each TIFF tile as a bare J2K codestream (no JP2 boxes): compression 33005 holds
RGB, normally coded with the irreversible 9/7 wavelet and the irreversible colour transform (ICT,
Kakadu "Q=70"); 33003 holds Y, Cb, Cr components without a codestream colour transform, which
readers convert to RGB afterwards (as OpenSlide does).

Decoding goes through our OpenJPEG binding (`wsi.codecs.openjpeg`), straight into the
caller's array. CPU time per 256-px tile, on the generated slide (`sample_data/make_j2k.py`) /
the TCGA sample: a full decode 3.3 / 2.4 ms, a 1/2-resolution one (the finest wavelet level
not decoded) 1.4 / 1.4 ms; a 33003 tile's colour conversion adds ~0.5 ms. Tiles are decoded
one per pool thread. Where the full tile is decoded anyway (JPEG output), level 1 is its 2x2
mean (0.16 ms); the reduced decode serves when level 0 is kept as it is.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import imagecodecs
import numpy as np

from wsi.codecs import jpeg, openjpeg
from wsi.errors import CorruptSlide, InvalidArgument

APERIO_YCBCR = 33003
"""TIFF compression: J2K codestreams of Y, Cb, Cr components."""
APERIO_RGB = 33005
"""TIFF compression: J2K codestreams of R, G, B components (usually through the ICT)."""
TIFF_COMPRESSIONS = (APERIO_YCBCR, APERIO_RGB)
ZARR_CODEC_NAME = "wsistore.jpeg2000"
"""Zarr v3 name of the chunk codec of levels kept as JPEG 2000 (`wsi.codecs.zarr_j2k`)."""
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
"""DICOM transfer syntax JPEG 2000 Image Compression (Lossless Only), PS3.5 A.4.4."""
JPEG2000 = "1.2.840.10008.1.2.4.91"
"""DICOM transfer syntax JPEG 2000 Image Compression (lossy or lossless)."""
SOC = b"\xff\x4f\xff\x51"
"""Start of codestream followed by the SIZ marker, as every J2K codestream begins."""
MAX_STREAM_BYTES = 64 * 1024 * 1024
"""Largest codestream accepted: a 256-1024 px tile is a few KB to ~1 MB."""
MAX_TILE_PIXELS = 8192 * 8192
"""Largest tile decoded (OpenJPEG holds 12 bytes a pixel while it decodes one)."""
_COD = 0xFF52
_SOT = 0xFF90
_SOD = 0xFF93
_COM = 0xFF64
_TLM = 0xFF55


@dataclass(frozen=True)
class Codestream:
    """What the main header of a J2K codestream says (ISO/IEC 15444-1 A.5.1, A.6.1)."""

    width: int
    height: int
    components: int
    subsampled: bool
    """Some component is sampled at less than full resolution (XRsiz or YRsiz > 1)."""
    colour_transform: bool
    """Multiple component transformation on (COD SGcod): the ICT with the 9/7 wavelet, the RCT
    with the 5/3."""
    reversible: bool
    """5/3 reversible wavelet (lossless-capable) rather than 9/7 irreversible."""

    def dicom(self, ycbcr: bool) -> tuple[str, str]:
        """(transfer syntax, photometric interpretation) of DICOM frames that are these
        codestreams, per PS3.5 8.2.4: YBR_RCT only in the lossless-only syntax, YBR_ICT only in
        the other, RGB or YBR_FULL when the codestream does no colour transform."""
        if self.colour_transform:
            if self.reversible:
                return JPEG2000_LOSSLESS, "YBR_RCT"
            return JPEG2000, "YBR_ICT"
        return JPEG2000, "YBR_FULL" if ycbcr else "RGB"


def parse(stream: bytes) -> Codestream:
    """The main header of a J2K codestream (CorruptSlide when it is not one)."""
    if len(stream) > MAX_STREAM_BYTES:
        raise InvalidArgument(f"JPEG 2000 stream of {len(stream)} bytes is too large")
    if not stream.startswith(SOC) or len(stream) < 42:
        raise CorruptSlide("not a JPEG 2000 codestream (no SOC/SIZ markers)")
    (lsiz,) = struct.unpack_from(">H", stream, 4)
    xsiz, ysiz, xo, yo = struct.unpack_from(">4I", stream, 8)
    (ncomp,) = struct.unpack_from(">H", stream, 40)
    if lsiz != 38 + 3 * ncomp or len(stream) < 4 + lsiz or not 1 <= ncomp <= 16384:
        raise CorruptSlide("JPEG 2000 SIZ marker is malformed")
    if xo >= xsiz or yo >= ysiz:  # a negative or empty image: nothing to size an array by
        raise CorruptSlide(f"JPEG 2000 SIZ marker puts the image origin ({xo}, {yo}) past its end")
    sampling = [stream[42 + 3 * i + 1 : 42 + 3 * i + 3] for i in range(ncomp)]
    subsampled = any(s != b"\x01\x01" for s in sampling)
    pos = 4 + lsiz
    while pos + 4 <= len(stream):
        marker, length = struct.unpack_from(">HH", stream, pos)
        if marker == _SOT or marker >> 8 != 0xFF:
            break
        if marker == _COD and pos + 4 + 10 <= len(stream):
            mct = stream[pos + 4 + 4]
            transform = stream[pos + 4 + 9]
            return Codestream(xsiz - xo, ysiz - yo, ncomp, subsampled, mct == 1, transform == 1)
        pos += 2 + length
    raise CorruptSlide("JPEG 2000 codestream has no COD marker in its main header")


def _header_segments(stream: bytes, pos: int, end: int, stop: int) -> list[tuple[int, int, int]]:
    """(marker, start, end) of the marker segments of a header from `pos` up to the marker
    `stop` (its start is the last `start`, with `end` == `start`); CorruptSlide when they do not
    follow one another within `end`."""
    out: list[tuple[int, int, int]] = []
    while pos + 2 <= end:
        (marker,) = struct.unpack_from(">H", stream, pos)
        if marker == stop:
            out.append((marker, pos, pos))
            return out
        if marker >> 8 != 0xFF or pos + 4 > end:
            break
        (length,) = struct.unpack_from(">H", stream, pos + 2)
        if length < 2 or pos + 2 + length > end:
            break
        out.append((marker, pos, pos + 2 + length))
        pos += 2 + length
    raise CorruptSlide("JPEG 2000 header is not one marker segment after another")


def without_comments(stream: bytes) -> bytes:
    """`stream` without its comment (COM) marker segments: encoders and scanners write free text
    there (an encoder's name, or a site's own notes: names, barcodes, dates), which a kept
    codestream would carry into the store, its DICOM frames and exports, under --deidentify too;
    JPEG tiles are stored without theirs (`jpegtran.transcode`). Comments of tile-part headers
    go as well, their tile-part's length (Psot) shortened to match, and then the optional
    tile-part length index (TLM), which would no longer agree. `stream` itself is returned when
    it has none; when its tile-parts cannot be followed only the main header's are removed."""
    info_end = 4 + struct.unpack_from(">H", stream, 4)[0] if stream.startswith(SOC) else 0
    try:
        main = _header_segments(stream, info_end, len(stream), _SOT) if info_end else []
    except CorruptSlide:
        return stream
    body_start = main[-1][1] if main else len(stream)
    try:
        parts, dropped = _tile_parts_without_comments(stream, body_start)
    except CorruptSlide:
        parts, dropped = stream[body_start:], 0
    if not dropped and not any(m == _COM for m, _, _ in main):
        return stream
    skip = {_COM, _TLM} if dropped else {_COM}
    kept = [stream[s:e] for m, s, e in main[:-1] if m not in skip]
    return b"".join((stream[:info_end], *kept, parts))


def _tile_parts_without_comments(stream: bytes, pos: int) -> tuple[bytes, int]:
    """The tile-parts from `pos` (an SOT) on, through EOC, without the comments of their
    headers, and how many bytes that removed."""
    out: list[bytes] = []
    dropped = 0
    while stream[pos : pos + 2] == b"\xff\x90":
        if pos + 12 > len(stream):
            raise CorruptSlide("JPEG 2000 tile-part header is truncated")
        (psot,) = struct.unpack_from(">I", stream, pos + 6)
        end = pos + psot if psot else len(stream) - 2
        if end > len(stream) or end < pos + 14:
            raise CorruptSlide("JPEG 2000 tile-part runs past the codestream")
        segments = _header_segments(stream, pos + 12, end, _SOD)
        kept = [stream[s:e] for m, s, e in segments[:-1] if m != _COM]
        removed = sum(e - s for m, s, e in segments[:-1] if m == _COM)
        sot = bytearray(stream[pos : pos + 12])
        if psot:
            struct.pack_into(">I", sot, 6, psot - removed)
        out += [bytes(sot), *kept, stream[segments[-1][1] : end]]
        dropped += removed
        pos = end
    return b"".join(out) + stream[pos:], dropped


def check_size(stream: bytes, height: int, width: int) -> Codestream:
    """The codestream's header, checked to declare exactly `width` x `height` pixels and three
    components: these bytes are copied unparsed otherwise (as `jpeg.check_size` for JPEG)."""
    info = parse(stream)
    if (info.width, info.height) != (width, height) or info.components != 3:
        raise CorruptSlide(
            f"JPEG 2000 tile is {info.width}x{info.height} with {info.components} components, "
            f"expected {width}x{height} RGB"
        )
    return info


def _fix(x: float) -> int:
    return int(x * 65536 + 0.5)


_X = np.arange(256, dtype=np.int32) - 128
_R_CR = (_fix(1.402) * _X + 32768) >> 16
_B_CB = (_fix(1.772) * _X + 32768) >> 16
_G_CB = -_fix(0.344136) * _X + 32768
_G_CR = -_fix(0.714136) * _X


def _ycbcr_into(y: np.ndarray, cb: np.ndarray, cr: np.ndarray, out: np.ndarray) -> None:
    """Full-range (JFIF) YCbCr planes (int, 0-255) -> RGB in `out`, in libjpeg's 16-bit fixed
    point (`jdcolor.c`): the tables OpenSlide uses for 33003 tiles too, so the pixels are the
    same to the bit."""
    out[..., 0] = np.clip(y + _R_CR[cr], 0, 255)
    out[..., 1] = np.clip(y + ((_G_CB[cb] + _G_CR[cr]) >> 16), 0, 255)
    out[..., 2] = np.clip(y + _B_CB[cb], 0, 255)


def ycbcr_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 full-range YCbCr -> RGB as OpenSlide converts Aperio 33003 tiles."""
    out = np.empty((*pixels.shape[:2], 3), np.uint8)
    _ycbcr_into(pixels[..., 0].astype(np.int32), pixels[..., 1], pixels[..., 2], out)
    return out


def decoded_shape(height: int, width: int, reduce: int = 0) -> tuple[int, int, int]:
    """(h, w, 3) of a `width` x `height` codestream decoded at 1/2**reduce resolution: each
    side rounded up, as the wavelet's low-pass band is."""
    step = 1 << reduce
    return -(-height // step), -(-width // step), 3


def decode_into(stream: bytes, out: np.ndarray, ycbcr: bool = False, reduce: int = 0) -> None:
    """Decode a codestream at 1/2**reduce resolution straight into `out`, an (h, w, 3) uint8
    array or view of exactly `decoded_shape` (e.g. a tile's place in a strip or a quadrant of
    the tile below), on the calling thread (`wsi.codecs.openjpeg`: the caller runs a pool).
    `ycbcr`: the components are Y, Cb, Cr (Aperio 33003) and are converted to RGB."""
    info = _decodable(stream)
    shape = decoded_shape(info.height, info.width, reduce)
    if out.shape != shape or out.dtype != np.uint8:
        raise InvalidArgument(f"cannot decode {shape} RGB into a {out.shape} {out.dtype} array")
    with openjpeg.decoded_planes(stream, 3, reduce) as planes:
        if planes[0].shape != shape[:2]:
            raise CorruptSlide(f"JPEG 2000 tile decodes to {planes[0].shape}, not {shape[:2]}")
        if ycbcr:
            _ycbcr_into(planes[0], planes[1], planes[2], out)
        else:
            for i, plane in enumerate(planes):
                out[..., i] = plane  # OpenJPEG clamped it to 0-255


def _decodable(stream: bytes) -> Codestream:
    info = parse(stream)
    if info.width * info.height > MAX_TILE_PIXELS:
        raise InvalidArgument(f"JPEG 2000 tile of {info.width}x{info.height} px is too large")
    return info


def _decode(stream: bytes, ycbcr: bool, reduce: int) -> np.ndarray:
    info = _decodable(stream)
    out = np.empty(decoded_shape(info.height, info.width, reduce), np.uint8)
    decode_into(stream, out, ycbcr, reduce)
    return out


def decode(stream: bytes, ycbcr: bool = False) -> np.ndarray:
    """A codestream -> (h, w, 3) uint8 RGB at full resolution (`decode_into`)."""
    return _decode(stream, ycbcr, 0)


def decode_half(stream: bytes, ycbcr: bool = False) -> np.ndarray:
    """A codestream at 1/2 resolution, (ceil(h/2), ceil(w/2), 3) uint8 RGB: the wavelet's
    low-pass band one level up, decoded without the finest level (about 45% of a full
    decode's time)."""
    return _decode(stream, ycbcr, 1)


def encode_flat(pixels: np.ndarray) -> bytes:
    """(h, w, 3) uint8 RGB -> a codestream coded as Aperio's RGB tiles are (9/7 wavelet, ICT),
    with no quality limit: a flat grey tile comes back exactly (checked for every grey), ~200
    bytes for 256 px. For the placeholder of tiles a shard does not hold."""
    return bytes(
        imagecodecs.jpeg2k_encode(
            np.ascontiguousarray(pixels),
            codecformat="J2K",
            reversible=False,
            mct=True,
            numthreads=1,
        )
    )


def to_jpeg(stream: bytes, quality: int, ycbcr: bool = False) -> bytes:
    """The tile as a baseline JPEG (4:2:0) for viewers that cannot show JPEG 2000."""
    return jpeg.encode(decode(stream, ycbcr), quality, True)
