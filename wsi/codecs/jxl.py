"""JPEG XL lossless recompression of JPEG streams, and the exact rebuild of the JPEG.

libjxl can store a JPEG's DCT coefficients with better entropy coding plus a small record of
everything else in the file (markers, Huffman tables, padding): the JPEG XL stream decodes to the
same pixels, and the original JPEG comes back byte for byte (ISO/IEC 18181-1, "JPEG
reconstruction"). On 256-px Q80-Q90 tiles it saves about 20-30%; rebuilding takes about 1 ms
per tile, encoding about 3-4 ms (libjxl's default effort 7; one core each).

The binding is imagecodecs' (`jpegxl_encode_jpeg` / `jpegxl_decode_jpeg`, libjxl 0.11),
already a dependency for other codecs: it releases the GIL, so a thread pool scales, and it
exposes the reconstruction API. pylibjxl and pyjpegxl (PyPI) do the same with the same ratio and
speed at effort 7, but are young single-author packages and would be one more dependency.
"""

from __future__ import annotations

import imagecodecs

from wsi.codecs.jpeg import SOI
from wsi.errors import CorruptSlide, InvalidArgument

ZARR_CODEC_NAME = "wsistore.jpegxl"
"""Zarr v3 name of the chunk codec of archived arrays (`wsi.codecs.zarr_jxl`): each chunk is a
JPEG XL recompressed JPEG; its configuration is the JPEG codec's (`wsistore.jpeg`)."""
MAX_INPUT_BYTES = 64 * 1024 * 1024
"""Largest stream accepted either way: a tile is ~5-100 KB and the largest associated image
(a macro) a few MB; anything far beyond that is not a tile of ours."""
JXL_SIGNATURES = (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")
"""A bare JPEG XL codestream, or the ISO BMFF container that carries the reconstruction data."""


def _check_size(data: bytes, what: str) -> None:
    if len(data) > MAX_INPUT_BYTES:
        raise InvalidArgument(f"{what} of {len(data)} bytes exceeds {MAX_INPUT_BYTES} bytes")


def is_jxl(data: bytes) -> bool:
    """Whether `data` starts like a JPEG XL stream (codestream or container)."""
    return data.startswith(JXL_SIGNATURES)


def jpeg_to_jxl(jpeg: bytes, threads: int = 1) -> bytes:
    """A JPEG stream -> JPEG XL keeping its DCT coefficients and the data to rebuild it exactly.
    `threads`: libjxl's own threads for this one stream (1: the caller runs a pool)."""
    _check_size(jpeg, "JPEG stream")
    if not jpeg.startswith(SOI):
        raise CorruptSlide("not a JPEG stream (no SOI marker)")
    try:
        return bytes(imagecodecs.jpegxl_encode_jpeg(jpeg, numthreads=threads))
    except imagecodecs.JpegxlError as exc:
        raise CorruptSlide(f"libjxl cannot recompress this JPEG: {exc}") from exc


def jxl_to_jpeg(jxl: bytes, threads: int = 1) -> bytes:
    """The exact JPEG stream a `jpeg_to_jxl` result was made from (CorruptSlide when `jxl` is
    not one, or carries no reconstruction data)."""
    _check_size(jxl, "JPEG XL stream")
    if not is_jxl(jxl):
        raise CorruptSlide("not a JPEG XL stream")
    try:
        jpeg = bytes(imagecodecs.jpegxl_decode_jpeg(jxl, numthreads=threads))
    except imagecodecs.JpegxlError as exc:
        raise CorruptSlide(f"cannot rebuild the JPEG from a JPEG XL stream: {exc}") from exc
    if not jpeg.startswith(SOI):
        raise CorruptSlide("the JPEG XL stream did not rebuild a JPEG")
    return jpeg


def recompress_exactly(jpeg: bytes) -> bytes:
    """`jpeg_to_jxl`, checked: the JPEG rebuilt from the result must be `jpeg` byte for byte,
    or the archive could not give back what it took (CorruptSlide)."""
    jxl = jpeg_to_jxl(jpeg)
    if jxl_to_jpeg(jxl) != jpeg:
        raise CorruptSlide("libjxl did not rebuild this JPEG byte for byte")
    return jxl
