"""`export-dicom`: a slide's DICOM view as a flat folder of `.dcm` files, without re-encoding.

Each stored level object already is a DICOM Part 10 file, so on a local store the export is a
folder of hard links to the very same bytes (a copy only when the folder is on another file
system); from S3 the objects are downloaded as they are. OpenSlide and wsidicom open the folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from wsi.errors import InvalidArgument
from wsi.store.objects import Store, StoreSettings, check_slide_id


def split_slide_location(location: str) -> tuple[str, str]:
    """`OUT/<slide-id>` or `s3://bucket/prefix/<slide-id>` -> (store URL, slide id)."""
    trimmed = location.rstrip("/")
    if "/" not in trimmed:
        trimmed = f"./{trimmed}"
    root, slide_id = trimmed.rsplit("/", 1)
    if not root or root.endswith(":/"):
        raise InvalidArgument(f"{location!r} does not name a slide folder (STORE/<slide-id>)")
    return root, check_slide_id(slide_id)


def export_dicom(store: Store, slide_id: str, dest: Path) -> list[Path]:
    """Write the slide's DICOM instances into `dest` as `<flavor>[-<level>].dcm`."""
    manifest = store.read_manifest(slide_id)
    instances = manifest.get("dicom") or []
    if not instances:
        raise InvalidArgument(f"slide {slide_id} has no DICOM view (converted with --format zarr)")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for inst in instances:
        key = f"{slide_id}/{inst['key']}"
        flavor = str(inst["flavor"]).lower()
        name = f"level-{inst['level']}.dcm" if flavor == "volume" else f"{flavor}.dcm"
        target = dest / name
        tmp = dest / f".{name}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if store.settings.is_s3:
            store.fs.get_file(store.path(key), str(tmp))
        else:
            try:
                os.link(store.path(key), tmp)  # the same inode: zero copies
            except OSError:
                shutil.copyfile(store.path(key), tmp)
        os.replace(tmp, target)
        written.append(target)
    return written


def export_dicom_location(
    location: str, dest: str | Path, endpoint_url: str | None = None
) -> list[Path]:
    root, slide_id = split_slide_location(location)
    return export_dicom(Store(StoreSettings(root, endpoint_url=endpoint_url)), slide_id, Path(dest))
