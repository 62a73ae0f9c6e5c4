"""A conversion that fails without being killed (its source deleted mid-way, a store error at the
commit, Ctrl-C) removes what it wrote before it ends, on a local store and on S3: a slide whose
source is gone is never converted again, so nothing else would ever remove those objects (a
deleted slide's pixels, listed by no `wsi list`, `verify` or console). A published version is
never touched: a failed re-conversion leaves it served byte for byte. What a clean-up cannot
remove (the store is down) stays for the next run, behind the error that ended the conversion.

Failures are injected at fixed points, never by timing: the source is deleted from the progress
callback's first call (the conversion reads on through its open file and fails where it looks at
the file again, after the pyramid, as `wsi convert` did when `rm` came seconds after its start)."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import wsi
import wsi.convert
from wsi.convert import ConvertSettings, convert_slide
from wsi.errors import SlideBusy, StoreError
from wsi.pyramid import PyramidSettings
from wsi.slide_id import content_slide_id
from wsi.store.objects import LOCKS, Store, StoreSettings

from .conftest import make_tiff
from .helpers import empty_folders, run_wsi
from .s3server import SeaweedFS
from .s3server import seaweedfs as _seaweedfs_fixture  # noqa: F401

OTHER = ConvertSettings(PyramidSettings(quality=70, reuse_levels=False))
"""Settings other than the defaults: converting a published slide with them makes a version."""


@pytest.fixture
def slide(tmp_path: Path) -> Path:
    return make_tiff(tmp_path / "slide.tif", 1800, 1500)


def deleting(source: Path) -> Callable[[int, int], None]:
    """A progress callback that deletes `source` at its first call, tiles already written."""

    def progress(done: int, total: int) -> None:
        source.unlink(missing_ok=True)

    return progress


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (its path relative to `folder`: its bytes)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def objects(store: Store, slide_id: str) -> dict[str, bytes]:
    """Every object under the slide's folder, temporaries too (its key: its bytes)."""
    return {key: store.get(key) for key in store.list_keys(slide_id, include_temporary=True)}


def published_keys(store: Store, slide_id: str) -> list[str]:
    """The keys of the published version: its manifest and every object it lists."""
    listed = [f"{slide_id}/{key}" for key in store.manifest(slide_id).objects]
    return sorted([*listed, f"{slide_id}/manifest.json"])


def fail_manifest_writes(patch: pytest.MonkeyPatch, failure: BaseException) -> None:
    """Make every manifest's rename into place raise `failure` (a disk error at the commit, or
    Ctrl-C while the manifest is written): the objects are written, no version is published."""
    real = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if os.fspath(dst).endswith("/manifest.json"):
            raise failure
        real(src, dst)

    patch.setattr(os, "replace", replace)


