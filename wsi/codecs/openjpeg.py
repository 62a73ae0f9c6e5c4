"""A thin ctypes binding to OpenJPEG's decoder, for Aperio's JPEG 2000 tiles.

Bound to the very libopenjp2 that imagecodecs ships (found beside it): the build whose full
decodes are OpenSlide's pixels to the bit on the TCGA sample. Another build of the same 2.5.4
(Pillow's) differed on one tile in 36 there, and Debian's 2.5.0 on one too (the 9/7 wavelet is
floating point and compilers may contract it differently), so which library decodes matters.

What the binding gives that imagecodecs' `jpeg2k_decode` and Pillow do not:
* reduced resolution (`opj_set_decoded_resolution_factor`): the finest wavelet levels are not
  decoded at all. That is how the level below a kept JPEG 2000 base is made: 1.40 ms of CPU a
  256-px tile of the generated slide, against 1.64 through Pillow's `reduce` (its decoder adds
  a codestream parse in Python, a tile-by-tile copy into its own image and one more copy out)
  and 3.3 for a full decode;
* the components (OpenJPEG always hands out one int32 plane each) narrowed straight into the
  caller's array (a tile's place in a strip, a quadrant of the tile below): no planar image and
  no interleaved copy in between. A full decode costs the same instructions as imagecodecs'
  (25.0 M a tile, callgrind), all but ~60 us of them OpenJPEG's;
* the codec decodes on the calling thread (`opj_codec_set_threads(0)`, whatever
  `OPJ_NUM_THREADS` says): OpenJPEG's own threads cost more CPU than they give on a tile this
  small (4.7 vs 3.6 ms with 2 threads vs 1), so the caller runs one tile per core instead;
* the GIL released once a tile, around `opj_decode`. The quick calls around it (set-up, header,
  clean-up: microseconds) keep it, as taking it back a dozen times a tile cost more than they
  do under contention. The codestream reaches OpenJPEG through a memory stream whose read
  callback runs in Python; the stream's buffer holds the whole codestream, so it is called
  once, while the header is read with the GIL held.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import imagecodecs
import numpy as np

from wsi.errors import CorruptSlide, UnsupportedSlide, WsiError

_CODEC_J2K = 0
_STREAM_BUFFER = 1 << 20
_SIZE_T_ERROR = ctypes.c_size_t(-1).value
_PARAMETERS_BYTES = 16384
"""Room for `opj_dparameters_t` (~8.3 KB in 2.5): filled by OpenJPEG, never read here."""


class _Component(ctypes.Structure):
    """`opj_image_comp_t` (whole: the components are an array of them)."""

    _fields_ = [
        *((name, ctypes.c_uint32) for name in ("dx", "dy", "w", "h", "x0", "y0", "prec")),
        *((name, ctypes.c_uint32) for name in ("bpp", "sgnd", "resno_decoded", "factor")),
        ("data", ctypes.POINTER(ctypes.c_int32)),
        ("alpha", ctypes.c_uint16),
    ]


class _Image(ctypes.Structure):
    """`opj_image_t`."""

    _fields_ = [
        *((name, ctypes.c_uint32) for name in ("x0", "y0", "x1", "y1", "numcomps")),
        ("color_space", ctypes.c_int),
        ("comps", ctypes.POINTER(_Component)),
        ("icc_profile_buf", ctypes.c_void_p),
        ("icc_profile_len", ctypes.c_uint32),
    ]


_ImagePointer = ctypes.POINTER(_Image)
_READ = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_SKIP = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
_SEEK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.c_void_p)
_MESSAGE = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_void_p)


def _library_path() -> str | None:
    """imagecodecs' own libopenjp2: bundled in its wheel (Linux `imagecodecs.libs`, macOS
    `.dylibs`), else the system's, which a source build of imagecodecs links."""
    package = Path(imagecodecs.__file__).parent
    for folder in (package.parent / "imagecodecs.libs", package / ".dylibs"):
        found = sorted(folder.glob("libopenjp2*"))
        if found:
            return str(found[0])
    return ctypes.util.find_library("openjp2")


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, u32 = ctypes.c_void_p, ctypes.c_uint32
    lib.opj_version.restype = ctypes.c_char_p
    lib.opj_create_decompress.restype = p
    lib.opj_create_decompress.argtypes = [ctypes.c_int]
    lib.opj_set_default_decoder_parameters.argtypes = [p]
    lib.opj_setup_decoder.argtypes = [p, p]
    lib.opj_codec_set_threads.argtypes = [p, ctypes.c_int]
    lib.opj_set_error_handler.argtypes = [p, _MESSAGE, p]
    lib.opj_stream_create.restype = p
    lib.opj_stream_create.argtypes = [ctypes.c_size_t, ctypes.c_int]
    lib.opj_stream_set_read_function.argtypes = [p, _READ]
    lib.opj_stream_set_skip_function.argtypes = [p, _SKIP]
    lib.opj_stream_set_seek_function.argtypes = [p, _SEEK]
    lib.opj_stream_set_user_data_length.argtypes = [p, ctypes.c_uint64]
    lib.opj_read_header.argtypes = [p, p, ctypes.POINTER(_ImagePointer)]
    lib.opj_set_decoded_resolution_factor.argtypes = [p, u32]
    lib.opj_decode.argtypes = [p, p, _ImagePointer]
    lib.opj_end_decompress.argtypes = [p, p]
    lib.opj_image_destroy.argtypes = [_ImagePointer]
    lib.opj_stream_destroy.argtypes = [p]
    lib.opj_destroy_codec.argtypes = [p]
    return lib


_PATH = _library_path()
if _PATH is None:
    raise WsiError("libopenjp2 not found: install imagecodecs with its JPEG 2000 codec")
