"""Ingest folder watching: slide grouping, completeness, the quiet period, and the async watcher.

Scans run on real files in tmp_path; the tracker gets an injected clock so the quiet period is
exact, and the async watcher tests use real (short) sleeps under a timeout so they cannot hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from wsi.errors import WsiError
from wsi.ingest import scan
from wsi.ingest import watcher as watch
from wsi.ingest.watcher import (
    FolderUnavailable,
    FolderWatcher,
    SlideCandidate,
    StabilityTracker,
    find_candidates,
)

from .conftest import sample
from .helpers import FakeClock

FIXTURES = sample("openslide-python-fixtures")
QUIET = 0.3


def copy_sample(name: str, dest: Path) -> Path:
    """A writable copy (the samples are read-only, and copyfile keeps no mode)."""
    src = FIXTURES / name
    assert src.exists(), f"missing sample slide {src}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def paths(candidates: list[SlideCandidate]) -> list[Path]:
    return [c.path for c in candidates]


def make_mrxs(root: Path, data_files: tuple[str, ...] = ("Data0000.dat", "Data0001.dat")) -> Path:
    """x.mrxs plus x/Slidedat.ini listing Index.dat and `data_files` (none of them written)."""
    mrxs = root / "x.mrxs"
    mrxs.write_bytes(b"")
    folder = root / "x"
    folder.mkdir()
    lines = ["[GENERAL]", "SLIDE_VERSION=01.03", "", "[HIERARCHICAL]", "INDEXFILE=Index.dat", ""]
    lines += ["[DATAFILE]", f"FILE_COUNT={len(data_files)}"]
    lines += [f"FILE_{i}={name}" for i, name in enumerate(data_files)]
    (folder / "Slidedat.ini").write_bytes(("\ufeff" + "\n".join(lines) + "\n").encode())
    return mrxs


# ------------------------------------------------------------------------------------------
# find_candidates


def test_temporaries_and_non_slides_are_ignored(tmp_path: Path) -> None:
    for name in [
        "a.svs.part",
        ".b.svs",
        "c.svs~",
        "d.tmp",
        "e.svs.crdownload",
        "~$f.svs",
        "notes.txt",
        "meta.json",
        "photo.jpg",
        "jobs.sqlite",
        "jobs.sqlite-wal",
        "jobs.sqlite-shm",
    ]:
        (tmp_path / name).write_bytes(b"x" * 300)
    (tmp_path / ".hidden").mkdir()
    copy_sample("small.svs", tmp_path / ".hidden" / "h.svs")
    (tmp_path / "copying.tmp").mkdir()
    copy_sample("small.svs", tmp_path / "copying.tmp" / "t.svs")
    assert find_candidates(tmp_path) == []

    copy_sample("small.svs", tmp_path / "real.svs")
    assert paths(find_candidates(tmp_path)) == [tmp_path / "real.svs"]


def test_sidecar_json_joins_its_slide(tmp_path: Path) -> None:
    a = copy_sample("small.svs", tmp_path / "a.svs")
    (tmp_path / "a.svs.json").write_text("{}")
    b = copy_sample("small.svs", tmp_path / "b.svs")
    (tmp_path / "b.json").write_text('{"patient_id": "7"}')
    c = copy_sample("small.svs", tmp_path / "c.svs")
    by_path = {cand.path: cand for cand in find_candidates(tmp_path)}
    assert set(by_path) == {a, b, c}
    assert by_path[a].files == (a, tmp_path / "a.svs.json")
    assert by_path[b].files == (b, tmp_path / "b.json")
    assert by_path[b].total_bytes == b.stat().st_size + (tmp_path / "b.json").stat().st_size
    assert by_path[c].files == (c,)
    assert [name for name, _, _ in by_path[b].fingerprint] == ["b.json", "b.svs"]
    assert all(cand.complete and cand.layout == "file" for cand in by_path.values())


def test_unknown_names_are_probed_with_the_backends(tmp_path: Path) -> None:
    """A slide or DICOM instance whose name says nothing is recognised by its header bytes."""
    copy_sample("small.svs", tmp_path / "scan.bin")
    copy_sample("boxes_0.dcm", tmp_path / "uids" / "1.2.826.0.1.3680043.2.1125.1")
    (tmp_path / "README").write_text("not a slide")
    got = {c.path.name: c.layout for c in find_candidates(tmp_path)}
    assert got == {"scan.bin": "file", "uids": "dicom-folder"}


def test_one_level_deep(tmp_path: Path) -> None:
    a = copy_sample("small.svs", tmp_path / "case1" / "a.svs")
    copy_sample("small.svs", tmp_path / "case1" / "deeper" / "b.svs")
    assert paths(find_candidates(tmp_path)) == [a]


# ------------------------------------------------------------------------------------------
# StabilityTracker


def test_slide_copied_in_pieces_is_reported_once_after_the_quiet_period(tmp_path: Path) -> None:
    clock = FakeClock()
    tracker = StabilityTracker(QUIET, clock=clock)
    data = (FIXTURES / "small.svs").read_bytes()
    target = tmp_path / "slide.svs"
    chunks = [data[i : i + 700] for i in range(0, len(data), 700)]
    for chunk in chunks:
        append(target, chunk)
        assert tracker.update(find_candidates(tmp_path)) == []
        clock.step(0.2)  # a pause shorter than the quiet period
        assert tracker.update(find_candidates(tmp_path)) == []
    assert target.stat().st_size == len(data)

    clock.step(0.05)  # 0.25 s since the last write was first seen
    assert tracker.update(find_candidates(tmp_path)) == []
    clock.step(0.05)
    ready = tracker.update(find_candidates(tmp_path))
    assert paths(ready) == [target]
    assert ready[0].total_bytes == len(data) and ready[0].complete

    for _ in range(3):  # exactly once
        clock.step(1.0)
        assert tracker.update(find_candidates(tmp_path)) == []
    assert tracker.next_due() is None


def test_recopied_slide_is_reported_again_and_vanished_ones_are_forgotten(tmp_path: Path) -> None:
    clock = FakeClock()
    tracker = StabilityTracker(QUIET, clock=clock)
    target = copy_sample("small.svs", tmp_path / "s.svs")
    tracker.update(find_candidates(tmp_path))
    assert tracker.next_due() == pytest.approx(clock.now + QUIET)
    clock.step(QUIET)
    assert paths(tracker.update(find_candidates(tmp_path))) == [target]

    append(target, b"more")  # copied again: a new fingerprint
    assert tracker.update(find_candidates(tmp_path)) == []
    clock.step(QUIET)
    assert paths(tracker.update(find_candidates(tmp_path))) == [target]

    target.rename(tmp_path / "away.txt")
    assert tracker.update(find_candidates(tmp_path)) == []
    assert len(tracker) == 0
    (tmp_path / "away.txt").rename(target)  # same fingerprint, but forgotten: a new arrival
    assert tracker.update(find_candidates(tmp_path)) == []
    clock.step(QUIET)
    assert paths(tracker.update(find_candidates(tmp_path))) == [target]


def test_tracker_rejects_a_negative_quiet_period() -> None:
    with pytest.raises(WsiError):
        StabilityTracker(-1)


# ------------------------------------------------------------------------------------------
# Multi-file formats


def test_mrxs_is_reported_only_when_every_listed_part_is_there(tmp_path: Path) -> None:
    clock = FakeClock()
    tracker = StabilityTracker(QUIET, clock=clock)
    folder = tmp_path / "x"

    # The folder arrives before its .mrxs: nothing yet, and never as a slide of its own.
    folder.mkdir()
    (folder / "Slidedat.ini").write_text("[GENERAL]\nSLIDE_VERSION=01.03\n")
    assert find_candidates(tmp_path) == []
    shutil.rmtree(folder)

    mrxs = make_mrxs(tmp_path)
    (folder / "Index.dat").write_bytes(b"i" * 64)
    (folder / "Data0000.dat").write_bytes(b"0" * 4096)
    (folder / "Data0001.dat.part").write_bytes(b"1" * 100)  # still being copied
    (folder / ".DS_Store").write_bytes(b"junk")

    (cand,) = find_candidates(tmp_path)
    assert cand.path == mrxs and cand.layout == "mrxs" and not cand.complete
    assert any("Data0001.dat is missing" in p for p in cand.pending)
    assert any("Data0001.dat.part" in p for p in cand.pending)
    assert folder / "Data0001.dat.part" not in cand.files
    for _ in range(5):
        assert tracker.update(find_candidates(tmp_path)) == []
        clock.step(1.0)

    (folder / "Data0001.dat.part").rename(folder / "Data0001.dat")
    (cand,) = find_candidates(tmp_path)
    assert cand.complete, cand.pending
    assert set(cand.files) == {
        mrxs,
        folder / "Slidedat.ini",
        folder / "Index.dat",
        folder / "Data0000.dat",
        folder / "Data0001.dat",
    }
    assert tracker.update(find_candidates(tmp_path)) == []  # complete, but not yet quiet
    clock.step(QUIET / 2)
    append(folder / "Data0001.dat", b"1" * 100)  # the last part still grows
    assert tracker.update(find_candidates(tmp_path)) == []
    clock.step(QUIET / 2 + 0.01)
    assert tracker.update(find_candidates(tmp_path)) == []
    clock.step(QUIET / 2)
    assert paths(tracker.update(find_candidates(tmp_path))) == [mrxs]
    clock.step(5)
    assert tracker.update(find_candidates(tmp_path)) == []


def test_mrxs_with_a_half_written_slidedat_is_held_back(tmp_path: Path) -> None:
    mrxs = make_mrxs(tmp_path)
    (tmp_path / "x" / "Slidedat.ini").write_text("[GENERAL]\nSLIDE_VERSION=01.03\n[DATAF")
    (cand,) = find_candidates(tmp_path)
    assert cand.path == mrxs and not cand.complete
    (tmp_path / "x").rename(tmp_path / "elsewhere")
    (cand,) = find_candidates(tmp_path)
    assert cand.pending == ("x/ is missing",)


def test_dicom_folder_waits_for_every_instance(tmp_path: Path) -> None:
    clock = FakeClock()
    tracker = StabilityTracker(QUIET, clock=clock)
    series = tmp_path / "series"
    copy_sample("boxes_0.dcm", series / "boxes_0.dcm")
    full = (FIXTURES / "boxes_1.dcm").read_bytes()
    half = series / "boxes_1.dcm"
    half.write_bytes(full[:64])  # not even the 128-byte preamble and DICM yet
    (tmp_path / "series.json").write_text("{}")

    (cand,) = find_candidates(tmp_path)
    assert cand.path == series and cand.layout == "dicom-folder"
    assert cand.pending == ("series/boxes_1.dcm is not (yet) a DICOM file",)
    for _ in range(4):
        assert tracker.update(find_candidates(tmp_path)) == []
        clock.step(1.0)

    append(half, full[64:200])  # DICM is there now, the rest is still arriving
    assert tracker.update(find_candidates(tmp_path)) == []
    clock.step(0.2)
    append(half, full[200:])
    assert tracker.update(find_candidates(tmp_path)) == []
    clock.step(0.2)
    assert tracker.update(find_candidates(tmp_path)) == []
    clock.step(0.1)
    (ready,) = tracker.update(find_candidates(tmp_path))
    assert ready.path == series and ready.complete
    assert ready.files == (series / "boxes_0.dcm", series / "boxes_1.dcm", tmp_path / "series.json")
    assert ready.total_bytes == sum(p.stat().st_size for p in ready.files)
    assert [name for name, _, _ in ready.fingerprint] == [
        "series.json",
        "series/boxes_0.dcm",
        "series/boxes_1.dcm",
    ]


def test_dicom_folder_with_a_partial_name_is_held_back(tmp_path: Path) -> None:
    series = tmp_path / "series"
    copy_sample("boxes_0.dcm", series / "boxes_0.dcm")
    copy_sample("boxes_1.dcm", series / "boxes_1.dcm.part")
    (series / "notes.txt").write_text("scanned by a robot")
    (cand,) = find_candidates(tmp_path)
    assert not cand.complete
    assert series / "notes.txt" in cand.files  # a sidecar need not be DICOM
    (series / "boxes_1.dcm.part").rename(series / "boxes_1.dcm")
    (cand,) = find_candidates(tmp_path)
    assert cand.complete


def test_loose_dicom_instances_are_grouped_by_series(tmp_path: Path) -> None:
    copy_sample("boxes_0.dcm", tmp_path / "b0.dcm")
    copy_sample("boxes_1.dcm", tmp_path / "b1.dcm")
    (tmp_path / "b2.dcm").write_bytes(b"\0" * 128 + b"DICM")  # header still being written
    got = find_candidates(tmp_path)
    assert [(c.path.name, c.complete, len(c.files)) for c in got] == [
        ("b0.dcm", True, 2),
        ("b2.dcm", False, 1),
    ]
    assert got[0].layout == "dicom-series"


def test_vms_needs_every_file_it_lists(tmp_path: Path) -> None:
    vms = tmp_path / "h.vms"
    vms.write_text(
        "[Virtual Microscope Specimen]\nNoLayers=1\nNoJpegColumns=2\nNoJpegRows=1\n"
        "ImageFile=h.jpg\nImageFile(1,0)=h_1.jpg\nMapFile=h_map.jpg\nOptimisationFile=h.opt\n"
    )
    for name in ["h.jpg", "h_map.jpg", "h.opt"]:
        (tmp_path / name).write_bytes(b"\xff\xd8" + b"j" * 100)
    (cand,) = find_candidates(tmp_path)
    assert cand.path == vms and cand.layout == "vms"
    assert cand.pending == ("h_1.jpg is missing",)
    (tmp_path / "h_1.jpg").write_bytes(b"\xff\xd8" + b"j" * 100)
    (cand,) = find_candidates(tmp_path)
    assert cand.complete
    assert {p.name for p in cand.files} == {"h.vms", "h.jpg", "h_1.jpg", "h_map.jpg", "h.opt"}


# ------------------------------------------------------------------------------------------
# Robustness


def test_symlinks_never_lead_out_of_the_folder_and_loops_are_harmless(tmp_path: Path) -> None:
    root = tmp_path / "watched"
    root.mkdir()
    outside = copy_sample("small.svs", tmp_path / "outside.svs")
    inside = copy_sample("small.svs", root / "inside.svs")
    (root / "escape.svs").symlink_to(outside)
    (root / "alias.svs").symlink_to(inside)
    (root / "up").symlink_to(tmp_path, target_is_directory=True)
    (root / "self").symlink_to(root, target_is_directory=True)
    (root / "loop1.svs").symlink_to(root / "loop2.svs")
    (root / "loop2.svs").symlink_to(root / "loop1.svs")
    (root / "dangling.svs").symlink_to(root / "nothing.svs")
    assert paths(find_candidates(root)) == [root / "alias.svs", inside]


def test_files_vanishing_mid_scan_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keep = copy_sample("small.svs", tmp_path / "keep.svs")
    copy_sample("small.svs", tmp_path / "gone.svs")
    copy_sample("boxes_0.dcm", tmp_path / "series" / "b0.dcm")
    real_scandir = os.scandir

    def vanishing_scandir(
        path: int | str | os.PathLike[str],
    ) -> AbstractContextManager[Iterable[os.DirEntry[str]]]:
        if not isinstance(path, str | os.PathLike) or Path(path) != tmp_path:
            return real_scandir(path)  # rmtree below lists by file descriptor
        with real_scandir(path) as it:
            entries = list(it)
        if (tmp_path / "gone.svs").exists():  # listed, then deleted before anything is stat'ed
            (tmp_path / "gone.svs").unlink()
            shutil.rmtree(tmp_path / "series")
        return contextlib.nullcontext(entries)

    monkeypatch.setattr(watch.os, "scandir", vanishing_scandir)
    assert paths(find_candidates(tmp_path)) == [keep]


def test_unreadable_subfolders_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keep = copy_sample("small.svs", tmp_path / "keep.svs")
    copy_sample("small.svs", tmp_path / "locked" / "a.svs")
    real_scandir = os.scandir

    def denying_scandir(
        path: str | os.PathLike[str],
    ) -> AbstractContextManager[Iterable[os.DirEntry[str]]]:
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(watch.os, "scandir", denying_scandir)
    assert paths(find_candidates(tmp_path)) == [keep]


def test_header_probes_are_reused_while_a_file_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Polling a big quiet folder must cost stats, not a header read per file per poll."""
    series = tmp_path / "series"
    copy_sample("boxes_0.dcm", series / "b0.dcm")
    copy_sample("boxes_1.dcm", series / "b1")
    calls: list[Path] = []
    real_can_open = watch.DicomSource.can_open

    def counting_can_open(path: Path) -> bool:
        calls.append(path)
        return real_can_open(path)

    monkeypatch.setattr(watch.DicomSource, "can_open", counting_can_open)
    first, cache = watch._find_candidates_cached(tmp_path, None)
    assert calls
    calls.clear()
    second, cache = watch._find_candidates_cached(tmp_path, cache)
    assert second == first and calls == []
    append(series / "b1", b"\0")  # changed: probed again
    third, _ = watch._find_candidates_cached(tmp_path, cache)
    assert set(calls) == {series / "b1"} and third != first


