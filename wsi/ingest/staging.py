"""Conversion sources in S3: an id by ranged reads, and a local copy for the readers.

OpenSlide and our other readers need local files, so a slide in a bucket is *staged*: streamed
in bounded chunks into a fresh folder in a spool directory, laid out as the scanner wrote it,
converted, then deleted. Its id comes from `remote_slide_id` without a download (the same sampled
hash as `content_slide_id`, through ranged reads), so a slide that is already published can be
skipped before any byte of it is copied.

Layout rules are those of `wsi.slide_id.slide_files`: a URL ending in `/` is a folder slide
(a DICOM series: every object under the prefix); an object with a companion folder
(`wsi.slidefiles.companion_folder`: `.mrxs`, `.vms`, `.vmu`) also takes every object under that
prefix (the key without suffix + `/`); anything else is one object. The metadata sidecar is looked
up under `wsi.slidefiles.sidecar_names`.

URLs come from HTTP requests, so they are checked strictly before anything is read, and so is
every listed object name before it becomes a local path. Errors never quote object content.

A source is bounded before any byte is copied (`StagingLimits`): its objects are listed at most
one past the object cap, and its bytes are summed against the byte cap, so a URL that names a
whole bucket prefix is refused instead of downloaded. The spool is bounded too
(`wsi.ingest.spool`): a copy reserves its full size before it downloads, and is refused with
`SpoolFull` (transient: the copy is made later) when the spool would exceed its quota.
Everything written here is private to the service's user and group (`wsi.store.objects.FILE_MODE`,
`DIR_MODE`), whatever the umask: staged slides are patient data.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from wsi.errors import InvalidArgument, SlideNotFound, StoreError, WsiError
from wsi.ingest.spool import copy_folder, reserve_waiting
from wsi.slide_id import SlideFile, hash_order, hash_slide_files
from wsi.slidefiles import companion_folder, sidecar_names
from wsi.store.objects import (
    DIR_MODE,
    FILE_MODE,
    StoreSettings,
    _s3_options,
    make_dirs,
    store_failures,
)

STAGE_SHARE = 0.15
"""Of a conversion whose source is downloaded first, the share of its progress the download
takes (the pyramid takes the rest)."""
CHUNK_BYTES = 8 * 1024 * 1024
"""Bytes read and written at a time while staging: the memory a download holds."""
MAX_KEY_BYTES = 1024
"""S3's limit on a key, in UTF-8 bytes."""
MAX_NAME_BYTES = 255
"""A path segment longer than this cannot become a local file name."""

