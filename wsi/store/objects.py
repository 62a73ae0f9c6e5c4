"""Object storage for converted slides: a local folder or `s3://bucket/prefix`.

On S3, object reads and streamed writes go through obstore (`wsi.store.obstore_s3`, several
times faster), listing and other metadata through s3fs; a local folder through plain files.

A slide's objects live under `<root>/<slide-id>/` (keys: `wsi.published.layout`); its manifest is
written last and is the commit point. Readers list and open only slides with a manifest, so a
conversion that dies half-way is invisible until it is run again and finishes.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import re
import sys
import uuid
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any, cast

from wsi.errors import CorruptSlide, InvalidArgument, SlideNotFound, StoreError
from wsi.published.layout import (
    MANIFEST,
    SLIDE_ID,
    Manifest,
    SlideKeys,
    check_slide_id,
    dump_json,
    load_json,
)
from wsi.store.locks import locked_file, private_temp_folder

if TYPE_CHECKING:
    from wsi.store.obstore_s3 import ObstoreS3

# fsspec, s3fs and obstore are imported for an S3 store only (and for the few operations of a
# local store that go through fsspec): with the asyncio and ssl they import they cost ~0.05 s of
# CPU at the start of every local conversion.

__all__ = [
    "MANIFEST",
    "TEMP_MARK",
    "Store",
    "StoreSettings",
    "check_folder",
    "check_key",
    "check_slide_id",
    "split_slide_location",
    "store_failures",
]

_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TEMP_MARK = ".tmp-"
_MiB = 1024 * 1024
_URL_LIKE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/|s3:", re.IGNORECASE)
"""A store that reads as a URL (`scheme:/...`, or any `s3:` spelling) but is not `s3://`: a
local folder of that name is never what was meant."""
_ENDPOINT = re.compile(
    r"https?://([A-Za-z0-9._~%-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?(/\S*)?", re.IGNORECASE
)
"""An S3 endpoint: an http(s) URL of a host name or address (IPv6 in brackets), a port, a path."""
_S3_FAILURES = (
    ("botocore.exceptions", ("BotoCoreError", "ClientError")),
    ("aiohttp.client_exceptions", ("ClientError",)),
)


def store_failures() -> tuple[type[BaseException], ...]:
    """What fsspec/s3fs let through when the disk, the network, the credentials or the object
    server fail (botocore's connection errors are not OSErrors): all become `StoreError`.

    Written `except store_failures():`, which Python evaluates only when an exception is on its
    way, so that nothing imports the S3 clients for a local store (aiohttp alone costs ~0.15 s
    of CPU at every start): an exception of botocore's or aiohttp's can only have been raised
    if the module that defines its class was imported, so the classes of modules not in
    `sys.modules` are left out without missing anything."""
    failures: list[type[BaseException]] = [OSError]
    for module_name, names in _S3_FAILURES:
        module = sys.modules.get(module_name)
        failures.extend(getattr(module, name) for name in names if hasattr(module, name))
    return tuple(failures)


def check_key(key: str) -> str:
    """Object keys are '/'-joined segments we generate; refuse anything that could escape."""
    parts = key.split("/")
    if not key or any(not _SEGMENT.fullmatch(p) or p in (".", "..") for p in parts):
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
    """Multipart upload part size (S3 needs at least 5 MiB but for the last part)."""
    upload_concurrency: int = 4
    """Parts of one object uploading at once while the next is written: each object being
    written holds at most `upload_concurrency + 2` parts in memory."""

    def __post_init__(self) -> None:
        if self.upload_part_bytes <= 0 or self.upload_concurrency <= 0:
            raise InvalidArgument("upload_part_bytes and upload_concurrency must be positive")
        if not self.is_s3 and _URL_LIKE.match(self.url):
            # `--out s3:/bucket/x`, `S3://bucket/x` or `ftp://host/x` wrote the slides into a
            # local folder named `s3:` (or `S3:`, `ftp:`) under the current folder, exit 0:
            # patient data where nobody looks, and the bucket never written.
            raise InvalidArgument(
                f"store {self.url} reads as a URL, and the one URL a store can be is "
                f"s3://bucket[/prefix] (lower case, two slashes); a local folder of that name "
                f"is ./{self.url}"
            )

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")

    @property
    def s3_endpoint(self) -> str | None:
        """Where S3 requests go: `endpoint_url`, else AWS_ENDPOINT_URL, else None (AWS).
        InvalidArgument unless it is an http(s) URL: `127.0.0.1:8333` without its scheme made
        obstore panic while signing the first request (a Rust backtrace and a Python traceback,
        98 lines, for `wsi list`)."""
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        if endpoint is not None and not _ENDPOINT.fullmatch(endpoint):
            given = "--s3-endpoint" if self.endpoint_url else "AWS_ENDPOINT_URL"
            raise InvalidArgument(
                f"S3 endpoint {endpoint} ({given}) must be a URL: http://host:port or "
                "https://host[:port]"
            )
        return endpoint


def _s3_options(settings: StoreSettings) -> dict[str, Any]:
    endpoint = settings.s3_endpoint
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


def _botocore_s3(settings: StoreSettings) -> Any:
    """A botocore S3 client with s3fs's options (`_s3_options`: endpoint, timeouts, retries)
    and obstore's identity (botocore's credentials and region). It costs ~0.1 s to make, where
    s3fs's first call costs ~0.4 s (importing s3fs, aiobotocore and aiohttp)."""
    import botocore.config
    import botocore.session

    from wsi.store.obstore_s3 import region

    options = _s3_options(settings)
    session = botocore.session.Session()
    return session.create_client(
        "s3",
        region_name=region(session),
        endpoint_url=options.get("endpoint_url"),
        config=botocore.config.Config(**options["config_kwargs"]),
    )


