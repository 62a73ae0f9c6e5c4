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
from typing import Any, Self

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.registry import register_codec

from wsi.codecs import jpeg, jxl

CODEC_NAME = jxl.ZARR_CODEC_NAME


@dataclass(frozen=True)
class JpegXlCodec(ArrayBytesCodec):
    """uint8 (h, w, 3) RGB <-> JPEG XL recompressed baseline JPEG."""

    is_fixed_size = False
    quality: int = 85
    """Quality of the JPEG that chunks written through zarr are made from."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        config = data.get("configuration", {}) or {}
        return cls(quality=int(config.get("quality", 85)))

    def to_dict(self) -> dict[str, Any]:
        return {"name": CODEC_NAME, "configuration": {"quality": self.quality}}

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        shape = chunk_spec.shape
        expected = (int(shape[0]), int(shape[1])) if len(shape) == 3 else None
        stream = jxl.jxl_to_jpeg(chunk_bytes.as_numpy_array().tobytes())
        pixels = jpeg.decode(stream, expected=expected)
        if pixels.size != int(np.prod(chunk_spec.shape)):
            raise ValueError(f"JPEG XL chunk is {pixels.shape}, expected {chunk_spec.shape}")
        return chunk_spec.prototype.nd_buffer.from_numpy_array(pixels.reshape(chunk_spec.shape))

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        pixels = np.ascontiguousarray(chunk_array.as_numpy_array())
        data = jxl.jpeg_to_jxl(jpeg.encode(pixels, self.quality))
        return chunk_spec.prototype.buffer.from_bytes(data)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError("JPEG XL chunks have no fixed size")


register_codec(CODEC_NAME, JpegXlCodec)