def test_polling_a_quiet_folder_groups_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every poll grouped every file of the inbox again (an object per file, ~0.1 ms a file:
    0.45 s of CPU every 2 s for 5,000 slides kept after conversion). A poll now lists the
    folders the last scan listed and, when none changed, answers what it found."""
    for i in range(20):
        copy_sample("small.svs", tmp_path / f"s{i}.svs")
    first, memo = watch._find_candidates_cached(tmp_path, None)
    grouped: list[Path] = []
    real_folder = scan._Scan.folder

    def counting_folder(
        self: scan._Scan, directory: Path, entries: list[scan._Entry], depth: int
    ) -> None:
        grouped.append(directory)
        real_folder(self, directory, entries, depth)

    monkeypatch.setattr(scan._Scan, "folder", counting_folder)
    for _ in range(3):
        again, memo = watch._find_candidates_cached(tmp_path, memo)
        assert again == first
    assert grouped == []
    copy_sample("small.svs", tmp_path / "new.svs")
    again, memo = watch._find_candidates_cached(tmp_path, memo)
    assert grouped == [tmp_path] and tmp_path / "new.svs" in paths(again)


def test_a_poll_answered_from_the_last_scan_sees_every_change(tmp_path: Path) -> None:
    """Whatever changes between polls, in the watched folder or any folder the scan looked
    into, the answer is that of a fresh scan."""
    root = tmp_path / "watched"
    copy_sample("small.svs", root / "a.svs")
    copy_sample("small.svs", root / "case 1" / "b.svs")
    copy_sample("boxes_0.dcm", root / "series" / "b0.dcm")
    copy_sample("boxes_1.dcm", root / "loose1.dcm")
    make_mrxs(root)
    outside = copy_sample("small.svs", tmp_path / "outside.svs")
    target = copy_sample("small.svs", root / "case 1" / "target.svs")
    (root / "alias.svs").symlink_to(target)
    changes = [
        lambda: copy_sample("small.svs", root / "c.svs"),
        lambda: append(root / "a.svs", b"\0"),
        lambda: copy_sample("small.svs", root / "case 1" / "d.svs"),
        lambda: (root / "case 1" / "b.svs").unlink(),
        lambda: copy_sample("boxes_1.dcm", root / "series" / "b1.part"),
        lambda: (root / "series" / "b1.part").rename(root / "series" / "b1.dcm"),
        lambda: (root / "x" / "Index.dat").write_bytes(b""),
        lambda: (root / "x" / "Data0000.dat").write_bytes(b""),
        lambda: (root / "x" / "Data0001.dat").write_bytes(b""),
        lambda: append(root / "x" / "Data0001.dat", b"\0"),
        lambda: append(target, b"\0"),  # seen through the link only
        lambda: (root / "alias.svs").unlink(),
        lambda: (root / "alias.svs").symlink_to(outside),  # now leads out: not a slide
        lambda: copy_sample("small.svs", root / "case 1" / "deeper" / "e.svs"),  # too deep
        lambda: copy_sample("boxes_0.dcm", root / "loose0.dcm"),
        lambda: (root / "x.json").write_text("{}"),
        lambda: shutil.rmtree(root / "series"),
        lambda: None,
    ]
    found, memo = watch._find_candidates_cached(root, None)
    assert found == find_candidates(root)
    for i, change in enumerate(changes):
        change()
        found, memo = watch._find_candidates_cached(root, memo)
        assert found == find_candidates(root), i
    shutil.rmtree(root)
    with pytest.raises(FolderUnavailable):
        watch._find_candidates_cached(root, memo)


def test_a_missing_folder_is_reported_as_unavailable(tmp_path: Path) -> None:
    with pytest.raises(FolderUnavailable) as info:
        find_candidates(tmp_path / "unmounted")
    assert isinstance(info.value, WsiError) and isinstance(info.value, OSError)


# ------------------------------------------------------------------------------------------
# FolderWatcher


async def _drop_slide_in_pieces(target: Path, pause: float) -> float:
    """Write small.svs to `target` in three pieces with pauses; returns when the last landed."""
    data = (FIXTURES / "small.svs").read_bytes()
    third = len(data) // 3 + 1
    for i in range(0, len(data), third):
        if i:
            await asyncio.sleep(pause)
        append(target, data[i : i + third])
    return time.monotonic()


async def _watch_and_drop(
    tmp_path: Path, watcher: FolderWatcher
) -> tuple[list[tuple[float, SlideCandidate]], float]:
    got: list[tuple[float, SlideCandidate]] = []

    async def consume() -> None:
        async for candidate in watcher:
            got.append((time.monotonic(), candidate))

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)  # the watcher is running (and has scanned an empty folder)
    last_write = await _drop_slide_in_pieces(tmp_path / "late.svs", pause=0.15)
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(2 * QUIET)  # room for a (wrong) second report
    watcher.stop()
    await asyncio.wait_for(task, 5)
    return got, last_write


def _check_one_report(
    got: list[tuple[float, SlideCandidate]], last_write: float, tmp_path: Path
) -> float:
    assert len(got) == 1, got
    seen_at, candidate = got[0]
    assert candidate.path == tmp_path / "late.svs"
    assert candidate.total_bytes == (FIXTURES / "small.svs").stat().st_size
    assert seen_at >= last_write + QUIET - 0.05
    return seen_at


def test_watcher_polling_only(tmp_path: Path) -> None:
    watcher = FolderWatcher(tmp_path, quiet_seconds=QUIET, poll_interval=0.1, use_inotify=False)
    got, last_write = asyncio.run(asyncio.wait_for(_watch_and_drop(tmp_path, watcher), 30))
    seen_at = _check_one_report(got, last_write, tmp_path)
    assert seen_at < last_write + QUIET + 2.0
    assert not [t for t in threading.enumerate() if t.name == "wsi-watch-inotify"]


def test_watcher_wakes_on_file_events(tmp_path: Path) -> None:
    """With a poll far longer than the test, only inotify and the quiet timer can report it."""
    watcher = FolderWatcher(
        [tmp_path], quiet_seconds=QUIET, poll_interval=120, use_inotify=True, debounce_ms=50
    )
    got, last_write = asyncio.run(asyncio.wait_for(_watch_and_drop(tmp_path, watcher), 30))
    seen_at = _check_one_report(got, last_write, tmp_path)
    assert seen_at < last_write + QUIET + 2.0
    deadline = time.monotonic() + 2
    while any(t.name == "wsi-watch-inotify" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "inotify thread still running after stop()"
        time.sleep(0.02)


def test_watcher_survives_a_missing_folder_and_stops_from_another_thread(tmp_path: Path) -> None:
    folder = tmp_path / "share"

    async def main() -> list[SlideCandidate]:
        watcher = FolderWatcher([folder], quiet_seconds=0.1, poll_interval=0.05)
        got: list[SlideCandidate] = []

        async def consume() -> None:
            async for candidate in watcher.events():
                got.append(candidate)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)  # several polls of a folder that is not there
        assert not task.done()
        folder.mkdir()
        copy_sample("small.svs", folder / "a.svs")
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        threading.Timer(0.05, watcher.stop).start()
        await asyncio.wait_for(task, 5)
        assert watcher.stopped
        return got

    got = asyncio.run(asyncio.wait_for(main(), 30))
    assert paths(got) == [folder / "a.svs"]


def test_watcher_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(WsiError):
        FolderWatcher([], quiet_seconds=1, poll_interval=1)
    with pytest.raises(WsiError):
        FolderWatcher(tmp_path, quiet_seconds=1, poll_interval=0)


def test_a_deletion_killed_half_way_leaves_nothing_once_the_folder_is_watched(
    tmp_path: Path,
) -> None:
    """`--after delete` (and a move across file systems) first renames a slide into a hidden
    folder beside it, then removes that folder: a SIGKILL or a power cut in between left the
    whole slide there, hidden from the watcher and the console, for ever (patient data kept
    against the policy, and disk space). Whoever watches the folder removes such leftovers,
    at any depth, once they have been left alone long enough (never the folder of a deletion
    running now), and nothing else."""
    from wsi.ingest.source_files import HIDDEN_DELETE_PREFIX

    shutil.copy(FIXTURES / "small.svs", tmp_path / "keep.svs")
    top = tmp_path / f"{HIDDEN_DELETE_PREFIX}0123456789ab"
    deep = tmp_path / "case-7" / f"{HIDDEN_DELETE_PREFIX}ba9876543210" / "mirax"
    young = tmp_path / f"{HIDDEN_DELETE_PREFIX}00000000young"  # a deletion running now
    for leftover in (top, deep, young):
        leftover.mkdir(parents=True)
        shutil.copy(FIXTURES / "small.svs", leftover / "slide.svs")
    for hidden in (top, deep.parent):  # left by deletions killed an hour ago
        os.utime(hidden, (time.time() - 3600, time.time() - 3600))
    other = tmp_path / ".scanner-cache"  # hidden, but not ours: left alone
    other.mkdir()
    (other / "x").write_bytes(b"x")
    watcher = FolderWatcher(tmp_path, quiet_seconds=QUIET, poll_interval=0.1, use_inotify=False)
    asyncio.run(watcher.poll())
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        ".scanner-cache",
        ".scanner-cache/x",
        f"{young.name}",
        f"{young.name}/slide.svs",
        "case-7",
        "keep.svs",
    ]