LOCKS = ".wsistore-locks"
"""A local store's folder of per-slide lock files (never a slide id: ids start alphanumeric)."""
FILE_MODE = 0o640
"""Objects we write: never world-readable, whatever the process umask (they hold patient data:
pixels, labels, DICOM headers); a group (say, a backup or web server account) may read."""
DIR_MODE = 0o750


def make_dirs(path: str) -> None:
    """`os.makedirs` with DIR_MODE for every folder it creates (makedirs gives intermediate
    folders the umask's default), each new folder made durable in its parent."""
    missing = []
    head = os.path.abspath(path)
    while not os.path.isdir(head):
        missing.append(head)
        head = os.path.dirname(head)
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, DIR_MODE)
        fsync_dir(os.path.dirname(folder))


def check_folder(path: str, what: str, *, exists: bool) -> None:
    """InvalidArgument unless `path` is a folder or, when not `exists`, can be made one by
    `make_dirs` (nothing but folders in its place and above it). A path typed wrong then fails
    in one line naming it, before any work: not as NotADirectoryError half-way through, nor,
    read, as a folder with nothing in it. `what` names the path for the user ("store")."""
    full = os.path.abspath(path)
    head = full
    while not os.path.lexists(head):
        head = os.path.dirname(head)
    if os.path.isdir(head):
        if head == full or not exists:
            return
        raise InvalidArgument(f"{what} {path} does not exist")
    if head == full:
        raise InvalidArgument(f"{what} {path} is not a folder")
    raise InvalidArgument(f"{what} {path} cannot be a folder: {head} is not one")


def fsync_dir(path: str) -> None:
    """Make a folder's entries (a rename into it, a new file) durable: without it a power cut
    after the manifest is written can leave the manifest and lose the objects it lists."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_temporary(path: str) -> tuple[str, int]:
    """A new temporary file beside the local object `path`, under the store's temporary mark
    (listings never show it; the next clean-up removes what a killed run left) and FILE_MODE:
    its name and a descriptor open for reading and writing."""
    tmp = f"{path}{TEMP_MARK}{uuid.uuid4().hex}"
    return tmp, os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)


@contextlib.contextmanager
def _local_file(path: str) -> Iterator[IO[bytes]]:
    """A local object that appears whole or not at all, and durably: written under a unique
    temporary name (`new_temporary`), fsynced, renamed into place, its folder fsynced; removed
    if the body raises."""
    make_dirs(os.path.dirname(path))
    tmp = ""
    try:
        tmp, fd = new_temporary(path)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))
    finally:
        if tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _remove_local_folder(path: str) -> None:
    """Remove the local folder `path` if it is empty: one `os.rmdir`, which removes an empty
    folder or nothing, atomically (a file written meanwhile keeps its folder)."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise


