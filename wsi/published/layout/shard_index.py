"""The index that ends every shard: where each chunk's bytes are (offset, length), which chunks
the shard holds, and the CRC32C that guards the index (the Zarr sharding codec's format)."""

from __future__ import annotations

import struct

import google_crc32c
import numpy as np

from wsi.errors import CorruptSlide

EMPTY_CHUNK = 2**64 - 1
"""Offset and length of a chunk the shard does not hold (the Zarr sharding codec's marker)."""
_INDEX_DTYPE = np.dtype("<u8")


def index_nbytes(chunks: int) -> int:
    """Bytes of the index of a shard of `chunks` chunks: (offset, length) uint64 + CRC32C."""
    return 16 * chunks + 4


def index_range(object_size: int, chunks: int, key: str) -> tuple[int, int]:
    """[start, end) of the index in the shard object: it ends the object."""
    start = object_size - index_nbytes(chunks)
    if start < 0:
        raise CorruptSlide(f"{key} is too short ({object_size} bytes) for a {chunks}-chunk index")
    return start, object_size


def empty_index(chunks: int) -> np.ndarray:
    """(chunks, 2) offsets and lengths, every chunk absent."""
    return np.full((chunks, 2), EMPTY_CHUNK, dtype=_INDEX_DTYPE)


def encode_index(index: np.ndarray) -> bytes:
    """The stored index: little-endian uint64 (offset, length) pairs, then their CRC32C."""
    raw = np.ascontiguousarray(index, dtype=_INDEX_DTYPE).tobytes()
    return raw + struct.pack("<I", google_crc32c.value(raw))


def decode_index(raw: bytes, chunks: int, key: str) -> np.ndarray:
    """The stored index -> read-only (chunks, 2) array; CorruptSlide when the CRC disagrees."""
    if len(raw) != index_nbytes(chunks):
        raise CorruptSlide(f"shard index of {key}: {len(raw)} bytes, expected {chunks} entries")
    (crc,) = struct.unpack("<I", raw[-4:])
    if google_crc32c.value(raw[:-4]) != crc:
        raise CorruptSlide(f"shard index of {key} is corrupt (CRC32C mismatch)")
    return np.frombuffer(raw[:-4], _INDEX_DTYPE).reshape(chunks, 2)


def stored_chunks(index: np.ndarray) -> np.ndarray:
    """Row-major numbers of the chunks a shard holds (int64, ascending): the frames of its
    DICOM instance, in order (a TILED_SPARSE instance has no frame for an absent chunk)."""
    absent = (index[:, 0] == EMPTY_CHUNK) & (index[:, 1] == EMPTY_CHUNK)
    return np.flatnonzero(~absent)


def chunk_span(index: np.ndarray, chunk: int, data_end: int, key: str) -> tuple[int, int] | None:
    """[start, end) of chunk `chunk` (row-major), or None when the shard does not hold it."""
    offset, nbytes = index[chunk].tolist()
    if offset == EMPTY_CHUNK and nbytes == EMPTY_CHUNK:
        return None
    if offset + nbytes > data_end:
        raise CorruptSlide(f"shard index of {key} points past the chunk data")
    return offset, offset + nbytes
