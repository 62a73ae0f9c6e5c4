"""One stored object per level: chunks front to back, the Zarr shard index at the end.

With a DICOM header the same object is also a DICOM Part 10 file: each chunk is an item of the
encapsulated Pixel Data (padded to even length; the index length excludes the pad byte) and the
index is the value of the trailing (FFFC,FFFC) element. Offsets count from the object's start,
as the Zarr sharding codec defines them, and point at the JPEG bytes either way.

A chunk may be absent (a blank tile, `None`): its index entry is the sharding codec's "empty"
marker. Without a DICOM header the object streams straight to the store. With one, the header
describes the frames actually stored (TILED_FULL when every tile is, else TILED_SPARSE with a
position per frame), which is only known once the level is complete, and the header comes before
the frames: the object is written head last (`wsi.store.head_last.open_head_last`). On S3 the frames
still go up while the level is encoded, as parts 2..N of a multipart upload, and the header
goes in part 1 with the first frames at `close`; on a local store they go straight into the
object's file and the header is inserted in front of them at `close` (padded to whole blocks of
the file system in its File Meta Information, so that no frame moves).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import IO

import google_crc32c
import numpy as np

from wsi.errors import WsiError
from wsi.model import Level
from wsi.published.layout import EMPTY_CHUNK, StoredObject, empty_index, encode_index
from wsi.store.head_last import HeadLastObject, open_head_last
from wsi.store.objects import Store
from wsi.writers.dicom import item_header, trailer_header

HeaderFactory = Callable[[list[bytes], tuple[int, ...] | None, int], bytes]
"""Given the first stored chunk, the row-major numbers of the stored tiles (None when every tile
is stored) and the bytes the frames take, the DICOM bytes that go before the frames (header
through the offset table, padded as `wsi.writers.dicom.header_multiple` says)."""


def frame_chunks(
    chunks: Sequence[bytes | None], dicom: bool, offset: int = 0
) -> tuple[bytes, np.ndarray]:
    """The bytes that a run of consecutive chunks (None: absent) adds to a shard object, and
    their (len(chunks), 2) index entries, for a run that starts `offset` bytes after the first
    chunk's position. With `dicom`, each chunk is an item padded to even length. A run's bytes
    depend on its chunks alone, so parts of one object can be framed apart and joined."""
    parts, entries = frame_parts(chunks, dicom, offset)
    return b"".join(parts), entries


def frame_parts(
    chunks: Sequence[bytes | None], dicom: bool, offset: int = 0
) -> tuple[list[bytes], np.ndarray]:
    """`frame_chunks`, its bytes as the list of parts (item headers, chunks, pads) they join:
    a local object takes them with one gathered write, saving the joined copy (a row of a 40,000
    pixel wide level is ~3 MB of fresh pages). (The entries are gathered in lists and made an
    array once: a row assignment per chunk was most of the 1.5 us a chunk this took, 25,000
    chunks of a byte copy that holds the GIL.)"""
    starts = [EMPTY_CHUNK] * len(chunks)
    lengths = [EMPTY_CHUNK] * len(chunks)
    parts = []
    for i, data in enumerate(chunks):
        if data is None:
            continue
        size = len(data)
        pad = size & 1 if dicom else 0
        if dicom:
            parts.append(item_header(size + pad))
            offset += 8
        starts[i], lengths[i] = offset, size
        parts.append(data)
        offset += size
        if pad:
            parts.append(b"\0")
            offset += 1
    entries = empty_index(len(chunks))
    entries[:, 0], entries[:, 1] = starts, lengths
    return parts, entries


def shard_tail(index: np.ndarray, dicom: bool) -> bytes:
    """What ends a shard object: the encoded index, after its DICOM element header."""
    encoded = encode_index(index)
    return trailer_header(len(encoded)) + encoded if dicom else encoded


def stored_tiles(index: np.ndarray) -> tuple[int, ...] | None:
    """Row-major numbers of the tiles an index holds; None when it holds every tile (the
    header's TILED_FULL case)."""
    stored = np.flatnonzero(index[:, 1] != EMPTY_CHUNK)
    return None if len(stored) == len(index) else tuple(int(t) for t in stored)


class ShardStream:
    """Appends chunks to one object and ends it with the index; tracks size and crc32c."""

    def __init__(
        self,
        store: Store,
        key: str,
        level: Level,
        stack: contextlib.ExitStack,
        dicom_header: HeaderFactory | None = None,
        placeholder: Callable[[], bytes] | None = None,
    ) -> None:
        """`placeholder`: the chunk stored as tile 0 of a DICOM level whose every tile is
        absent (an instance needs a frame); it must decode to the fill."""
        self.key = key
        self.level = level
        self._crc = google_crc32c.Checksum()
        self._offset = 0
        """End of the chunk data so far, counted from the first chunk's item."""
        self._written = 0
        """Bytes written to the object."""
        self._index = empty_index(level.tile_count)
        self._next = 0
        self._first: bytes | None = None
        self._dicom_header = dicom_header
        self._placeholder = placeholder
        self._file: IO[bytes] | None = None
        self._body: HeadLastObject | None = None
        if dicom_header is None:
            self._file = stack.enter_context(store.open_write(key))
        else:
            self._body = stack.enter_context(open_head_last(store, key))

    @property
    def stored(self) -> int:
        """Chunks stored so far."""
        return int(np.count_nonzero(self._index[: self._next, 1] != EMPTY_CHUNK))

    def _write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._crc.update(data)
        self._written += len(data)

    def append(self, data: bytes | None) -> None:
        self.extend([data])

    def extend(self, chunks: Sequence[bytes | None]) -> None:
        """Append several chunks (None: an absent tile) with one write: tiles are ~10-100 KB,
        so fewer, larger writes."""
        if not chunks:
            return
        if self._next + len(chunks) > self.level.tile_count:
            raise WsiError(f"too many tiles for {self.key}")
        if self._first is None:
            self._first = next((data for data in chunks if data is not None), None)
        parts, entries = frame_parts(chunks, self._dicom_header is not None, self._offset)
        self._index[self._next : self._next + len(chunks)] = entries
        self._next += len(chunks)
        if self._body is not None:
            self._body.write_parts(parts)
        else:
            self._write(b"".join(parts))
        self._offset += sum(map(len, parts))

    def close(self) -> StoredObject:
        """End the object (it appears when the stack given at creation closes): its size and
        CRC32C."""
        if self._next != self.level.tile_count:
            raise WsiError(f"{self.key}: {self._next} of {self.level.tile_count} tiles")
        if self._body is not None:
            return self._close_dicom_object(self._body)
        self._write(shard_tail(self._index, False))
        return StoredObject(self.key, self._written, self._crc.hexdigest().decode())

    def _close_dicom_object(self, body: HeadLastObject) -> StoredObject:
        """The header (for the frames actually stored) before the frames written so far, the
        index after them."""
        assert self._dicom_header is not None
        if self._first is None:  # every tile absent: an instance still needs one frame
            if self._placeholder is None:
                raise WsiError(f"{self.key}: no tile stored and no placeholder frame")
            self._next = 0
            self.extend([self._placeholder(), *([None] * (self.level.tile_count - 1))])
        assert self._first is not None
        header = self._dicom_header([self._first], stored_tiles(self._index), self._offset)
        self._index[self._index[:, 1] != EMPTY_CHUNK, 0] += len(header)
        return body.finish(header, shard_tail(self._index, True))
