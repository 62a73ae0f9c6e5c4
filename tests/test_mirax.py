"""A genuine (synthetic) 3DHISTECH MIRAX slide, written by `sample_data/make_mirax.py`, through
every layer: OpenSlide opens it as vendor `mirax`; conversion stores OpenSlide's level 0 pixel
for pixel; the content id covers the companion folder; the folder watcher waits for every data
file Slidedat.ini lists; ingest converts it and moves `.mrxs` and folder together.

Pixels are always compared with OpenSlide's own `read_region` (the independent reader), never
with the generator's input, which JPEG has changed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np
import openslide
import pytest
import zarr

import wsi
from sample_data.make_mirax import tissue_image, write_mirax
from wsi import ConvertSettings, PyramidSettings, Store, StoreSettings, convert_slide
from wsi.ingest.queue import JobState, SQLiteJobQueue
from wsi.ingest.settings import IngestSettings
from wsi.ingest.source_files import submit_slide
from wsi.ingest.watcher import StabilityTracker, find_candidates
from wsi.slide_id import content_slide_id
from wsi.slidefiles import mrxs_required_files
from wsi.sources import open_slide

from .conftest import area_reference, openslide_level0, psnr
from .helpers import FakeClock, drain, settled

WIDTH, HEIGHT = 1500, 1100
LEVELS = 3
MPP = 0.25
DATA_FILES = [f"Data{k:04d}.dat" for k in range(LEVELS)]
QUIET = 0.3


@pytest.fixture(scope="session")
def mirax_image() -> np.ndarray:
    return tissue_image(WIDTH, HEIGHT, seed=3)


@pytest.fixture(scope="session")
def mirax_slide(tmp_path_factory: pytest.TempPathFactory, mirax_image: np.ndarray) -> Path:
    """Read-only by convention: tests that change files work on a copy (`copy_slide`)."""
    folder = tmp_path_factory.mktemp("mirax")
    return write_mirax(folder / "slide.mrxs", mirax_image, levels=LEVELS, mpp=MPP)


def copy_slide(src: Path, dest_dir: Path, name: str | None = None) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / (name or src.name)
    shutil.copyfile(src, dest)
    shutil.copytree(src.with_suffix(""), dest.with_suffix(""))
    return dest


def level_pixels(root: zarr.Group, k: int) -> np.ndarray:
    array = root[str(k)]
    assert isinstance(array, zarr.Array)
    return np.moveaxis(cast(np.ndarray, array[:]), 0, -1)


# ------------------------------------------------------------------------------------------
# The generator's output is a MIRAX slide to OpenSlide


def test_openslide_reads_it_as_mirax(mirax_slide: Path, mirax_image: np.ndarray) -> None:
    folder = mirax_slide.with_suffix("")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["Slidedat.ini", "Index.dat", *DATA_FILES]
    )
    assert openslide.OpenSlide.detect_format(str(mirax_slide)) == "mirax"
    with openslide.OpenSlide(str(mirax_slide)) as slide:
        assert slide.properties["openslide.vendor"] == "mirax"
        assert slide.dimensions == (WIDTH, HEIGHT)
        assert slide.level_dimensions == ((1500, 1100), (750, 550), (375, 275))
        assert slide.level_downsamples == (1.0, 2.0, 4.0)
        assert float(slide.properties["openslide.mpp-x"]) == MPP
        assert slide.properties["mirax.GENERAL.IMAGENUMBER_X"] == "6"  # 250-pixel images
        for k in range(LEVELS):
            rgba = np.asarray(slide.read_region((0, 0), k, slide.level_dimensions[k]))
            assert (rgba[..., 3] == 255).all(), f"level {k} has holes"
            # Level k is the 2^k area downsample of the input, through JPEG at quality 90.
            assert psnr(rgba[..., :3], area_reference(mirax_image, k)) > 32, f"level {k}"
        # Not a flat image: a copy shifted by one pixel matches far worse (so the PSNR checks
        # above would catch misplaced or mixed-up images).
        level0 = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))[..., :3]
        assert psnr(level0[:, 1:], mirax_image[:, :-1]) < psnr(level0, mirax_image) - 6


def test_image_placement_is_exact(tmp_path: Path) -> None:
    """Each 250 x 275 camera image lands where it belongs: blocks of distinct flat colours (JPEG
    keeps flat 8x8-aligned blocks nearly exact) come back in place, at level 0 and level 1."""
    rng = np.random.default_rng(7)
    colours = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(colours, 275, axis=0), 250, axis=1)
    path = write_mirax(tmp_path / "blocks.mrxs", image, tile=256, levels=2)
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.properties["openslide.level[0].tile-width"] == "250"
        assert slide.properties["openslide.level[0].tile-height"] == "275"
        level0 = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))[..., :3]
        level1 = np.asarray(slide.read_region((0, 0), 1, slide.level_dimensions[1]))[..., :3]
    for y in range(4):
        for x in range(6):
            centre = level0[y * 275 + 137, x * 250 + 125].astype(int)
            assert np.abs(centre - colours[y, x]).max() <= 3, (x, y)
            half = level1[(y * 275 + 137) // 2, (x * 250 + 125) // 2].astype(int)
            assert np.abs(half - colours[y, x]).max() <= 3, (x, y)


# ------------------------------------------------------------------------------------------
# Conversion


def test_open_slide_picks_the_mirax_backend(mirax_slide: Path) -> None:
    with wsi.open_slide(mirax_slide) as src:
        assert src.name == "mirax"
        assert [(lv.width, lv.height) for lv in src.levels] == [
            (1500, 1100),
            (750, 550),
            (375, 275),
        ]
        assert [lv.downsample for lv in src.levels] == [1.0, 2.0, 4.0]
        assert src.properties.vendor == "mirax"
        assert src.properties.mpp_x == src.properties.mpp_y == MPP
        assert src.properties.objective_power == 20
        assert src.associated_names == ()


def test_lossless_conversion_equals_openslide(mirax_slide: Path, tmp_path: Path) -> None:
    store = Store(StoreSettings(str(tmp_path / "store")))
    settings = ConvertSettings(pyramid=PyramidSettings(lossless=True), formats=("zarr",))
    result = convert_slide(mirax_slide, store, settings)
    assert result.slide_id == content_slide_id(mirax_slide)
    assert store.published_slides() == [result.slide_id]
    root = zarr.open_group(result.url, mode="r")
    level0 = openslide_level0(mirax_slide)
    assert level0.shape == (HEIGHT, WIDTH, 3)
    assert np.array_equal(level_pixels(root, 0), level0)
    k = 1
    while str(k) in root:
        ours, ref = level_pixels(root, k), area_reference(level0, k)
        assert ours.shape == ref.shape
        # Rounding only: at most half a unit per level made from the one above it.
        assert np.abs(ours.astype(float) - ref).max() <= 0.5 * (k + 1), f"level {k}"
        k += 1
    assert k >= 3
    attrs: dict[str, Any] = root.attrs.asdict()
    assert attrs["wsistore"]["vendor"] == "mirax"
    assert attrs["wsistore"]["levels"][0]["codec"] == "zstd"
    scale = attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]
    assert scale["scale"][1:] == [MPP, MPP]


# ------------------------------------------------------------------------------------------
# Content id


def test_content_id_covers_the_companion_folder(mirax_slide: Path, tmp_path: Path) -> None:
    sid = content_slide_id(mirax_slide)
    copy = copy_slide(mirax_slide, tmp_path / "copy")
    assert content_slide_id(copy) == sid  # same files elsewhere: same id
    with openslide.OpenSlide(str(copy)) as slide:
        quickhash = slide.properties["openslide.quickhash-1"]

    data = copy.with_suffix("") / "Data0000.dat"  # level 0: outside OpenSlide's quickhash
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    changed = content_slide_id(copy)
    assert changed != sid
    with openslide.OpenSlide(str(copy)) as slide:
        assert slide.properties["openslide.quickhash-1"] == quickhash

    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    assert content_slide_id(copy) == sid
    (copy.with_suffix("") / "Index.dat").write_bytes(
        (copy.with_suffix("") / "Index.dat").read_bytes() + b"\0"
    )
    assert content_slide_id(copy) not in (sid, changed)


# ------------------------------------------------------------------------------------------
# Watch folder


def test_watcher_waits_for_every_listed_data_file(mirax_slide: Path, tmp_path: Path) -> None:
    """A scanner's copy arrives file by file: `.mrxs`, then the folder's parts. The lowest-res
    data file is copied first and Data0000.dat last: OpenSlide already opens the slide before
    that (it reads level 0 only when asked for pixels), so only Slidedat.ini's file list says
    it is incomplete."""
    src_folder = mirax_slide.with_suffix("")
    assert mrxs_required_files(src_folder / "Slidedat.ini") == ["Index.dat", *DATA_FILES]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    mrxs = inbox / mirax_slide.name
    folder = inbox / src_folder.name
    clock = FakeClock()
    tracker = StabilityTracker(QUIET, clock=clock)

    shutil.copyfile(mirax_slide, mrxs)
    order = ["Slidedat.ini", "Index.dat", *reversed(DATA_FILES)]
    steps: list[tuple[str | None, tuple[str, ...]]] = []
    for i, name in enumerate([None, *order]):
        if name is not None:
            folder.mkdir(exist_ok=True)
            shutil.copyfile(src_folder / name, folder / name)
        (cand,) = find_candidates(inbox)
        assert cand.path == mrxs and cand.layout == "mrxs"
        steps.append((name, cand.pending))
        if i < len(order):
            assert not cand.complete, f"complete after copying {name}"
            for _ in range(3):  # however long it stays like this
                clock.step(QUIET * 2)
                assert tracker.update(find_candidates(inbox)) == []
    assert steps[0][1] == ("slide/ is missing",)
    assert steps[1][1] == tuple(f"slide/{n} is missing" for n in ["Index.dat", *DATA_FILES])
    assert steps[2][1] == tuple(f"slide/{n} is missing" for n in DATA_FILES)
    assert steps[-2][1] == ("slide/Data0000.dat is missing",)
    # The last incomplete state opens in OpenSlide: "openable" is not "complete".
    data0 = folder / "Data0000.dat"
    data0.rename(tmp_path / "held-back")
    with openslide.OpenSlide(str(mrxs)) as slide:
        assert slide.dimensions == (WIDTH, HEIGHT)
        with pytest.raises(openslide.OpenSlideError):
            slide.read_region((0, 0), 0, (16, 16))
    (tmp_path / "held-back").rename(data0)

    (cand,) = find_candidates(inbox)
    assert cand.complete, cand.pending
    expected = {mrxs, *(folder / n for n in order)}
    assert set(cand.files) == expected
    assert cand.total_bytes == sum(p.stat().st_size for p in expected)
    assert tracker.update(find_candidates(inbox)) == []  # complete, not yet quiet
    clock.step(QUIET)
    assert [c.path for c in tracker.update(find_candidates(inbox))] == [mrxs]
    for _ in range(3):
        clock.step(QUIET)
        assert tracker.update(find_candidates(inbox)) == []  # reported once
    assert content_slide_id(mrxs) == content_slide_id(mirax_slide)


# ------------------------------------------------------------------------------------------
# Ingest


def test_ingest_converts_and_moves_mrxs_with_its_folder(mirax_slide: Path, tmp_path: Path) -> None:
    slide = copy_slide(mirax_slide, tmp_path / "inbox")
    broken = copy_slide(mirax_slide, tmp_path / "inbox", "broken.mrxs")
    index = broken.with_suffix("") / "Index.dat"
    index.write_bytes(index.read_bytes()[:5] + b"not-this-slide" + index.read_bytes()[19:])
    settled(broken, broken.with_suffix(""))
    store = tmp_path / "store"
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    settings = IngestSettings(
        after_success="move",
        done_dir=str(tmp_path / "done"),
        quarantine_dir=str(tmp_path / "quarantine"),
        poll_seconds=0.1,
        convert_args=("--format", "zarr"),
    )
    sid = content_slide_id(slide)
    # As the watcher submits them: with every file of each slide.
    found = {c.path: c for c in find_candidates(tmp_path / "inbox")}
    job = submit_slide(queue, found[slide])
    bad_job = submit_slide(queue, found[broken])
    assert job.slide_id == sid
    drain(queue, str(store), settings)

    done = queue.get(job.id)
    assert done.state is JobState.DONE, done.error
    published = Store(StoreSettings(str(store)))
    assert published.published_slides() == [sid]
    assert published.read_manifest(sid)["width"] == WIDTH
    root = zarr.open_group(str(store / sid / "slide.zarr"), mode="r")
    # Default (lossy) settings: level 0 re-encoded as JPEG, close to OpenSlide's pixels.
    assert psnr(level_pixels(root, 0), openslide_level0(mirax_slide)) > 33
    assert not slide.exists() and not slide.with_suffix("").exists()
    moved = tmp_path / "done" / slide.name / slide.name
    assert moved.is_file() and (moved.with_suffix("") / "Data0000.dat").is_file()
    assert content_slide_id(moved) == sid  # still whole, still the same slide

    failed = queue.get(bad_job.id)
    assert failed.state is JobState.FAILED
    assert failed.error is not None and "slide identifier" in failed.error
    quarantined = tmp_path / "quarantine" / broken.name
    assert (quarantined / broken.name).is_file()
    assert (quarantined / "broken" / "Index.dat").is_file()
    assert "slide identifier" in (quarantined / "REASON.txt").read_text()
    with open_slide(moved) as src:  # the moved copy opens where it now is
        assert src.levels[0].width == WIDTH
