"""Objects written in numbered parts: by many processes then completed by one (`ObjectParts`),
or streamed by one writer whose first bytes are known last (`open_head_last`).

On S3 an object is a multipart upload: any process uploads a part under its number (uploading a
number again replaces that part, so a task that runs twice does no harm), and the coordinator
completes the upload with the parts it lists in ascending order (numbers may have gaps; a part
left out is discarded). S3 requires every part but the last to hold at least 5 MiB
(`MIN_PART_BYTES`; SeaweedFS refuses the completion too). On a local store a part is a
temporary file beside the object (written whole or not at all, under the store's temporary
mark, so listings never show it and the next conversion's clean-up removes what a killed run
left); completing joins them into the object, which appears whole by a rename.

The object's CRC32C is combined from its parts' (`crc32c_combine`), so the coordinator never
reads back what the workers wrote.

Head last (`open_head_last`): a DICOM level object starts with a header that describes the
frames actually stored, known only when the level is complete, yet its frames should reach S3
while the level is encoded, not after. So part 1 is the head plus the first bytes of the body
(held in memory: at least `MIN_PART_BYTES`, so that part 1 is a valid part), parts 2..N are
uploaded as the body grows, by a few threads while the writer goes on, and at the end the last
part (the rest and the tail) and part 1 go up, and the upload is completed when the block ends.
Numbered parts need botocore's API (obstore numbers parts itself, in the order they are sent), so
they go through the store's s3fs client, which also works in a process forked after obstore ran.
On a local store the body goes straight into the object's file and the head is inserted in front
of it at the end (`_LocalHeadLast`).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import functools
import os
import re
import shutil
import sys
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

import google_crc32c

from wsi.errors import StoreError, WsiError
from wsi.published.layout import StoredObject
from wsi.store.objects import (
    FILE_MODE,
    TEMP_MARK,
    Store,
    fsync_dir,
    make_dirs,
    store_failures,
)

if TYPE_CHECKING:
    import ssl

__all__ = [
    "MAX_PART_NUMBER",
    "MIN_PART_BYTES",
    "HeadLastObject",
    "ObjectParts",
    "PartRef",
    "crc32c_combine",
    "open_head_last",
]

MIN_PART_BYTES = 5 * 1024 * 1024
"""The smallest part S3 accepts, but for an upload's last part."""
MAX_PART_NUMBER = 10_000
_CRC32C_POLY = 0x82F63B78
_COPY_BLOCK = 8 * 1024 * 1024


@dataclass(frozen=True)
class PartRef:
    """A part written: where it goes in its object, its size (bytes) and its CRC32C."""

    number: int
    size: int
    crc: int
    etag: str = ""


@dataclass(frozen=True)
class ObjectParts:
    """One object of the store being written in parts. Picklable: workers get a copy."""

    key: str
    run: str
    """Names this conversion's part files (a rerun never mixes in a killed run's)."""
    upload_id: str | None = None
    """The S3 multipart upload; None on a local store."""

    @classmethod
    def begin(cls, store: Store, key: str, run: str) -> ObjectParts:
        if not store.settings.is_s3:
            return cls(key, run)
        bucket, name = _bucket_key(store, key)
        try:
            answer = store.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=name)
        except store_failures() as exc:
            raise StoreError(f"cannot start the upload of {key}: {exc}") from exc
        return cls(key, run, str(answer["UploadId"]))

    def part_key(self, number: int) -> str:
        return f"{self.key}{TEMP_MARK}{self.run}-{number:05d}"

    def put(self, store: Store, number: int, data: bytes) -> PartRef:
        """Write part `number` (again: it replaces the first)."""
        if not 1 <= number <= MAX_PART_NUMBER:
            raise StoreError(f"{self.key}: part number {number} out of range")
        crc = google_crc32c.value(data)
        if self.upload_id is None:
            try:
                _write_part_file(store.path(self.part_key(number)), data)
            except OSError as exc:
                raise StoreError(f"cannot write part {number} of {self.key}: {exc}") from exc
            return PartRef(number, len(data), crc)
        etag = upload_part(store, self.key, self.upload_id, number, data)
        return PartRef(number, len(data), crc, etag)

    def complete(self, store: Store, parts: Sequence[PartRef]) -> None:
        """Make the object of `parts` (ascending numbers) appear whole."""
        numbers = [p.number for p in parts]
        if numbers != sorted(set(numbers)):
            raise StoreError(f"{self.key}: parts out of order")
        if self.upload_id is None:
            self._join(store, parts)
            return
        bucket, name = _bucket_key(store, self.key)
        listed = [{"PartNumber": p.number, "ETag": p.etag} for p in parts]
        try:
            store.fs.call_s3(
                "complete_multipart_upload",
                Bucket=bucket,
                Key=name,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": listed},
            )
        except store_failures() as exc:
            raise StoreError(f"cannot complete the upload of {self.key}: {exc}") from exc

    def _join(self, store: Store, parts: Sequence[PartRef]) -> None:
        with store.open_write(self.key) as out:
            out.flush()
            for part in parts:
                path = store.path(self.part_key(part.number))
                try:
                    with open(path, "rb") as f:
                        size = os.fstat(f.fileno()).st_size
                        if size != part.size:
                            raise StoreError(f"part {part.number} of {self.key}: {size} bytes")
                        _copy(f, out, size)
                except OSError as exc:
                    raise StoreError(f"cannot read part {part.number} of {self.key}") from exc
        self.abort(store)

    def abort(self, store: Store) -> None:
        """Drop every part written so far (the S3 upload, or this run's part files)."""
        if self.upload_id is not None:
            bucket, name = _bucket_key(store, self.key)
            with contextlib.suppress(*store_failures()):
                store.fs.call_s3(
                    "abort_multipart_upload", Bucket=bucket, Key=name, UploadId=self.upload_id
                )
            return
        folder, _, stem = store.path(self.part_key(0)).rpartition("/")
        prefix = stem[: -len("00000")]
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(folder):
                if name.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(folder, name))


