"""Converting a published slide again (other settings) builds the new version beside the old one
and swaps it in only when complete: a failed or killed re-conversion leaves the published version
as it was; two conversions of one slide never run at once on a machine, so neither deletes the
other's objects or temporaries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import google_crc32c
import pytest

import wsi
from wsi.convert import ConvertSettings
from wsi.errors import SlideBusy
from wsi.ingest.protocol import ExitCode
from wsi.pyramid import PyramidSettings

from .conftest import make_tiff, sample
from .helpers import empty_folders, run_wsi, zarr_members
from .s3server import SeaweedFS
from .s3server import seaweedfs as _seaweedfs_fixture  # noqa: F401


def verify(root: Path, sid: str) -> dict:
    """The published manifest, after checking every object it lists against its size and CRC."""
    manifest = json.loads((root / sid / "manifest.json").read_text())
    for key, entry in manifest["objects"].items():
        data = (root / sid / key).read_bytes()
        assert len(data) == entry["size"], key
        assert google_crc32c.Checksum(data).hexdigest().decode() == entry["crc32c"], key
    return manifest


def leftovers(root: Path, sid: str) -> list[str]:
    return sorted(
        p.name for p in (root / sid).rglob("*") if "staging-" in p.name or ".tmp-" in p.name
    )


@pytest.fixture
def slide(tmp_path: Path) -> Path:
    return make_tiff(tmp_path / "slide.tif", 1800, 1500)


def test_a_failed_reconversion_keeps_the_published_version(slide: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = wsi.Store(wsi.StoreSettings(str(root)))
    sid = wsi.convert_slide(slide, store).slide_id
    before = verify(root, sid)
    calls = 0

    def fail_half_way(done: int, total: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError("disk full (simulated in the progress callback)")

    again = ConvertSettings(PyramidSettings(quality=70, reuse_levels=False))
    with pytest.raises(OSError, match="disk full"):
        wsi.convert_slide(slide, store, again, progress=fail_half_way)
    assert verify(root, sid) == before  # still published, every object intact
    assert leftovers(root, sid) == []
    with wsi.open_published(str(root / sid)) as published:
        assert published.tile(0, 0, 0).shape == (256, 256, 3)


def test_a_reconversion_replaces_the_version_whole(slide: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = wsi.Store(wsi.StoreSettings(str(root)))
    sid = wsi.convert_slide(slide, store).slide_id
    first = verify(root, sid)
    result = wsi.convert_slide(
        slide, store, ConvertSettings(PyramidSettings(quality=70, reuse_levels=False))
    )
    assert not result.skipped
    second = verify(root, sid)
    assert second["settings"] != first["settings"]
    assert leftovers(root, sid) == []
    # Nothing of the old version that the new one lacks is left in the slide's folder.
    on_disk = sorted(
        p.relative_to(root / sid).as_posix() for p in (root / sid).rglob("*") if p.is_file()
    )
    assert on_disk == sorted([*second["objects"], "manifest.json"])


def test_a_reconversion_that_drops_images_leaves_no_empty_folder(tmp_path: Path) -> None:
    """Converted again with --deidentify, a slide loses its label and macro: their objects were
    deleted but their folders (`associated/label/c/0/0`, ...) stayed, and zarr-python warned
    that each "is not recognized as a component of a Zarr hierarchy" when listing the group."""
    source = str(sample("CMU-1-Small-Region.svs"))
    root = tmp_path / "store"
    first = run_wsi("convert", source, "--out", str(root), "--no-progress", "--workers", "1")
    assert first.returncode == 0, first.stderr
    sid = first.stdout.split("\t")[0]
    assert {"label", "macro"} <= {p.name for p in (root / sid / "slide.zarr/associated").iterdir()}
    # Under its own id: de-identified, a slide is otherwise published under another one.
    again = run_wsi("convert", source, "--out", str(root), "--no-progress", "--workers", "1",
                    "--deidentify", "--slide-id", sid)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert verify(root, sid)["settings"]["deidentify"]
    assert empty_folders(root / sid) == []
    members, warned = zarr_members(root / sid / "slide.zarr")
    assert warned == []
    assert [m for m in members if m.startswith("associated/")] == ["associated/thumbnail"]
    assert "0" in members


@pytest.mark.timeout(300)
def test_a_killed_reconversion_keeps_the_old_version(tmp_path: Path) -> None:
    source = make_tiff(tmp_path / "big.tif", 9000, 7000, pyramid=False)
    root = tmp_path / "store"
    first = run_wsi("convert", str(source), "--out", str(root), "--no-progress")
    assert first.returncode == 0, first.stderr
    sid = first.stdout.split("\t")[0]
    before = verify(root, sid)
    # Through OpenSlide on one thread every tile is decoded and encoded again: seconds of work
    # after the staging folder appears, on any machine, so the kill lands mid-way.
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "convert", str(source), "--out", str(root),
         "--no-progress", "--quality", "60", "--no-reuse-levels", "--backend", "openslide",
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not any((root / sid).glob("staging-*/slide.zarr/0/c/0/0/*")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert verify(root, sid) == before  # killed mid-way: the old version is untouched
    rerun = run_wsi("convert", str(source), "--out", str(root), "--no-progress", "--quality", "60",
                    "--no-reuse-levels")  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert verify(root, sid)["settings"] != before["settings"]
    assert leftovers(root, sid) == []


def test_one_conversion_of_a_slide_at_a_time(slide: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = wsi.Store(wsi.StoreSettings(str(root)))
    sid = wsi.convert_slide(slide, store).slide_id
    private = tmp_path / "private-tmp"  # another service's own temporary folder
    private.mkdir()
    with store.slide_lock(sid):  # as a conversion running in another process would hold it
        for env in (None, {**os.environ, "TMPDIR": str(private)}):
            other = run_wsi(
                "convert", str(slide), "--out", str(root), "--no-progress", "--quality", "70",
                env=env,
            )  # fmt: skip
            # Not attempted: ingest retries it later without counting an attempt.
            assert other.returncode == ExitCode.SLIDE_BUSY, other.stderr
            assert "being converted by another process" in other.stderr
            assert len(other.stderr.strip().splitlines()) == 1
    verify(root, sid)


def test_s3_slide_locks_stay_in_a_folder_of_the_users_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An S3 store's slide locks live in the shared temp folder: in a folder of this user's
    own that nobody else may write in. One another user made first (open to everyone, or a
    symlink), or a symlink in a lock's place, is refused in one line, not used: its owner could
    remove the locks or redirect them (it was `<tmp>/wsistore-locks`, taken as it was found)."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    store = wsi.Store(wsi.StoreSettings("s3://bucket/slides", "http://127.0.0.1:9"))
    sid = "0123456789abcdef01234567"
    with store.slide_lock(sid):
        folder = tmp_path / f"wsistore-locks-{os.getuid()}"
        assert folder.stat().st_mode & 0o777 == 0o700 and len(list(folder.iterdir())) == 1
        lock = next(folder.iterdir())
    assert list(folder.iterdir()) == []
    # A bucket of the same name on another S3 service is another store; on this one, the same.
    elsewhere = wsi.Store(wsi.StoreSettings("s3://bucket/slides", "http://127.0.0.1:10"))
    with (
        store.slide_lock(sid),
        elsewhere.slide_lock(sid),
        pytest.raises(SlideBusy),
        wsi.Store(store.settings).slide_lock(sid),
    ):
        pass
    lock.symlink_to(tmp_path / "elsewhere")  # planted in a lock's place
    with pytest.raises(wsi.StoreError, match="lock file"), store.slide_lock(sid):
        pass
    assert not (tmp_path / "elsewhere").exists()
    lock.unlink()
    folder.chmod(0o777)  # as if another user had made it, open to all
    with pytest.raises(wsi.StoreError, match="only it may write"), store.slide_lock(sid):
        pass
    folder.rmdir()
    (tmp_path / "somewhere").mkdir(mode=0o700)
    folder.symlink_to(tmp_path / "somewhere")
    with pytest.raises(wsi.StoreError, match="only it may write"), store.slide_lock(sid):
        pass


@pytest.mark.s3
def test_reconversion_on_s3(slide: Path, seaweedfs: SeaweedFS) -> None:
    """On S3 the new version is promoted by server-side copies; a failure leaves the old one."""
    url = seaweedfs.url(f"reconvert-{os.getpid()}")
    store = wsi.Store(wsi.StoreSettings(url, endpoint_url=seaweedfs.endpoint_url))
    sid = wsi.convert_slide(slide, store).slide_id
    before = store.manifest(sid)

    def boom(done: int, total: int) -> None:
        raise OSError("simulated failure")

    other = ConvertSettings(PyramidSettings(quality=70, reuse_levels=False))
    with pytest.raises(OSError):
        wsi.convert_slide(slide, store, other, progress=boom)
    assert store.manifest(sid) == before
    assert not [k for k in store.list_keys(sid) if "staging-" in k]
    wsi.convert_slide(slide, store, other)
    after = store.manifest(sid)
    assert after.settings != before.settings
    assert sorted(store.list_keys(sid)) == sorted(
        [f"{sid}/{k}" for k in after.objects] + [f"{sid}/manifest.json"]
    )
    with wsi.open_published(f"{url}/{sid}", s3_endpoint=seaweedfs.endpoint_url) as published:
        assert published.tile(0, 1, 1).shape == (256, 256, 3)


def cut_promote_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next `Store.promote` fail after moving 3 objects in: the store going away (or the
    process killed) half way through a swap, the rest still in the staging folder."""
    import wsi.store.objects as objects

    real, moved = objects.fsync_dir, []

    def fsync_dir(path: str) -> None:
        if "staging-" not in path:  # a folder an object was moved into
            moved.append(path)
            if len(moved) > 3:
                raise OSError("the disk went away during the swap")
        real(path)

    monkeypatch.setattr(objects, "fsync_dir", fsync_dir)


