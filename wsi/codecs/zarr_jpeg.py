"""The Zarr v3 codec that lets zarr-python read (and write) our JPEG chunks.

A level array's chunk (3, tile_h, tile_w) goes through the standard `transpose` codec (order 1,2,0)
to (tile_h, tile_w, 3) and then through this array->bytes codec, named `wsistore.jpeg`, which stores
one complete baseline JPEG per chunk: exactly the bytes a browser or a DICOM reader takes. The name
is namespaced because no JPEG codec is registered with Zarr yet. Installing wsistore registers it
with zarr-python through the `zarr.codecs` entry point; importing this module does it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.registry import register_codec

from wsi.codecs import jpeg
from wsi.model import JPEG_CODEC_NAME

CODEC_NAME = JPEG_CODEC_NAME


@dataclass(frozen=True)
class JpegCodec(ArrayBytesCodec):
    """uint8 (h, w, 3) RGB <-> baseline JPEG stream."""

    is_fixed_size = False
    quality: int = 85
    """Quality of the JPEG that chunks written through zarr are made from."""

    codec_name: ClassVar[str] = CODEC_NAME
    format_name: ClassVar[str] = "JPEG"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        config = data.get("configuration", {}) or {}
        return cls(quality=int(config.get("quality", 85)))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.codec_name, "configuration": {"quality": self.quality}}

    @staticmethod
    def jpeg_of(chunk: bytes) -> bytes:
        """The JPEG stream a stored chunk holds (a subclass stores it in another form)."""
        return chunk

    @staticmethod
    def chunk_of(stream: bytes) -> bytes:
        """The stored chunk of a JPEG stream."""
        return stream

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        shape = chunk_spec.shape
        expected = (int(shape[0]), int(shape[1])) if len(shape) == 3 else None
        stream = self.jpeg_of(chunk_bytes.as_numpy_array().tobytes())
        pixels = jpeg.decode(stream, expected=expected)
        if pixels.size != int(np.prod(chunk_spec.shape)):
            raise ValueError(
                f"{self.format_name} chunk is {pixels.shape}, expected {chunk_spec.shape}"
            )
        return chunk_spec.prototype.nd_buffer.from_numpy_array(pixels.reshape(chunk_spec.shape))

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        pixels = np.ascontiguousarray(chunk_array.as_numpy_array())
        data = self.chunk_of(jpeg.encode(pixels, self.quality))
        return chunk_spec.prototype.buffer.from_bytes(data)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError(f"{self.format_name} chunks have no fixed size")


register_codec(CODEC_NAME, JpegCodec)
