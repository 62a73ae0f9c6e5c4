"""One stored object per level: chunks streamed front to back, the Zarr shard index at the end.

With a DICOM header the same object is also a DICOM Part 10 file: each chunk is an item of the
encapsulated Pixel Data (padded to even length; the index length excludes the pad byte) and the
index is the value of the trailing (FFFC,FFFC) element. Offsets count from the object's start,
as the Zarr sharding codec defines them, and point at the JPEG bytes either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import IO

import google_crc32c

from wsi.errors import WsiError
from wsi.model import Level
from wsi.published.layout import StoredObject, empty_index, encode_index
from wsi.store.objects import Store
from wsi.writers.dicom import item_header, trailer_header

HeaderFactory = Callable[[list[bytes]], bytes]
"""Given the first chunks, the DICOM bytes that go before them (header through the offset
table); the header describes the frames (colour space, compression ratio) from them."""


class ShardStream:
    """Appends chunks to one object and ends it with the index; tracks size and crc32c."""

    def __init__(
        self,
        store: Store,
        key: str,
        level: Level,
        stack: contextlib.ExitStack,
        dicom_header: HeaderFactory | None = None,
    ) -> None:
        self.key = key
        self.level = level
        self._file: IO[bytes] = stack.enter_context(store.open_write(key))
        self._crc = google_crc32c.Checksum()
        self._offset = 0
        self._index = empty_index(level.tile_count)
        self._next = 0
        self._dicom_header = dicom_header

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._crc.update(data)
        self._offset += len(data)

    def append(self, data: bytes) -> None:
        self.extend([data])

    def extend(self, chunks: list[bytes]) -> None:
        """Append several chunks with one write (tiles are ~10-100 KB: fewer, larger writes)."""
        if not chunks:
            return
        if self._next + len(chunks) > self.level.tile_count:
            raise WsiError(f"too many tiles for {self.key}")
        if self._next == 0 and self._dicom_header is not None:
            # From the first tile only: the header (and so the object) must not depend on how
            # the caller batches its writes.
            self._write(self._dicom_header(chunks[:1]))
        dicom = self._dicom_header is not None
        parts = []
        offset = self._offset
        for data in chunks:
            pad = len(data) & 1 if dicom else 0
            if dicom:
                parts.append(item_header(len(data) + pad))
                offset += 8
            self._index[self._next] = (offset, len(data))
            self._next += 1
            parts.append(data)
            offset += len(data)
            if pad:
                parts.append(b"\0")
                offset += 1
        self._write(b"".join(parts))

    def close(self) -> StoredObject:
        if self._next != self.level.tile_count:
            raise WsiError(f"{self.key}: {self._next} of {self.level.tile_count} tiles")
        index = encode_index(self._index)
        if self._dicom_header is not None:
            self._write(trailer_header(len(index)))
        self._write(index)
        return StoredObject(self.key, self._offset, self._crc.hexdigest().decode())
