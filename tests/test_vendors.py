"""Philips TIFF, MIRAX, Leica SCN and Ventana BIF through their raw-tile backends: stored JPEG
tiles copied, never decoded, where they form an exact grid; decoded through OpenSlide, level by
level, where they do not.

Slides are written by `sample_data/make_philips.py`, `make_mirax.py`, `make_leica.py` and
`make_bif.py` (OpenSlide reads them as vendors `philips`, `mirax`, `leica` and `ventana`), with
blank glass left unstored as scanners do.
Pixels are always compared with OpenSlide's own reading of the same file (transparent parts on
white), never with the generator's input.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import zarr

from sample_data.make_bif import write_bif
from sample_data.make_leica import write_leica
from sample_data.make_mirax import tissue_image, write_mirax
from sample_data.make_philips import write_philips
from wsi import ConvertSettings, PyramidSettings, Store, StoreSettings, convert_slide
from wsi.errors import EncodedTileUnavailable
from wsi.model import TileCodec
from wsi.sources import LeicaSource, MiraxSource, PhilipsSource, VentanaSource, open_slide

from .conftest import psnr

KEEP_ALL = PyramidSettings(keep_background=True)
"""Every tile stored, so that published pixels compare with OpenSlide's everywhere."""


def _image(width: int, height: int, seed: int) -> np.ndarray:
    """Tissue with a blank (white) band on the left: whole tiles of nothing to leave unstored."""
    image = tissue_image(width, height, seed)
    image[:, : width * 2 // 5] = 255
    return image


@pytest.fixture(scope="session")
def philips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1500 x 1100 in 256 px tiles: level 0's page (and OpenSlide's level 0) is 1536 x 1280,
    level 1's page 768 x 768 where OpenSlide's level 1 is 768 x 640."""
    folder = tmp_path_factory.mktemp("philips")
    return write_philips(folder / "slide.tiff", _image(1500, 1100, 7), levels=3)


@pytest.fixture(scope="session")
def mirax(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1536 x 1024 in 256 px camera images, blank ones not stored."""
    folder = tmp_path_factory.mktemp("mirax")
    return write_mirax(folder / "slide.mrxs", _image(1536, 1024, 8), levels=3, omit_blank=True)


@pytest.fixture(scope="session")
def leica(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2048 x 1024 main image 1024 px from the glass's left edge (whole tiles on every
    level), on 3584 x 1536 px of glass."""
    folder = tmp_path_factory.mktemp("leica")
    return write_leica(folder / "slide.scn", tissue_image(2048, 1024, 10), offset=(1024, 0))


@pytest.fixture(scope="session")
def leica_shifted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The main image 512 x 256 px from the corner: whole 256 px tiles at level 0 only."""
    folder = tmp_path_factory.mktemp("leica")
    return write_leica(folder / "slide.scn", tissue_image(2048, 1024, 11), offset=(512, 256))


@pytest.fixture(scope="session")
def ventana(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1536 x 1024, one AOI over it all, every tile joint without overlap."""
    folder = tmp_path_factory.mktemp("ventana")
    return write_bif(folder / "slide.bif", tissue_image(1536, 1024, 12))


def copy_mirax(src: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dest = Path(shutil.copyfile(src, folder / src.name))
    shutil.copytree(src.with_suffix(""), dest.with_suffix(""))
    return dest


def overlapping(src: Path, folder: Path) -> Path:
    """A copy whose Slidedat.ini says every camera image overlaps its neighbours by 4 px across
    (OpenSlide then stitches them, 4 px apart; no tile grid is left)."""
    dest = copy_mirax(src, folder)
    ini = dest.with_suffix("") / "Slidedat.ini"
    ini.write_text(ini.read_text().replace("OVERLAP_X=0", "OVERLAP_X=4"))
    return dest


def openslide_level(path: Path, level: int) -> np.ndarray:
    """OpenSlide's level, transparent parts composited on white (in float)."""
    with openslide.OpenSlide(str(path)) as slide:
        rgba = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]))
    alpha = rgba[..., 3:4].astype(np.float64) / 255
    return np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)


def published_level(url: str, level: int) -> np.ndarray:
    array = zarr.open_group(url, mode="r")[str(level)]
    assert isinstance(array, zarr.Array), level
    return np.moveaxis(np.asarray(array[:]), 0, -1)


