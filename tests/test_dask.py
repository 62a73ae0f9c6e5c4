"""One slide's pyramid across a Dask cluster (`wsi.pyramid.cluster`): byte-identical output.

A real `distributed.LocalCluster` of two worker processes builds the bands; every object the
distributed conversion publishes is compared byte for byte with a conversion in one process, on
a local folder and on SeaweedFS. Parts are made small (`min_part_bytes`) so that the workers'
own part writes, the coordinator's groups and part 1 (header first) are all exercised on small
slides. A worker SIGKILLed while it runs a band only means the band runs again; a coordinator
SIGKILLed mid-run leaves nothing published, and the rerun completes and cleans up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import google_crc32c
import pytest
from distributed import Client, LocalCluster

import wsi
from wsi.convert import ConvertSettings, convert_slide
from wsi.pyramid.builder import PyramidSettings
from wsi.pyramid.cluster import BandResult, ClusterOptions, check_address
from wsi.pyramid.cluster.parts import MIN_PART_BYTES, crc32c_combine
from wsi.store.objects import TEMP_MARK

from .conftest import make_tiff
from .helpers import run_wsi
from .s3server import SeaweedFS
from .s3server import seaweedfs as _seaweedfs_fixture  # noqa: F401

SMALL_PART = 16 * 1024
"""Parts this small make every code path of the joining run on slides of a few megapixels."""


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0"
    ) as running:
        yield running


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("dask-slides")
    import pyvips

    blank = folder / "blank.tif"
    grey = (pyvips.Image.black(700, 600, bands=3) + 245).cast("uchar")
    grey.tiffsave(str(blank), tile=True, compression="jpeg", tile_width=256, tile_height=256)
    return {
        # odd sizes: the last band is short, levels end mid-tile
        "jpeg": make_tiff(folder / "jpeg.tif", 1237, 1029, pyramid=False, seed=1),
        # libvips's exact 2x levels are copied: a segment per level
        "pyramid": make_tiff(folder / "pyramid.tif", 1737, 1529, seed=2),
        # decoded and encoded base, deeper levels built by the coordinator from level-k pixels
        "deflate": make_tiff(
            folder / "deflate.tif", 2300, 1900, compression="deflate", pyramid=False, seed=3
        ),
        # 9 tile rows: levels of 9, 5, 2 and 1 rows (`test_halves_of_odd_levels_join_exactly`)
        "odd": make_tiff(
            folder / "odd.tif", 1237, 2051, compression="deflate", pyramid=False, seed=6
        ),
        # blank glass only: every level's DICOM instance holds the placeholder frame
        "blank": blank,
        # JPEG 2000 tiles (Aperio 33005), kept as codestreams with keep_jpeg2000
        "j2k": make_j2k_slide(folder / "small.j2k.svs"),
    }


def make_j2k_slide(path: Path) -> Path:
    from sample_data.make_j2k import main as make_j2k

    assert make_j2k([str(path), "--width", "1100", "--height", "900", "--seed", "5"]) == 0
    return path


CASES = {
    "jpeg": ("jpeg", ConvertSettings(), 2),
    "pyramid": ("pyramid", ConvertSettings(), 4),
    "deflate": ("deflate", ConvertSettings(), 4),
    "lossless": (
        "deflate",
        ConvertSettings(pyramid=PyramidSettings(lossless=True), formats=("zarr",)),
        2,
    ),
    "dicom-kept": (
        "jpeg",
        ConvertSettings(
            pyramid=PyramidSettings(keep_background=True, optimize_huffman=False),
            formats=("dicom",),
        ),
        2,
    ),
    "blank": ("blank", ConvertSettings(), 2),
    "j2k-kept": ("j2k", ConvertSettings(pyramid=PyramidSettings(keep_jpeg2000=True)), 2),
}


def local_objects(root: Path) -> dict[str, bytes]:
    """Every file under `root`, temporaries too (there must be none)."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_local_store_byte_identical(
    case: str, slides: dict[str, Path], cluster: LocalCluster, tmp_path: Path
) -> None:
    name, settings, band_rows = CASES[case]
    plain = wsi.Store(wsi.StoreSettings(str(tmp_path / "plain")))
    spread = wsi.Store(wsi.StoreSettings(str(tmp_path / "dask")))
    convert_slide(slides[name], plain, settings)
    bands: list[BandResult] = []
    options = ClusterOptions(
        cluster.scheduler_address,
        band_rows=band_rows,
        min_part_bytes=SMALL_PART,
        on_band=bands.append,
    )
    result = convert_slide(slides[name], spread, settings, cluster=options)
    expected, got = local_objects(tmp_path / "plain"), local_objects(tmp_path / "dask")
    assert sorted(got) == sorted(expected)
    assert [key for key in expected if got[key] != expected[key]] == []
    assert not any(TEMP_MARK in key for key in got)
    assert spread.published_slides() == [result.slide_id]
    assert [b.band for b in bands] == list(range(len(bands))) and len(bands) >= 2
    if case == "jpeg":  # some tails were written by the workers themselves
        assert any(share.tail is not None for b in bands for share in b.shares)