def test_a_first_conversion_whose_source_is_deleted_leaves_nothing(
    slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clean-up runs holding the slide's lock: no other run of the slide is writing it."""
    root = tmp_path / "store"
    store = Store(StoreSettings(str(root)))
    sid = content_slide_id(slide)
    real_delete, locked = Store.delete_prefix, []

    def delete_prefix(self: Store, prefix: str) -> None:
        try:
            with self.slide_lock(sid):
                locked.append(False)
        except SlideBusy:
            locked.append(True)
        real_delete(self, prefix)

    monkeypatch.setattr(Store, "delete_prefix", delete_prefix)
    with pytest.raises(FileNotFoundError, match=r"slide\.tif"):
        convert_slide(slide, store, progress=deleting(slide))
    assert not (root / sid).exists(), sorted(files(root / sid))
    assert os.listdir(root) == [LOCKS] and os.listdir(root / LOCKS) == []
    assert locked and all(locked)


@pytest.mark.parametrize("failure", [OSError, KeyboardInterrupt])
def test_a_first_conversion_that_cannot_publish_leaves_nothing(
    slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: type[BaseException]
) -> None:
    """The manifest's write fails (a disk error), or Ctrl-C comes while it is written."""
    root = tmp_path / "store"
    store = Store(StoreSettings(str(root)))
    sid = content_slide_id(slide)
    fail_manifest_writes(monkeypatch, failure("at the commit (simulated)"))
    with pytest.raises(StoreError if failure is OSError else failure, match="at the commit"):
        convert_slide(slide, store)
    assert not (root / sid).exists(), sorted(files(root / sid))
    assert os.listdir(root) == [LOCKS]


@pytest.mark.parametrize("cause", ["source deleted", "manifest write failed"])
def test_a_failed_reconversion_leaves_the_published_version_byte_for_byte(
    slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cause: str
) -> None:
    """The new version fails after it is built: before the swap began (the staged manifest is
    its first step), so its staging folder goes and the old version stays served as it was."""
    root = tmp_path / "store"
    store = Store(StoreSettings(str(root)))
    sid = convert_slide(slide, store).slide_id
    before = files(root / sid)
    if cause == "source deleted":
        with pytest.raises(FileNotFoundError, match=r"slide\.tif"):
            convert_slide(slide, store, OTHER, progress=deleting(slide))
    else:
        with monkeypatch.context() as patch:
            fail_manifest_writes(patch, OSError(errno.ENOSPC, "No space left (simulated)"))
            with pytest.raises(StoreError, match="No space left"):
                convert_slide(slide, store, OTHER)
    assert files(root / sid) == before  # the manifest and every object, nothing more
    assert empty_folders(root / sid) == []
    checked = run_wsi("verify", str(root), sid)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with wsi.open_published(str(root / sid)) as published:
        assert published.tile(0, 0, 0).shape == (256, 256, 3)


def test_a_clean_up_that_fails_leaves_the_original_error_and_the_next_run_the_rest(
    slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store refuses the clean-up's deletions: the conversion still fails with the error
    that ended it, and the next conversion of the slide removes what was left and publishes."""
    root = tmp_path / "store"
    store = Store(StoreSettings(str(root)))
    kept = shutil.copyfile(slide, tmp_path / "kept.tif")
    sid = content_slide_id(slide)

    def delete_prefix(self: Store, prefix: str) -> None:
        raise StoreError(f"cannot delete {prefix}: the store is down (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(Store, "delete_prefix", delete_prefix)
        with pytest.raises(FileNotFoundError, match=r"slide\.tif"):
            convert_slide(slide, store, progress=deleting(slide))
    assert files(root / sid) and not store.is_published(sid)  # left for the next run

    shutil.copyfile(kept, slide)
    assert convert_slide(slide, store).slide_id == sid
    assert sorted(f"{sid}/{name}" for name in files(root / sid)) == published_keys(store, sid)


@pytest.mark.s3
def test_on_s3_a_failed_conversion_leaves_nothing_but_the_published_version(
    slide: Path, tmp_path: Path, seaweedfs: SeaweedFS
) -> None:
    url = seaweedfs.url(f"failed-{os.getpid()}")
    store = Store(StoreSettings(url, endpoint_url=seaweedfs.endpoint_url))
    kept = shutil.copyfile(slide, tmp_path / "kept.tif")
    sid = content_slide_id(slide)

    with pytest.raises(FileNotFoundError, match=r"slide\.tif"):
        convert_slide(slide, store, progress=deleting(slide))
    assert store.list_keys(sid, include_temporary=True) == []
    assert sid not in store.children()  # no folder either (SeaweedFS keeps emptied ones)
    bucket, _, prefix = store.path(sid).partition("/")
    uploads = store.s3_api().list_multipart_uploads(Bucket=bucket, Prefix=f"{prefix}/")
    assert uploads.get("Uploads", []) == []

    shutil.copyfile(kept, slide)
    convert_slide(slide, store)
    before, folders = objects(store, sid), store.children(sid)
    assert sorted(before) == published_keys(store, sid)
    with pytest.raises(FileNotFoundError, match=r"slide\.tif"):
        convert_slide(slide, store, OTHER, progress=deleting(slide))
    assert objects(store, sid) == before
    assert store.children(sid) == folders == ["manifest.json", "slide.zarr"]
    checked = run_wsi("verify", url, sid, "--s3-endpoint", seaweedfs.endpoint_url)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.s3
def test_on_s3_a_clean_up_the_store_refuses_leaves_the_original_error(
    slide: Path, tmp_path: Path, seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server goes down after the pyramid is written, just before the conversion finds its
    source gone: the clean-up fails, FileNotFoundError is still what the caller sees, and once
    the server is back the next conversion removes what was left and publishes."""
    url = seaweedfs.url(f"failed-down-{os.getpid()}")
    store = Store(StoreSettings(url, endpoint_url=seaweedfs.endpoint_url))
    kept = shutil.copyfile(slide, tmp_path / "kept.tif")
    sid = content_slide_id(slide)
    real = wsi.convert.source_bytes

    def store_down_then_source_bytes(path: Path, backend: str) -> int:
        seaweedfs.stop()
        return real(path, backend)

    with monkeypatch.context() as patch:
        patch.setattr(wsi.convert, "source_bytes", store_down_then_source_bytes)
        try:
            with pytest.raises(FileNotFoundError, match=r"slide\.tif"):
                convert_slide(slide, store, progress=deleting(slide))
        finally:
            seaweedfs.start()
    assert store.list_keys(sid) and not store.is_published(sid)  # left for the next run

    shutil.copyfile(kept, slide)
    convert_slide(slide, store)
    assert store.list_keys(sid, include_temporary=True) == published_keys(store, sid)