def _write_part_file(path: str, data: bytes) -> None:
    """A part file, whole or not at all (written under a unique name, then renamed: a task run
    twice replaces it), not made durable: a part matters only until its object is joined, and
    the joined object is (`Store.open_write`); after a crash the rerun writes the parts again.
    Skipping the fsync spares writing every byte to the disk twice before the join."""
    make_dirs(os.path.dirname(path))
    tmp = f"{path}.{uuid.uuid4().hex}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _copy(source: IO[bytes], target: IO[bytes], size: int) -> None:
    """Append `size` bytes of `source` to `target` (flushed): in the kernel where the file
    system can (no copy through this process), else through a buffer."""
    done = 0
    with contextlib.suppress(OSError):
        while done < size:
            step = os.copy_file_range(source.fileno(), target.fileno(), size - done)
            if step <= 0:
                break
            done += step
    if done < size:
        source.seek(done)
        shutil.copyfileobj(source, target, _COPY_BLOCK)
        target.flush()


def _bucket_key(store: Store, key: str) -> tuple[str, str]:
    bucket, _, name = store.path(key).partition("/")
    return bucket, name


# -- part uploads -----------------------------------------------------------------------------

PART_ATTEMPTS = 3
"""Tries of one part upload (a refused or broken connection, a 5xx), 0.5 s then 1 s apart: as
bounded as the store's clients, so a store that went away fails a conversion within seconds."""
PART_TIMEOUT_S = 60.0
"""Per socket operation of a part upload: an 8 MiB part at 150 KB/s still makes it."""
PRESIGNED_FOR_S = 900
"""Validity of a part's URL, signed again for each try: covers a slow upload with margin."""
_ERROR_BYTES = 4096
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")


def upload_part(store: Store, key: str, upload_id: str, number: int, data: bytes) -> str:
    """Upload part `number` of `key`'s multipart upload: its ETag.

    A plain HTTP PUT of the bytes to a URL the store's botocore client presigns (its
    credentials, region, endpoint and addressing; S3's standard way to upload parts with
    another client). Against SeaweedFS on loopback this costs the client 0.06 s of CPU per
    128 MiB, against 0.3-0.45 s through botocore's `upload_part` (which hashes every byte
    twice over plain HTTP: SHA-256 to sign the payload, CRC32 as a checksum) and 0.11-0.13 s
    through obstore; on a 2-core machine whose S3 server shares the cores, that CPU is what
    the conversion waits for. A presigned URL signs no payload hash: the bytes are protected
    in transit by TLS (https), and the manifest's CRC32C is computed from the bytes sent.
    Certificates are checked against `AWS_CA_BUNDLE` when it is set, as botocore does, else
    the system's. Where the environment names an HTTP proxy (which botocore honours and this
    client does not), the part goes through botocore."""
    if _proxied():
        return _upload_part_botocore(store, key, upload_id, number, data)
    error = ""
    for attempt in range(PART_ATTEMPTS):
        if attempt:
            time.sleep(0.25 * 2**attempt)
        try:
            url = store.fs.url(
                store.path(key),
                expires=PRESIGNED_FOR_S,
                client_method="upload_part",
                UploadId=upload_id,
                PartNumber=number,
            )
        except store_failures() as exc:
            raise StoreError(f"cannot upload part {number} of {key}: {exc}") from exc
        try:
            status, etag, body = _put(url, data)
        except (OSError, _http_errors()) as exc:
            error = (
                f"{str(exc) or type(exc).__name__} (cannot connect to the store, or it broke off)"
            )
            continue
        if status == 200 and etag:
            return etag
        code = re.search(rb"<Code>([^<]{1,64})</Code>", body)
        error = f"HTTP {status}" + (f" {code.group(1).decode(errors='replace')}" if code else "")
        if status < 500:
            break
    raise StoreError(f"cannot upload part {number} of {key}: {error}")


