"""Huffman-optimised tiles: every stored JPEG tile (copied from the source or encoded here) is
rewritten with optimal Huffman tables, losslessly: the same DCT coefficients, so every decoder
gives the same pixels as from the source's own tile. `keep_source_jpeg` (PyramidSettings
`optimize_huffman=False`) keeps the source's bytes exactly.

Independent decoders: imagecodecs decodes the source's tiles, Pillow decodes ours, OpenSlide 4
reads the exported DICOM instances; none of them is the binding that wrote the tiles.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import openslide
import pytest
import zarr
from PIL import Image

import wsi
from wsi.export import export_dicom
from wsi.sources import open_slide

from .conftest import sample
from .helpers import run_wsi
from .test_convert import shard_chunks
from .test_converting_tiles import PLANTED, commented_tiff

CMU = sample("CMU-1-Small-Region.svs")
KEEP = {"keep_background": True}
"""Blank glass kept, so that every tile compares (tests/test_sparse.py covers the rest)."""


def convert(path: Path, root: Path, **pyramid: Any) -> tuple[wsi.Store, str, Path]:
    store = wsi.Store(wsi.StoreSettings(str(root)))
    result = wsi.convert_slide(path, store, wsi.ConvertSettings(wsi.PyramidSettings(**pyramid)))
    return store, result.slide_id, root / result.slide_id / "slide.zarr"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, synthetic_jpeg_tiff: Path) -> dict[str, Any]:
    """The generated JPEG pyramid and CMU-1, each converted optimised and as the source has it."""
    out: dict[str, Any] = {}
    for name, path in (("gen", synthetic_jpeg_tiff), ("cmu", CMU)):
        root = tmp_path_factory.mktemp(name)
        out[name] = {
            "path": path,
            "optimised": convert(path, root / "opt", **KEEP),
            "source": convert(path, root / "src", optimize_huffman=False, **KEEP),
        }
    return out


def pillow(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("name", ["gen", "cmu"])
def test_copied_tiles_are_smaller_and_decode_to_the_source_pixels(
    pair: dict[str, Any], name: str
) -> None:
    entry = pair[name]
    _, _, opt = entry["optimised"]
    _, _, src = entry["source"]
    with open_slide(entry["path"]) as source:
        lv = source.levels[0]
        ours = shard_chunks(opt / "0/c/0/0/0")
        theirs = [source.read_encoded_tile(0, c, r) for r in range(lv.rows) for c in range(lv.cols)]
    assert shard_chunks(src / "0/c/0/0/0") == theirs  # keep_source_jpeg: the source's bytes
    assert len(ours) == len(theirs)
    for mine, original in zip(ours, theirs, strict=True):
        assert len(mine) <= len(original)
        assert mine[:2] == b"\xff\xd8" and mine[2:4] != b"\xff\xc2"  # baseline, not progressive
        assert np.array_equal(pillow(mine), np.asarray(imagecodecs.jpeg8_decode(original)))
    saved = 1 - sum(map(len, ours)) / sum(map(len, theirs))
    assert saved > 0.03, saved


def test_tiles_we_encode_are_optimised_too(pair: dict[str, Any], tmp_path: Path) -> None:
    """Derived levels (no source level reused): the same pixels, fewer bytes."""
    path = pair["gen"]["path"]
    _, _, opt = convert(path, tmp_path / "opt", reuse_levels=False, **KEEP)
    _, _, plain = convert(
        path, tmp_path / "plain", reuse_levels=False, optimize_huffman=False, **KEEP
    )
    for k in (1, 2):
        ours = shard_chunks(opt / f"{k}/c/0/0/0")
        before = shard_chunks(plain / f"{k}/c/0/0/0")
        assert sum(map(len, ours)) < sum(map(len, before))
        for a, b in zip(ours, before, strict=True):
            assert np.array_equal(pillow(a), np.asarray(imagecodecs.jpeg8_decode(b)))


def test_openslide_reads_the_source_pixels_from_the_optimised_instances(
    pair: dict[str, Any], tmp_path: Path
) -> None:
    store, sid, root = pair["cmu"]["optimised"]
    export_dicom(store, sid, tmp_path / "dicom")
    with (
        openslide.OpenSlide(str(tmp_path / "dicom" / "level-0.dcm")) as ours,
        openslide.OpenSlide(str(CMU)) as source,
    ):
        size = source.dimensions
        a = np.asarray(ours.read_region((0, 0), 0, size))
        b = np.asarray(source.read_region((0, 0), 0, size))
        assert np.array_equal(a, b)
    array = zarr.open_group(str(root), mode="r")["0"]
    assert isinstance(array, zarr.Array)
    level0 = np.moveaxis(np.asarray(array[:]), 0, -1)
    assert np.array_equal(level0, b[..., :3])


def test_cli_keeps_the_source_jpeg_on_request(tmp_path: Path) -> None:
    out = tmp_path / "store"
    run = run_wsi("convert", str(CMU), "--out", str(out), "--keep-source-jpeg", "--keep-background")
    assert run.returncode == 0, run.stderr
    [manifest] = out.glob("*/manifest.json")
    settings = wsi.Store(wsi.StoreSettings(str(out))).read_manifest(manifest.parent.name)
    assert settings["settings"]["pyramid"]["optimize_huffman"] is False
    assert settings["settings"]["pyramid"]["keep_background"] is True
    with open_slide(CMU) as source:
        assert shard_chunks(manifest.parent / "slide.zarr/0/c/0/0/0")[5] == (
            source.read_encoded_tile(0, 5, 0)
        )


def test_a_corrupt_tile_does_not_break_the_thread() -> None:
    """libjpeg-turbo 2.1 left the thread's decompressor unusable after a header error: the next
    valid tile failed ("Bogus DQT index 15"). Blank-glass detection decodes on the converting
    thread, so one corrupt slide broke every later conversion of the process."""
    from wsi.codecs import jpeg

    with open_slide(CMU) as source:
        good = source.read_encoded_tile(0, 0, 0)
    with open_slide(sample("openslide-python-fixtures/unreadable.svs")) as broken:
        lv = broken.levels[-1]
        with pytest.raises(wsi.CorruptSlide):
            broken.read_region(len(broken.levels) - 1, 0, 0, lv.width, lv.height)
    assert np.array_equal(jpeg.decode(good), np.asarray(imagecodecs.jpeg8_decode(good)))


@pytest.mark.parametrize(("optimize", "glass"), [(False, True), (False, False), (True, True)])
def test_kept_source_tiles_carry_no_comment_or_exif(
    tmp_path: Path, optimize: bool, glass: bool
) -> None:
    """`--keep-source-jpeg` stored the source's tiles with their comment and EXIF block, where
    an encoder had written the patient's name: it reached the store and the DICOM export, under
    --deidentify too. Kept tiles are the source's bytes but those segments now (and so is the
    optimised tile where its rewrite would not be smaller); their pixels are the source's."""
    (tmp_path / "in").mkdir()
    path = commented_tiff(tmp_path / "in" / "slide.tif")
    settings = wsi.ConvertSettings(
        wsi.PyramidSettings(optimize_huffman=optimize, keep_background=glass), deidentify=True
    )
    store = wsi.Store(wsi.StoreSettings(str(tmp_path / "store")))
    sid = wsi.convert_slide(path, store, settings).slide_id
    export_dicom(store, sid, tmp_path / "export")
    written = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    written += list((tmp_path / "export").iterdir())
    assert not [p.name for p in written if PLANTED in p.read_bytes()]
    with open_slide(path) as source:
        tile = source.read_encoded_tile(0, 1, 1)
    stored = shard_chunks(tmp_path / "store" / sid / "slide.zarr/0/c/0/0/0")[3]
    assert PLANTED in tile and np.array_equal(pillow(stored), pillow(tile))
