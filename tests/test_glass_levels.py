"""Blank glass below level 0 and in what we read back: a level made from the level above sees a
blank tile as the fill grey a reader shows for it (copied JPEG tiles and decoded ones), and a
TILED_SPARSE DICOM series we read gives its absent tiles the colour it recommends for them (so
a dark-field slide converts back with the same tiles absent). Helpers and fixtures of the
sparse tests (`tests/test_sparse.py`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import wsi
from wsi.codecs.colour import dicom_lab, srgb_of_dicom_lab
from wsi.export import export_dicom

from .test_dicom import level_array, read_pixels, wsistore_attrs
from .test_sparse import COLS, DEFAULT, HEIGHT, KEPT, ROWS, WIDTH, absent_tiles, group, levels


def test_levels_made_below_see_glass_as_the_fill(tmp_path: Path) -> None:
    """A level made from level 0 (a base-only slide) takes a blank-glass tile as what viewers
    show for it, the fill grey, without decoding it: in each stored tile of level 1, the
    quadrant of a level-0 tile not stored is flat fill, and the quadrants of stored ones are
    what the conversion keeping every tile made (away from the quadrants' borders, where the
    decoder's chroma upsampling reads across)."""
    from sample_data.generate import generate

    path = generate(tmp_path / "base.tif", WIDTH, HEIGHT, seed=2, base_only=True)
    made = {}
    for name, settings in (("sparse", DEFAULT), ("full", KEPT)):
        root = tmp_path / name
        store = wsi.Store(wsi.StoreSettings(str(root)))
        made[name] = {"root": root, "id": wsi.convert_slide(path, store, settings).slide_id}
    sparse, full = made["sparse"], made["full"]
    fill = wsistore_attrs(group(sparse))["fill"]
    glass, absent = absent_tiles(sparse, 0), absent_tiles(sparse, 1)
    ours, before = (
        np.moveaxis(read_pixels(level_array(group(entry), "1")), 0, -1).astype(int)
        for entry in (sparse, full)
    )
    half = levels(sparse)[0]["tile_width"] // 2
    seen = {True: 0, False: 0}
    for col in range(COLS):
        for row in range(ROWS):
            if (col // 2, row // 2) in absent:
                continue  # a level-1 tile not stored reads as the fill anyway
            y, x = row * half, col * half
            inner = (slice(y + 8, y + half - 8), slice(x + 8, x + half - 8))
            is_glass = (col, row) in glass
            seen[is_glass] += 1
            if is_glass:
                assert np.abs(ours[inner] - fill).max() <= 1
            else:
                assert np.array_equal(ours[inner], before[inner])
    assert seen[True] and seen[False]


def test_decoded_glass_is_the_fill_for_the_levels_below(tmp_path: Path) -> None:
    """The same for a source whose tiles are decoded (deflate): a tile of textured glass is not
    stored, and the level made from it sees the fill grey there, not the texture."""
    import tifffile

    rng = np.random.default_rng(5)
    tint = np.array([243, 241, 245])  # glass a little coloured, as the generator's
    image = (tint + rng.integers(0, 2, (512, 1024, 3))).astype(np.uint8)
    image[:, 256:] = rng.integers(40, 220, (512, 768, 3))  # tissue right of the first column
    path = tmp_path / "deflate.tif"
    tifffile.imwrite(path, image, tile=(256, 256), compression="zlib", photometric="rgb")
    store = wsi.Store(wsi.StoreSettings(str(tmp_path / "store")))
    entry = {"root": tmp_path / "store", "id": wsi.convert_slide(path, store, DEFAULT).slide_id}
    fill = wsistore_attrs(group(entry))["fill"]
    assert absent_tiles(entry, 0) == {(0, 0), (0, 1)} and not absent_tiles(entry, 1)
    level1 = np.moveaxis(read_pixels(level_array(group(entry), "1")), 0, -1).astype(int)
    assert np.abs(level1[8:248, 8:120] - fill).max() <= 1  # the glass quadrants, inside


def test_dicom_lab_reads_back_to_the_same_srgb() -> None:
    """`srgb_of_dicom_lab` inverts `dicom_lab` (every grey, random colours, the extremes)."""
    rng = np.random.default_rng(7)
    colours = [(v, v, v) for v in range(256)]
    for r, g, b in rng.integers(0, 256, (500, 3)).tolist():
        colours.append((r, g, b))
    colours += [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 0, 0)]
    for colour in colours:
        assert srgb_of_dicom_lab(dicom_lab(colour)) == colour


def test_a_dark_sparse_dicom_converts_back_with_its_absent_colour(tmp_path: Path) -> None:
    """A slide with a dark fill (fluorescence): its TILED_SPARSE export converts back with the
    absent tiles shown in its Recommended Absent Pixel CIELab Value, not white (what wsidicom
    paints them): the same tiles absent, every tile the same."""
    import pyvips

    rng = np.random.default_rng(6)
    image = (6 + rng.integers(0, 2, (768, 1024, 3))).astype(np.uint8)  # dark background
    image[256:512, 256:768] = rng.integers(40, 220, (256, 512, 3))
    path = tmp_path / "dark.tif"
    pyvips.Image.new_from_array(image).tiffsave(
        str(path), tile=True, tile_width=256, tile_height=256, compression="jpeg", Q=90
    )
    store = wsi.Store(wsi.StoreSettings(str(tmp_path / "first")))
    first_id = wsi.convert_slide(path, store, DEFAULT).slide_id
    first = {"root": tmp_path / "first", "id": first_id}
    assert wsistore_attrs(group(first))["fill"] < 10
    export_dicom(store, first_id, tmp_path / "dicom")
    again_store = wsi.Store(wsi.StoreSettings(str(tmp_path / "again")))
    again_id = wsi.convert_slide(tmp_path / "dicom", again_store, DEFAULT).slide_id
    again = {"root": tmp_path / "again", "id": again_id}
    assert absent_tiles(again, 0) == absent_tiles(first, 0) != set()
    with (
        wsi.open_published(f"{first['root']}/{first['id']}") as before,
        wsi.open_published(f"{again['root']}/{again['id']}") as after,
    ):
        for k, lv in enumerate(before.levels):
            for row in range(lv.rows):
                for col in range(lv.cols):
                    assert after.tile_bytes(k, col, row) == before.tile_bytes(k, col, row)
