"""Stable, opaque slide ids derived from the source's content.

Hashing every byte of a 20 GB slide would cost more than converting it, so large files are
sampled: size, the first and last MiB (TIFF/DICOM headers and directories live there), and 64
evenly spaced 64 KiB blocks. Two different scans never share all of these; the same file copied
or renamed keeps its id. Multi-file slides (a DICOM series folder, MIRAX .mrxs + folder) hash each
file with its relative name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_FULL_LIMIT = 64 * 1024 * 1024
_EDGE = 1024 * 1024
_SAMPLES = 64
_SAMPLE = 64 * 1024
VERSION = b"wsistore-slide-id-1"


def _hash_file(h: hashlib._Hash, path: Path) -> None:
    size = path.stat().st_size
    h.update(size.to_bytes(8, "little"))
    with path.open("rb") as f:
        if size <= _FULL_LIMIT:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return
        h.update(f.read(_EDGE))
        for i in range(_SAMPLES):
            f.seek(_EDGE + (size - 2 * _EDGE - _SAMPLE) * i // (_SAMPLES - 1))
            h.update(f.read(_SAMPLE))
        f.seek(size - _EDGE)
        h.update(f.read(_EDGE))


def slide_files(path: Path) -> list[Path]:
    """Every file that makes up the slide at `path` (a file, a folder, or MIRAX file + folder)."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    files = [path]
    companion = path.with_suffix("")
    if path.suffix.lower() in {".mrxs", ".vms", ".vmu"} and companion.is_dir():
        files += sorted(p for p in companion.rglob("*") if p.is_file())
    return files


def content_slide_id(path: str | os.PathLike[str]) -> str:
    """A 24-hex-digit id (96 bits) for the slide's content."""
    path = Path(path)
    h = hashlib.sha256(VERSION)
    base = path if path.is_dir() else path.parent
    for file in slide_files(path):
        rel = file.name if file == path else str(file.relative_to(base))
        h.update(rel.encode() if path.is_dir() or file != path else b"")
        _hash_file(h, file)
    return h.hexdigest()[:24]
