"""Housekeeping of staged copies: what is swept, what is kept (no S3 needed: the folders are
made by hand as a crashed or finished run leaves them)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from server.bucket_copies import StagedSources
from wsi.ingest.spool import sweep_orphans

LIVE, DONE = "aaaa00000000000000000001", "aaaa00000000000000000002"


def _copy(root: Path, slide_id: str, name: str = "case.svs") -> Path:
    folder = root / slide_id
    folder.mkdir(parents=True)
    (folder / name).write_bytes(b"slide")
    (folder / ".ready").write_text(name + "\n")
    return folder / name


def test_sweep_keeps_live_copies_and_drops_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "copies"
    live = _copy(root, LIVE)
    _copy(root, DONE)
    partial = root / f".partial-{LIVE}-1234abcd"  # a download a crash cut short
    partial.mkdir()
    (partial / "case.svs").write_bytes(b"half")

    async def main() -> None:
        copies = StagedSources(root, None)
        try:
            assert copies.copies() == {LIVE: live, DONE: root / DONE / "case.svs"}
            assert copies.sweep({LIVE}) == 1
            assert copies.copies() == {LIVE: live}
            assert not partial.exists()
            assert copies.progress(LIVE) == 1.0
        finally:
            await copies.close()

    asyncio.run(main())


def test_a_ready_file_cannot_point_outside_its_copy(tmp_path: Path) -> None:
    root = tmp_path / "copies"
    (tmp_path / "secret.svs").write_bytes(b"not yours")
    folder = root / LIVE
    folder.mkdir(parents=True)
    for name in ("../../secret.svs", "..", "", "sub/../../secret.svs"):
        (folder / ".ready").write_text(name)

        async def check() -> None:
            copies = StagedSources(root, None)
            try:
                assert copies.ready(LIVE) is None, name
            finally:
                await copies.close()

        asyncio.run(check())


def test_sweep_orphans_removes_temp_copies_of_dead_processes(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(done.stdout)  # exited: its temp copy is an orphan
    orphan = tmp_path / f"wsi-staged-{dead_pid}-x1"
    mine = tmp_path / f"wsi-staged-{os.getpid()}-x2"
    other = tmp_path / "copies"
    for folder in (orphan, mine, other):
        folder.mkdir()
        (folder / "f").write_bytes(b"x")
    assert sweep_orphans(tmp_path) == 1
    assert not orphan.exists() and mine.exists() and other.exists()
    assert sweep_orphans(tmp_path / "missing") == 0