@pytest.mark.parametrize("band_rows", [2, 4])
def test_halves_of_odd_levels_join_exactly(
    band_rows: int, slides: dict[str, Path], cluster: LocalCluster, tmp_path: Path
) -> None:
    """Bands halve their row of level k into half of a row of level k+1; the coordinator joins
    the halves of bands 2r and 2r+1. On levels of 9, 5, 2 and 1 tile rows (5, 3, 2, 1
    columns): with bands of 2 rows, band 4's half of level 2 lies past that level's 2 rows and
    is dropped, and level 2's second column joins a white quarter (level 1 has 3 columns); with
    bands of 4 rows, band 2 has no row of level 2 (it has 2) and level 3's only row is joined
    from bands 0 and 1. Every object is still the one a single process makes. Parts have their
    default size: none on a local folder, so bands write all their bytes themselves."""
    plain = wsi.Store(wsi.StoreSettings(str(tmp_path / "plain")))
    spread = wsi.Store(wsi.StoreSettings(str(tmp_path / "dask")))
    convert_slide(slides["odd"], plain)
    bands: list[BandResult] = []
    options = ClusterOptions(cluster.scheduler_address, band_rows=band_rows, on_band=bands.append)
    convert_slide(slides["odd"], spread, cluster=options)
    expected, got = local_objects(tmp_path / "plain"), local_objects(tmp_path / "dask")
    assert sorted(got) == sorted(expected)
    assert [key for key in expected if got[key] != expected[key]] == []
    shares = [share for b in bands for share in b.shares]
    assert all(share.head == b"" for share in shares)
    assert all((share.tail is None) == (share.size == 0) for share in shares)
    halves = [b.half for b in bands]
    if band_rows == 2:  # level 2: 2 columns of 256 px, halves 128 px high
        assert len(halves) == 5 and all(h is not None and h.shape == (128, 512, 3) for h in halves)
        assert halves[4] is not None and (halves[4][:, 384:] == 255).all()
    else:  # level 3: 1 column
        assert len(halves) == 3 and halves[2] is None
        assert all(h is not None and h.shape == (128, 256, 3) for h in halves[:2])


