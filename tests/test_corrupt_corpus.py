"""A corpus of corrupt slides made by the tests (truncations, bit flips, a zeroed header, a tile
whose JPEG header declares 65000 x 65000 pixels, a sparse file declaring 4 * 10^10 pixels)
goes through `wsi convert`, `wsi serve --sources` and a watch folder's jobs: each bad file gives
one readable line (or a 4xx JSON), in bounded time and under a memory limit, and the good slides
beside them are not disturbed."""

from __future__ import annotations

import asyncio
import random
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

import wsi
from server.app import create_app
from server.settings import ServerSettings
from wsi.ingest.queue import Job, JobState, SQLiteJobQueue
from wsi.ingest.scan import find_candidates
from wsi.ingest.settings import IngestSettings
from wsi.ingest.source_files import submit_slide

from .conftest import make_tiff, sample
from .helpers import drain, settled
from .test_hostile_slides import hostile_tile_tiff, sparse_tiff

MEMORY_LIMIT = 3 * 1024**3
"""Address space of each conversion (bytes): a decoder allocating what a crafted header declares
(12 GiB) fails under it instead of quietly succeeding on a big machine."""


def truncated(src: Path, dest: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dest.write_bytes(data[: int(len(data) * fraction)])
    return dest


def bit_flipped(src: Path, dest: Path, seed: int, flips: int = 64) -> Path:
    data = bytearray(src.read_bytes())
    rng = random.Random(seed)
    for _ in range(flips):
        at = rng.randrange(len(data) // 4, len(data))  # past the header: damaged tiles
        data[at] ^= 1 << rng.randrange(8)
    dest.write_bytes(bytes(data))
    return dest


def zeroed_header(src: Path, dest: Path) -> Path:
    data = bytearray(src.read_bytes())
    data[:16] = bytes(16)
    dest.write_bytes(bytes(data))
    return dest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[Path]]:
    """(folder, bad files, good files)."""
    folder = tmp_path_factory.mktemp("corpus")
    good_tiff = make_tiff(folder / "good.tif", 700, 600, pyramid=False)
    svs = shutil.copy(sample("CMU-1-Small-Region.svs"), folder / "good.svs")
    work = tmp_path_factory.mktemp("corpus-src")
    base = make_tiff(work / "base.tif", 900, 700)
    bad = [
        truncated(Path(svs), folder / "cut-10.svs", 0.10),
        truncated(Path(svs), folder / "cut-60.svs", 0.60),
        truncated(base, folder / "cut-95.tif", 0.95),
        zeroed_header(base, folder / "zero-header.tif"),
        sparse_tiff(folder / "sparse-huge.tif", 200_000),
    ]
    # Opens fine and converts until its crafted tile: refused there, in one line.
    bad.append(hostile_tile_tiff(folder / "crafted-tile.tif"))
    flipped = [bit_flipped(Path(svs), folder / f"flip-{i}.svs", seed=i) for i in range(3)]
    return folder, bad, [good_tiff, Path(svs), *flipped]


def limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@pytest.mark.timeout(600)
def test_convert_reports_each_bad_slide_in_one_line(
    corpus: tuple[Path, list[Path], list[Path]], tmp_path: Path
) -> None:
    _, bad, good = corpus
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "convert", *map(str, bad + good), "--out", str(out),
         "--no-progress"],
        capture_output=True, text=True, timeout=540, check=False, preexec_fn=limited,
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    errors = done.stderr.strip().splitlines()
    assert all(line.startswith("wsi: error: ") for line in errors), done.stderr
    failed = {line.split(": ")[2] for line in errors}
    # Every unreadable file is reported once; the good ones are published. (A bit flip may hit
    # only padding and convert fine: such a file may be in either group, never in both.)
    for path in bad:
        assert str(path) in failed, (path, done.stderr)
    for path in good[:2]:
        assert str(path) not in failed
    published = done.stdout.strip().splitlines()
    assert len(published) + len(errors) == len(bad) + len(good)
    assert done.returncode == 1


@pytest.mark.timeout(600)
def test_sources_serve_good_slides_and_refuse_bad_tiles(
    corpus: tuple[Path, list[Path], list[Path]],
) -> None:
    folder, _, _ = corpus

    async def main() -> None:
        settings = ServerSettings(store=str(folder / "store"), sources=(str(folder),))
        async with TestClient(TestServer(create_app(settings))) as c:
            r = await c.get("/slides")
            assert r.status == 200
            slides = (await r.json())["slides"]
            assert len(slides) >= 2  # the good ones at least
            for slide in slides:
                sid = slide["id"]
                for url in (
                    f"/slides/{sid}",
                    f"/slides/{sid}/tiles/0/0/0",
                    f"/slides/{sid}/tiles/0/1/1",
                    f"/slides/{sid}.dzi",
                    f"/slides/{sid}_files/9/0_0.jpeg",
                ):
                    resp = await c.get(url)
                    assert resp.status < 500, (url, resp.status, await resp.text())
                    if resp.status >= 400:
                        assert (await resp.json())["status"] == resp.status
            assert (await c.get("/healthz")).status == 200

    asyncio.run(main())


@pytest.mark.timeout(600)
def test_the_watch_folder_quarantines_each_bad_slide_and_converts_the_rest(
    corpus: tuple[Path, list[Path], list[Path]], tmp_path: Path
) -> None:
    """As the watcher submits them: every candidate the scanner reports becomes a job; bad ones
    fail once with one readable reason and move to quarantine, good ones are published, and
    files no reader takes are left where they are."""
    _, bad, good = corpus
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for path in [*bad, *good]:
        shutil.copy(path, inbox / path.name)
        settled(inbox / path.name)
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    settings = IngestSettings(
        after_success="move",
        done_dir=str(tmp_path / "done"),
        quarantine_dir=str(tmp_path / "quarantine"),
        poll_seconds=0.1,
    )
    jobs = [submit_slide(queue, c) for c in find_candidates(inbox) if c.complete]
    assert len(jobs) >= len(good)
    drain(queue, str(tmp_path / "store"), settings, until=400)
    ended = [queue.get(j.id) for j in jobs]
    assert all(j.state in (JobState.DONE, JobState.FAILED) for j in ended), ended
    job: Job | None
    for job in ended:
        if job.state is JobState.FAILED:
            assert job.error and "\n" not in job.error.strip() and "Traceback" not in job.error
    by_name = {Path(j.source).name: j for j in ended}
    for path in good[:2]:
        assert by_name[path.name].state is JobState.DONE
    for path in bad:
        job = by_name.get(path.name)
        if job is None:  # not a slide to any reader: never submitted, left as it was
            assert (inbox / path.name).exists()
            continue
        assert job.state is JobState.FAILED, (path.name, job)
        assert (tmp_path / "quarantine" / path.name / "REASON.txt").is_file()
    store = wsi.Store(wsi.StoreSettings(str(tmp_path / "store")))
    assert len(store.published_slides()) >= 2
