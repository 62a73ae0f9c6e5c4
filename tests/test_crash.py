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
from wsi.ingest.protocol import ExitCode
from wsi.slide_id import content_slide_id

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
