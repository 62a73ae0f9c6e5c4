"""Conversions checked against independent readers: OpenSlide (pixels), tifffile (bytes),
zarr-python (the OME-Zarr view), and an exact area downsample (derived levels)."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import google_crc32c
import numpy as np
import pytest
import tifffile
import zarr

import wsi
from wsi import (
    ConvertResult,
    ConvertSettings,
    PyramidSettings,
    Store,
    StoreSettings,
    convert_slide,
)
from wsi.slide_id import content_slide_id
from wsi.sources import open_slide

from .conftest import area_reference, openslide_level0, psnr, sample, shared


def zarr_array(root: zarr.Group, key: str) -> zarr.Array:
    """The array at `key` (zarr types a member as an array or a group)."""
    array = root[key]
    assert isinstance(array, zarr.Array)
    return array


def group_attrs(root: zarr.Group, key: str) -> dict[str, Any]:
    """One JSON object of a group's attributes (zarr types an attribute as any JSON value)."""
    return cast(dict[str, Any], root.attrs.asdict()[key])


def level_pixels(root: zarr.Group, k: int) -> np.ndarray:
    return np.moveaxis(cast(np.ndarray, zarr_array(root, str(k))[:]), 0, -1)


def shard_chunks(path: Path) -> list[bytes]:
    """Chunks of a shard object, read by parsing the index at its end (independent of zarr)."""
    data = path.read_bytes()
    meta = json.loads((path.parents[3] / "zarr.json").read_text())
    shard = meta["codecs"][0]["configuration"]
    grid = [
        s // c
        for s, c in zip(
            meta["chunk_grid"]["configuration"]["chunk_shape"], shard["chunk_shape"], strict=True
        )
    ]
    n = int(np.prod(grid))
    index = data[-(16 * n + 4) : -4]
    assert struct.unpack("<I", data[-4:])[0] == google_crc32c.value(index)
    entries = np.frombuffer(index, "<u8").reshape(n, 2)
    return [data[o : o + size] for o, size in entries]


def convert(path: Path, tmp_path: Path, **pyramid: Any) -> tuple[Store, ConvertResult, zarr.Group]:
    store = Store(StoreSettings(str(tmp_path / "store")))
    # zstd (lossless) tiles have no DICOM transfer syntax: such conversions publish Zarr only.
    formats = ("zarr",) if pyramid.get("lossless") else ("zarr", "dicom")
    settings = ConvertSettings(PyramidSettings(**pyramid), formats=formats)
    result = convert_slide(path, store, settings)
    root = zarr.open_group(result.url, mode="r")
    return store, result, root


OPENSLIDE_READABLE = [
    "CMU-1-Small-Region.svs",
    "standin:aperio-jp2k.svs",
    shared("tcga-cr-7395-01a-01-ts1.svs"),
    "openslide-python-fixtures/small.svs",
    "openslide-python-fixtures/boxes.tiff",
    "openslide-python-fixtures/boxes_0.dcm",
    "hamamatsu/test3-DAPI-2-(387).ndpi",
    "highdicom/sm_image.dcm",
]


@pytest.mark.parametrize("name", OPENSLIDE_READABLE)
def test_base_level_equals_openslide(
    name: str, tmp_path: Path, slide_path: Callable[[str], Path]
) -> None:
    """JPEG sources are passed through (identical pixels: their Huffman tables are optimised,
    not their coefficients); others are stored losslessly here. Blank glass is kept, so every
    tile compares (tests/test_sparse.py covers the tiles left out)."""
    path = slide_path(name)
    with open_slide(path) as src:
        jpeg_source = src.tile_codec(0) is wsi.TileCodec.JPEG
    _, _, root = convert(path, tmp_path, lossless=not jpeg_source, keep_background=True)
    assert np.array_equal(level_pixels(root, 0), openslide_level0(path))
    attrs = group_attrs(root, "wsistore")
    assert attrs["levels"][0]["codec"] == ("jpeg" if jpeg_source else "zstd")


def test_jpegls_dicom_converts_with_wsidicom_pixels(tmp_path: Path) -> None:
    from wsidicom import WsiDicom

    path = sample("highdicom/sm_image_jpegls.dcm")
    _, _, root = convert(path, tmp_path, lossless=True)
    with WsiDicom.open(path) as ref:
        expected = np.asarray(ref.read_region((0, 0), 0, ref.size.to_tuple()).convert("RGB"))
    assert np.array_equal(level_pixels(root, 0), expected)


