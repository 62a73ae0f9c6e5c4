"""Stable, opaque slide ids derived from the source's content.

Hashing every byte of a 20 GB slide would cost more than converting it, so large files are
sampled: size, the first and last MiB (TIFF/DICOM headers and directories live there), and 64
evenly spaced 64 KiB blocks. Two different scans never share all of these; the same file copied
or renamed keeps its id. Multi-file slides (a DICOM series folder, MIRAX .mrxs + folder) hash each
file with its relative name.

The hashing reads through any fsspec filesystem, so a slide in S3 gets, with a few ranged reads,
the id its downloaded copy would get (`wsi.ingest.staging.remote_slide_id`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from wsi.slidefiles import companion_folder, dicom_series_files, is_dicom_file

_FULL_LIMIT = 64 * 1024 * 1024
_EDGE = 1024 * 1024
_SAMPLES = 64
_SAMPLE = 64 * 1024
_READ = 8 * 1024 * 1024
"""Read size while hashing a small file whole: few requests on S3, little memory."""
VERSION = b"wsistore-slide-id-1"

RangeReader = Callable[[str, Sequence[tuple[int, int]]], list[bytes]]
"""Reads several [start, end) ranges of one file (by its `SlideFile.path`) at once: on S3 one
concurrent call instead of one round trip per sample (`wsi.store.obstore_s3`)."""


def sample_spans(size: int) -> list[tuple[int, int]]:
    """The [start, end) byte ranges hashed of a file of `size` bytes over `_FULL_LIMIT`, in
    hash order: the first MiB, `_SAMPLES` evenly spaced blocks, the last MiB."""
    step = size - 2 * _EDGE - _SAMPLE
    blocks = [_EDGE + step * i // (_SAMPLES - 1) for i in range(_SAMPLES)]
    return [(0, _EDGE), *((b, b + _SAMPLE) for b in blocks), (size - _EDGE, size)]


@dataclass(frozen=True)
class SlideFile:
    """One file of a slide: where to read it, and the name its content is hashed under."""

    path: str
    """Where the filesystem finds it: a local path, or `bucket/key` for s3fs."""
    name: str
    """Relative to the slide folder (folder slides) or to the folder holding the slide file
    (a slide file and its MIRAX companion folder), `/`-separated. A local copy laid out under
    these names has the same id."""
    size: int
    """Bytes."""
    main: bool = False
    """The slide file of a file slide: hashed without its name, so a renamed copy keeps its id."""
    mtime: float | None = field(default=None, compare=False)
    """Last modified (seconds since the epoch), where known; not hashed. A staged copy keeps
    it, since DICOM dates fall back to it: the same object converts to the same bytes."""

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"negative size for {self.name}")


def hash_order(name: str) -> tuple[str, ...]:
    """Sort key for relative names: segment by segment, the order `sorted(list of Path)` gives
    (plain string order would put `a-b` before `a/c` and change multi-file ids)."""
    return tuple(name.split("/"))


def _read_exact(f: IO[bytes], n: int) -> bytes:
    # Remote files may hand back a short read; the hash must see the same bytes as locally.
    parts: list[bytes] = []
    while n > 0:
        block = f.read(n)
        if not block:
            break
        parts.append(block)
        n -= len(block)
    return b"".join(parts)


class Opener(Protocol):
    """What the hashing reads files through: an fsspec filesystem (s3fs for `s3://` sources)
    or `LocalFiles`."""

    def open(self, path: str, mode: str = "rb", **options: Any) -> Any: ...


class LocalFiles:
    """Local files, opened plainly: a local slide is hashed without importing fsspec (~0.05 s
    of CPU with the asyncio and ssl it imports). fsspec's options do not apply."""

    def open(self, path: str, mode: str = "rb", **options: Any) -> IO[bytes]:
        return open(path, "rb")


def _hash_file(
    h: hashlib._Hash,
    fs: Opener,
    path: str,
    size: int,
    read_ranges: RangeReader | None = None,
) -> None:
    h.update(size.to_bytes(8, "little"))
    if read_ranges is not None and size > _FULL_LIMIT:
        for part in read_ranges(path, sample_spans(size)):
            h.update(part)
        return
    # No read-ahead cache: every read is one ranged request on S3, so a sampled 20 GB file costs
    # 66 small reads instead of 66 block-sized ones.
    with fs.open(path, "rb", block_size=_EDGE, cache_type="none") as f:
        if size <= _FULL_LIMIT:
            done = 0
            while done < size:
                block = _read_exact(f, min(_READ, size - done))
                if not block:
                    break
                h.update(block)
                done += len(block)
            return
        for start, end in sample_spans(size):
            f.seek(start)
            h.update(_read_exact(f, end - start))


def hash_slide_files(
    fs: Opener, files: Iterable[SlideFile], read_ranges: RangeReader | None = None
) -> str:
    """The id of a slide made of `files` (in the order `local_slide_files` gives), read via `fs`,
    the samples of large files through `read_ranges` when given."""
    h = hashlib.sha256(VERSION)
    for file in files:
        h.update(b"" if file.main else file.name.encode())
        _hash_file(h, fs, file.path, file.size, read_ranges)
    return h.hexdigest()[:24]


def slide_files(path: Path) -> list[Path]:
    """Every file hashed into the id of the slide at `path`: a folder's files, or the slide file
    and the files of its companion folder (`wsi.slidefiles.companion_folder`), if present."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    files = [path]
    folder = companion_folder(path.name)
    if folder is not None and path.with_name(folder).is_dir():
        files += sorted(p for p in path.with_name(folder).rglob("*") if p.is_file())
    return files


def local_slide_files(path: str | os.PathLike[str]) -> list[SlideFile]:
    """The files of the local slide at `path` with their hashed names, in hash order."""
    path = Path(path)
    series = _series_of_instance(path)
    if series is not None:
        return sorted(
            (
                SlideFile(path=str(f), name=f.name, size=f.stat().st_size)
                for f in dict.fromkeys(series)
            ),
            key=lambda f: hash_order(f.name),
        )
    folder = path.is_dir()
    base = path if folder else path.parent
    return [
        SlideFile(
            path=str(file),
            name=file.relative_to(base).as_posix(),
            size=file.stat().st_size,
            main=not folder and file == path,
        )
        for file in slide_files(path)
    ]


def _series_of_instance(path: Path) -> list[Path] | None:
    """The instances of the DICOM series `path` is one of, when others lie beside it: the
    files its conversion reads (`wsi.slidefiles.dicom_series_files`), so every instance of a
    series names the same slide (`wsi convert series/*.dcm` made one copy per instance, each
    under the id of its own file). Hashed with their names, as a series folder's files are: a
    folder holding only the series has the same id. None for anything else, a lone instance
    included (its id stays that of its file, as the staged copy of one S3 object has it)."""
    if not path.is_file() or not is_dicom_file(path):
        return None
    files = dicom_series_files(path)
    return files if len(files) > 1 else None


def content_slide_id(path: str | os.PathLike[str]) -> str:
    """A 24-hex-digit id (96 bits) for the slide's content."""
    return hash_slide_files(LocalFiles(), local_slide_files(path))
