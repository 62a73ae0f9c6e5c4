"""`export-dicom`: a slide's DICOM view as a flat folder of `.dcm` files, without re-encoding.

Each stored level object already is a DICOM Part 10 file, so the export copies bytes as they
are: on a local store a copy-on-write clone where the file system can (btrfs, XFS: no data
copied) and a plain copy elsewhere; from S3 a download. Never a hard link: DICOM tools edit files
in place (dcmodify, anonymisers), and through a link they would truncate the stored object and
with it the Zarr index. OpenSlide and wsidicom open the folder.
The instances are those the manifest lists, so a slide published with `--format dicom` (no Zarr
metadata) exports too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from wsi.errors import InvalidArgument
from wsi.published.layout import SlideKeys
from wsi.store.objects import FILE_MODE, Store, StoreSettings, split_slide_location

__all__ = ["export_dicom", "export_dicom_location", "split_slide_location"]


def export_dicom(store: Store, slide_id: str, dest: Path) -> list[Path]:
    """Write the slide's DICOM instances into `dest` as `level-<k>.dcm`, `label.dcm`,
    `overview.dcm`, `thumbnail.dcm`."""
    manifest = store.manifest(slide_id)
    if not manifest.dicom:
        raise InvalidArgument(f"slide {slide_id} has no DICOM view (converted with --format zarr)")
    keys = SlideKeys(slide_id)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for inst in manifest.dicom:
        key = keys.in_store(inst.key)
        name = f"{inst.name}.dcm"
        target = dest / name
        tmp = dest / f".{name}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if store.settings.is_s3:
            store.fs.get_file(store.path(key), str(tmp))
        else:
            _clone_or_copy(store.path(key), tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, target)
        written.append(target)
    return written


_FICLONE = 0x40049409
"""Linux ioctl: make `dest` share `src`'s extents copy-on-write (btrfs, XFS, bcachefs)."""


def _clone_or_copy(src: str, dest: Path) -> None:
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
            return
        except OSError:  # not supported here (ext4, tmpfs, another file system): copy
            pass
        shutil.copyfileobj(fin, fout, 8 * 1024 * 1024)


def export_dicom_location(
    location: str, dest: str | Path, endpoint_url: str | None = None
) -> list[Path]:
    root, slide_id = split_slide_location(location)
    return export_dicom(Store(StoreSettings(root, endpoint_url=endpoint_url)), slide_id, Path(dest))
