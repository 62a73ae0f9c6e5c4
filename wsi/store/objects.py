"""Object storage for converted slides: a local folder or `s3://bucket/prefix`, through fsspec.

Layout: `<root>/<slide-id>/slide.zarr/...` holds the pyramid; `<root>/<slide-id>/manifest.json` is
written last and is the commit point. Readers list and open only slides with a manifest, so a
conversion that dies half-way is invisible until it is run again and finishes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import aiohttp
import fsspec
from botocore.exceptions import BotoCoreError, ClientError

from wsi.errors import InvalidArgument, SlideNotFound, StoreError

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SLIDE_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MANIFEST = "manifest.json"
TEMP_MARK = ".tmp-"
_MiB = 1024 * 1024
STORE_FAILURES: tuple[type[BaseException], ...] = (
    OSError,
    BotoCoreError,
    ClientError,
    aiohttp.ClientError,
)
"""What fsspec/s3fs let through when the disk, the network, the credentials or the object
server fail (botocore's connection errors are not OSErrors): all become `StoreError`."""


def check_slide_id(slide_id: str) -> str:
    """Slide ids are opaque, lower-case and safe as one path segment or object-key segment."""
    if not isinstance(slide_id, str) or not SLIDE_ID.match(slide_id) or ".." in slide_id:
        raise InvalidArgument(
            "slide id must be 1-64 characters of a-z, 0-9, '.', '_', '-', starting alphanumeric"
        )
    return slide_id


def check_key(key: str) -> str:
    """Object keys are '/'-joined segments we generate; refuse anything that could escape."""
    parts = key.split("/")
    if not key or any(not _SEGMENT.match(p) or p in (".", "..") for p in parts):
        raise InvalidArgument(f"invalid object key {key!r}")
    return key


@dataclass(frozen=True)
class StoreSettings:
    """Where slides live and how to reach the object store."""

    url: str
    """A local folder or `s3://bucket/prefix`."""
    endpoint_url: str | None = None
    """S3 endpoint (SeaweedFS, MinIO, ...); default: AWS_ENDPOINT_URL or AWS itself."""
    upload_part_bytes: int = 8 * _MiB
    """Multipart upload part size: the memory each object being written may buffer."""

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")


def _s3_options(settings: StoreSettings) -> dict[str, Any]:
    endpoint = settings.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    # No listing cache: a reader must see slides that another process publishes. Bounded
    # timeouts and retries: with botocore's defaults a request to a store that went away hangs
    # for minutes, where a conversion should fail (and be retried by ingest) instead.
    options: dict[str, Any] = {
        "use_listings_cache": False,
        "config_kwargs": {
            "connect_timeout": 5,
            "read_timeout": 30,
            "retries": {"max_attempts": 3, "mode": "standard"},
        },
    }
    if endpoint:
        options["endpoint_url"] = endpoint
    # Credentials come from the usual AWS environment variables / config files via botocore.
    return options


class Store:
    """A slide store. Every key is validated; user input never becomes a path unchecked."""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        if settings.is_s3:
            self.storage_options = _s3_options(settings)
            self.fs = fsspec.filesystem("s3", **self.storage_options)
            self.root = settings.url[len("s3://") :].rstrip("/")
            if not self.root:
                raise InvalidArgument("s3 URL needs a bucket: s3://bucket[/prefix]")
        else:
            self.storage_options = {}
            self.fs = fsspec.filesystem("file", auto_mkdir=True)
            self.root = os.path.abspath(settings.url)
        self.url = settings.url

    # -- keys -------------------------------------------------------------------------------
    def path(self, key: str) -> str:
        """The backend path of a validated key."""
        return f"{self.root}/{check_key(key)}"

    def full_url(self, key: str = "") -> str:
        base = f"s3://{self.root}" if self.settings.is_s3 else self.root
        return f"{base}/{check_key(key)}" if key else base

    # -- objects ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[IO[bytes]]:
        """Stream an object that appears whole or not at all: on S3 a multipart upload completed
        on success and discarded on error; locally a temporary file renamed on success."""
        path = self.path(key)
        try:
            if self.settings.is_s3:
                f = self.fs.open(path, "wb", block_size=self.settings.upload_part_bytes)
                try:
                    yield f
                except BaseException:
                    # With the store unreachable the abort fails too; the file must still never
                    # be flushed again (fsspec's __del__ would retry the upload at interpreter
                    # exit and hang the process, and with it the job).
                    with contextlib.suppress(Exception):
                        f.discard()
                    f.closed = True
                    raise
                f.close()
            else:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}{TEMP_MARK}{uuid.uuid4().hex}"
                try:
                    with open(tmp, "wb") as lf:
                        yield lf
                    os.replace(tmp, path)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
        except STORE_FAILURES as exc:
            raise StoreError(f"cannot write {key}: {exc}") from exc

    def put(self, key: str, data: bytes) -> None:
        """Write a whole object atomically (temp file + rename locally; one PUT on S3)."""
        path = self.path(key)
        try:
            if self.settings.is_s3:
                self.fs.pipe_file(path, data)
            else:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}{TEMP_MARK}{uuid.uuid4().hex}"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
        except STORE_FAILURES as exc:
            raise StoreError(f"cannot write {key}: {exc}") from exc

    def get(self, key: str) -> bytes:
        try:
            return bytes(self.fs.cat_file(self.path(key)))
        except FileNotFoundError as exc:
            raise SlideNotFound(f"no object {key}") from exc
        except STORE_FAILURES as exc:
            raise StoreError(f"cannot read {key}: {exc}") from exc

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object."""
        try:
            return bytes(self.fs.cat_file(self.path(key), start=start, end=end))
        except FileNotFoundError as exc:
            raise SlideNotFound(f"no object {key}") from exc
        except STORE_FAILURES as exc:
            raise StoreError(f"cannot read {key}: {exc}") from exc

    def exists(self, key: str) -> bool:
        try:
            return bool(self.fs.exists(self.path(key)))
        except STORE_FAILURES as exc:
            raise StoreError(f"cannot reach store: {exc}") from exc

    def size(self, key: str) -> int:
        try:
            return int(self.fs.size(self.path(key)))
        except FileNotFoundError as exc:
            raise SlideNotFound(f"no object {key}") from exc

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(key))

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under `prefix/` (used to clear leftovers of a failed run)."""
        path = self.path(prefix)
        with contextlib.suppress(FileNotFoundError):
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)

    def children(self, prefix: str = "") -> list[str]:
        """Names directly under `prefix` (or the root)."""
        path = self.path(prefix) if prefix else self.root
        try:
            entries = self.fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        except STORE_FAILURES as exc:
            raise StoreError(f"cannot list store: {exc}") from exc
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def remove_temporaries(self, prefix: str) -> None:
        """Delete what a killed or failed writer left under `prefix/`: temporary files on a
        local store; on S3, unfinished multipart uploads (never objects, but their parts are
        stored and billed until aborted; an abort fails when the store was unreachable)."""
        if self.settings.is_s3:
            self._abort_uploads(prefix)
            return
        for key in self.list_keys(prefix, include_temporary=True):
            if TEMP_MARK in key:
                self.delete(key)

    def _abort_uploads(self, prefix: str) -> None:
        bucket, _, root = self.path(prefix).partition("/")
        try:
            listed = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=root + "/")
            for upload in listed.get("Uploads", []):
                self.fs.call_s3(
                    "abort_multipart_upload",
                    Bucket=bucket,
                    Key=upload["Key"],
                    UploadId=upload["UploadId"],
                )
        except STORE_FAILURES as exc:
            raise StoreError(f"cannot clean up unfinished uploads under {prefix}: {exc}") from exc

    def list_keys(self, prefix: str, include_temporary: bool = False) -> list[str]:
        """Every object key under `prefix/`, relative to the store root."""
        base = self.path(prefix)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        root = self.root.rstrip("/") + "/"
        keys = (str(p)[len(root) :] for p in found if str(p).startswith(root))
        return sorted(k for k in keys if include_temporary or TEMP_MARK not in k)

    # -- slides -----------------------------------------------------------------------------
    def manifest_key(self, slide_id: str) -> str:
        return f"{check_slide_id(slide_id)}/{MANIFEST}"

    def read_manifest(self, slide_id: str) -> dict[str, Any]:
        """The manifest of a published slide (SlideNotFound if unpublished)."""
        try:
            data = self.get(self.manifest_key(slide_id))
        except SlideNotFound as exc:
            raise SlideNotFound(f"slide {slide_id} is not published") from exc
        try:
            manifest: dict[str, Any] = json.loads(data)
        except ValueError as exc:
            raise StoreError(f"manifest of {slide_id} is not valid JSON") from exc
        return manifest

    def is_published(self, slide_id: str) -> bool:
        return self.exists(self.manifest_key(slide_id))

    def publish(self, slide_id: str, manifest: Mapping[str, Any]) -> None:
        """The commit point: after this one atomic write, readers see the whole slide."""
        body = json.dumps(manifest, indent=1, sort_keys=True).encode()
        self.put(self.manifest_key(slide_id), body)

    def unpublish(self, slide_id: str) -> None:
        """Hide a slide from readers before its objects are rewritten."""
        self.delete(self.manifest_key(slide_id))

    def published_slides(self) -> list[str]:
        """Ids of committed slides only: folders without a manifest are work in progress."""
        out = []
        for name in self.children():
            if SLIDE_ID.match(name) and self.exists(f"{name}/{MANIFEST}"):
                out.append(name)
        return out