_lib = _declare(ctypes.PyDLL(_PATH))
"""For the quick calls (set-up, header, clean-up: microseconds), which keep the GIL: releasing
and taking it back around each of them cost more than the call under contention."""
_decoder = _declare(ctypes.CDLL(_PATH))
"""For `opj_decode`, the milliseconds of work, which run with the GIL released."""
VERSION: str = _lib.opj_version().decode()
"""OpenJPEG's version, e.g. "2.5.4"."""
_PARAMETERS = ctypes.create_string_buffer(_PARAMETERS_BYTES)
_lib.opj_set_default_decoder_parameters(_PARAMETERS)


class _Call(threading.local):
    """The codestream being decoded on this thread and what OpenJPEG said about it: the
    callbacks run on the decoding thread (the codec has no threads of its own)."""

    def __init__(self) -> None:
        self.data = b""
        self.pos = 0
        self.errors: list[str] = []


_call = _Call()


@_READ
def _read(buffer: int, size: int, _user: int) -> int:
    left = len(_call.data) - _call.pos
    if left <= 0:
        return _SIZE_T_ERROR  # end of stream, as OpenJPEG expects it
    size = min(size, left)
    ctypes.memmove(buffer, _call.data[_call.pos : _call.pos + size], size)
    _call.pos += size
    return size


@_SKIP
def _skip(count: int, _user: int) -> int:
    position = min(max(_call.pos + count, 0), len(_call.data))
    moved, _call.pos = position - _call.pos, position
    return moved if moved or not count else -1  # -1: nothing left to skip


@_SEEK
def _seek(position: int, _user: int) -> int:
    if not 0 <= position <= len(_call.data):
        return 0
    _call.pos = position
    return 1


@_MESSAGE
def _error(message: bytes | None, _user: int) -> None:
    _call.errors.append((message or b"").decode(errors="replace").strip())


def _fail(what: str) -> CorruptSlide:
    said = "; ".join(m for m in _call.errors if m) or "no reason given"
    return CorruptSlide(f"cannot decode JPEG 2000 tile ({what}): {said}")


@contextmanager
def _decoded(stream: bytes, reduce: int) -> Iterator[_Image]:
    """The decoded image of `stream` at 1/2**reduce resolution, valid inside the block."""
    _call.data, _call.pos, _call.errors = stream, 0, []
    codec = _lib.opj_create_decompress(_CODEC_J2K)
    handle = _lib.opj_stream_create(min(max(len(stream), 4096), _STREAM_BUFFER), 1)
    image = _ImagePointer()
    try:
        if not codec or not handle:
            raise MemoryError("OpenJPEG could not allocate a decoder")
        _lib.opj_set_error_handler(codec, _error, None)
        if not _lib.opj_setup_decoder(codec, _PARAMETERS):  # only read
            raise _fail("setup")
        _lib.opj_codec_set_threads(codec, 0)  # decode on this thread (module docstring)
        _lib.opj_stream_set_read_function(handle, _read)
        _lib.opj_stream_set_skip_function(handle, _skip)
        _lib.opj_stream_set_seek_function(handle, _seek)
        _lib.opj_stream_set_user_data_length(handle, len(stream))
        if not _lib.opj_read_header(handle, codec, ctypes.byref(image)):
            raise _fail("header")
        if reduce and not _lib.opj_set_decoded_resolution_factor(codec, reduce):
            raise _fail(f"1/{2**reduce} resolution")
        if not _decoder.opj_decode(codec, handle, image):
            raise _fail("data")
        if not _lib.opj_end_decompress(codec, handle):
            raise _fail("end")
        yield image.contents
    finally:
        if image:
            _lib.opj_image_destroy(image)
        if handle:
            _lib.opj_stream_destroy(handle)
        if codec:
            _lib.opj_destroy_codec(codec)
        _call.data = b""


def _planes(image: _Image, count: int) -> list[np.ndarray]:
    """The first `count` components of a decoded image as (h, w) int32 views (valid while the
    image is), checked to be 8-bit unsigned at one size (UnsupportedSlide otherwise)."""
    if image.numcomps < count:
        raise CorruptSlide(f"JPEG 2000 tile has {image.numcomps} components, expected {count}")
    out = []
    for i in range(count):
        comp = image.comps[i]
        if comp.prec != 8 or comp.sgnd:
            raise UnsupportedSlide(f"JPEG 2000 tile of {comp.prec}-bit samples, not 8-bit")
        if (comp.w, comp.h) != (image.comps[0].w, image.comps[0].h):
            raise UnsupportedSlide("JPEG 2000 tile with subsampled components")
        if not comp.data:
            raise CorruptSlide("JPEG 2000 tile decoded to nothing")
        address = ctypes.cast(comp.data, ctypes.c_void_p).value or 0
        plane = np.frombuffer(memoryview(_int32s(comp.w * comp.h).from_address(address)), np.int32)
        out.append(plane.reshape(comp.h, comp.w))
    return out


@functools.lru_cache(maxsize=64)
def _int32s(count: int) -> type[ctypes.Array[ctypes.c_int32]]:
    """The ctypes array type of `count` int32 (made once: 1.2 us a plane against 5.6 us for
    `np.ctypeslib.as_array`)."""
    return ctypes.c_int32 * count


@contextmanager
def decoded_planes(stream: bytes, count: int, reduce: int = 0) -> Iterator[list[np.ndarray]]:
    """The first `count` components of `stream` decoded at 1/2**reduce resolution (each side
    rounded up), as int32 planes in [0, 255] (OpenJPEG clamps to the precision), valid only
    inside the block: narrow them into the caller's array there."""
    with _decoded(stream, reduce) as image:
        yield _planes(image, count)
