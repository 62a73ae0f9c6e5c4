"""Many published slides from one: copies of a converted slide under other ids, its objects
hard-linked (no bytes copied), for tests and benchmarks of stores with thousands of slides."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from wsi.published.layout.manifest import Manifest, ObjectEntry, crc32c_hex


def copy_slide(store: Path, source_id: str, slide_id: str, name: str, case: str) -> None:
    """Another published slide with the same pixels (hard links) under `slide_id`, named
    `name` in case `case`. Its DICOM instances keep the source's UIDs (their headers are the
    same bytes)."""
    src, dst = store / source_id, store / slide_id
    shutil.copytree(src, dst, copy_function=os.link)
    root = dst / "slide.zarr" / "zarr.json"
    data = root.read_bytes().replace(source_id.encode(), slide_id.encode())
    root.unlink()  # a link to the source's: written anew, not through the link
    root.write_bytes(data)
    manifest = Manifest.from_bytes((src / "manifest.json").read_bytes())
    objects = {**manifest.objects, "slide.zarr/zarr.json": ObjectEntry(len(data), crc32c_hex(data))}
    copied = dataclasses.replace(manifest, slide_id=slide_id, objects=objects, name=name, case=case)
    (dst / "manifest.json").unlink()
    (dst / "manifest.json").write_bytes(copied.to_bytes())


def rename(store: Path, slide_id: str, name: str) -> None:
    """Publish `slide_id` again with another name (a new manifest, so a new version)."""
    path = store / slide_id / "manifest.json"
    manifest = dataclasses.replace(Manifest.from_bytes(path.read_bytes()), name=name)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(manifest.to_bytes())
    tmp.replace(path)
