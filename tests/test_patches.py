"""Many patches at once, tissue sampling and the patch dataset, against independent readers.

Patches are compared with `region()` of the same reader, with zarr-python reading the same store
and, on level 0 of a JPEG slide whose tiles are stored as the source has them, with OpenSlide
reading the source. The tissue sampler runs on a slide whose tissue cells are known (the random
cells `make_tiff` draws). The dataset runs without torch in a subprocess that cannot import it,
and through a DataLoader when torch is installed; the DataLoader's process rules (the dataset
pickled for spawned workers, copied into forked ones) are also checked with plain
multiprocessing, which needs no torch. S3 runs against the SeaweedFS the session starts.
"""

from __future__ import annotations

import gc
import multiprocessing
import pickle
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
from multiprocessing.context import ForkContext, SpawnContext
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import zarr

import wsi
from wsi import (
    InvalidArgument,
    PatchDataset,
    PatchSettings,
    ReaderSettings,
    TissueRule,
    coords_from_level0,
    open_published,
    sample_tissue_patches,
    tissue_mask,
    to_chw_float,
)
from wsi.published import layout

from .conftest import ROOT, make_tiff, openslide_level0
from .s3server import SeaweedFS
from .s3server import seaweedfs as _seaweedfs_fixture  # noqa: F401

KEPT = wsi.ConvertSettings(wsi.PyramidSettings(keep_background=True))
WIDTH, HEIGHT, SEED = 1837, 1411, 11
"""The generated slide: partial edge tiles both ways (7 x 6 tiles of 256 at level 0)."""


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiff(tmp_path_factory.mktemp("src") / "cells.tif", WIDTH, HEIGHT, seed=SEED)


