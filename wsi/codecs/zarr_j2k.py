"""The Zarr v3 codec that lets zarr-python read (and write) levels kept as JPEG 2000.

A level kept from a JPEG 2000 source (`--keep-jpeg2000`) has the chunk layout of a JPEG level
(`wsi.codecs.zarr_jpeg`): `transpose` (order 1,2,0), then this array->bytes codec,
`wsistore.jpeg2000`, whose chunks are bare J2K codestreams of R, G, B components, exactly the
bytes of the DICOM frames (JPEG 2000 transfer syntax). Decoding is OpenJPEG's
(`wsi.codecs.jpeg2000.decode`), the pixels OpenSlide gives for the source's tiles. Encoding
writes a codestream as Aperio's RGB tiles are coded, with no quality limit. Installing wsistore
registers the codec through the `zarr.codecs` entry point; importing this module does it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.registry import register_codec

from wsi.codecs import jpeg2000

CODEC_NAME = jpeg2000.ZARR_CODEC_NAME


@dataclass(frozen=True)
class Jpeg2000Codec(ArrayBytesCodec):
    """uint8 (h, w, 3) RGB <-> bare JPEG 2000 codestream."""

    is_fixed_size = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return {"name": CODEC_NAME, "configuration": {}}

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        shape = chunk_spec.shape
        stream = chunk_bytes.as_numpy_array().tobytes()
        if len(shape) == 3:
            jpeg2000.check_size(stream, int(shape[0]), int(shape[1]))
        pixels = jpeg2000.decode(stream)
        if pixels.size != int(np.prod(shape)):
            raise ValueError(f"JPEG 2000 chunk is {pixels.shape}, expected {shape}")
        return chunk_spec.prototype.nd_buffer.from_numpy_array(pixels.reshape(shape))

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        pixels = np.ascontiguousarray(chunk_array.as_numpy_array())
        return chunk_spec.prototype.buffer.from_bytes(jpeg2000.encode_flat(pixels))

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError("JPEG 2000 chunks have no fixed size")


register_codec(CODEC_NAME, Jpeg2000Codec)
