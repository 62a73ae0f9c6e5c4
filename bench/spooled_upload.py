"""The way DICOM level objects went to S3 before they were streamed in parts, for
`bench/s3.py`'s comparison: the body spooled (in memory up to 8 MiB, then in a temporary file)
and written header first through `Store.open_write` when the level ends. Not used by wsistore."""

from __future__ import annotations

import contextlib
import tempfile

import google_crc32c

from wsi.errors import StoreError
from wsi.published.layout import StoredObject
from wsi.store import head_last
from wsi.store.objects import Store

SPOOL_MEMORY = 8 * 1024 * 1024
COPY_BLOCK = 8 * 1024 * 1024


class Spooled(head_last.HeadLastObject):
    def __init__(self, store: Store, key: str) -> None:
        super().__init__(store, key)
        self._spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self._spool)

    def write(self, data: bytes) -> None:
        self._spool.write(data)

    def finish(self, head: bytes, tail: bytes) -> StoredObject:
        out = self._stack.enter_context(self.store.open_write(self.key))
        crc = google_crc32c.Checksum()
        size = 0
        self._spool.seek(0)
        for block in (head, *iter(lambda: self._spool.read(COPY_BLOCK), b""), tail):
            out.write(block)
            crc.update(block)
            size += len(block)
        self._spool.close()
        return StoredObject(self.key, size, crc.hexdigest().decode())

    def complete(self) -> None:
        self._stack.close()

    def abort(self) -> None:
        error = StoreError(f"the write of {self.key} was abandoned")
        with contextlib.suppress(BaseException):
            self._stack.__exit__(type(error), error, None)


def install() -> None:
    """Every head-last object this process writes to S3 spooled."""
    head_last._PartedUpload = Spooled  # type: ignore[misc,assignment]