@pytest.fixture(scope="module")
def store(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Blank glass kept: its fill is white, which `crop_padded` pads with (tests/test_sparse.py
    reads patches of slides whose blank tiles were left out)."""
    root = tmp_path_factory.mktemp("store")
    slide_id = wsi.convert_slide(source, wsi.Store(wsi.StoreSettings(str(root))), KEPT).slide_id
    return root, slide_id


@pytest.fixture(scope="module")
def location(store: tuple[Path, str]) -> str:
    return f"{store[0]}/{store[1]}"


def zarr_level(root: Path, slide_id: str, level: int) -> np.ndarray:
    """A whole level as zarr-python reads it, channels last."""
    group = zarr.open_group(str(root / slide_id / "slide.zarr"), mode="r")
    array = group[str(level)]
    assert isinstance(array, zarr.Array), level
    return np.asarray(array[:]).transpose(1, 2, 0)


def crop_padded(image: np.ndarray, x: int, y: int, width: int, height: int) -> np.ndarray:
    """image[y:y+height, x:x+width], white where the window leaves the image."""
    out = np.full((height, width, 3), layout.FILL_VALUE, np.uint8)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + width, image.shape[1]), min(y + height, image.shape[0])
    if x0 < x1 and y0 < y1:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = image[y0:y1, x0:x1]
    return out


def edge_cases(width: int, height: int, pw: int, ph: int, tile: int) -> list[tuple[int, int]]:
    """Corners across tile edges, at the right and bottom edges, overhanging and outside."""
    return [
        (0, 0),
        (tile - 7, tile - 3),  # across a tile corner: four tiles
        (tile, 2 * tile),  # exactly on tile boundaries
        (width - pw, height - ph),  # flush with the bottom-right corner
        (width - pw // 2, height - ph // 3),  # overhanging right and bottom
        (width - 1, 0),  # one column inside
        (-pw // 2, -5),  # overhanging left and top
        (width + 3, 10),  # wholly outside
        (10, -ph - 1),  # wholly outside
    ]


def random_corners(rng: np.random.Generator, width: int, height: int, n: int) -> np.ndarray:
    return np.stack([rng.integers(-40, width, n), rng.integers(-40, height, n)], axis=1)


# -- pixels ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", [0, 1, 2])
def test_patches_equal_region_and_zarr_python(store: tuple[Path, str], level: int) -> None:
    root, slide_id = store
    expected = zarr_level(root, slide_id, level)
    pw, ph = 96, 80  # not square: catches swapped axes
    with open_published(f"{root}/{slide_id}") as slide:
        lv = slide.level(level)
        rng = np.random.default_rng(level)
        edges = edge_cases(lv.width, lv.height, pw, ph, lv.tile_width)
        corners = np.concatenate([np.array(edges), random_corners(rng, lv.width, lv.height, 60)])
        patches = slide.patches(level, corners, (pw, ph))
        assert patches.shape == (len(corners), ph, pw, 3) and patches.dtype == np.uint8
        for (x, y), patch in zip(corners.tolist(), patches, strict=True):
            assert np.array_equal(patch, slide.region(level, x, y, pw, ph)), (x, y)
            assert np.array_equal(patch, crop_padded(expected, x, y, pw, ph)), (x, y)
        outside = patches[len(edges) - 2 : len(edges)]  # the last two edge cases
        assert (outside == 255).all()


def test_level0_patches_equal_openslide(store: tuple[Path, str], source: Path) -> None:
    """Level 0 holds the source's own JPEG tiles: OpenSlide decodes the same pixels."""
    root, slide_id = store
    reference = openslide_level0(source)  # outside the slide: transparent, composited on white
    with open_published(f"{root}/{slide_id}") as slide:
        corners = np.concatenate(
            [
                np.array(edge_cases(WIDTH, HEIGHT, 256, 256, 256)),
                random_corners(np.random.default_rng(5), WIDTH, HEIGHT, 40),
            ]
        )
        patches = slide.patches(0, corners, 256)
    for (x, y), patch in zip(corners.tolist(), patches, strict=True):
        assert np.array_equal(patch, crop_padded(reference, x, y, 256, 256)), (x, y)


def test_batching_and_read_settings_do_not_change_pixels(location: str) -> None:
    """Tiny batches, one tile per read, huge coalesced reads: the same patches."""
    corners = random_corners(np.random.default_rng(3), WIDTH, HEIGHT, 150)
    variants = [
        PatchSettings(batch_patches=1, read_bytes=1, gap_bytes=0),
        PatchSettings(batch_patches=7, read_bytes=40_000, gap_bytes=0),
        PatchSettings(read_bytes=64 << 20, gap_bytes=64 << 20, inflight_bytes=1),
    ]
    with open_published(location, settings=ReaderSettings(threads=3)) as slide:
        reference = slide.patches(0, corners, 128)
        for settings in variants:
            assert np.array_equal(slide.patches(0, corners, 128, settings), reference)
        # Into a caller's buffer: the same pixels, in that buffer.
        buffer = np.zeros_like(reference)
        assert slide.patches(0, corners, 128, out=buffer) is buffer
        assert np.array_equal(buffer, reference)
        for bad in (buffer[:-1], buffer.astype(np.uint16), buffer[:, ::-1], buffer.T):
            with pytest.raises(InvalidArgument, match="out must be"):
                slide.patches(0, corners, 128, out=bad)
        # Duplicates and the order of the request are kept.
        twice = np.concatenate([corners[::-1], corners[:5]])
        again = slide.patches(0, twice, 128)
        assert np.array_equal(again[: len(corners)], reference[::-1])
        assert np.array_equal(again[len(corners) :], reference[:5])


def test_zstd_levels(tmp_path: Path) -> None:
    """A lossless conversion stores zstd chunks: patches still equal zarr-python's pixels."""
    src = make_tiff(tmp_path / "deflate.tif", 700, 530, compression="deflate", seed=2)
    settings = wsi.ConvertSettings(pyramid=wsi.PyramidSettings(lossless=True), formats=("zarr",))
    st = wsi.Store(wsi.StoreSettings(str(tmp_path / "store")))
    slide_id = wsi.convert_slide(src, st, settings).slide_id
    expected = zarr_level(tmp_path / "store", slide_id, 0)
    corners = [(0, 0), (250, 250), (600, 450), (-10, 500)]
    with open_published(f"{tmp_path}/store/{slide_id}") as slide:
        assert slide.level(0).codec == "zstd"
        patches = slide.patches(0, corners, (130, 90))
    for (x, y), patch in zip(corners, patches, strict=True):
        assert np.array_equal(patch, crop_padded(expected, x, y, 130, 90))


def test_a_tile_the_shard_lacks_is_white(store: tuple[Path, str], tmp_path: Path) -> None:
    root, slide_id = store
    shutil.copytree(root / slide_id, tmp_path / slide_id)
    shard = tmp_path / slide_id / "slide.zarr" / "0" / "c" / "0" / "0" / "0"
    data = shard.read_bytes()
    with open_published(f"{tmp_path}/{slide_id}") as slide:
        level = slide.level(0)
        n = level.tile_count
        index = layout.decode_index(data[-layout.index_nbytes(n) :], n, "shard").copy()
        index[level.cols + 1] = layout.EMPTY_CHUNK  # tile (1, 1)
        shard.write_bytes(data[: -layout.index_nbytes(n)] + layout.encode_index(index))
        [patch] = slide.patches(0, [(200, 200)], 128)
    expected = zarr_level(tmp_path, slide_id, 0)
    assert np.array_equal(patch, expected[200:328, 200:328])
    assert (patch[56:, 56:] == 255).all() and not (patch[:56, :56] == 255).all()


def test_arguments(location: str) -> None:
    with open_published(location) as slide:
        assert slide.patches(0, np.zeros((0, 2), int), 64).shape == (0, 64, 64, 3)
        assert slide.patches(0, [], (30, 20)).shape == (0, 20, 30, 3)
        floats = slide.patches(1, np.array([[10.0, 20.0]]), 32)
        assert np.array_equal(floats, slide.patches(1, [(10, 20)], 32))
        size: Any  # some deliberately of a type `patches` does not take
        for coords, size in [
            ([(1, 2, 3)], 64),
            ([(1.5, 2)], 64),
            ([(0, 0)], 0),
            ([(0, 0)], (64, -1)),
            ([(0, 0)], "big"),
            ([(0, 0)], 100_000),  # beyond max_region_pixels
        ]:
            with pytest.raises(InvalidArgument):
                slide.patches(0, coords, size)
        with pytest.raises(InvalidArgument):
            slide.patches(len(slide.levels), [(0, 0)], 64)
        with pytest.raises(InvalidArgument):
            PatchSettings(batch_patches=0)

        level2 = slide.level(2)
        assert level2.downsample == 4.0
        corners = coords_from_level0(level2, [(0, 0), (403, 17), (1836, 1410)])
        assert corners.tolist() == [[0, 0], [100, 4], [459, 352]]


def test_integers_are_integers_and_sizes_cannot_wrap(location: str) -> None:
    """numpy int32 sizes multiplied into 0 and passed the region limit (65536 x 65536 then
    asked for a 12 GiB array); floats, None and strings were a raw TypeError or, for a patch
    size, truncated; True was a 1x1 patch; an unsigned coordinate 2**64 - 1 read the pixels at
    -1. Each is an InvalidArgument now, before anything is allocated or read."""
    with open_published(location) as slide:
        big: Any
        for big in (np.int32(65536), np.int64(2**62), 2**40):
            with pytest.raises(InvalidArgument, match="pixel limit"):
                slide.region(0, 0, 0, big, big)
        bad: Any
        for bad in (10.0, None, "3", True, np.float64(1)):
            with pytest.raises(InvalidArgument, match="must be an integer"):
                slide.region(0, 0, 0, bad, 8)
            with pytest.raises(InvalidArgument, match="must be an integer"):
                slide.region(0, bad, 0, 8, 8)
            with pytest.raises(InvalidArgument, match="must be an integer"):
                slide.tile(0, bad, 0)
            with pytest.raises(InvalidArgument, match="must be an integer"):
                slide.tile_bytes(bad, 0, 0)
        sizes: list[Any] = [True, (True, 4), (10.7, 8)]
        for size in sizes:
            with pytest.raises(InvalidArgument):
                slide.patches(0, [(0, 0)], size)
        with pytest.raises(InvalidArgument, match=r"below 2\*\*62"):
            slide.patches(0, np.array([[2**64 - 1, 0]], np.uint64), 8)
        # numpy integers are integers: the same pixels as Python ints
        region: list[Any] = [np.int64(1), np.int32(3), np.uint16(4), np.int64(20), np.int8(9)]
        assert np.array_equal(slide.region(*region), slide.region(1, 3, 4, 20, 9))
        tile: list[Any] = [np.int64(0), np.int32(0), np.uint8(0)]
        assert slide.tile_bytes(*tile) == slide.tile_bytes(0, 0, 0)


def test_a_batch_made_here_is_bounded_unless_the_caller_gives_the_array(location: str) -> None:
    """200,000 patches of 256 px asked for a 37 GiB array up front: the array a call makes is
    at most `max_batch_bytes`; a caller's own `out` may be larger (its memory, allocated)."""
    settings = ReaderSettings(max_batch_bytes=10 * 32 * 32 * 3)
    with open_published(location, settings=settings) as slide:
        assert slide.patches(0, [(0, 0)] * 10, 32).shape == (10, 32, 32, 3)
        with pytest.raises(InvalidArgument, match="max_batch_bytes"):
            slide.patches(0, [(0, 0)] * 11, 32)
        out = np.empty((11, 32, 32, 3), np.uint8)
        assert slide.patches(0, [(0, 0)] * 11, 32, out=out) is out
    with open_published(location) as slide, pytest.raises(InvalidArgument, match="max_batch_bytes"):
        slide.patches(0, np.zeros((200_000, 2), np.int64), 256)
    with pytest.raises(InvalidArgument):
        ReaderSettings(max_batch_bytes=0)


def test_memory_stays_bounded(location: str) -> None:
    """2,000 patches: besides the result, the call holds a few reads and one batch's plan,
    however many patches there are (tracemalloc sees numpy's buffers and every thread)."""
    budget = 4 << 20
    settings = ReaderSettings(threads=2)
    with open_published(location, settings=settings) as slide:
        slide.patches(0, [(0, 0)], 64)  # the index is cached, as it would be for any read
        overheads = []
        for n in (200, 2000):
            corners = random_corners(np.random.default_rng(n), WIDTH, HEIGHT, n)
            gc.collect()
            tracemalloc.start()
            try:
                patches = slide.patches(0, corners, 64, PatchSettings(batch_patches=256))
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            overheads.append(peak - patches.nbytes)
            assert patches.shape == (n, 64, 64, 3)
            del patches
    assert max(overheads) < budget, overheads
    assert overheads[1] < overheads[0] + (1 << 20), overheads  # does not grow with n


# -- tissue ---------------------------------------------------------------------------------------
def true_tissue_cells(width: int, height: int, seed: int) -> np.ndarray:
    """The 256-px cells `make_tiff` fills with tissue: its second draw from its generator."""
    rng = np.random.default_rng(seed)
    rng.integers(0, 255, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    return rng.random((-(-height // 256), -(-width // 256))) > 0.5


def tissue_fraction(cells: np.ndarray, x: int, y: int, size: int) -> float:
    """Fraction of the level-0 square at (x, y) inside tissue cells."""
    mask = np.repeat(np.repeat(cells, 256, axis=0), 256, axis=1)
    return float(mask[y : y + size, x : x + size].mean())


def test_tissue_cells_are_what_the_slide_shows(source: Path) -> None:
    """Guards the replay of make_tiff's draws: background cells are flat near-white."""
    cells = true_tissue_cells(WIDTH, HEIGHT, SEED)
    pixels = openslide_level0(source)
    for row, col in np.argwhere(~cells)[:6]:
        block = pixels[row * 256 + 8 : row * 256 + 248, col * 256 + 8 : col * 256 + 248]
        assert abs(float(block.mean()) - 245) < 2 and int(np.ptp(block)) < 20
    for row, col in np.argwhere(cells)[:6]:
        block = pixels[row * 256 + 8 : row * 256 + 248, col * 256 + 8 : col * 256 + 248]
        assert float(block.std()) > 20


HALF = TissueRule(min_side=512)
"""Mask from level 1 (918 x 705): one mask pixel is 2 x 2 level-0 pixels."""


@pytest.mark.parametrize(("level", "size"), [(0, 128), (1, 64)])
def test_tissue_patches_lie_in_tissue(location: str, level: int, size: int) -> None:
    cells = true_tissue_cells(WIDTH, HEIGHT, SEED)
    with open_published(location) as slide:
        mask = tissue_mask(slide, HALF)
        assert mask.level == 1 and mask.downsample == 2.0
        lv = slide.level(level)
        corners = sample_tissue_patches(slide, level, size, 200, 4, min_tissue=0.8, mask=mask)
        assert corners.shape == (200, 2) and corners.dtype == np.int64
        assert (corners >= 0).all()
        assert (corners[:, 0] <= lv.width - size).all()
        assert (corners[:, 1] <= lv.height - size).all()
        scale = int(lv.downsample)
        fractions = [tissue_fraction(cells, x * scale, y * scale, size * scale) for x, y in corners]
        assert min(fractions) >= 0.7 and float(np.mean(fractions)) >= 0.9, fractions
        assert (mask.fraction(lv, corners, size) >= 0.8).all()  # what was asked, by the mask
        # The patches show stain, not glass.
        patches = slide.patches(level, corners[:20], size)
        chroma = patches.max(axis=3).astype(int) - patches.min(axis=3)
        assert (chroma >= TissueRule().min_chroma).mean(axis=(1, 2)).min() >= 0.5

        same = sample_tissue_patches(slide, level, size, 200, 4, min_tissue=0.8, mask=mask)
        assert np.array_equal(same, corners)
        other = sample_tissue_patches(slide, level, size, 200, 5, min_tissue=0.8, mask=mask)
        assert not np.array_equal(other, corners)


def test_every_sampled_patch_has_the_tissue_asked_for_at_every_level(location: str) -> None:
    """A corner drawn as floor((anchor + jitter) / scale) could start one mask pixel before
    its anchor, most often on levels coarser than the mask: 0.5-2.5% of the patches held less
    tissue than `min_tissue` by the mask's own `fraction` (0.485 for 0.5)."""
    with open_published(location) as slide:
        mask = tissue_mask(slide, HALF)
        for lv in slide.levels:
            for size, min_tissue in ((16, 0.5), (32, 0.9), (7, 0.3)):
                corners = sample_tissue_patches(
                    slide, lv.index, size, 3000, 1, min_tissue=min_tissue, mask=mask
                )
                if not len(corners):
                    continue
                assert (mask.fraction(lv, corners, size) >= min_tissue).all(), (lv.index, size)
                assert (corners >= 0).all()
                assert (corners[:, 0] <= lv.width - size).all()
                assert (corners[:, 1] <= lv.height - size).all()
            if lv.downsample > mask.downsample:  # coarser than the mask: distinct level pixels
                few = sample_tissue_patches(slide, lv.index, 16, 20, 2, min_tissue=0.5, mask=mask)
                assert len({tuple(c) for c in few.tolist()}) == 20


def test_the_tissue_mask_matches_the_cells(location: str) -> None:
    cells = true_tissue_cells(WIDTH, HEIGHT, SEED)
    with open_published(location) as slide:
        mask = tissue_mask(slide, HALF).mask
        whole = tissue_mask(slide)  # default: the only level at least 1024 long is level 0
        assert whole.level == 0 and whole.mask.shape == (HEIGHT, WIDTH)
    truth = np.repeat(np.repeat(cells, 128, axis=0), 128, axis=1)[: mask.shape[0], : mask.shape[1]]
    assert (mask == truth).mean() > 0.95
    assert mask[~truth].mean() < 0.01  # glass is not tissue


def test_no_tissue_gives_no_corners(location: str) -> None:
    with open_published(location) as slide:
        nothing = tissue_mask(slide, TissueRule(min_chroma=255, min_side=512))
        assert not nothing.mask.any()
        assert sample_tissue_patches(slide, 0, 128, 10, seed=1, mask=nothing).shape == (0, 2)
        anything = tissue_mask(slide, HALF)
        too_big = sample_tissue_patches(slide, 0, 5000, 10, min_tissue=0, mask=anything)
        assert too_big.shape == (0, 2)
        # More patches than positions: positions repeat, jittered inside their mask pixel.
        lv = slide.level(2)
        size = (lv.width - 2, lv.height - 2)
        many = sample_tissue_patches(slide, 2, size, 100, seed=0, min_tissue=0, mask=anything)
        assert len(many) == 100 and ((many >= 0) & (many <= 2)).all()
        assert len({tuple(c) for c in many.tolist()}) > 1
        with pytest.raises(InvalidArgument):
            sample_tissue_patches(slide, 0, 128, 10, min_tissue=1.5, mask=anything)


# -- the dataset ----------------------------------------------------------------------------------
def read_in_worker(dataset: PatchDataset, indices: list[int], results: Any) -> None:
    """What a DataLoader worker does with the dataset it was handed (module level, so that a
    spawned process can import it): report whether it came with a reader, then read items."""
    inherited = dataset._slide is not None
    results.put((inherited, dataset.__getitems__(indices)))
    dataset.close()


def read_through_inherited_slide(slide: Any, results: Any) -> None:
    """A forked child's use of a slide its parent opened: read, close."""
    results.put(slide.region(1, 10, 20, 48, 32).tobytes())
    slide.close()


def close_inherited_slide(slide: Any, results: Any) -> None:
    """A forked child that only closes what it inherited (nothing of the parent's is touched)."""
    slide.close()
    try:
        slide.tile_bytes(0, 0, 0)
    except InvalidArgument as exc:
        results.put(str(exc))


def test_a_slide_opened_before_a_fork_reads_in_the_child(location: str) -> None:
    """A slide opened in a dataset's `__init__` reached DataLoader's forked workers with a loop
    thread that does not exist there: the first read waited for ever. The child opens the slide
    again for itself on its first read; closing in the child leaves the parent's reader alone."""
    context = multiprocessing.get_context("fork")
    with open_published(location) as slide:
        expected = slide.region(1, 10, 20, 48, 32).tobytes()
        for target, answer in (
            (read_through_inherited_slide, expected),
            (close_inherited_slide, "the slide is closed"),
        ):
            results = context.Queue()
            child = context.Process(target=target, args=(slide, results))
            child.start()
            try:
                assert results.get(timeout=120) == answer
            finally:
                child.join(60)
                if child.is_alive():
                    child.kill()
            assert child.exitcode == 0
        assert slide.region(1, 10, 20, 48, 32).tobytes() == expected  # the parent's still reads


def test_dataset_without_torch(location: str) -> None:
    """In a process where `import torch` fails: items, batches, transforms, labels, pickling."""
    script = textwrap.dedent(
        f"""
        import pickle, sys
        sys.modules["torch"] = None  # any import of torch now raises ImportError
        import numpy as np
        from wsi import PatchDataset, open_published, to_chw_float

        location = {location!r}
        corners = [(0, 0), (300, 200), (1800, 1400), (-20, 5)]
        dataset = PatchDataset(location, 1, corners, 64, labels=["a", "b", "c", "d"])
        assert len(dataset) == 4
        with open_published(location) as slide:
            expected = slide.patches(1, corners, 64)
        patch, label = dataset[1]
        assert label == "b" and np.array_equal(patch, expected[1])
        assert np.array_equal(dataset[-1][0], expected[3])
        batch = dataset.__getitems__([3, 0])
        assert [b[1] for b in batch] == ["d", "a"]
        assert np.array_equal(batch[0][0], expected[3])
        copy = pickle.loads(pickle.dumps(dataset))
        assert copy._slide is None and np.array_equal(copy[2][0], expected[2])
        floats = PatchDataset(location, 1, corners, 64, transform=to_chw_float)
        chw = floats[0]
        assert chw.shape == (3, 64, 64) and chw.dtype == np.float32
        assert np.allclose(chw * 255, expected[0].transpose(2, 0, 1))
        try:
            dataset[4]
        except IndexError:
            pass
        else:
            raise AssertionError("index 4 of 4 items")
        dataset.close(); copy.close(); floats.close()
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_dataset_in_worker_processes(location: str, method: str) -> None:
    """DataLoader's process rules, without torch: a worker is a `multiprocessing.Process` given
    the dataset, which a spawned child receives pickled and a forked child as a copy of the
    parent's memory, here after the parent has read items (so the copy holds the parent's
    reader, whose loop thread and pool do not exist in the child)."""
    corners = random_corners(np.random.default_rng(8), WIDTH, HEIGHT, 12)
    dataset = PatchDataset(location, 0, corners, 48)
    try:
        expected = dataset.__getitems__(list(range(12)))  # opens the reader in this process
        assert dataset._slide is not None
        context = multiprocessing.get_context(method)
        assert isinstance(context, (ForkContext, SpawnContext))  # the ones with a Process
        results = context.Queue()
        jobs = [[0, 1, 2, 3, 4, 5], [11, 6]]
        workers = [
            context.Process(target=read_in_worker, args=(dataset, job, results), daemon=True)
            for job in jobs
        ]
        for worker in workers:
            worker.start()
        try:
            answers = [results.get(timeout=120) for _ in workers]
        finally:
            for worker in workers:
                worker.join(timeout=60)
                if worker.is_alive():
                    worker.kill()
        assert [worker.exitcode for worker in workers] == [0, 0]
        assert {inherited for inherited, _ in answers} == {method == "fork"}
        got = sorted((items for _, items in answers), key=len, reverse=True)
        for job, items in zip(jobs, got, strict=True):
            assert all(np.array_equal(a, expected[i]) for i, a in zip(job, items, strict=True))
        assert np.array_equal(dataset[3], expected[3])  # the parent's reader still works
    finally:
        dataset.close()


def test_dataset_with_torch_dataloader(location: str) -> None:
    torch = pytest.importorskip("torch", reason="torch is optional: the stand-ins above run")
    from torch.utils.data import DataLoader, Dataset

    corners = random_corners(np.random.default_rng(9), WIDTH, HEIGHT, 20)
    with open_published(location) as slide:
        expected = slide.patches(0, corners, 32)
    labels = list(range(20))
    dataset = PatchDataset(location, 0, corners, 32, transform=to_chw_float, labels=labels)
    try:
        dataset[0]  # the parent opens a reader before the workers fork
        # DataLoader takes any object with __getitem__ and __len__; torch types it as a Dataset
        loader: DataLoader[Any] = DataLoader(
            cast(Dataset[Any], dataset), batch_size=6, num_workers=2, shuffle=False
        )
        images, targets = [], []
        for batch, label in loader:
            assert isinstance(batch, torch.Tensor) and batch.dtype == torch.float32
            images.append(batch.numpy())
            targets.extend(label.tolist())
    finally:
        dataset.close()
    assert targets == labels
    got = np.concatenate(images)
    assert got.shape == (20, 3, 32, 32)
    assert np.array_equal(np.rint(got * 255).astype(np.uint8), expected.transpose(0, 3, 1, 2))


def test_dataset_pickles_without_its_reader(location: str) -> None:
    dataset = PatchDataset(location, 2, [(1, 2)], 16)
    first = dataset[0]
    state = pickle.dumps(dataset)
    assert len(state) < 4096  # coordinates and settings, no reader
    copy = pickle.loads(state)
    assert np.array_equal(copy[0], first)
    copy.close()
    dataset.close()
    with pytest.raises(InvalidArgument):
        PatchDataset(location, 9, [(0, 0)], 16)
    with pytest.raises(InvalidArgument):
        PatchDataset(location, 0, [(0, 0)], 16, labels=[1, 2])
    # A patch over the region limit is refused here, not by the first read in a worker.
    with pytest.raises(InvalidArgument, match="pixel limit"):
        PatchDataset(location, 0, [(0, 0)], 100_000)


# -- S3 -------------------------------------------------------------------------------------------
@pytest.mark.s3
def test_patches_from_s3_equal_the_local_store(
    seaweedfs: SeaweedFS, source: Path, location: str
) -> None:
    url = seaweedfs.url("patches")
    s3 = wsi.Store(wsi.StoreSettings(url, endpoint_url=seaweedfs.endpoint_url))
    slide_id = wsi.convert_slide(source, s3, KEPT).slide_id
    remote_location = f"{url}/{slide_id}"
    corners = np.concatenate(
        [
            np.array(edge_cases(WIDTH, HEIGHT, 200, 150, 256)),
            random_corners(np.random.default_rng(12), WIDTH, HEIGHT, 80),
        ]
    )
    with (
        open_published(remote_location, s3_endpoint=seaweedfs.endpoint_url) as remote,
        open_published(location) as local,
    ):
        for level in (0, 1):
            expected = local.patches(level, corners, (200, 150))
            assert np.array_equal(remote.patches(level, corners, (200, 150)), expected)
            one_tile_reads = PatchSettings(read_bytes=1, gap_bytes=0, batch_patches=16)
            assert np.array_equal(
                remote.patches(level, corners, (200, 150), one_tile_reads), expected
            )
        tissue = sample_tissue_patches(remote, 0, 128, 30, seed=2)
        assert np.array_equal(tissue, sample_tissue_patches(local, 0, 128, 30, seed=2))
    dataset = PatchDataset(remote_location, 1, corners[:8], 64, s3_endpoint=seaweedfs.endpoint_url)
    try:
        with open_published(location) as local:
            want = local.patches(1, corners[:8], 64)
        assert all(
            np.array_equal(a, b)
            for a, b in zip(dataset.__getitems__(list(range(8))), want, strict=True)
        )
    finally:
        dataset.close()
