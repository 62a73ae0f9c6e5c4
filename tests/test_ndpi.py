"""Hamamatsu NDPI through the raw-tile backend: levels cut at restart markers, never decoded.

Slides: the sample NDPI (4:4:4, one 3968 px restart interval per row of MCUs: cropped on DCT
blocks) and NDPIs written by `sample_data/make_ndpi.py` (OpenSlide reads them as vendor
`hamamatsu`): intervals that are the tiles' width (joined in rows), narrower ones (joined across
too), wider than 2048 px (cropped), 4:4:4 and 4:2:2, and a NanoZoomer-like layout (levels 4x
apart, the smallest one JPEG without restart markers). Pixels are always compared with
OpenSlide's own reading of the same file, never with the generator's input.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import cast

import numpy as np
import openslide
import pytest
import tifffile
import zarr

from sample_data.make_ndpi import write_ndpi
from wsi import ConvertSettings, PyramidSettings, Store, StoreSettings, convert_slide
from wsi.codecs import jpeg, restart
from wsi.errors import CorruptSlide, UnsupportedSlide, WsiError
from wsi.model import TileCodec
from wsi.sources import NdpiSource, open_slide
from wsi.sources.ndpi_backend import CUT, CUT_AND_CROPPED

from .conftest import sample
from .helpers import run_wsi

SAMPLE = "hamamatsu/test3-DAPI-2-(387).ndpi"
KEEP_ALL = PyramidSettings(keep_background=True)
"""Every tile stored, so that the published pixels can be compared with OpenSlide's everywhere
(blank glass would otherwise read as the slide's fill grey)."""


@pytest.fixture(scope="session")
def ndpi_wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Restart intervals of 1504 px (two across level 0, 3008 x 2528; 752 and 376 px below):
    the tiles are 1504 x 176, eleven rows of level 0's intervals, joined intervals below."""
    folder = tmp_path_factory.mktemp("ndpi")
    return write_ndpi(folder / "wide.ndpi", 3000, 2500, levels=3, stripe=2048, seed=4)


@pytest.fixture(scope="session")
def ndpi_scanner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A NanoZoomer's layout: levels 4x apart with the same four intervals across (1024 and
    256 px), the smallest (256 x 128) one JPEG without restart markers."""
    folder = tmp_path_factory.mktemp("ndpi")
    return write_ndpi(
        folder / "scanner.ndpi", 4096, 2048, 3, stripe=1024, level_step=4,
        single_frame_smallest=True, seed=6,
    )  # fmt: skip


@pytest.fixture(scope="session")
def ndpi_narrow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Restart intervals of 200 px (joined: two to a tile), level 0 3200 x 2400."""
    folder = tmp_path_factory.mktemp("ndpi")
    return write_ndpi(folder / "narrow.ndpi", 3200, 2400, levels=3, stripe=200, seed=5)