def test_passed_through_tiles_are_the_source_bytes(tmp_path: Path) -> None:
    """With `--keep-source-jpeg` (and blank glass kept) level 0 is the source's tiles."""
    path = sample("CMU-1-Small-Region.svs")
    _, result, _ = convert(path, tmp_path, optimize_huffman=False, keep_background=True)
    chunks = shard_chunks(tmp_path / "store" / result.slide_id / "slide.zarr/0/c/0/0/0")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert len(chunks) == len(page.dataoffsets)
        for chunk, offset, count in zip(chunks, page.dataoffsets, page.databytecounts, strict=True):
            tif.filehandle.seek(offset)
            assert chunk.endswith(tif.filehandle.read(count)[2:])


@pytest.mark.parametrize(("subsample_420", "floor_db"), [(False, 38.0), (True, 32.5)])
def test_derived_levels_psnr_against_exact_area_downsample(
    tmp_path: Path, subsample_420: bool, floor_db: float
) -> None:
    """CMU-1 is dense tissue edge to edge: the hardest case for JPEG at lower levels. Quality
    90 both times: RGB-coded 4:4:4 tiles, and the default YCbCr 4:2:0."""
    path = sample("CMU-1-Small-Region.svs")
    _, _, root = convert(path, tmp_path, quality=90, subsample_420=subsample_420)
    level0 = openslide_level0(path)
    k = 1
    while str(k) in root:
        ours = level_pixels(root, k)
        ref = area_reference(level0, k)
        assert ours.shape == ref.shape
        assert psnr(ours, ref) >= floor_db, f"level {k}"
        k += 1
    assert max(zarr_array(root, "0").shape[1:]) > 240 * 2 and k >= 4  # down to one tile


def test_lossless_derived_levels_are_near_exact(tmp_path: Path) -> None:
    path = sample("openslide-python-fixtures/boxes.tiff")
    _, _, root = convert(path, tmp_path, lossless=True, tile_size=64)
    level0 = openslide_level0(path)
    for k in (1, 2):
        ours, ref = level_pixels(root, k), area_reference(level0, k)
        assert np.abs(ours.astype(float) - ref).max() <= 1.0  # rounding only


def test_exact_2x_source_levels_are_reused_byte_for_byte(
    tmp_path: Path, synthetic_jpeg_tiff: Path
) -> None:
    """With `--keep-source-jpeg` (and blank glass kept) reused levels are the source's tiles."""
    settings = {"optimize_huffman": False, "keep_background": True}
    _, result, root = convert(synthetic_jpeg_tiff, tmp_path, **settings)
    base = tmp_path / "store" / result.slide_id / "slide.zarr"
    with open_slide(synthetic_jpeg_tiff) as src:
        for k, lv in enumerate(src.levels):
            assert zarr_array(root, str(k)).shape == (3, lv.height, lv.width)
            chunks = shard_chunks(base / str(k) / "c/0/0/0")
            expected = [
                src.read_encoded_tile(k, c, r) for r in range(lv.rows) for c in range(lv.cols)
            ]
            assert chunks == expected


def test_derived_instead_of_reused_when_asked(tmp_path: Path, synthetic_jpeg_tiff: Path) -> None:
    _, _, root = convert(synthetic_jpeg_tiff, tmp_path, reuse_levels=False, subsample_420=False)
    level0 = openslide_level0(synthetic_jpeg_tiff)
    for k in (1, 2, 3):
        assert psnr(level_pixels(root, k), area_reference(level0, k)) >= 38.0


def test_ome_zarr_metadata(tmp_path: Path) -> None:
    path = sample("CMU-1-Small-Region.svs")
    _, result, root = convert(path, tmp_path)
    ome = group_attrs(root, "ome")
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert ms["axes"][2]["unit"] == "micrometer"
    for k, ds in enumerate(ms["datasets"]):
        assert ds["path"] == str(k)
        assert ds["coordinateTransformations"][0]["scale"][2] == pytest.approx(0.499 * 2**k)
    attrs = group_attrs(root, "wsistore")
    assert attrs["vendor"] == "aperio" and attrs["objective_power"] == 20
    assert "aperio.AppMag" in attrs["vendor_properties"]
    names = {a["name"] for a in attrs["associated_images"]}
    assert names == {"label", "macro", "thumbnail"}
    label = cast(np.ndarray, zarr_array(root, "associated/label")[:])
    assert label.shape == (3, 463, 387)
    # One shard object per level: a level is a handful of objects.
    files = [p for p in (tmp_path / "store" / result.slide_id).rglob("*") if p.is_file()]
    assert len(files) == 1 + 1 + 2 * len(ms["datasets"]) + 2 * 3 + 1