@pytest.fixture(scope="module")
def noise_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Independent noise per channel, stored losslessly: at JPEG quality 100 4:4:4 about 4 bytes
    a pixel, so that a band of 4 tile rows of level 0 is over twice S3's 5 MiB part minimum
    (which SeaweedFS enforces) and workers upload parts of real size."""
    import pyvips

    path = tmp_path_factory.mktemp("dask-noise") / "noise.tif"
    channels = [pyvips.Image.gaussnoise(4096, 2560, sigma=40, mean=128, seed=s) for s in (5, 6, 7)]
    image = channels[0].bandjoin(channels[1:]).cast("uchar")
    image.tiffsave(str(path), tile=True, compression="deflate", tile_width=256, tile_height=256)
    return path


@pytest.mark.s3
def test_s3_byte_identical_with_parts_from_workers(noise_slide: Path, seaweedfs: SeaweedFS) -> None:
    """Worker processes (started after the fixture set the server's credentials) upload parts
    of real multipart uploads, every part but the last at least 5 MiB; the coordinator
    completes them. Every object is compared with a conversion in one process."""
    prefix = f"dask-{os.getpid()}"
    plain = wsi.Store(wsi.StoreSettings(seaweedfs.url(f"{prefix}/plain"), seaweedfs.endpoint_url))
    spread = wsi.Store(wsi.StoreSettings(seaweedfs.url(f"{prefix}/dask"), seaweedfs.endpoint_url))
    settings = ConvertSettings(pyramid=PyramidSettings(quality=100, subsample_420=False))
    plain_result = convert_slide(noise_slide, plain, settings)
    bands: list[BandResult] = []
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0"
    ) as s3_cluster:
        options = ClusterOptions(s3_cluster.scheduler_address, band_rows=4, on_band=bands.append)
        result = convert_slide(noise_slide, spread, settings, cluster=options)
    assert result.slide_id == plain_result.slide_id
    sid = result.slide_id
    keys = plain.list_keys(sid)
    assert spread.list_keys(sid) == keys and len(keys) > 5
    for key in keys:
        assert spread.get(key) == plain.get(key), key
    tails = [share.tail for b in bands for share in b.shares if share.tail is not None]
    assert len(tails) >= 2 and all(t.size >= MIN_PART_BYTES for t in tails)
    bucket, _, root = spread.path(sid).partition("/")
    uploads = spread.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=root + "/")
    assert uploads.get("Uploads", []) == []


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Base level decoded and encoded (deflate): bands of a few hundred ms each on a worker."""
    folder = tmp_path_factory.mktemp("dask-big")
    return make_tiff(folder / "big.tif", 6000, 5000, compression="deflate", pyramid=False, seed=4)


@pytest.fixture(scope="module")
def big_reference(big_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("dask-big-ref")
    convert_slide(big_slide, wsi.Store(wsi.StoreSettings(str(root))))
    return local_objects(root)


def _page_faults_of_reallocating() -> int:
    """Minor page faults of this process while it allocates, fills and frees 1 MiB 100 times:
    about 25,600 when every such allocation is a fresh mapping, a handful when freed memory is
    reused."""
    import resource

    import numpy as np

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(100):
        block = np.ones(1 << 20, np.uint8)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_a_band_lets_its_worker_reuse_freed_memory(slides: dict[str, Path], tmp_path: Path) -> None:
    """A nanny starts its worker with MALLOC_TRIM_THRESHOLD_ set, so glibc maps and unmaps
    every allocation over 128 KiB (a band's tiles are 192 KiB): the first band restores
    glibc's own thresholds in its worker (`bands._reuse_freed_memory`), after which a freed
    megabyte is reused instead of faulted in again page by page."""
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0") as one,
        Client(one.scheduler_address, set_as_default=False) as client,
    ):
        assert set(client.run(os.getenv, "MALLOC_TRIM_THRESHOLD_").values()) == {"65536"}
        (untuned,) = client.run(_page_faults_of_reallocating).values()
        options = ClusterOptions(one.scheduler_address, band_rows=2)
        convert_slide(slides["jpeg"], wsi.Store(wsi.StoreSettings(str(tmp_path))), cluster=options)
        (tuned,) = client.run(_page_faults_of_reallocating).values()
    assert untuned > 20_000
    assert tuned < 2_000


def test_worker_killed_mid_band_runs_it_again(
    big_slide: Path, big_reference: dict[str, bytes], cluster: LocalCluster, tmp_path: Path
) -> None:
    """SIGKILL a worker process while the scheduler has a band running on it: the band runs
    again (on the restarted or the other worker) and the output is still identical."""
    watcher = Client(cluster.scheduler_address, set_as_default=False)
    pids = watcher.run(os.getpid)
    killed: list[str] = []
    """Keys of the bands the killed worker had."""
    done = threading.Event()

    def kill_a_busy_worker() -> None:
        while not done.is_set():
            for address, keys in watcher.processing().items():
                if any(str(key).startswith("wsi-band-") for key in keys) and address in pids:
                    os.kill(pids[address], signal.SIGKILL)
                    killed.extend(str(key) for key in keys)
                    return
            done.wait(0.005)

    thread = threading.Thread(target=kill_a_busy_worker, daemon=True)
    thread.start()
    store = wsi.Store(wsi.StoreSettings(str(tmp_path / "out")))
    options = ClusterOptions(cluster.scheduler_address, band_rows=2, min_part_bytes=SMALL_PART)
    try:
        convert_slide(big_slide, store, cluster=options)
        done.set()
        thread.join(10)
        assert killed, "no band was seen running"
        story = watcher.story(*killed)
    finally:
        done.set()
        watcher.close()
    # The scheduler sent one of the killed worker's bands to a worker again.
    runs = [entry for entry in story if entry[2] == "processing"]
    assert len(runs) > len(killed), story
    got = local_objects(tmp_path / "out")
    assert sorted(got) == sorted(big_reference)
    assert [key for key in big_reference if got[key] != big_reference[key]] == []


def test_coordinator_killed_leaves_nothing_published_and_rerun_completes(
    big_slide: Path, big_reference: dict[str, bytes], tmp_path: Path
) -> None:
    """`wsi convert --dask local:2` (coordinator, scheduler and workers: one process group) is
    SIGKILLed as soon as it reports progress (a band is done, the rest are not): no slide is
    published; the rerun removes the leftovers and publishes the same bytes."""
    out = tmp_path / "out"
    read_fd, write_fd = os.pipe()
    command = [sys.executable, "-m", "wsi.cli", "convert", str(big_slide), "--out", str(out)]
    proc = subprocess.Popen(
        [*command, "--dask", "local:2", "--no-progress", "--progress-fd", str(write_fd)],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.close(write_fd)
    seen: list[float] = []
    with proc, os.fdopen(read_fd) as lines:
        for line in lines:
            seen.append(json.loads(line)["progress"])
            if 0 < seen[-1] < 100:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        assert proc.wait(60) == -signal.SIGKILL, seen
    store = wsi.Store(wsi.StoreSettings(str(out)))
    assert store.published_slides() == []
    assert run_wsi("list", str(out)).stdout.strip() == ""
    rerun = run_wsi("convert", str(big_slide), "--out", str(out), "--dask", "local:2")
    assert rerun.returncode == 0, rerun.stderr
    got = local_objects(out)
    assert sorted(got) == sorted(big_reference)
    assert [key for key in big_reference if got[key] != big_reference[key]] == []


def test_cli_refuses_a_bad_address(tmp_path: Path, slides: dict[str, Path]) -> None:
    run = run_wsi("convert", str(slides["jpeg"]), "--out", str(tmp_path), "--dask", "local:0")
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        "wsi: error: --dask takes tcp://HOST:PORT or local:N (N >= 1), not 'local:0'"
    ]
    assert check_address("tcp://10.0.0.1:8786") == "tcp://10.0.0.1:8786"


def test_crc32c_combine_matches_the_whole() -> None:
    a, b = os.urandom(1000), os.urandom(12345)
    whole = google_crc32c.value(a + b)
    assert crc32c_combine(google_crc32c.value(a), google_crc32c.value(b), len(b)) == whole
    assert crc32c_combine(0, google_crc32c.value(b), len(b)) == google_crc32c.value(b)
    assert crc32c_combine(
        google_crc32c.value(a), google_crc32c.value(b""), 0
    ) == google_crc32c.value(a)
    for size in (1, 7, 8, 255, 4096, 65537, 3 << 20):  # every bit of the length up to 2^21
        tail = os.urandom(size)
        combined = crc32c_combine(google_crc32c.value(a), google_crc32c.value(tail), size)
        assert combined == google_crc32c.value(a + tail), size