@pytest.fixture(scope="session")
def ndpi_422(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4:2:2 chroma, intervals of 2016 px: the tiles' width."""
    folder = tmp_path_factory.mktemp("ndpi")
    return write_ndpi(folder / "s422.ndpi", 2016, 1000, 2, stripe=2016, subsampling="422")


@pytest.fixture(scope="session")
def ndpi_422_cropped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4:2:2 chroma, one 4032 px interval per row of MCUs: cropped into 448 px tiles (a
    divisor of 4032 nearest to 512 that is a whole number of 16 px MCUs)."""
    folder = tmp_path_factory.mktemp("ndpi")
    return write_ndpi(folder / "c422.ndpi", 4032, 600, 2, stripe=4032, subsampling="422")


def openslide_level(path: Path, level: int) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as slide:
        rgba = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]))
    assert (rgba[..., 3] == 255).all()
    return np.ascontiguousarray(rgba[..., :3])


def published_level(url: str, level: int) -> np.ndarray:
    array = zarr.open_group(url, mode="r")[str(level)]
    assert isinstance(array, zarr.Array)
    return np.moveaxis(cast(np.ndarray, array[:]), 0, -1)


def tiff_page(tif: tifffile.TiffFile, index: int = 0) -> tifffile.TiffPage:
    """Page `index` read in full (tifffile types a page as a page or a lighter frame)."""
    page = tif.pages[index]
    assert isinstance(page, tifffile.TiffPage)
    return page


def copy_of(path: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(path, folder / path.name))


# ------------------------------------------------------------------------------------------
# The generator writes NDPI as OpenSlide and tifffile read it


def test_generated_slide_is_an_ndpi_to_openslide_and_tifffile(ndpi_wide: Path) -> None:
    assert openslide.OpenSlide.detect_format(str(ndpi_wide)) == "hamamatsu"
    with openslide.OpenSlide(str(ndpi_wide)) as slide:
        assert slide.properties["openslide.vendor"] == "hamamatsu"
        assert slide.level_dimensions[:3] == ((3008, 2528), (1504, 1264), (752, 632))
        assert slide.properties["openslide.level[0].tile-width"] == "1504"  # one interval
        assert slide.properties["openslide.level[0].tile-height"] == "8"
        assert slide.properties["openslide.objective-power"] == "40"
        assert list(slide.associated_images) == ["macro"]
    with tifffile.TiffFile(ndpi_wide) as tif:
        assert tif.is_ndpi and tiff_page(tif).is_ndpi
        page = tiff_page(tif)
        assert (page.tilewidth, page.tilelength) == (1504, 8)


def test_backend_is_chosen_for_ndpi_and_cuts_every_stored_level(ndpi_wide: Path) -> None:
    with open_slide(ndpi_wide) as src:
        assert isinstance(src, NdpiSource)
        level0 = src.levels[0]
        assert (level0.tile_width, level0.tile_height) == (1504, 176)  # whole intervals
        codecs = [src.tile_codec(i) for i in range(len(src.levels))]
        assert codecs[:3] == [TileCodec.JPEG] * 3  # stored levels
        assert set(codecs[3:]) == {TileCodec.OTHER}  # OpenSlide's scaled decodes
        assert src.decoded == dict.fromkeys(range(3, len(src.levels)), "not stored")
        assert [src.encoded_tile_method(i) for i in range(3)] == [CUT] * 3
        tile = src.read_encoded_tile(1, 0, 1)  # two 752 px intervals across, 22 rows of them
        assert restart.parse_header(tile).restart_interval == 94
        np.testing.assert_array_equal(
            jpeg.decode(tile), openslide_level(ndpi_wide, 1)[176:352, :1504]
        )
    with NdpiSource(sample(SAMPLE)) as src:
        assert (src.levels[0].tile_width, src.levels[0].tile_height) == (496, 496)
        assert [src.tile_codec(i) for i in range(4)] == [TileCodec.JPEG] * 4
        assert src.properties.vendor == "hamamatsu"


def test_a_file_that_is_not_an_ndpi_is_refused_by_name(
    synthetic_jpeg_tiff: Path, tmp_path: Path
) -> None:
    """`--backend ndpi` on another slide is refused as `--backend mirax` or `dicom` refuse
    theirs (UnsupportedSlide, one line), not read under the name "ndpi"; a generic TIFF named
    `.ndpi` is not an NDPI either."""
    renamed = tmp_path / "generic.ndpi"
    shutil.copyfile(synthetic_jpeg_tiff, renamed)
    for path in (synthetic_jpeg_tiff, sample("CMU-1-Small-Region.svs"), renamed):
        with pytest.raises(UnsupportedSlide, match="not a Hamamatsu NDPI file"):
            open_slide(path, "ndpi")
    run = run_wsi("info", "--backend", "ndpi", str(synthetic_jpeg_tiff))
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr == f"wsi: error: {synthetic_jpeg_tiff}: not a Hamamatsu NDPI file\n"


def test_narrow_intervals_are_joined_without_cropping(ndpi_narrow: Path) -> None:
    with NdpiSource(ndpi_narrow) as src:
        assert (src.levels[0].tile_width, src.levels[0].tile_height) == (400, 400)
        assert src.encoded_tile_method(0) == CUT
        tile = src.read_encoded_tile(0, 0, 0)
        # Restart markers renumbered from RST0 and the original interval kept as it is.
        header = restart.parse_header(tile)
        assert header.restart_interval == 25 and (header.width, header.height) == (400, 400)
        np.testing.assert_array_equal(
            jpeg.decode(tile), openslide_level(ndpi_narrow, 0)[:400, :400]
        )


# ------------------------------------------------------------------------------------------
# Conversions keep the tiles: pixels are OpenSlide's, the manifest says what was kept


@pytest.mark.parametrize("name", ["sample", "wide", "narrow"])
def test_copied_levels_equal_openslide_and_the_manifest_says_so(
    name: str, ndpi_wide: Path, ndpi_narrow: Path, tmp_path: Path
) -> None:
    path = {"sample": sample(SAMPLE), "wide": ndpi_wide, "narrow": ndpi_narrow}[name]
    store = Store(StoreSettings(str(tmp_path / "store")))
    result = convert_slide(path, store, ConvertSettings(pyramid=KEEP_ALL, formats=("zarr",)))
    origins = store.manifest(result.slide_id).levels
    copied = [o for o in origins if o.copied]
    with openslide.OpenSlide(str(path)) as slide:
        stored = 4 if name == "sample" else 3
        assert [o.source_level for o in copied] == list(range(stored))
        assert slide.level_dimensions[stored - 1] > (0, 0)
    methods = {
        # The sample's intervals are whole rows: 3968 px cut into 496 px tiles, and so on
        # down to level 3, which is 496 px wide: one interval per tile.
        "sample": [CUT_AND_CROPPED] * 3 + [CUT],
        "wide": [CUT] * 3,
        "narrow": [CUT] * 3,
    }
    assert [o.method for o in copied] == methods[name]
    below = origins[len(copied)]
    assert (below.method, below.from_level) == ("dct-half", len(copied) - 1)
    assert all(o.method == "mean2x2" for o in origins[len(copied) + 1 :])
    for level in range(len(copied)):
        np.testing.assert_array_equal(
            published_level(result.url, level), openslide_level(path, level), err_msg=str(level)
        )


def test_info_shows_where_each_output_level_comes_from(ndpi_narrow: Path) -> None:
    run = run_wsi("info", str(ndpi_narrow))
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["backend"] == "ndpi"
    assert doc["output_levels"][0] == {
        "width": 3200,
        "height": 2400,
        "level": 0,
        "method": CUT,
        "source_level": 0,
    }
    assert [lv["method"] for lv in doc["output_levels"][3:]] == ["dct-half"]


def test_a_scanners_levels_4x_apart_are_copied_and_the_single_jpeg_is_decoded(
    ndpi_scanner: Path, tmp_path: Path
) -> None:
    """Stored levels 1, 1/4 and 1/16 (OpenSlide adds the halves by scaled decoding): output
    levels 0 and 2 are copied, 1 and 3 come from DCT-scaled halves of them; the smallest
    stored level has no restart markers, so it is read through OpenSlide, and not needed."""
    with openslide.OpenSlide(str(ndpi_scanner)) as slide:
        assert slide.level_dimensions[:5] == (
            (4096, 2048), (2048, 1024), (1024, 512), (512, 256), (256, 128)
        )  # fmt: skip
    with NdpiSource(ndpi_scanner) as src:
        assert (src.levels[0].tile_width, src.levels[0].tile_height) == (1024, 256)
        assert [src.tile_codec(i) for i in range(5)] == [
            TileCodec.JPEG, TileCodec.OTHER, TileCodec.JPEG, TileCodec.OTHER, TileCodec.OTHER
        ]  # fmt: skip
        assert src.decoded[4] == "no restart marker offsets (one JPEG stream)"
        assert src.decoded[1] == src.decoded[3] == "not stored"
    store = Store(StoreSettings(str(tmp_path / "store")))
    result = convert_slide(
        ndpi_scanner, store, ConvertSettings(pyramid=KEEP_ALL, formats=("zarr",))
    )
    origins = store.manifest(result.slide_id).levels
    assert [(o.method, o.source_level, o.from_level) for o in origins] == [
        (CUT, 0, None), ("dct-half", None, 0), (CUT, 2, None), ("dct-half", None, 2)
    ]  # fmt: skip
    for level in (0, 2):
        np.testing.assert_array_equal(
            published_level(result.url, level), openslide_level(ndpi_scanner, level)
        )


def test_whole_interval_tiles_with_subsampled_chroma_equal_openslide(ndpi_422: Path) -> None:
    """A tile of whole 4:2:2 intervals holds the rows OpenSlide decodes one interval at a time
    with the same horizontal neighbours (4:2:2 is not subsampled vertically): identical."""
    with NdpiSource(ndpi_422) as src:
        lv = src.levels[0]
        assert (lv.tile_width, lv.tile_height) == (2016, 128)
        assert src.encoded_tile_method(0) == CUT
        ours = src.read_region(0, 0, 0, lv.width, lv.height)
    np.testing.assert_array_equal(ours, openslide_level(ndpi_422, 0))


def test_subsampled_chroma_differs_from_openslide_only_at_cropped_tile_edges(
    ndpi_422_cropped: Path,
) -> None:
    """OpenSlide decodes one 4032 px interval at a time; a 448 px tile cropped from it is
    decoded alone, so 4:2:2 chroma is upsampled from other neighbours at the crop's edges. The
    coefficients are the same: everything else is equal."""
    with NdpiSource(ndpi_422_cropped) as src:
        lv = src.levels[0]
        assert lv.tile_width == 448 and src.encoded_tile_method(0) == CUT_AND_CROPPED
        ours = src.read_region(0, 0, 0, lv.width, lv.height)
    ref = openslide_level(ndpi_422_cropped, 0)
    differs = np.any(ours != ref, axis=2)
    columns = np.nonzero(differs.any(axis=0))[0]
    assert set(columns % 448) <= {0, 447} and len(columns) > 0
    assert np.abs(ours.astype(int) - ref).max() <= 32
    inner = [x for x in range(lv.width) if x % 448 not in (0, 447)]
    np.testing.assert_array_equal(ours[:, inner], ref[:, inner])


# ------------------------------------------------------------------------------------------
# Codec pieces


def test_white_intervals_pad_edge_tiles_with_white(ndpi_wide: Path) -> None:
    with NdpiSource(ndpi_wide) as src:
        lv = src.levels[0]
        assert (lv.width, lv.height) == (3008, 2528)  # 2 x 14.4 tiles of 1504 x 176 px
        tile = src.read_tile(0, lv.cols - 1, lv.rows - 1)
        inside_h = lv.height - (lv.rows - 1) * 176
        assert (tile[inside_h:] == 255).all()
        assert (tile[:inside_h] < 250).any()


def test_crop_refuses_corrupt_data() -> None:
    with pytest.raises(CorruptSlide):
        restart.crop(b"\xff\xd8\xff\xd9", [(0, 0, 8, 8)])
    with pytest.raises(CorruptSlide):
        restart.parse_header(b"\xff\xd8\xff\xc0\x00")


def test_an_empty_scan_header_is_a_corrupt_slide() -> None:
    """A start-of-scan segment with no payload (length 2, a damaged header) is refused as
    corrupt, not indexed past its end (an IndexError that only the NDPI backend's broad catch
    turned into CorruptSlide, and that any other caller would see as a crash)."""
    stream = jpeg.encode(np.full((16, 16, 3), 200, np.uint8), 90)
    at = stream.index(b"\xff\xda")
    damaged = (
        stream[: at + 2]
        + b"\x00\x02"
        + stream[at + 2 + int.from_bytes(stream[at + 2 : at + 4], "big") :]
    )
    with pytest.raises(CorruptSlide, match="scan"):
        restart.parse_header(damaged)


# ------------------------------------------------------------------------------------------
# Damaged files: a clear error, or OpenSlide's decoding where the file still allows it


def _mcu_starts(path: Path, page: int = 0) -> tuple[int, np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        tag = tiff_page(tif, page).tags[65426]
        return tag.valueoffset, np.asarray(tag.value, np.int64)


def _write_mcu_starts(path: Path, offset: int, values: np.ndarray) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(struct.pack(f"<{len(values)}I", *values.tolist()))


def test_shifted_restart_offsets_raise_a_clear_error(ndpi_wide: Path, tmp_path: Path) -> None:
    bad = copy_of(ndpi_wide, tmp_path)
    offset, starts = _mcu_starts(bad)
    _write_mcu_starts(bad, offset, starts + 3)
    with NdpiSource(bad) as src, pytest.raises(CorruptSlide, match="restart marker offsets"):
        src.read_encoded_tile(0, 1, 1)
    store = Store(StoreSettings(str(tmp_path / "store")))
    with pytest.raises(CorruptSlide):
        convert_slide(bad, store, ConvertSettings(formats=("zarr",)))
    assert store.published_slides() == []
    run = run_wsi("convert", str(bad), "--out", str(tmp_path / "cli"))
    assert run.returncode != 0
    assert "restart marker offsets do not point at restart intervals" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_a_wrong_count_of_restart_offsets_falls_back_to_openslide(
    ndpi_wide: Path, tmp_path: Path
) -> None:
    """Level 0's offsets one short: it cannot be cut, and OpenSlide, which distrusts them too,
    finds the restart markers itself. No level is cut then (the output's tile size is chosen
    for a decoded base)."""
    bad = copy_of(ndpi_wide, tmp_path)
    with tifffile.TiffFile(bad) as tif:
        tag = tiff_page(tif).tags[65426]
        count_at, count = tag.offset + 4, tag.count
    with bad.open("r+b") as f:
        f.seek(count_at)
        f.write(struct.pack("<I", count - 1))
    with NdpiSource(bad) as src:
        assert src.tile_codec(0) is TileCodec.OTHER
        reason = "the number of restart marker offsets does not match the image size"
        assert src.decoded[0] == reason
        assert src.decoded[1] == "level 0 cannot be cut, so no level is"
        region = src.read_region(0, 100, 200, 700, 500)
    np.testing.assert_array_equal(region, openslide_level(ndpi_wide, 0)[200:700, 100:800])


def test_restart_offsets_out_of_order_give_a_clear_error(ndpi_wide: Path, tmp_path: Path) -> None:
    """Nobody can read these: not cut (inconsistent), and OpenSlide's reading fails cleanly."""
    bad = copy_of(ndpi_wide, tmp_path)
    offset, starts = _mcu_starts(bad)
    _write_mcu_starts(bad, offset, starts[::-1].copy())
    with NdpiSource(bad) as src:
        assert src.decoded[0] == "restart marker offsets are inconsistent"
        with pytest.raises(CorruptSlide):
            src.read_tile(0, 1, 1)


def test_level_data_past_the_end_of_the_file_is_refused(ndpi_wide: Path, tmp_path: Path) -> None:
    bad = copy_of(ndpi_wide, tmp_path)
    with tifffile.TiffFile(bad) as tif:
        tag = tiff_page(tif).tags[279]  # StripByteCounts of level 0: inside the entry
        entry = tag.offset + 8
    with bad.open("r+b") as f:
        f.seek(entry)
        f.write(struct.pack("<I", bad.stat().st_size * 2))
    with pytest.raises(WsiError, match="past the end of the file"):
        NdpiSource(bad)


@pytest.mark.parametrize("name", ["sample", "generated"])
def test_truncated_ndpi_gives_one_clear_line(name: str, ndpi_wide: Path, tmp_path: Path) -> None:
    source = sample(SAMPLE) if name == "sample" else ndpi_wide
    cut = tmp_path / "cut.ndpi"
    cut.write_bytes(source.read_bytes()[: source.stat().st_size * 2 // 3])
    with pytest.raises(WsiError), open_slide(cut) as src:
        for level in range(len(src.levels)):
            lv = src.levels[level]
            src.read_tile(level, lv.cols - 1, lv.rows - 1)
    run = run_wsi("convert", str(cut), "--out", str(tmp_path / "out"))
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsi: error:"), run.stderr
