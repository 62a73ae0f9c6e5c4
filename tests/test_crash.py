"""A conversion killed at any moment: readers never see a partial slide, a rerun finishes it,
and the result is byte-identical to an uninterrupted conversion."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from wsi import Store, StoreSettings
from wsi.convert import convert_slide
from wsi.ingest.protocol import ExitCode
from wsi.slide_id import content_slide_id
from wsi.store.objects import LOCKS, TEMP_MARK

from .conftest import sample

CONVERT = [sys.executable, "-m", "wsi.cli", "convert", "--no-progress", "--no-reuse-levels"]


class Reader(threading.Thread):
    """Polls the store like a tile server would, checking every listed slide is complete."""

    def __init__(self, store: Store) -> None:
        super().__init__(daemon=True)
        self.store = store
        self.stop = threading.Event()
        self.violations: list[str] = []
        self.polls = 0

    def run(self) -> None:
        while not self.stop.is_set():
            for sid in self.store.published_slides():
                for key, meta in self.store.read_manifest(sid)["objects"].items():
                    full = f"{sid}/{key}"
                    if not self.store.exists(full) or self.store.size(full) != meta["size"]:
                        self.violations.append(full)
            self.polls += 1
            time.sleep(0.002)


def wait_until_midway(proc: subprocess.Popen[Any], out: Path, name: str) -> None:
    """Until the conversion into `out` has written 4 MB of its base level's object (`name`: a
    glob for the object's file), and is still running."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(out.glob(f"*/slide.zarr/0/c/0/0/{name}"))
        if found and found[0].stat().st_size > 4_000_000:
            break
        time.sleep(0.005)
    else:
        raise AssertionError("the conversion ended before it was half-way")
    assert proc.poll() is None, "the conversion ended before it could be stopped"


def test_sigkill_midway_then_rerun(tmp_path: Path, medium_jpeg_tiff: Path) -> None:
    out = tmp_path / "killed"
    store = Store(StoreSettings(str(out)))
    reader = Reader(store)
    reader.start()
    proc = subprocess.Popen([*CONVERT, str(medium_jpeg_tiff), "--out", str(out), "--workers", "1"])
    wait_until_midway(proc, out, "0")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert store.published_slides() == []  # half a slide is written, none is visible

    rerun = subprocess.run([*CONVERT, str(medium_jpeg_tiff), "--out", str(out)], check=False)
    assert rerun.returncode == 0
    reader.stop.set()
    reader.join()
    assert reader.polls > 10 and reader.violations == []

    ref_dir = tmp_path / "uninterrupted"
    ref = subprocess.run([*CONVERT, str(medium_jpeg_tiff), "--out", str(ref_dir)], check=False)
    assert ref.returncode == 0
    [sid] = store.published_slides()
    reference = Store(StoreSettings(str(ref_dir)))
    keys = store.list_keys(sid)
    assert keys == reference.list_keys(sid)
    for key in keys:
        assert store.get(key) == reference.get(key), key


def test_sigterm_midway_removes_what_was_written(tmp_path: Path, medium_jpeg_tiff: Path) -> None:
    """SIGTERM (a worker cancelling or timing out its job, `systemctl stop`) ends a conversion as
    Ctrl-C does: status 130 and nothing left in the store, where Python's default ended it at
    once with half a slide's objects that only a later conversion of that slide would remove."""
    out = tmp_path / "stopped"
    store = Store(StoreSettings(str(out)))
    sid = content_slide_id(medium_jpeg_tiff)
    proc = subprocess.Popen(
        [*CONVERT, str(medium_jpeg_tiff), "--out", str(out), "--workers", "1"],
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until_midway(proc, out, "0*")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.INTERRUPTED
    assert err.strip().splitlines()[-1] == "wsi: interrupted"
    assert store.published_slides() == []
    assert store.list_keys(sid, include_temporary=True) == []


def test_sigterm_midway_through_a_sync_removes_what_it_was_writing(tmp_path: Path) -> None:
    """`wsi sync` (as `archive`, `restore` and `export-dicom`) ends on SIGTERM as on Ctrl-C:
    status 130, the object it was writing and its slide's lock file removed, the objects it
    finished kept for the next run, which completes the copy. Python's default ended it at once,
    leaving both in the target store. The copy runs at a bounded read rate, so each object takes
    seconds: the signal lands while the first one is being written."""
    source, target = tmp_path / "a", tmp_path / "b"
    published = convert_slide(sample("CMU-1-Small-Region.svs"), Store(StoreSettings(str(source))))
    sid = published.slide_id
    command = [sys.executable, "-m", "wsi.cli", "sync", str(source), str(target), "--rate", "0.4"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(TEMP_MARK in p.name for p in target.rglob("*")):
        assert proc.poll() is None, "the sync ended before it wrote"
        assert time.monotonic() < deadline, "no object was ever being written"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.INTERRUPTED
    assert err.strip().splitlines()[-1] == "wsi: interrupted"
    left = [p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()]
    assert not [name for name in left if TEMP_MARK in name or name.startswith(LOCKS)], left
    assert not Store(StoreSettings(str(target))).is_published(sid)

    rerun = subprocess.run(command[:-2], capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.startswith(f"{sid}\tcopied\t")