def _proxied() -> bool:
    return any(name.lower() in _PROXY_VARIABLES for name in os.environ)


def _http_errors() -> type[Exception]:
    import http.client

    return http.client.HTTPException


def _put(url: str, data: bytes) -> tuple[int, str | None, bytes]:
    """PUT `data` to `url` on a connection of its own: (status, ETag, the first bytes of the
    body, which hold the error document of a refusal). http.client (with the ssl, email and
    socket modules it imports, ~10 ms) is imported by the first upload, not by every local
    conversion."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        context = _tls_context(os.environ.get("AWS_CA_BUNDLE") or None)
        connection = http.client.HTTPSConnection(
            parts.hostname or "", parts.port, timeout=PART_TIMEOUT_S, context=context
        )
    else:
        connection = http.client.HTTPConnection(
            parts.hostname or "", parts.port, timeout=PART_TIMEOUT_S
        )
    try:
        connection.request("PUT", f"{parts.path}?{parts.query}", body=data)
        response = connection.getresponse()
        return response.status, response.getheader("ETag"), response.read(_ERROR_BYTES)
    finally:
        connection.close()


@functools.cache
def _tls_context(cafile: str | None) -> ssl.SSLContext:
    """Made once per CA bundle (loading one takes milliseconds; contexts are thread-safe)."""
    import ssl

    return ssl.create_default_context(cafile=cafile)


def _upload_part_botocore(store: Store, key: str, upload_id: str, number: int, data: bytes) -> str:
    bucket, name = _bucket_key(store, key)
    try:
        answer = store.fs.call_s3(
            "upload_part", Bucket=bucket, Key=name, UploadId=upload_id, PartNumber=number, Body=data
        )
    except store_failures() as exc:
        raise StoreError(f"cannot upload part {number} of {key}: {exc}") from exc
    return str(answer["ETag"])


def _gf2_times(matrix: list[int], vector: int) -> int:
    total = 0
    row = 0
    while vector:
        if vector & 1:
            total ^= matrix[row]
        vector >>= 1
        row += 1
    return total


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, matrix[n]) for n in range(32)]


def crc32c_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC32C of A + B from crc(A), crc(B) and len(B): zlib's `crc32_combine` (appending
    len(B) zero bytes to A is a linear operator: the product of the operators for the powers
    of two in len(B)), with the Castagnoli polynomial."""
    if length2 <= 0:
        return crc1
    for operator in _zero_bytes_operators():
        if length2 & 1:
            crc1 = _gf2_times(operator, crc1)
        length2 >>= 1
        if not length2:
            break
    return crc1 ^ crc2


@functools.cache
def _zero_bytes_operators() -> tuple[list[int], ...]:
    """Operator i appends 2^i zero bytes to a CRC32C (i < 64). Squared once per process: zlib
    squares them again in every call, which in Python is 3-4 ms a call (a distributed build's
    coordinator combines a few hundred parts) against 0.1 ms."""
    operator = [_CRC32C_POLY] + [1 << n for n in range(31)]  # one zero bit
    for _ in range(3):
        operator = _gf2_square(operator)
    operators = []
    for _ in range(64):
        operators.append(operator)
        operator = _gf2_square(operator)
    return tuple(operators)


# -- head last --------------------------------------------------------------------------------


class HeadLastObject(ABC):
    """One object written as head + body + tail, the body first (`write`, in order), the head
    and the tail at the end (`finish`). It appears when its `open_head_last` block ends."""

    def __init__(self, store: Store, key: str) -> None:
        self.store = store
        self.key = key

    @abstractmethod
    def write(self, data: bytes) -> None:
        """Append to the body."""

    @abstractmethod
    def finish(self, head: bytes, tail: bytes) -> StoredObject:
        """Give the head and the tail: the object's size and CRC32C, as it will appear."""

    @abstractmethod
    def complete(self) -> None:
        """Make the finished object appear whole (at the end of the block)."""

    @abstractmethod
    def abort(self) -> None:
        """Discard everything written (an exception left the block, or it was never finished)."""


