"""`export-dicom`: a slide's DICOM view as a flat folder of `.dcm` files, without re-encoding.

Each stored level object already is a DICOM Part 10 file, so the export copies bytes as they
are: on a local store a copy-on-write clone where the file system can (btrfs, XFS: no data
copied) and a plain copy elsewhere; from S3 a download. Never a hard link: DICOM tools edit files
in place (dcmodify, anonymisers), and through a link they would truncate the stored object and
with it the Zarr index. OpenSlide and wsidicom open the folder.
The instances are those the manifest lists, so a slide published with `--format dicom` (no Zarr
metadata) exports too. An archived slide's instances are written in their JPEG form, byte for
byte what they were before the archive (`wsi.published.archive.JpegForm`): JPEG XL instances
are what no PACS or DICOM reader we know decodes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from wsi.errors import InvalidArgument, SlideNotFound, StoreError, WsiError
from wsi.published.archive import JpegForm
from wsi.published.layout import DicomInstanceEntry, SlideKeys
from wsi.store.objects import (
    FILE_MODE,
    Store,
    StoreSettings,
    check_folder,
    make_dirs,
    split_slide_location,
)

__all__ = ["export_dicom", "export_dicom_location", "split_slide_location"]


def export_dicom(store: Store, slide_id: str, dest: Path) -> list[Path]:
    """Write the slide's DICOM instances into `dest` as `level-<k>.dcm`, `label.dcm`,
    `overview.dcm`, `thumbnail.dcm`."""
    manifest = store.manifest(slide_id)
    if not manifest.dicom:
        raise InvalidArgument(f"slide {slide_id} has no DICOM view (converted with --format zarr)")
    keys = SlideKeys(slide_id)
    check_folder(str(dest), "destination", exists=False)
    _check_empty(dest)
    written: list[Path] = []
    try:
        _write_instances(store, keys, manifest.dicom, dest, written, JpegForm(store, manifest))
    except BaseException as exc:
        for path in written:  # half an export is not one: the folder was empty before
            with contextlib.suppress(OSError):
                path.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, WsiError):
            raise StoreError(f"cannot export into {dest}: {exc.strerror or exc}") from exc
        raise
    return written


def _check_empty(dest: Path) -> None:
    """InvalidArgument when `dest` holds anything: the files of an earlier export (another
    slide's, or this slide's before a re-conversion with fewer images or a de-identification)
    left beside the new ones would make one folder of two series, and keep the label or the
    patient's name an export without them was meant to drop."""
    try:
        with os.scandir(dest) as entries:
            if next(entries, None) is None:
                return
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"cannot read the destination {dest}: {exc.strerror or exc}") from exc
    raise InvalidArgument(
        f"destination {dest} is not empty: export into a new or empty folder (files of "
        "another export left beside this one would mix two series)"
    )


def _write_instances(
    store: Store,
    keys: SlideKeys,
    instances: Iterable[DicomInstanceEntry],
    dest: Path,
    written: list[Path],
    jpeg_form: JpegForm,
) -> None:
    """Copy each instance into `dest` (made here) under its export name (an archived one in
    its JPEG form), adding each file to `written` once it is complete."""
    make_dirs(str(dest))  # DIR_MODE, whatever the umask: the files hold patient data
    for inst in instances:
        key = keys.in_store(inst.key)
        name = f"{inst.name}.dcm"
        target = dest / name
        tmp = dest / f".{name}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        # Private from its first byte (a reader that opens it during the copy keeps its
        # access), and never a file someone else put there (O_EXCL: no link followed).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            with os.fdopen(fd, "wb") as fout:
                if jpeg_form.archived(inst.key):
                    jpeg_form.write(inst.key, fout)
                elif store.settings.is_s3:
                    with store.fs.open(store.path(key), "rb") as fin:
                        shutil.copyfileobj(fin, fout, COPY_CHUNK)
                else:
                    _clone_or_copy(store.path(key), fout)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        written.append(target)


COPY_CHUNK = 8 * 1024 * 1024
_FICLONE = 0x40049409
"""Linux ioctl: make `dest` share `src`'s extents copy-on-write (btrfs, XFS, bcachefs)."""


def _clone_or_copy(src: str, fout: IO[bytes]) -> None:
    with open(src, "rb") as fin:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
            return
        except OSError:  # not supported here (ext4, tmpfs, another file system): copy
            pass
        shutil.copyfileobj(fin, fout, COPY_CHUNK)


def export_dicom_location(
    location: str, dest: str | Path, endpoint_url: str | None = None
) -> list[Path]:
    """`export_dicom` of the slide `STORE/<slide-id>`. A store named instead of one of its
    slides is said to be one: read as a slide, it would be "slide <store's name> is not
    published"."""
    root, slide_id = split_slide_location(location)
    try:
        return export_dicom(
            Store(StoreSettings(root, endpoint_url=endpoint_url)), slide_id, Path(dest)
        )
    except SlideNotFound:
        if not Store(StoreSettings(location, endpoint_url=endpoint_url)).holds_slides():
            raise
        store = location.rstrip("/")
        raise InvalidArgument(
            f"{store} is a store, not a slide: name one of its slides, {store}/<slide id> "
            f"(`wsi list {store}` lists them)"
        ) from None
