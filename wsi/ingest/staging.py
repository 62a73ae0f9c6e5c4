"""Conversion sources in S3: an id by ranged reads, and a local copy for the readers.

OpenSlide and our other readers need local files, so a slide in a bucket is *staged*: streamed
in bounded chunks into a fresh folder in a spool directory, laid out as the scanner wrote it,
converted, then deleted. Its id comes from `remote_slide_id` without a download (the same sampled
hash as `content_slide_id`, through ranged reads), so a slide that is already published can be
skipped before any byte of it is copied.

Layout rules are those of `wsi.slide_id.slide_files`: a URL ending in `/` is a folder slide
(a DICOM series: every object under the prefix); a `.mrxs`/`.vms`/`.vmu` object also takes every
object under its companion prefix (the key without suffix + `/`); anything else is one object.

URLs come from HTTP requests, so they are checked strictly before anything is read, and so is
every listed object name before it becomes a local path. Errors never quote object content.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec

from wsi.errors import InvalidArgument, SlideNotFound, StoreError, WsiError
from wsi.slide_id import SlideFile, companion_folder, hash_order, hash_slide_files
from wsi.store.objects import STORE_FAILURES, StoreSettings, _s3_options

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


def _filesystem(endpoint_url: str | None) -> Any:
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
    except STORE_FAILURES as exc:
        raise StoreError(f"cannot read {url}: {type(exc).__name__}: {exc}") from exc


def _mtime(info: dict[str, Any]) -> float | None:
    """An object's LastModified as epoch seconds (s3fs gives a datetime), or None."""
    stamp = info.get("LastModified")
    return float(stamp.timestamp()) if isinstance(stamp, datetime) else None


def _list_under(fs: Any, bucket: str, prefix: str, name_prefix: str) -> list[SlideFile]:
    """Every object under `prefix` (ending in `/`), named `name_prefix` + its path below it."""
    root = f"{bucket}/{prefix}"
    found: dict[str, dict[str, Any]] = fs.find(root, detail=True)
    files = []
    for path, info in found.items():
        # find() also returns the object `prefix` without its slash, if one exists, and
        # zero-byte folder markers (`.../`): neither is part of the folder.
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


def _remote_slide_files(fs: Any, bucket: str, key: str) -> list[SlideFile]:
    """The slide's objects, named and ordered as `local_slide_files` names its staged copy."""
    url = f"s3://{bucket}/{key}"
    if key.endswith("/"):
        files = _list_under(fs, bucket, key, "")
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
            files += _list_under(fs, bucket, prefix, f"{companion}/")
    _check_layout(files)
    return files


def remote_slide_id(url: str, endpoint_url: str | None = None) -> str:
    """The id `content_slide_id` gives the staged copy of the slide at `url`, from ranged reads:
    a 20 GB object costs a few MiB of traffic, not a download."""
    bucket, key = parse_s3_url(url)
    with _s3_errors(url):
        fs = _filesystem(endpoint_url)
        return hash_slide_files(fs, _remote_slide_files(fs, bucket, key))


def _sidecar(fs: Any, bucket: str, key: str) -> SlideFile | None:
    """The metadata JSON beside the slide, under the names `wsi.metadata.sidecar_path` tries
    (`<slide>.json`, then `<stem>.json`), named as it must lie beside the staged slide."""
    slide_key = key.rstrip("/")
    parent, _, name = slide_key.rpartition("/")
    candidates = [name + ".json", PurePosixPath(name).with_suffix(".json").name]
    for candidate in dict.fromkeys(candidates):
        if candidate == name:
            continue
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
        dest.parent.mkdir(parents=True, exist_ok=True)
        out = dest.open("xb")
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
) -> Path:
    """Download the slide at `url` (and its sidecar JSON, if any) into the existing empty folder
    `dest`, laid out under the objects' own names; returns the local slide path (a file, or a
    folder for a folder slide). The caller owns `dest` and removes it; see `staged`.

    `content_slide_id` of the copy equals `remote_slide_id(url)`, the metadata sidecar is found as
    beside a scanner's output, and each file keeps its object's modification time (DICOM dates
    fall back to it). Memory stays at `chunk_bytes` per download whatever the slide's size.
    """
    bucket, key = parse_s3_url(url)
    if chunk_bytes <= 0:
        raise InvalidArgument(f"chunk_bytes must be positive, not {chunk_bytes}")
    with _s3_errors(url):
        fs = _filesystem(endpoint_url)
        files = _remote_slide_files(fs, bucket, key)
    sidecar = _sidecar(fs, bucket, key)
    total = sum(f.size for f in files) + (sidecar.size if sidecar else 0)
    root = dest.resolve()
    name = key.rstrip("/").rpartition("/")[2]
    slide = root / name
    base = slide if key.endswith("/") else root
    try:
        if key.endswith("/"):
            slide.mkdir()
    except OSError as exc:
        raise StoreError(f"cannot write the staged copy of {url} ({dest}): {exc}") from exc
    done = 0

    def report(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    for file in files:
        target = base / file.name
        # The names were checked; this guards the rule itself.
        if not target.resolve().is_relative_to(root):
            raise InvalidArgument(f"object {_show(file.name)} would land outside the spool")
        _download(fs, file, target, report, chunk_bytes)
    if sidecar is not None:
        _download(fs, sidecar, root / sidecar.name, report, chunk_bytes)
    return slide


@contextlib.contextmanager
def staged(
    url: str,
    endpoint_url: str | None = None,
    spool_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    *,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[Path]:
    """A local copy of the slide at `url` (see `stage_into`) for as long as the `with` block
    runs, in a fresh folder inside `spool_dir` (default: the system temp folder); yields the local
    slide path. The folder is removed afterwards, also on error.
    """
    parse_s3_url(url)  # a bad URL fails before anything is created
    try:
        spool = Path(spool_dir if spool_dir is not None else tempfile.gettempdir())
        spool.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-", dir=spool)).resolve()
    except OSError as exc:
        raise StoreError(f"cannot create a spool folder in {spool}: {exc}") from exc
    try:
        yield stage_into(url, root, endpoint_url, progress, chunk_bytes=chunk_bytes)
    finally:
        shutil.rmtree(root, ignore_errors=True)


_TEMP_PREFIX = "wsi-staged-"


def sweep_orphans(spool_dir: str | os.PathLike[str]) -> int:
    """Delete the temporary copies `staged` left in `spool_dir` when its process was killed
    (the folder names carry the process id; a live process's copy is left alone). Returns how
    many went. Meant for a service or worker starting up on this host."""
    removed = 0
    spool = Path(spool_dir)
    if not spool.is_dir():
        return 0
    for entry in spool.iterdir():
        if not entry.name.startswith(_TEMP_PREFIX):
            continue
        pid_text = entry.name[len(_TEMP_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