# ------------------------------------------------------------------------------------------
# The generators write what OpenSlide reads as the vendor's format


def test_philips_generator_writes_a_philips_tiff_with_sparse_tiles(philips: Path) -> None:
    assert openslide.OpenSlide.detect_format(str(philips)) == "philips"
    with openslide.OpenSlide(str(philips)) as slide:
        assert slide.level_dimensions == ((1536, 1280), (768, 640), (384, 320))
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert slide.properties["openslide.objective-power"] == "40"
        assert set(slide.associated_images) == {"label", "macro"}
    with tifffile.TiffFile(philips) as tif:
        pages = [p for p in tif.pages if isinstance(p, tifffile.TiffPage) and p.is_tiled]
        assert [(p.imagewidth, p.imagelength) for p in pages][1] == (768, 768)
        assert (np.asarray(pages[0].databytecounts) == 0).sum() >= 8


def test_the_vendor_backends_are_chosen_and_copy_every_level(
    philips: Path, mirax: Path, leica: Path, ventana: Path
) -> None:
    cases = [(philips, PhilipsSource), (mirax, MiraxSource), (leica, LeicaSource)]
    for path, backend in [*cases, (ventana, VentanaSource)]:
        with open_slide(path) as src:
            assert isinstance(src, backend)
            assert [src.tile_codec(i) for i in range(3)] == [TileCodec.JPEG] * 3
            assert all(src.encoded_tile_method(i) == "copied" for i in range(3))
            assert (src.levels[0].tile_width, src.levels[0].tile_height) == (256, 256)
            assert src.properties.mpp_x == pytest.approx(0.5 if backend is LeicaSource else 0.25)


def test_unstored_tiles_are_refused_as_encoded_and_read_white(
    philips: Path, mirax: Path, leica: Path
) -> None:
    for path in (philips, mirax, leica):
        with open_slide(path) as src:
            with pytest.raises(EncodedTileUnavailable):
                src.read_encoded_tile(0, 0, 0)
            assert (src.read_tile(0, 0, 0) == 255).all()


# ------------------------------------------------------------------------------------------
# Conversions keep the tiles: pixels are OpenSlide's, the manifest says what was kept


@pytest.mark.parametrize("vendor", ["philips", "mirax", "leica", "ventana"])
def test_copied_levels_equal_openslide_and_the_manifest_says_so(
    vendor: str, philips: Path, mirax: Path, leica: Path, ventana: Path, tmp_path: Path
) -> None:
    path = {"philips": philips, "mirax": mirax, "leica": leica, "ventana": ventana}[vendor]
    store = Store(StoreSettings(str(tmp_path / "store")))
    result = convert_slide(path, store, ConvertSettings(pyramid=KEEP_ALL, formats=("zarr",)))
    origins = store.manifest(result.slide_id).levels
    assert [(o.method, o.source_level) for o in origins[:3]] == [
        ("copied", 0),
        ("copied", 1),
        ("copied", 2),
    ]
    assert [o.method for o in origins[3:]] == ["dct-half"] + ["mean2x2"] * (len(origins) - 4)
    for level in range(3):
        np.testing.assert_array_equal(
            published_level(result.url, level), openslide_level(path, level), err_msg=str(level)
        )


def test_overlapping_camera_images_are_decoded_and_the_reason_logged_without_the_name(
    mirax: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = overlapping(mirax, tmp_path / "patient-doe-john")
    with caplog.at_level(logging.INFO, logger="wsi.sources.mirax_backend"):
        src = open_slide(path)
    with src:
        assert isinstance(src, MiraxSource)
        assert src.decoded == dict.fromkeys(range(3), "its camera images overlap")
        assert [src.tile_codec(i) for i in range(3)] == [TileCodec.OTHER] * 3
        with pytest.raises(EncodedTileUnavailable):
            src.read_encoded_tile(0, 3, 1)
        assert src.levels[0].width == 1536 - 4 * 5  # six images across, five seams
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        f"MIRAX level {k} is decoded through OpenSlide: its camera images overlap" for k in range(3)
    ]
    assert not any("doe" in m or path.name in m for m in messages)
    store = Store(StoreSettings(str(tmp_path / "store")))
    result = convert_slide(path, store, ConvertSettings(pyramid=KEEP_ALL, formats=("zarr",)))
    origins = store.manifest(result.slide_id).levels
    assert origins[0].method == "decoded+encoded" and not origins[0].copied
    assert psnr(published_level(result.url, 0), openslide_level(path, 0)) > 38