def test_icc_profile_kept(tmp_path: Path) -> None:
    path = sample("highdicom/sm_image.dcm")
    _, _, root = convert(path, tmp_path, lossless=True)
    import base64

    icc = base64.b64decode(group_attrs(root, "wsistore")["icc_profile"])
    assert icc[36:40] == b"acsp"


def test_idempotent_and_deterministic(tmp_path: Path) -> None:
    path = sample("CMU-1-Small-Region.svs")
    store, first, _ = convert(path, tmp_path)
    assert not first.skipped
    again = convert_slide(path, store)
    assert again.skipped and again.slide_id == first.slide_id
    other = Store(StoreSettings(str(tmp_path / "other")))
    convert_slide(path, other, ConvertSettings(PyramidSettings(workers=1)))
    a = {k: store.get(k) for k in store.list_keys(first.slide_id)}
    b = {k: other.get(k) for k in other.list_keys(first.slide_id)}
    assert a == b
    manifest = store.read_manifest(first.slide_id)
    for key, meta in manifest["objects"].items():
        assert store.size(f"{first.slide_id}/{key}") == meta["size"]


def test_changed_settings_reconvert(tmp_path: Path) -> None:
    path = sample("openslide-python-fixtures/boxes.tiff")
    store, first, _ = convert(path, tmp_path, tile_size=64)
    second = convert_slide(path, store, ConvertSettings(PyramidSettings(quality=50, tile_size=64)))
    assert not second.skipped
    assert store.read_manifest(first.slide_id)["settings"]["pyramid"]["quality"] == 50


def test_slide_id_follows_content_not_name(tmp_path: Path) -> None:
    src = sample("CMU-1-Small-Region.svs")
    copy = tmp_path / "renamed.svs"
    shutil.copy(src, copy)
    assert content_slide_id(copy) == content_slide_id(src)
    assert content_slide_id(sample("openslide-python-fixtures/small.svs")) != content_slide_id(src)


def test_explicit_slide_id_is_validated(tmp_path: Path) -> None:
    store = Store(StoreSettings(str(tmp_path)))
    path = sample("openslide-python-fixtures/small.svs")
    assert convert_slide(path, store, slide_id="case-42").slide_id == "case-42"
    for bad in ("../evil", "A/B", "", "x" * 65, ".hidden"):
        with pytest.raises(wsi.InvalidArgument):
            convert_slide(path, store, slide_id=bad)


def test_failed_conversion_leaves_nothing_behind(tmp_path: Path) -> None:
    store = Store(StoreSettings(str(tmp_path)))
    path = sample("openslide-python-fixtures/unreadable.svs")  # its thumbnail is corrupt
    with pytest.raises(wsi.CorruptSlide):
        convert_slide(path, store)
    assert store.published_slides() == []
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_another_file_under_a_given_id_is_converted_not_found_published(tmp_path: Path) -> None:
    """`wsi convert B --slide-id X`, X published from A with the same settings, said "already
    published" and exit 0, B never converted: the slide's id was the only thing compared. The
    manifest records the source's own id, and another file is a new version of X."""
    store = wsi.Store(wsi.StoreSettings(str(tmp_path / "store")))
    first, second = sample("openslide-python-fixtures/small.svs"), sample("CMU-1-Small-Region.svs")
    a = wsi.convert_slide(first, store, slide_id="case-7")
    assert store.manifest("case-7").source_id == content_slide_id(first)
    b = wsi.convert_slide(second, store, slide_id="case-7")
    assert not b.skipped and store.manifest("case-7").source_id == content_slide_id(second)
    manifest = store.manifest("case-7")
    with open_slide(second) as source:  # B's pixels now
        assert (manifest.width, manifest.height) == (
            source.levels[0].width,
            source.levels[0].height,
        )
    assert a.base_pixels != manifest.width * manifest.height
    assert wsi.convert_slide(second, store, slide_id="case-7").skipped