_SCHEME = "s3://"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4 = re.compile(r"\d{1,3}(\.\d{1,3}){3}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes in all) while a slide is staged."""

_GiB = 1 << 30
MAX_SOURCE_OBJECTS = 10_000
"""Objects one staged source may have. A DICOM series has one object per level and associated
image (tens), a MIRAX folder its index and data files (tens to hundreds); a URL with more names
a bucket prefix, not a slide."""
MAX_SOURCE_BYTES = 50 * _GiB
"""Bytes one staged source may have. The converter accepts base levels up to 10^11 pixels
(`ConvertSettings.max_pixels`); scanners store their JPEG or JPEG 2000 pyramids in 0.1-0.3 bytes
per base pixel, so the largest slide it converts takes 10-30 GB: 50 GiB leaves room for a
lightly compressed one."""
SPOOL_QUOTA_BYTES = 2 * MAX_SOURCE_BYTES
"""Bytes the spool may hold at once: one largest source being converted while the next one is
already copied."""


_SETTING = {
    "max_objects": "--max-source-objects (WSI_MAX_SOURCE_OBJECTS)",
    "max_bytes": "--max-source-bytes (WSI_MAX_SOURCE_BYTES)",
    "spool_quota": "--spool-quota-bytes (WSI_SPOOL_QUOTA_BYTES)",
}
"""How a user sets each limit: the flag (`wsi convert`, the ingest roles) and the variable (the
ingest roles). Errors named the field (`max_bytes`), or only the variable, which `wsi convert`
does not read."""


@dataclass(frozen=True)
class StagingLimits:
    """How much one staged source, and the spool as a whole, may take (see the module doc)."""

    max_objects: int = MAX_SOURCE_OBJECTS
    """Objects of one source (a folder or companion-folder slide)."""
    max_bytes: int = MAX_SOURCE_BYTES
    """Bytes of one source, its sidecar included."""
    spool_quota: int = SPOOL_QUOTA_BYTES
    """Bytes of every copy in the spool together, reserved in full when a copy starts."""

    def __post_init__(self) -> None:
        for name in ("max_objects", "max_bytes", "spool_quota"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgument(f"{_SETTING[name]} must be a positive integer")
        if self.max_bytes > self.spool_quota:
            # A source that fits no spool would wait for room for ever.
            raise InvalidArgument(
                f"the largest source must fit the spool quota ({_SETTING['max_bytes']} <= "
                f"{_SETTING['spool_quota']})"
            )


def is_remote(source: str) -> bool:
    """Whether `source` names an object in S3 (`s3://...`) rather than a local path."""
    return source[: len(_SCHEME)].lower() == _SCHEME


def _show(text: str, limit: int = 120) -> str:
    # User input goes back into error messages (and HTTP responses): quoted, escaped, bounded.
    return ascii(text if len(text) <= limit else text[:limit] + "...")


def _check_name(name: str, what: str) -> None:
    """`/`-separated name that can become a local path below a folder: no empty, `.` or `..`
    segments (no way up or out), no control characters, segments a file system accepts."""
    if _CONTROL.search(name):
        raise InvalidArgument(f"{what} {_show(name)} contains control characters")
    for segment in name.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidArgument(f"{what} {_show(name)} has an empty, '.' or '..' segment")
        if len(segment.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise InvalidArgument(f"{what} {_show(name)} has a segment over {MAX_NAME_BYTES} bytes")


def _check_bucket(bucket: str) -> None:
    if (
        not _BUCKET.fullmatch(bucket)
        or ".." in bucket
        or ".-" in bucket
        or "-." in bucket
        or _IPV4.fullmatch(bucket)
    ):
        raise InvalidArgument(
            f"invalid bucket name {_show(bucket)}: 3-63 lower-case letters, digits, dots and "
            "hyphens, starting and ending with a letter or digit"
        )


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key), or InvalidArgument saying what is wrong.

    The key is taken literally (no percent-decoding; `?` and `#` are key characters in S3). A
    trailing `/` is kept: it makes the URL a folder (prefix) slide.
    """
    if not isinstance(url, str) or not url.startswith(_SCHEME):
        shown = _show(url) if isinstance(url, str) else type(url).__name__
        raise InvalidArgument(f"not an s3:// URL: {shown}")
    bucket, slash, key = url[len(_SCHEME) :].partition("/")
    _check_bucket(bucket)
    if not slash or not key:
        raise InvalidArgument(f"s3 URL needs an object key: s3://{bucket}/<key>, not {_show(url)}")
    try:
        key_bytes = len(key.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"object key {_show(key)} is not valid Unicode") from exc
    if key_bytes > MAX_KEY_BYTES:
        raise InvalidArgument(f"object key is {key_bytes} bytes; S3 allows {MAX_KEY_BYTES}")
    _check_name(key[:-1] if key.endswith("/") else key, "object key")
    if "?versionId=" in key:
        # s3fs would read the rest as an object version, not as part of the key.
        raise InvalidArgument(f"object key {_show(key)} contains '?versionId='")
    return bucket, key


def strictly_below(bucket: str, key: str, prefix: str) -> bool:
    """Whether the object `key` of `bucket` (as `parse_s3_url` gives them) lies strictly below
    the `s3://bucket[/prefix]` URL `prefix`. The prefix itself (with or without its slash) is
    never accepted: as a folder slide it would be every object under it."""
    p_bucket, _, p_key = prefix[len(_SCHEME) :].partition("/")
    p_key = p_key.strip("/")
    if bucket != p_bucket or (p_key and not key.startswith(p_key + "/")):
        return False
    return key[len(p_key) :].strip("/") != ""


def _filesystem(endpoint_url: str | None) -> Any:
    import fsspec  # here: a local conversion, which imports this module, reads no S3 source

    # The store's options: endpoint, no listing cache, bounded timeouts, AWS_* credentials.
    return fsspec.filesystem("s3", **_s3_options(StoreSettings(_SCHEME, endpoint_url=endpoint_url)))


@contextlib.contextmanager
def _s3_errors(url: str) -> Iterator[None]:
    """s3fs/botocore/aiohttp failures as library errors: missing -> SlideNotFound, anything else
    (network, credentials, server) -> StoreError, which ingest treats as transient."""
    try:
        yield
    except WsiError:
        raise
    except FileNotFoundError as exc:
        raise SlideNotFound(f"no such object {url}") from exc
    except store_failures() as exc:
        raise StoreError(f"cannot read {url}: {type(exc).__name__}: {exc}") from exc


def _mtime(info: dict[str, Any]) -> float | None:
    """An object's LastModified as epoch seconds (s3fs gives a datetime), or None."""
    stamp = info.get("LastModified")
    return float(stamp.timestamp()) if isinstance(stamp, datetime) else None


def _list_objects(fs: Any, bucket: str, prefix: str, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` + 1 objects whose keys start with `prefix` (one past the cap tells that
    there are too many, without listing a million keys first)."""

    async def collect() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        async for info in fs._iterdir(bucket, max_items=limit + 1, delimiter="", prefix=prefix):
            found.append(info)
        return found

    import fsspec.asyn

    return list(fsspec.asyn.sync(fs.loop, collect))


def _list_under(
    fs: Any, bucket: str, prefix: str, name_prefix: str, limits: StagingLimits
) -> list[SlideFile]:
    """Every object under `prefix` (ending in `/`), named `name_prefix` + its path below it;
    InvalidArgument past `limits.max_objects`."""
    root = f"{bucket}/{prefix}"
    found = _list_objects(fs, bucket, prefix, limits.max_objects)
    if len(found) > limits.max_objects:
        raise InvalidArgument(
            f"{_show('s3://' + root)} holds over {limits.max_objects} objects: not one slide"
        )
    files = []
    for info in found:
        path = str(info.get("name", ""))
        # Zero-byte folder markers (`.../`) are not part of the folder.
        if info.get("type") != "file" or not path.startswith(root) or path.endswith("/"):
            continue
        rel = path[len(root) :]
        _check_name(rel, f"object name under s3://{root}:")
        files.append(
            SlideFile(path=path, name=name_prefix + rel, size=int(info["size"]), mtime=_mtime(info))
        )
    return sorted(files, key=lambda f: hash_order(f.name))


def _check_layout(files: list[SlideFile]) -> None:
    # `a` and `a/b` can both be objects, but not both local files.
    names = {f.name for f in files}
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in names:
                raise InvalidArgument(f"object {_show(name)} lies below another object")


def _remote_slide_files(fs: Any, bucket: str, key: str, limits: StagingLimits) -> list[SlideFile]:
    """The slide's objects, named and ordered as `local_slide_files` names its staged copy;
    InvalidArgument when they are more or larger than `limits` allow."""
    url = f"s3://{bucket}/{key}"
    if key.endswith("/"):
        files = _list_under(fs, bucket, key, "", limits)
        if not files:
            raise SlideNotFound(f"no such object {url} (no objects under this prefix)")
    else:
        info = fs.info(f"{bucket}/{key}")
        if info.get("type") != "file":
            raise SlideNotFound(f"no such object {url} (a folder slide's URL ends with /)")
        parent, _, name = key.rpartition("/")
        files = [
            SlideFile(
                path=f"{bucket}/{key}",
                name=name,
                size=int(info["size"]),
                main=True,
                mtime=_mtime(info),
            )
        ]
        companion = companion_folder(name)
        if companion:
            prefix = f"{parent}/{companion}/" if parent else f"{companion}/"
            files += _list_under(fs, bucket, prefix, f"{companion}/", limits)
            if len(files) > limits.max_objects:
                raise InvalidArgument(f"{_show(url)} has over {limits.max_objects} objects")
    _check_size(url, sum(f.size for f in files), limits)
    _check_layout(files)
    return files


def _check_size(url: str, total: int, limits: StagingLimits) -> None:
    if total > limits.max_bytes:
        raise InvalidArgument(
            f"{_show(url)} holds {total} bytes, over the {limits.max_bytes}-byte limit of one "
            f"source ({_SETTING['max_bytes']})"
        )


def remote_slide_id(
    url: str, endpoint_url: str | None = None, limits: StagingLimits | None = None
) -> str:
    """The id `content_slide_id` gives the staged copy of the slide at `url`, from ranged reads:
    a 20 GB object costs a few MiB of traffic, not a download. InvalidArgument when the source
    is over `limits` (default `StagingLimits()`): it would never be staged."""
    bucket, key = parse_s3_url(url)
    with _s3_errors(url):
        fs = _filesystem(endpoint_url)
        files = _remote_slide_files(fs, bucket, key, limits or StagingLimits())
        from wsi.store.obstore_s3 import bucket_range_reader

        return hash_slide_files(fs, files, bucket_range_reader(endpoint_url))


def _sidecar(fs: Any, bucket: str, key: str) -> SlideFile | None:
    """The metadata JSON beside the slide, under the names `wsi.slidefiles.sidecar_path` tries,
    named as it must lie beside the staged slide."""
    slide_key = key.rstrip("/")
    parent, _, name = slide_key.rpartition("/")
    for candidate in sidecar_names(name):
        path = f"{bucket}/{parent}/{candidate}" if parent else f"{bucket}/{candidate}"
        with _s3_errors(f"s3://{path}"):
            try:
                info = fs.info(path)
            except FileNotFoundError:
                continue
        if info.get("type") == "file":
            return SlideFile(path=path, name=candidate, size=int(info["size"]))
    return None


def _download(
    fs: Any, file: SlideFile, dest: Path, report: Callable[[int], None], chunk: int
) -> None:
    """Stream one object to `dest`, `chunk` bytes at a time."""
    url = f"s3://{file.path}"
    try:
        make_dirs(str(dest.parent))
        out = os.fdopen(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE), "wb")
    except OSError as exc:
        raise StoreError(f"cannot write the staged copy of {url} ({dest}): {exc}") from exc
    done = 0
    with out:
        with _s3_errors(url):
            src = fs.open(file.path, "rb", block_size=chunk, cache_type="none")
        with src:
            while True:
                with _s3_errors(url):
                    block = src.read(chunk)
                if not block:
                    break
                try:
                    out.write(block)
                except OSError as exc:
                    raise StoreError(f"cannot write the staged copy of {url}: {exc}") from exc
                done += len(block)
                report(len(block))
    if done != file.size:
        raise StoreError(f"{url} changed while it was staged ({done} of {file.size} bytes)")
    if file.mtime is not None:
        with contextlib.suppress(OSError):
            os.utime(dest, (file.mtime, file.mtime))


def stage_into(
    url: str,
    dest: Path,
    endpoint_url: str | None = None,
    progress: Progress | None = None,
    *,
    chunk_bytes: int = CHUNK_BYTES,
    limits: StagingLimits | None = None,
    spool: Path | None = None,
    headroom: int = 0,
    waiting: Callable[[], None] | None = None,
) -> Path:
    """Download the slide at `url` (and its sidecar JSON, if any) into the existing empty folder
    `dest`, laid out under the objects' own names; returns the local slide path (a file, or a
    folder for a folder slide). The caller owns `dest` and removes it; see `staged`.

    `content_slide_id` of the copy equals `remote_slide_id(url)`, the metadata sidecar is found as
    beside a scanner's output, and each file keeps its object's modification time (DICOM dates
    fall back to it). Memory stays at `chunk_bytes` per download whatever the slide's size.

    Before the first byte, the source is checked against `limits` (InvalidArgument: it can never
    be staged) and its size reserved in `spool` (the folder whose total the quota caps; default
    `dest`'s parent), leaving `headroom` bytes of the quota free. When there is no room:
    SpoolFull, or, with `waiting`, call it and look again every `ROOM_POLL_SECONDS` (the copies
    that hold the room belong to running conversions, which end).
    """
    bucket, key = parse_s3_url(url)
    limits = limits or StagingLimits()
    if chunk_bytes <= 0:
        raise InvalidArgument(f"chunk_bytes must be positive, not {chunk_bytes}")
    source = _listed_source(url, bucket, key, endpoint_url, limits)
    root = dest.resolve()
    quota = limits.spool_quota - headroom
    reserve_waiting(spool or root.parent, root, source.total, quota, waiting)
    slide = root / key.rstrip("/").rpartition("/")[2]
    try:
        if key.endswith("/"):
            slide.mkdir(DIR_MODE)
    except OSError as exc:
        raise StoreError(f"cannot write the staged copy of {url} ({dest}): {exc}") from exc
    _copy_source(source, root, slide if key.endswith("/") else root, progress, chunk_bytes)
    return slide


@dataclass(frozen=True)
class _ListedSource:
    """A slide's objects in S3 and its sidecar, listed and checked against the limits: what a
    staged copy downloads."""

    fs: Any
    files: tuple[SlideFile, ...]
    sidecar: SlideFile | None
    total: int
    """Bytes of the files and the sidecar: the room reserved, and the progress's whole."""


def _listed_source(
    url: str, bucket: str, key: str, endpoint_url: str | None, limits: StagingLimits
) -> _ListedSource:
    """List the slide at `url` and its sidecar; InvalidArgument over `limits`."""
    with _s3_errors(url):
        fs = _filesystem(endpoint_url)
        files = _remote_slide_files(fs, bucket, key, limits)
    sidecar = _sidecar(fs, bucket, key)
    total = sum(f.size for f in files) + (sidecar.size if sidecar else 0)
    _check_size(url, total, limits)
    return _ListedSource(fs, tuple(files), sidecar, total)


def _copy_source(
    source: _ListedSource, root: Path, base: Path, progress: Progress | None, chunk_bytes: int
) -> None:
    """Download the slide's objects under `base` (their names are relative to it) and the
    sidecar into `root`, telling `progress` the bytes done; a name that would land outside
    `root` is refused before its download."""
    done = 0

    def report(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, source.total)

    if progress is not None:
        progress(0, source.total)
    for file in source.files:
        target = base / file.name
        # The names were checked; this guards the rule itself.
        if not target.resolve().is_relative_to(root):
            raise InvalidArgument(f"object {_show(file.name)} would land outside the spool")
        _download(source.fs, file, target, report, chunk_bytes)
    if source.sidecar is not None:
        _download(source.fs, source.sidecar, root / source.sidecar.name, report, chunk_bytes)


@contextlib.contextmanager
def staged(
    url: str,
    endpoint_url: str | None = None,
    spool_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    *,
    chunk_bytes: int = CHUNK_BYTES,
    limits: StagingLimits | None = None,
    waiting: Callable[[], None] | None = None,
) -> Iterator[Path]:
    """A local copy of the slide at `url` (see `stage_into`) for as long as the `with` block
    runs, in a fresh folder inside `spool_dir` (default: the system temp folder), whose quota it
    shares; yields the local slide path. The folder is removed afterwards, also on error.
    """
    parse_s3_url(url)  # a bad URL fails before anything is created
    spool = Path(spool_dir if spool_dir is not None else tempfile.gettempdir())
    try:
        make_dirs(str(spool))
        root = copy_folder(spool)
    except OSError as exc:
        raise StoreError(f"cannot create a spool folder in {spool}: {exc}") from exc
    try:
        yield stage_into(
            url,
            root,
            endpoint_url,
            progress,
            chunk_bytes=chunk_bytes,
            limits=limits,
            spool=spool,
            waiting=waiting,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