def _folders_above(slide_id: str, keys: Iterable[str]) -> list[str]:
    """The folders of the slide's `keys` and theirs, up to but not including the slide's
    folder: those that deleting the objects may leave empty; deepest first, so that a folder
    comes after every folder in it."""
    folders: set[str] = set()
    for key in keys:
        folder = key.rsplit("/", 1)[0]
        while folder != slide_id and folder not in folders:
            folders.add(folder)
            folder = folder.rsplit("/", 1)[0]
    return sorted(folders, key=lambda f: (-f.count("/"), f))


def _local_find(base: str) -> list[str]:
    """The files under the folder `base` (or `base` itself when it is a file), as fsspec's
    `find` lists them; nothing when it does not exist."""
    if os.path.isfile(base):
        return [base]
    return [os.path.join(top, name) for top, _, names in os.walk(base) for name in names]


class Store:
    """A slide store. Every key is validated; user input never becomes a path unchecked."""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        if settings.is_s3:
            from wsi.store.obstore_s3 import ObstoreS3

            self.storage_options = _s3_options(settings)
            self.root = settings.url[len("s3://") :].rstrip("/")
            if not self.root:
                raise InvalidArgument("s3 URL needs a bucket: s3://bucket[/prefix]")
            self._obstore: ObstoreS3 | None = ObstoreS3(settings, self.root)
        else:
            self._obstore = None
            self.storage_options = {}
            self.root = os.path.abspath(settings.url)
        self.url = settings.url
        self._api: tuple[int, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_api": None}  # a botocore client stays in its process

    def check_folder(self, *, exists: bool) -> None:
        """A local store's `check_folder`: `exists` for a command that only reads the store (a
        path typed wrong would read as an empty, healthy store). An S3 store is not checked:
        a prefix exists only while objects lie under it, so an empty one is an empty store."""
        if not self.settings.is_s3:
            check_folder(self.settings.url, "store", exists=exists)

    def s3_api(self) -> Any:
        """This process's botocore S3 client of the store (`_botocore_s3`), for the calls
        obstore does not make: numbered parts (`wsi.store.parts`) and a slide's leftover
        uploads. Made on first use in each process; botocore's clients are thread-safe."""
        if self._api is None or self._api[0] != os.getpid():
            self._api = (os.getpid(), _botocore_s3(self.settings))
        return self._api[1]

    @functools.cached_property
    def fs(self) -> Any:
        """The store's fsspec filesystem (s3fs on S3), made on first use: a conversion to S3
        goes through obstore and `s3_api` and never needs s3fs, whose import (with aiobotocore
        and aiohttp) and first client cost ~0.4 s of a conversion."""
        import fsspec

        if self.settings.is_s3:
            return fsspec.filesystem("s3", **self.storage_options)
        return fsspec.filesystem("file", auto_mkdir=True)

    # -- keys -------------------------------------------------------------------------------
    def path(self, key: str) -> str:
        """The backend path of a validated key."""
        return f"{self.root}/{check_key(key)}"

    def full_url(self, key: str = "") -> str:
        base = f"s3://{self.root}" if self.settings.is_s3 else self.root
        return f"{base}/{check_key(key)}" if key else base

    def is_same_store(self, other: Store) -> bool:
        """Whether `other` names the same objects: the same folder however it is written
        (relative, through a symlink), or the same bucket and prefix on the same S3 service."""
        if self.settings.is_s3 != other.settings.is_s3:
            return False
        if self.settings.is_s3:
            mine = (self.settings.s3_endpoint, self.full_url())
            return mine == (other.settings.s3_endpoint, other.full_url())
        return os.path.realpath(self.root) == os.path.realpath(other.root)

    # -- objects ----------------------------------------------------------------------------
    def obstore_client(self) -> ObstoreS3 | None:
        """The obstore client for S3 object I/O, or None: a local store, or a process forked
        after obstore ran (see `wsi.store.obstore_s3`), which goes through s3fs."""
        if self._obstore is None:
            return None
        from wsi.store.obstore_s3 import usable

        return self._obstore if usable() else None

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[IO[bytes]]:
        """Stream an object that appears whole or not at all: on S3 a multipart upload completed
        on success and discarded on error (write-only: `write` is all it offers there); locally
        a temporary file renamed on success."""
        path = self.path(key)
        fast = self.obstore_client()
        if fast is not None:
            with fast.open_write(key) as upload:
                yield cast(IO[bytes], upload)
            return
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
                with _local_file(path) as lf:
                    yield lf
        except store_failures() as exc:
            raise StoreError(f"cannot write {key}: {exc}") from exc

    def put(self, key: str, data: bytes) -> None:
        """Write a whole object atomically (temp file + rename locally; on S3 one PUT, or past
        one part a concurrent multipart upload)."""
        path = self.path(key)
        fast = self.obstore_client()
        if fast is not None:
            fast.put(key, data)
            return
        try:
            if self.settings.is_s3:
                self.fs.pipe_file(path, data)
            else:
                with _local_file(path) as f:
                    f.write(data)
        except store_failures() as exc:
            raise StoreError(f"cannot write {key}: {exc}") from exc

    def get(self, key: str) -> bytes:
        path = self.path(key)
        fast = self.obstore_client()
        if fast is not None:
            return fast.get(key)
        try:
            return bytes(self.fs.cat_file(path))
        except FileNotFoundError as exc:
            raise SlideNotFound(f"no object {key}") from exc
        except store_failures() as exc:
            raise StoreError(f"cannot read {key}: {exc}") from exc

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object."""
        path = self.path(key)
        fast = self.obstore_client()
        if fast is not None:
            return fast.get_range(key, start, end)
        try:
            return bytes(self.fs.cat_file(path, start=start, end=end))
        except FileNotFoundError as exc:
            raise SlideNotFound(f"no object {key}") from exc
        except store_failures() as exc:
            raise StoreError(f"cannot read {key}: {exc}") from exc

    def get_ranges(self, key: str, spans: Sequence[tuple[int, int]]) -> list[bytes]:
        """Several [start, end) ranges of one object, read together (on S3 in one concurrent
        call instead of one round trip each)."""
        from wsi.store.obstore_s3 import check_spans

        path = self.path(key)
        check_spans(spans)
        fast = self.obstore_client()
        if fast is not None:
            return fast.get_ranges(key, spans)
        if not spans:
            return []
        try:
            if self.settings.is_s3:
                starts, ends = [s for s, _ in spans], [e for _, e in spans]
                parts = self.fs.cat_ranges([path] * len(spans), starts, ends, on_error="raise")
                return [bytes(p) for p in parts]
            with open(path, "rb") as f:
                out = []
                for start, end in spans:
                    f.seek(start)
                    out.append(f.read(end - start))
                return out
        except FileNotFoundError as exc:
            raise SlideNotFound(f"no object {key}") from exc
        except store_failures() as exc:
            raise StoreError(f"cannot read {key}: {exc}") from exc

    def exists(self, key: str) -> bool:
        """Whether the object `key` exists (one HEAD on S3)."""
        path = self.path(key)
        fast = self.obstore_client()
        if fast is not None:
            try:
                fast.head(key)
            except SlideNotFound:
                return False
            return True
        if not self.settings.is_s3:
            return os.path.exists(path)
        try:
            return bool(self.fs.exists(path))
        except store_failures() as exc:
            raise StoreError(f"cannot reach store: {exc}") from exc

    PROBE_KEY = "readiness-probe"
    """The object `answers` asks for: it need not exist (a missing key is an answer)."""

    def answers(self) -> bool:
        """Whether the store answers one small request, whatever it holds (readiness): the
        local root's first entry can be read (a root not made yet holds no slide: it answers),
        or on S3 a GET of `PROBE_KEY` is answered, a missing key included but not a missing
        bucket (`ObstoreS3.probe`). Never a listing of every slide: `/readyz` asks every few
        seconds, and a store of 100,000 slides lists in 100 requests of 1,000 on S3. It was a
        HEAD, whose 404 carries no error code: a bucket typed wrong or deleted read as an empty
        store, `/readyz` ready while every listing answered 503. A process forked after obstore
        ran (no S3 service runs so) still asks with a HEAD."""
        if self.settings.is_s3:
            fast = self.obstore_client()
            try:
                if fast is not None:
                    fast.probe(self.PROBE_KEY)
                else:
                    self.exists(self.PROBE_KEY)
            except Exception:  # whatever the client raises, the store did not answer
                return False
            return True
        try:
            with os.scandir(self.root) as entries:
                next(entries, None)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True

    def size(self, key: str) -> int:
        path = self.path(key)
        fast = self.obstore_client()
        if fast is not None:
            return int(fast.head(key)["size"])
        try:
            return int(self.fs.size(path))
        except FileNotFoundError as exc:
            raise SlideNotFound(f"no object {key}") from exc

    def modified(self, key: str) -> float:
        """When an object was last written (seconds since the epoch): a manifest's time is when
        its slide was last published (the archive policy's clock)."""
        path = self.path(key)
        fast = self.obstore_client()
        if fast is not None:
            return fast.head(key)["last_modified"].timestamp()
        try:
            info = self.fs.info(path)
        except FileNotFoundError as exc:
            raise SlideNotFound(f"no object {key}") from exc
        except store_failures() as exc:
            raise StoreError(f"cannot read {key}: {exc}") from exc
        stamp = info.get("mtime", info.get("LastModified"))
        if isinstance(stamp, datetime):
            return stamp.timestamp()
        if isinstance(stamp, int | float):
            return float(stamp)
        raise StoreError(f"the store gives no modification time for {key}")

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(key))

    def delete_objects(self, slide_id: str, keys: Iterable[str]) -> None:
        """Delete objects of the slide `slide_id` (store keys under its folder), then the
        folders this leaves empty, up to but not including the slide's folder. A version that
        drops an array (a re-conversion under `--deidentify` drops the label) otherwise leaves
        its folders (`associated/label/c/0/0`) in a local store, and in an S3 server that keeps
        folders (SeaweedFS), where zarr-python lists each as a group member it does not
        recognise, with a warning. Call holding the slide's lock: no writer of the slide makes
        a folder in it meanwhile, and a folder that holds anything is never removed anyway."""
        within = check_slide_id(slide_id) + "/"
        chosen = list(keys)
        for key in chosen:
            if not check_key(key).startswith(within):
                raise InvalidArgument(f"{key!r} is not an object of slide {slide_id}")
        for key in chosen:
            self.delete(key)
        try:
            for folder in _folders_above(slide_id, chosen):
                if self.settings.is_s3:
                    self._remove_s3_folder(folder)
                else:
                    _remove_local_folder(self.path(folder))
        except store_failures() as exc:
            raise StoreError(f"cannot remove the emptied folders of {slide_id}: {exc}") from exc

    def _remove_s3_folder(self, folder: str) -> None:
        """Remove the S3 folder `folder` if it is one and holds no object. An S3 object store
        has no folders, but a server on a file system may (SeaweedFS keeps an emptied one and
        lists it as a common prefix), as may a zero-byte `folder/` marker object: HEAD of
        `folder/` finds either (a 404 otherwise, and then nothing is asked of a versioned
        bucket, where deleting a missing key adds a delete marker), and a DELETE of `folder/`
        removes that key alone (SeaweedFS: an empty folder, never one holding objects)."""
        import botocore.exceptions

        bucket, _, key = self.path(folder).partition("/")
        marker = f"{key}/"
        api = self.s3_api()
        try:
            api.head_object(Bucket=bucket, Key=marker)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return
            raise
        listed = api.list_objects_v2(Bucket=bucket, Prefix=marker, MaxKeys=2)
        if any(o["Key"] != marker for o in listed.get("Contents", [])):
            return
        api.delete_object(Bucket=bucket, Key=marker)

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under `prefix/` (used to clear leftovers of a failed run), and
        the folder `prefix` with the folders in it: `_remove_s3_folders` on S3."""
        path = self.path(prefix)
        with contextlib.suppress(FileNotFoundError):
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        if self.settings.is_s3:
            try:
                self._remove_s3_folders(prefix)
            except store_failures() as exc:
                raise StoreError(f"cannot remove the emptied folders of {prefix}: {exc}") from exc

    def _remove_s3_folders(self, prefix: str) -> None:
        """Remove the folders an S3 server on a file system keeps under `prefix/` once its
        objects are deleted, and `prefix/` itself (SeaweedFS lists each emptied one; the id of a
        slide whose failed first conversion was removed would still list as a folder, which
        `verify` reports as a slide not published). Such folders show only as common prefixes
        of a listing by folder: one listing per folder found, a single one on a store without
        folders; then deepest first, each removed only if empty (`_remove_s3_folder`)."""
        bucket, _, key = self.path(prefix).partition("/")
        in_bucket = len(self.root) - len(bucket)  # the store's own prefix in the bucket
        pages = self.s3_api().get_paginator("list_objects_v2")
        folders, waiting = [prefix], [f"{key}/"]
        while waiting:
            for page in pages.paginate(Bucket=bucket, Prefix=waiting.pop(), Delimiter="/"):
                for common in page.get("CommonPrefixes", []):
                    waiting.append(common["Prefix"])
                    folders.append(common["Prefix"][in_bucket:].rstrip("/"))
        for folder in sorted(folders, key=lambda f: (-f.count("/"), f)):
            self._remove_s3_folder(folder)

    def children(self, prefix: str = "") -> list[str]:
        """Names directly under `prefix` (or the root)."""
        path = self.path(prefix) if prefix else self.root
        fast = self.obstore_client()
        try:
            if fast is not None:
                entries = fast.children(prefix)
            elif self.settings.is_s3:
                entries = self.fs.ls(path, detail=False, refresh=True)
            else:  # as fsspec lists a local path: a file lists itself
                listed = [""] if os.path.isfile(path) else os.listdir(path)
                entries = [os.path.join(path, n) if n else path for n in listed]
        except FileNotFoundError:
            return []
        except store_failures() as exc:
            raise StoreError(f"cannot list store: {exc}") from exc
        names = (str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)
        return sorted(n for n in names if TEMP_MARK not in n)  # writes still in progress

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
            api = self.s3_api()
            listed = api.list_multipart_uploads(Bucket=bucket, Prefix=root + "/")
            for upload in listed.get("Uploads", []):
                api.abort_multipart_upload(
                    Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
        except store_failures() as exc:
            raise StoreError(f"cannot clean up unfinished uploads under {prefix}: {exc}") from exc

    def list_keys(self, prefix: str, include_temporary: bool = False) -> list[str]:
        """Every object key under `prefix/`, relative to the store root."""
        base = self.path(prefix)
        try:
            found = self.fs.find(base) if self.settings.is_s3 else _local_find(base)
        except FileNotFoundError:
            return []
        root = self.root.rstrip("/") + "/"
        keys = (str(p)[len(root) :] for p in found if str(p).startswith(root))
        # Some S3 servers (SeaweedFS) keep an emptied folder, which find() returns as itself.
        return sorted(k for k in keys if k != prefix and (include_temporary or TEMP_MARK not in k))

    # -- slides -----------------------------------------------------------------------------
    def manifest_key(self, slide_id: str) -> str:
        return SlideKeys(slide_id).manifest

    def _manifest_bytes(self, slide_id: str) -> bytes:
        try:
            return self.get(self.manifest_key(slide_id))
        except SlideNotFound as exc:
            raise SlideNotFound(f"slide {slide_id} is not published") from exc

    def read_manifest(self, slide_id: str) -> dict[str, Any]:
        """The manifest of a published slide as JSON (SlideNotFound if unpublished)."""
        try:
            return load_json(self._manifest_bytes(slide_id), f"manifest of {slide_id}")
        except CorruptSlide as exc:
            raise StoreError(str(exc)) from exc

    def manifest(self, slide_id: str) -> Manifest:
        """The parsed manifest of a published slide (SlideNotFound if unpublished, CorruptSlide
        when it does not follow the layout)."""
        return Manifest.from_bytes(self._manifest_bytes(slide_id))

    def is_published(self, slide_id: str) -> bool:
        return self.exists(self.manifest_key(slide_id))

    def publish(self, slide_id: str, manifest: Manifest | Mapping[str, Any]) -> None:
        """The commit point: after this one atomic write, readers see the whole slide."""
        body = manifest.to_bytes() if isinstance(manifest, Manifest) else dump_json(manifest)
        self.put(self.manifest_key(slide_id), body)

    @contextlib.contextmanager
    def slide_lock(self, slide_id: str) -> Iterator[None]:
        """Hold while converting `slide_id`: one conversion of a slide at a time on this machine,
        whichever process runs it. A second one fails at once (StoreError, which ingest retries)
        instead of deleting the first one's temporaries or objects. Across machines the job
        queue gives a slide to one worker at a time. A local store keeps its locks in the store
        (`LOCKS`): processes with other temporary folders (TMPDIR, a service's private /tmp)
        still meet there; an S3 store's are in a temp folder of the user's own
        (`private_temp_folder`), which the processes of that user share."""
        if self.settings.is_s3:
            folder = private_temp_folder("wsistore-locks")
            # The endpoint too: buckets of the same name on two S3 services are two stores.
            store = f"{self.settings.s3_endpoint or ''}\n{self.full_url()}"
            name = hashlib.sha256(f"{store}\n{slide_id}".encode()).hexdigest()[:32]
        else:
            folder = os.path.join(self.root, LOCKS)
            try:
                make_dirs(folder)
            except OSError as exc:  # a store we may not write in (or a file in its place)
                raise StoreError(f"cannot make the lock folder in {self.root}: {exc}") from exc
            name = check_slide_id(slide_id)
        fd = locked_file(os.path.join(folder, f"{name}.lock"), slide_id)
        try:
            yield
        finally:  # the file goes with the lock: a failed conversion leaves nothing in the store
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, f"{name}.lock"))
            os.close(fd)  # releases the lock (so does the process's death)

    def promote(self, staged: SlideKeys, keys_in_slide: Iterable[str]) -> None:
        """Move a version built in a staging folder to the slide's own keys, replacing what is
        there: a rename each on a local store (made durable), a server-side copy each on S3;
        then the staging folder goes. Call with the slide unpublished."""
        final = SlideKeys(staged.slide_id)
        try:
            for key in keys_in_slide:
                source, target = self.path(staged.in_store(key)), self.path(final.in_store(key))
                if self.settings.is_s3:
                    self.fs.copy(source, target)
                else:
                    make_dirs(os.path.dirname(target))
                    os.replace(source, target)
                    fsync_dir(os.path.dirname(target))
        except store_failures() as exc:
            raise StoreError(f"cannot promote the new version of {staged.slide_id}: {exc}") from exc
        self.delete_prefix(staged.root)

    def unpublish(self, slide_id: str) -> None:
        """Hide a slide from readers before its objects are rewritten."""
        self.delete(self.manifest_key(slide_id))

    def published_slides(self, known: Container[str] = ()) -> list[str]:
        """Ids of committed slides only: folders without a manifest are work in progress.
        `known`: slides the caller saw published and has not seen unpublished since, listed
        without asking for their manifest again (one HEAD a slide on S3)."""
        return list(self._published(known))

    def holds_slides(self) -> bool:
        """Whether any slide is published here: whether this location is recognisably a store
        (one listing, and the manifests up to the first one found)."""
        return next(self._published(), None) is not None

    def _published(self, known: Container[str] = ()) -> Iterator[str]:
        for name in self.children():
            if SLIDE_ID.fullmatch(name) and (
                name in known or self.exists(SlideKeys(name).manifest)
            ):
                yield name


def split_slide_location(location: str) -> tuple[str, str]:
    """`OUT/<slide-id>` or `s3://bucket/prefix/<slide-id>` -> (store URL, slide id)."""
    trimmed = location.rstrip("/")
    if "/" not in trimmed:
        trimmed = f"./{trimmed}"
    root, slide_id = trimmed.rsplit("/", 1)
    if not root or root.endswith(":/"):
        raise InvalidArgument(f"{location!r} does not name a slide folder (STORE/<slide-id>)")
    return root, check_slide_id(slide_id)
