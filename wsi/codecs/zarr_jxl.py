"""The Zarr v3 codec that lets zarr-python read (and write) the chunks of archived arrays.

An archived level keeps the chunk layout of its JPEG form (`wsi.codecs.zarr_jpeg`): `transpose`
(order 1,2,0), then this array->bytes codec, `wsistore.jpegxl`, whose chunks are JPEG XL streams
made from the JPEG chunks by lossless recompression. Decoding rebuilds the exact JPEG and decodes
it with libjpeg-turbo, so zarr-python returns the same pixels as before the archive, bit for bit
(libjxl's own pixel decoder may round differently). Encoding makes a JPEG at the configured
quality and recompresses it. Installing wsistore registers the codec through the `zarr.codecs`
entry point; importing this module does it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from zarr.registry import register_codec

from wsi.codecs import jxl
from wsi.codecs.zarr_jpeg import JpegCodec

CODEC_NAME = jxl.ZARR_CODEC_NAME


@dataclass(frozen=True)
class JpegXlCodec(JpegCodec):
    """uint8 (h, w, 3) RGB <-> JPEG XL recompressed baseline JPEG: the JPEG codec with chunks
    stored in their recompressed form."""

    codec_name: ClassVar[str] = CODEC_NAME
    format_name: ClassVar[str] = "JPEG XL"

    @staticmethod
    def jpeg_of(chunk: bytes) -> bytes:
        return jxl.jxl_to_jpeg(chunk)

    @staticmethod
    def chunk_of(stream: bytes) -> bytes:
        return jxl.jpeg_to_jxl(stream)


register_codec(CODEC_NAME, JpegXlCodec)