def test_a_level_off_the_grid_is_decoded_alone(mirax: Path, tmp_path: Path) -> None:
    """Level 1's images said to overlap: OpenSlide gives that level no tile grid; the backend
    decodes what OpenSlide does not place on a grid of the image size, and copies the rest."""
    path = copy_mirax(mirax, tmp_path / "one")
    ini = path.with_suffix("") / "Slidedat.ini"
    head, tail = ini.read_text().split("[LAYER_0_LEVEL_1_SECTION]")
    ini.write_text(
        head + "[LAYER_0_LEVEL_1_SECTION]" + tail.replace("OVERLAP_X=0", "OVERLAP_X=4", 1)
    )
    with MiraxSource(path) as src, openslide.OpenSlide(str(path)) as slide:
        assert src.decoded[1] == "its images overlap"
        for level in range(3):
            hinted = f"openslide.level[{level}].tile-width" in slide.properties
            assert (src.tile_codec(level) is TileCodec.JPEG) == hinted, level
            lv = src.levels[level]
            np.testing.assert_array_equal(
                src.read_region(level, 0, 0, lv.width, lv.height), openslide_level(path, level)
            )


def test_leica_levels_whose_offset_is_not_whole_tiles_are_decoded(
    leica_shifted: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Level 0 is copied; levels 1 and 2 put the image 256 x 128 and 128 x 64 px from the
    corner: decoded through OpenSlide (logged), and the converter derives them from level 0."""
    with caplog.at_level(logging.INFO, logger="wsi.sources.leica_backend"):
        src = open_slide(leica_shifted)
    with src:
        assert isinstance(src, LeicaSource)
        assert [src.tile_codec(i) for i in range(3)] == [TileCodec.JPEG] + [TileCodec.OTHER] * 2
        reason = "the main image's offset is not a whole number of tiles"
        assert src.decoded == {1: reason, 2: reason}
        for level in range(3):
            lv = src.levels[level]
            np.testing.assert_array_equal(
                src.read_region(level, 0, 0, lv.width, lv.height),
                openslide_level(leica_shifted, level),
            )
    assert [r.getMessage() for r in caplog.records] == [
        f"Leica level {k} is decoded through OpenSlide: {reason}" for k in (1, 2)
    ]
    store = Store(StoreSettings(str(tmp_path / "store")))
    convert = ConvertSettings(pyramid=KEEP_ALL, formats=("zarr",))
    result = convert_slide(leica_shifted, store, convert)
    origins = store.manifest(result.slide_id).levels
    assert [(o.method, o.source_level) for o in origins[:2]] == [("copied", 0), ("dct-half", None)]
    np.testing.assert_array_equal(published_level(result.url, 0), openslide_level(leica_shifted, 0))


def test_overlapping_bif_tiles_are_decoded_and_a_single_overlap_is_enough(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenSlide steps tiles by the confidence-weighted mean overlap: one joint of 2 px among
    zeros moves every tile by a fraction of a pixel. The backend checks every joint."""
    path = write_bif(tmp_path / "patient-doe.bif", tissue_image(1024, 768, 13))
    head, joint, rest = path.read_bytes().partition(b'OverlapX="0"')
    one = tmp_path / "one.bif"
    one.write_bytes(head + b'OverlapX="2"' + rest)  # same length: offsets stay valid
    with caplog.at_level(logging.INFO, logger="wsi.sources.ventana_backend"):
        src = open_slide(one)
    with src, openslide.OpenSlide(str(one)) as slide:
        assert joint and isinstance(src, VentanaSource)
        assert src.decoded == dict.fromkeys(range(3), "its tiles overlap (TileJointInfo)")
        for level in range(3):
            lv = src.levels[level]
            assert (lv.width, lv.height) == slide.level_dimensions[level]
            np.testing.assert_array_equal(
                src.read_region(level, 0, 0, lv.width, lv.height), openslide_level(one, level)
            )
    assert len(caplog.records) == 3
    assert not any("doe" in r.getMessage() or "one.bif" in r.getMessage() for r in caplog.records)