def test_a_reconversion_cut_short_in_its_swap_is_finished_not_lost(
    slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The swap unpublishes the old version and moves the new one's objects in: cut short
    there, the slide was published in neither version, and the next run deleted the complete
    staged one. Now the staged manifest is written first and the next run (any conversion of the
    slide, or the archive policy) finishes the swap."""
    root = tmp_path / "store"
    store = wsi.Store(wsi.StoreSettings(str(root)))
    sid = wsi.convert_slide(slide, store).slide_id
    again = ConvertSettings(PyramidSettings(quality=70, reuse_levels=False))
    with monkeypatch.context() as patch:
        cut_promote_short(patch)
        with pytest.raises(wsi.StoreError, match="went away"):
            wsi.convert_slide(slide, store, again)
    assert not store.is_published(sid)
    result = wsi.convert_slide(slide, store, again)  # finishes the swap: nothing to convert
    assert result.skipped
    manifest = verify(root, sid)
    assert manifest["settings"]["pyramid"]["quality"] == 70
    assert leftovers(root, sid) == []
    with wsi.open_published(str(root / sid)) as published:
        assert published.tile(0, 0, 0).shape == (256, 256, 3)

    with monkeypatch.context() as patch:  # the archive policy finishes it too
        cut_promote_short(patch)
        with pytest.raises(wsi.StoreError, match="went away"):
            wsi.convert_slide(slide, store)
    assert not store.is_published(sid)
    from wsi.published.archive import archive_due

    archive_due(store, 10_000.0, time.time())  # nothing old enough to archive
    assert store.is_published(sid) and "quality" in verify(root, sid)["settings"]["pyramid"]
    assert verify(root, sid)["settings"]["pyramid"]["quality"] == 90
