"""What a power cut or a DICOM editor can do to a published slide: every object and folder is
durable (fsynced) before the manifest that lists it is renamed into place; files we write are
never world-readable whatever the umask; an exported DICOM file is a copy, not the stored
object (a hard link let an in-place editor truncate the store's shard)."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

import wsi
import wsi.export
from wsi.export import export_dicom

from .conftest import make_tiff


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, str]]]:
    """Record (call, path) for every fsync and rename, calling the real ones."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        real_replace(src, dst)
        events.append(("rename", os.path.abspath(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    yield events


def test_objects_and_folders_are_durable_before_the_manifest(
    tmp_path: Path, spy: list[tuple[str, str]]
) -> None:
    source = make_tiff(tmp_path / "s.tif", 900, 700)
    root = tmp_path / "store"
    sid = wsi.convert_slide(source, wsi.Store(wsi.StoreSettings(str(root)))).slide_id
    manifest = root / sid / "manifest.json"
    commit = spy.index(("rename", str(manifest)))
    before = spy[:commit]
    listed = json.loads(manifest.read_text())["objects"]
    assert listed
    for key in listed:
        path = str(root / sid / key)
        renamed = before.index(("rename", path))
        # The file's data was flushed before its rename, and its folder after it.
        assert any(e[0] == "fsync" and e[1].startswith(path) for e in before[:renamed]), key
        assert ("fsync", os.path.dirname(path)) in before[renamed:], key
    # The manifest itself is durable once written (the caller may delete the source next).
    assert ("fsync", str(root / sid)) in spy[commit:]


def test_files_are_not_world_readable_whatever_the_umask(tmp_path: Path) -> None:
    source = make_tiff(tmp_path / "s.tif", 900, 700)
    root = tmp_path / "fresh" / "store"  # folders that do not exist yet are made too
    old = os.umask(0)
    try:
        sid = wsi.convert_slide(source, wsi.Store(wsi.StoreSettings(str(root)))).slide_id
        exported = export_dicom(wsi.Store(wsi.StoreSettings(str(root))), sid, tmp_path / "dcm")
    finally:
        os.umask(old)
    paths = [root, *root.rglob("*"), *exported]
    assert len(paths) > 10
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o007 == 0, f"{path} is {oct(mode)}"


def test_an_export_is_private_from_its_first_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another local user who opens an exported file while it is copied keeps that access, so
    the file must be private before its first byte, and so must the folders made for it."""
    source = make_tiff(tmp_path / "s.tif", 900, 700)
    store = wsi.Store(wsi.StoreSettings(str(tmp_path / "store")))
    sid = wsi.convert_slide(source, store).slide_id
    seen: list[int] = []
    real_copy = shutil.copyfileobj

    def no_clone(*args: object) -> None:
        raise OSError("no reflinks here")  # the copy path, on any file system

    def copy(fin: IO[bytes], fout: IO[bytes], length: int = 0) -> None:
        seen.append(stat.S_IMODE(os.fstat(fout.fileno()).st_mode))
        real_copy(fin, fout, length)

    monkeypatch.setattr(wsi.export.fcntl, "ioctl", no_clone)
    monkeypatch.setattr(wsi.export.shutil, "copyfileobj", copy)
    dest = tmp_path / "new" / "dcm"
    old = os.umask(0)
    try:
        exported = export_dicom(store, sid, dest)
    finally:
        os.umask(old)
    assert len(seen) == len(exported) > 1
    assert all(mode & 0o007 == 0 for mode in seen), [oct(m) for m in seen]
    for path in (tmp_path / "new", dest, *exported):
        assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0, path
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in exported)


def test_an_exported_file_edited_in_place_leaves_the_store_intact(tmp_path: Path) -> None:
    source = make_tiff(tmp_path / "s.tif", 900, 700)
    store = wsi.Store(wsi.StoreSettings(str(tmp_path / "store")))
    sid = wsi.convert_slide(source, store).slide_id
    exported = export_dicom(store, sid, tmp_path / "dcm")
    level0 = next(p for p in exported if p.name == "level-0.dcm")
    stored = tmp_path / "store" / sid / "slide.zarr" / "0" / "c" / "0" / "0" / "0"
    before = stored.read_bytes()
    assert level0.read_bytes() == before
    assert level0.stat().st_ino != stored.stat().st_ino
    with open(level0, "r+b") as f:  # what an in-place DICOM editor does
        f.truncate(1000)
    assert stored.read_bytes() == before
    with wsi.open_published(str(tmp_path / "store" / sid)) as slide:
        assert slide.tile(0, 0, 0).shape == (256, 256, 3)


def test_done_and_quarantine_folders_a_deployment_made_are_made_private(tmp_path: Path) -> None:
    """`--done-dir` and `--quarantine-dir` made beforehand, 0755 as `mkdir` makes them: every
    local user could list the slides moved there, named as the scanner named them (often a
    patient's name). The service takes others' permissions away when it makes its state."""
    from wsi.ingest.settings import IngestSettings

    done, quarantine = tmp_path / "done", tmp_path / "quarantine"
    for folder in (done, quarantine):
        folder.mkdir()
        folder.chmod(0o755)
    settings = IngestSettings(
        state_dir=str(tmp_path / "state"), done_dir=str(done), quarantine_dir=str(quarantine)
    )
    settings.make_state(str(tmp_path / "store"))
    for folder in (done, quarantine):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o750, folder
    IngestSettings(state_dir=str(tmp_path / "other")).make_state(str(tmp_path / "store"))
    assert not (tmp_path / "other" / "done").exists()  # made when first used, as before