@contextlib.contextmanager
def open_head_last(store: Store, key: str) -> Iterator[HeadLastObject]:
    """A head-last object: completed when the block ends (after `finish`), discarded when it
    raises. On S3 the body streams out as numbered parts while it is written; locally it goes
    straight into the object's temporary file."""
    target: HeadLastObject = (
        _PartedUpload(store, key) if store.settings.is_s3 else _LocalHeadLast(store, key)
    )
    try:
        yield target
        target.complete()
    except BaseException:
        target.abort()
        raise


def _object_crc(head: bytes, body_crc: int, body_size: int, tail: bytes) -> int:
    return google_crc32c.extend(
        crc32c_combine(google_crc32c.value(head), body_crc, body_size), tail
    )


class _LocalHeadLast(HeadLastObject):
    """Locally: the body goes straight into the object's temporary file, and at `finish` the
    head is put in front of it. When the head fills whole blocks of the file system (the
    DICOM writer pads large objects' headers to 4 KiB, `wsi.writers.dicom.HEADER_BLOCK`) and
    the file system can insert blocks into a file (ext4, XFS:
    fallocate's FALLOC_FL_INSERT_RANGE), that moves no byte of the body: the base level of a
    40,000 x 30,000 slide is ~240 MB, which took 0.3 s to copy behind its head, a quarter of
    the whole conversion when the tiles are copied as they are. Otherwise the body is copied
    behind the head into a second temporary file, in the kernel where it can (copy_file_range).
    Either way the object appears by a rename at `complete`, fsynced, as `Store.open_write`'s
    objects do, and the body is never held in memory."""

    def __init__(self, store: Store, key: str) -> None:
        super().__init__(store, key)
        self._path = store.path(key)
        self._tmp = ""
        self._fd = -1
        self._crc = 0
        self._size = 0
        self._finished = False
        try:
            make_dirs(os.path.dirname(self._path))
            self._tmp, self._fd = _new_temporary(self._path)
            self._block = os.fstatvfs(self._fd).f_bsize
        except OSError as exc:
            self.abort()
            raise StoreError(f"cannot write {key}: {exc}") from exc

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._crc = google_crc32c.extend(self._crc, data)
        self._size += len(data)
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            raise StoreError(f"cannot write {self.key}: {exc}") from exc

    def finish(self, head: bytes, tail: bytes) -> StoredObject:
        try:
            if not (len(head) % self._block == 0 and _insert_blocks(self._fd, len(head))):
                self._copy_behind(len(head))
            _write_all_at(self._fd, head, 0)
            os.lseek(self._fd, len(head) + self._size, os.SEEK_SET)
            _write_all(self._fd, tail)
            os.fsync(self._fd)
        except OSError as exc:
            raise StoreError(f"cannot write {self.key}: {exc}") from exc
        self._finished = True
        crc = _object_crc(head, self._crc, self._size, tail)
        return StoredObject(self.key, len(head) + self._size + len(tail), f"{crc:08x}")

    def _copy_behind(self, offset: int) -> None:
        """Move the body to a new temporary file, `offset` bytes from its start."""
        tmp, fd = _new_temporary(self._path)
        try:
            os.lseek(self._fd, 0, os.SEEK_SET)
            os.lseek(fd, offset, os.SEEK_SET)
            with (
                open(self._fd, "rb", closefd=False) as source,
                open(fd, "wb", closefd=False) as target,
            ):
                _copy(source, target, self._size)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(self._fd)
        os.unlink(self._tmp)
        self._tmp, self._fd = tmp, fd

    def complete(self) -> None:
        if not self._finished:
            raise WsiError(f"{self.key} was never finished")
        try:
            os.replace(self._tmp, self._path)
            self._tmp = ""
            fsync_dir(os.path.dirname(self._path))
        except OSError as exc:
            raise StoreError(f"cannot write {self.key}: {exc}") from exc
        finally:
            self._close()

    def abort(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._tmp = ""


def _new_temporary(path: str) -> tuple[str, int]:
    """A new temporary file beside `path` (under the store's temporary mark, FILE_MODE), open
    for reading and writing."""
    tmp = f"{path}{TEMP_MARK}{uuid.uuid4().hex}"
    return tmp, os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_all_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


_FALLOC_FL_INSERT_RANGE = 0x20
_NO_INSERT = {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.ENOTTY, errno.EPERM}
"""fallocate's answers for a file system (or file) that cannot insert blocks."""


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's fallocate(2), which takes the modes `os.posix_fallocate` does not; None where
    there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    function.restype = ctypes.c_int

    def call(fd: int, mode: int, offset: int, length: int) -> int:
        if function(fd, mode, offset, length) == 0:
            return 0
        return ctypes.get_errno()

    return call


def _insert_blocks(fd: int, length: int) -> bool:
    """Insert `length` bytes (whole blocks) of zeros at the start of the file, shifting its
    data: True when done, False when the file system cannot (nothing changed)."""
    fallocate = _fallocate()
    if fallocate is None:
        return False
    failure = fallocate(fd, _FALLOC_FL_INSERT_RANGE, 0, length)
    if failure in _NO_INSERT:
        return False
    if failure:
        raise OSError(failure, os.strerror(failure))
    return True


class _PartedUpload(HeadLastObject):
    """On S3: part 1 is the head and the body's first `MIN_PART_BYTES` (or the store's part
    size if smaller), held here; the rest of the body goes up in parts 2, 3, ... of at least
    `StoreSettings.upload_part_bytes` (a part is sent once it holds that much) by at most
    `upload_concurrency` threads at a time; the last part is the rest and the tail. An object
    whose body never passes one part is sent with one PUT at `complete`.

    Memory, per object: the opening (< 5 MiB + one write), the parts in flight (at most
    `upload_concurrency`) and one more, either being filled or waiting for a slot (a write
    waits beyond that), each < one part + one write. With the defaults (8 MiB, 4) and the
    converter's writes (one row of tiles: ~3 MB at the base of a 40,000 pixel wide slide),
    at most 5 x 11 + 8 = 63 MB, whatever the level's size; levels are written side by side,
    so a slide holds that per level object past 5 MiB (in practice a few MB: loopback S3
    takes parts faster than the converter makes them)."""

    def __init__(self, store: Store, key: str) -> None:
        super().__init__(store, key)
        settings = store.settings
        self._part_bytes = settings.upload_part_bytes
        self._opening_bytes = min(MIN_PART_BYTES, settings.upload_part_bytes)
        self._concurrency = settings.upload_concurrency
        self._opening = bytearray()
        self._group = bytearray()
        self._crc = 0
        """CRC32C of the body so far."""
        self._size = 0
        self._parts: ObjectParts | None = None
        self._pool: cf.ThreadPoolExecutor | None = None
        self._pending: deque[cf.Future[PartRef]] = deque()
        self._sent: list[PartRef] = []
        self._next = 2
        self._whole: bytes | None = None
        """The object, when it goes up in one PUT."""
        self._finished = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._crc = google_crc32c.extend(self._crc, data)
        self._size += len(data)
        if len(self._opening) < self._opening_bytes:
            self._opening += data
            return
        self._group += data
        if len(self._group) >= self._part_bytes:
            part, self._group = bytes(self._group), bytearray()
            self._send(self._next, part)
            self._next += 1

    def _send(self, number: int, data: bytes) -> None:
        """Upload part `number` on the pool, after waiting for a slot (and surfacing the error
        of any part that failed)."""
        if self._parts is None:
            self._parts = ObjectParts.begin(self.store, self.key, uuid.uuid4().hex)
            self._pool = cf.ThreadPoolExecutor(self._concurrency, thread_name_prefix="s3-part")
        assert self._pool is not None
        while self._pending and (
            self._pending[0].done() or len(self._pending) >= self._concurrency
        ):
            self._sent.append(self._pending.popleft().result())
        self._pending.append(self._pool.submit(self._parts.put, self.store, number, data))

    def finish(self, head: bytes, tail: bytes) -> StoredObject:
        size = len(head) + self._size + len(tail)
        crc = _object_crc(head, self._crc, self._size, tail)
        if self._parts is None:
            self._whole = b"".join((head, self._opening, self._group, tail))
        else:
            rest = bytes(self._group) + tail
            if rest:
                self._send(self._next, rest)
            self._send(1, head + bytes(self._opening))
        self._opening = self._group = bytearray()
        self._finished = True
        return StoredObject(self.key, size, f"{crc:08x}")

    def complete(self) -> None:
        if not self._finished:
            raise WsiError(f"{self.key} was never finished")
        if self._parts is None:
            assert self._whole is not None
            self.store.put(self.key, self._whole)
            self._whole = None
            return
        while self._pending:
            self._sent.append(self._pending.popleft().result())
        self._close_pool()
        self._parts.complete(self.store, sorted(self._sent, key=lambda p: p.number))

    def abort(self) -> None:
        self._close_pool()
        if self._parts is not None:
            self._parts.abort(self.store)
        self._whole = None

    def _close_pool(self) -> None:
        """Stop the pool: parts not started are dropped, parts being sent are waited for (so
        that none lands after the upload is aborted)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()
