"""How the chunks (tiles) of a published array are encoded: the codec ids, the Zarr codec chain
each one is stored with, and the encoding and decoding of single chunks, the fill grey's
background chunk included."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import numpy as np

from wsi.codecs import jpeg, jpeg2000, jxl
from wsi.errors import CorruptSlide, InvalidArgument
from wsi.model import JPEG_CODEC_NAME

CodecId: TypeAlias = Literal["jpeg", "zstd", "jpegxl", "jpeg2000"]
JPEG: CodecId = "jpeg"
"""Each chunk is a complete baseline JPEG stream (the `wsistore.jpeg` Zarr codec)."""
ZSTD: CodecId = "zstd"
"""Each chunk is the zstd of the interleaved RGB bytes (`bytes` + `zstd` Zarr codecs)."""
JPEGXL: CodecId = "jpegxl"
"""Each chunk is a JPEG chunk recompressed losslessly with JPEG XL (the `wsistore.jpegxl` Zarr
codec): the archive tier (`wsi.published.archive`). The JPEG is rebuilt byte for byte to serve
or decode it, so everything that reads JPEG chunks reads these too."""
JPEG2000: CodecId = "jpeg2000"
"""Each chunk is a bare JPEG 2000 codestream of R, G, B components, a source's tile kept as it
is (`--keep-jpeg2000`; the `wsistore.jpeg2000` Zarr codec, DICOM's JPEG 2000 transfer
syntaxes). Handed out to viewers as a JPEG transcoded at `JPEG2000_SERVED_QUALITY`."""
CODEC_IDS: tuple[CodecId, ...] = (JPEG, ZSTD, JPEGXL, JPEG2000)
JPEG2000_SERVED_QUALITY = 90
"""JPEG quality of the tiles transcoded from JPEG 2000 chunks for viewers."""
FILL_VALUE = 255
"""The fill grey of slides published without a chosen one: white. A slide's own fill
(`SlideAttributes.fill`, each level array's `fill_value`) is the grey of its blank glass, what
readers give for pixels outside the stored tiles and for chunks a shard does not hold."""


@dataclass(frozen=True)
class ChunkFormat:
    """How the chunks (tiles) of one output level are encoded."""

    codec: CodecId
    quality: int = 85
    """JPEG quality (1-100) of tiles we encode; passed-through tiles keep the source's."""
    zstd_level: int = 3

    def __post_init__(self) -> None:
        if self.codec not in CODEC_IDS:
            raise InvalidArgument(f"unknown chunk codec {self.codec!r}")
        if not 1 <= self.quality <= 100:
            raise InvalidArgument(f"JPEG quality must be 1-100, got {self.quality}")


def chunk_codecs(fmt: ChunkFormat) -> list[dict[str, Any]]:
    """Inner codecs of a level's chunks: channels last, then JPEG or raw bytes + zstd."""
    transpose = {"name": "transpose", "configuration": {"order": [1, 2, 0]}}
    if fmt.codec == JPEG2000:
        return [transpose, {"name": jpeg2000.ZARR_CODEC_NAME, "configuration": {}}]
    if fmt.codec in (JPEG, JPEGXL):
        name = JPEG_CODEC_NAME if fmt.codec == JPEG else jxl.ZARR_CODEC_NAME
        return [transpose, {"name": name, "configuration": {"quality": fmt.quality}}]
    return [
        transpose,
        {"name": "bytes"},
        {"name": "zstd", "configuration": {"level": fmt.zstd_level, "checksum": False}},
    ]


def codec_of_array(metadata: Mapping[str, Any], what: str) -> CodecId:
    """The chunk codec id of an array, from its zarr.json (the inverse of `chunk_codecs`)."""
    try:
        [sharding] = metadata["codecs"]
        names = [c["name"] for c in sharding["configuration"]["codecs"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptSlide(f"{what}: not a sharded array of ours") from exc
    if JPEG_CODEC_NAME in names:
        return JPEG
    if jxl.ZARR_CODEC_NAME in names:
        return JPEGXL
    if jpeg2000.ZARR_CODEC_NAME in names:
        return JPEG2000
    if "zstd" in names:
        return ZSTD
    raise CorruptSlide(f"{what}: unknown chunk codecs {names}")


def encode_chunk_zstd(pixels: np.ndarray, level: int = 3) -> bytes:
    """(h, w, 3) uint8 -> zstd of the interleaved bytes (what `transpose` + `bytes` produce)."""
    return bytes(_zstd(level).encode(np.ascontiguousarray(pixels)))


def _zstd(level: int = 0) -> Any:
    """numcodecs' Zstd codec (the level matters only to encode). numcodecs is imported here,
    not with this module: importing it scans the codec entry points (~50 ms of CPU), which
    every `wsi` command would pay and only lossless chunks need."""
    from numcodecs import Zstd

    return Zstd(level=level)


def decode_chunk(codec: CodecId, data: bytes, height: int, width: int) -> np.ndarray:
    """A stored chunk -> (height, width, 3) uint8 RGB: the whole chunk, edge padding included.
    A JPEG declaring another size is refused before anything is allocated (`jpeg.check_size`)."""
    if codec in (JPEG, JPEGXL):
        stream = jxl.jxl_to_jpeg(data) if codec == JPEGXL else data
        pixels = jpeg.decode(stream, expected=(height, width))
    elif codec == JPEG2000:
        jpeg2000.check_size(data, height, width)
        pixels = jpeg2000.decode(data)
    else:
        raw = _zstd().decode(data)
        if len(raw) != height * width * 3:
            raise CorruptSlide(f"zstd chunk holds {len(raw)} bytes, not {height}x{width}x3")
        pixels = np.frombuffer(raw, np.uint8).reshape(height, width, 3)
    if pixels.shape != (height, width, 3):
        raise CorruptSlide(f"chunk decodes to {pixels.shape}, expected ({height}, {width}, 3)")
    return pixels


@functools.lru_cache(maxsize=64)
def background_chunk(codec: CodecId, width: int, height: int, fill: int) -> bytes:
    """The stored form of a chunk the shard does not hold: a `width` x `height` tile of the
    grey (fill, fill, fill). JPEG at quality 100 (4:2:0) decodes to exactly that grey in
    libjpeg-turbo, Pillow and imagecodecs (checked for every grey), ~1.7 KB for 256 px."""
    pixels = np.full((height, width, 3), fill, np.uint8)
    if codec == JPEG:
        return jpeg.encode(pixels, 100, subsample_420=True)
    if codec == JPEG2000:
        return jpeg2000.encode_flat(pixels)
    return encode_chunk_zstd(pixels)


def served_codec(codec: CodecId) -> CodecId:
    """How chunks stored as `codec` are handed to readers that ask for encoded tiles: an
    archived chunk as the JPEG it was made from, a JPEG 2000 one transcoded to JPEG."""
    return JPEG if codec in (JPEGXL, JPEG2000) else codec
