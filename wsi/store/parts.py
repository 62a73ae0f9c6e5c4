"""Objects written in numbered parts by many processes then completed by one (`ObjectParts`),
and the parts' shared pieces: S3 part uploads (`upload_part`) and CRC32C combination.

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
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

import google_crc32c

from wsi.errors import StoreError
from wsi.store.objects import (
    FILE_MODE,
    TEMP_MARK,
    Store,
    make_dirs,
    store_failures,
)

if TYPE_CHECKING:
    import ssl

__all__ = [
    "MAX_PART_NUMBER",
    "MIN_PART_BYTES",
    "ObjectParts",
    "PartRef",
    "copy_file",
    "crc32c_combine",
    "upload_part",
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
            answer = store.s3_api().create_multipart_upload(Bucket=bucket, Key=name)
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
            store.s3_api().complete_multipart_upload(
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
                        copy_file(f, out, size)
                except OSError as exc:
                    raise StoreError(f"cannot read part {part.number} of {self.key}") from exc
        self.abort(store)

    def abort(self, store: Store) -> None:
        """Drop every part written so far (the S3 upload, or this run's part files)."""
        if self.upload_id is not None:
            bucket, name = _bucket_key(store, self.key)
            with contextlib.suppress(*store_failures()):
                store.s3_api().abort_multipart_upload(
                    Bucket=bucket, Key=name, UploadId=self.upload_id
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


def copy_file(source: IO[bytes], target: IO[bytes], size: int) -> None:
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
            bucket, name = _bucket_key(store, key)
            url = store.s3_api().generate_presigned_url(
                "upload_part",
                Params={"Bucket": bucket, "Key": name, "UploadId": upload_id, "PartNumber": number},
                ExpiresIn=PRESIGNED_FOR_S,
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
        answer = store.s3_api().upload_part(
            Bucket=bucket, Key=name, UploadId=upload_id, PartNumber=number, Body=data
        )
    except store_failures() as exc:
        raise StoreError(f"cannot upload part {number} of {key}: {exc}") from exc
    return str(answer["ETag"])


def _multiply(a: int, b: int) -> int:
    """a * b modulo the CRC32C polynomial, both in the CRC's reflected bit order."""
    m = 1 << 31
    product = 0
    while True:
        if a & m:
            product ^= b
            if not a & (m - 1):
                return product
        m >>= 1
        b = (b >> 1) ^ _CRC32C_POLY if b & 1 else b >> 1


@functools.cache
def _x_to_2_to_the() -> tuple[int, ...]:
    """x^(2^n) modulo the polynomial, for n < 32 (zlib's x2n_table)."""
    powers = [1 << 30]  # x^1
    for _ in range(31):
        powers.append(_multiply(powers[-1], powers[-1]))
    return tuple(powers)


def crc32c_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC32C of A + B from crc(A), crc(B) and len(B): zlib's `crc32_combine` (appending
    len(B) zero bytes multiplies crc(A) by x^(8 len(B)) modulo the polynomial: the product of
    the x^(2^n) of the bits of 8 len(B)), with the Castagnoli polynomial. ~30 us a call in
    Python; the matrix squaring zlib did before 1.2.12 took 20 ms to set up, the last serial
    step of a conversion's base level."""
    if length2 <= 0:
        return crc1
    powers = _x_to_2_to_the()
    factor = 1 << 31  # x^0
    n, k = length2, 3  # x^(8 len) = x^(len 2^3)
    while n:
        if n & 1:
            factor = _multiply(powers[k & 31], factor)
        n >>= 1
        k += 1
    return _multiply(factor, crc1) ^ crc2
