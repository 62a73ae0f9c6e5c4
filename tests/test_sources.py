"""Slide sources beyond their contract: the registry's probe and override, what each backend
makes of particular files, and errors on broken ones. What every backend promises (geometry,
tiles, regions, encoded tiles, refusals, pixels equal to an independent reader) is the source
contract, run on each backend by `test_contract_sources.py`."""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import pytest
import tifffile

from wsi import CorruptSlide, InvalidArgument, SlideNotFound, TileCodec, UnsupportedSlide, WsiError
from wsi.codecs.jpeg import APP14_RGB, complete_tile, needs_rgb_marker
from wsi.sources import open_slide

from .conftest import openslide_level0, sample, shared
from .helpers import run_wsi

READABLE = [
    ("CMU-1-Small-Region.svs", "tiff", TileCodec.JPEG),
    ("standin:aperio-jp2k.svs", "tiff", TileCodec.JPEG2000),
    shared("tcga-cr-7395-01a-01-ts1.svs", "tiff", TileCodec.JPEG2000),
    ("openslide-python-fixtures/small.svs", "tiff", TileCodec.JPEG),
    ("openslide-python-fixtures/boxes.tiff", "tiff", TileCodec.OTHER),
    ("openslide-python-fixtures/boxes_0.dcm", "dicom", TileCodec.JPEG),
    ("hamamatsu/test3-DAPI-2-(387).ndpi", "ndpi", TileCodec.JPEG),
    ("highdicom/sm_image.dcm", "dicom", TileCodec.OTHER),
    ("highdicom/sm_image_jpegls.dcm", "dicom", TileCodec.OTHER),
]
BROKEN = [
    "openslide-python-fixtures/unopenable.tiff",
    "standin:dicom-no-image-type.dcm",
    "standin:vectra.qptiff",
    "standin:plain-strip.tif",
    shared("pathml/small_dicom.dcm"),
    shared("pathml/small_vectra.qptiff"),
    shared("kidney-48-5.tif"),
]


@pytest.mark.parametrize(("name", "backend", "codec"), READABLE)
def test_probe_picks_backend_and_levels_match_openslide(
    name: str, backend: str, codec: TileCodec, slide_path: Callable[[str], Path]
) -> None:
    path = slide_path(name)
    with open_slide(path) as src:
        assert src.name == backend
        assert src.tile_codec(0) is codec
        tile = src.read_tile(0, 0, 0)
        lv = src.levels[0]
        assert tile.shape == (lv.tile_height, lv.tile_width, 3) and tile.dtype == np.uint8
        if name != "highdicom/sm_image_jpegls.dcm":  # OpenSlide 4 has no JPEG-LS decoder
            with openslide.OpenSlide(str(path)) as ref:
                assert [(lv.width, lv.height) for lv in src.levels] == list(ref.level_dimensions)
                assert set(src.associated_names) <= set(ref.associated_images)


def test_svs_encoded_tile_is_the_stored_tile_completed() -> None:
    path = sample("CMU-1-Small-Region.svs")
    with tifffile.TiffFile(path) as tif, open_slide(path) as src:
        page = tif.pages[0]
        index = 3 * src.levels[0].cols + 2
        tif.filehandle.seek(page.dataoffsets[index])
        raw = tif.filehandle.read(page.databytecounts[index])
        data = src.read_encoded_tile(0, 2, 3)
        # Scan data copied byte for byte; tables merged in; Adobe marker says "RGB".
        assert data.endswith(raw[2:])
        assert data.startswith(b"\xff\xd8" + APP14_RGB)
        assert page.jpegtables is not None
        assert page.jpegtables[2:-2] in data
    # An independent decoder (imagecodecs) gives OpenSlide's pixels for that tile.
    pixels = imagecodecs.jpeg8_decode(data)
    ref = openslide_level0(path)[3 * 240 : 4 * 240, 2 * 240 : 3 * 240]
    assert np.array_equal(pixels, ref)


def test_rgb_marker_only_when_needed() -> None:
    ycbcr = imagecodecs.jpeg8_encode(np.zeros((16, 16, 3), np.uint8))
    assert isinstance(ycbcr, bytes)
    assert not needs_rgb_marker(ycbcr)  # JFIF stream: already self-describing
    assert complete_tile(ycbcr, None, rgb=True) == ycbcr
    with pytest.raises(CorruptSlide):
        complete_tile(b"not a jpeg", None, rgb=False)


def test_backend_override_and_unknown_backend() -> None:
    path = sample("CMU-1-Small-Region.svs")
    with open_slide(path, backend="openslide") as src:
        assert src.name == "openslide" and src.tile_codec(0) is TileCodec.OTHER
    with pytest.raises(InvalidArgument):
        open_slide(path, backend="nope")


@pytest.mark.parametrize("backend", ["philips", "leica", "ventana"])
def test_a_vendor_backend_asked_for_by_name_refuses_another_vendors_slide(
    backend: str, synthetic_jpeg_tiff: Path
) -> None:
    """`--backend philips` on a generic TIFF or an SVS is refused in one line, as `--backend
    ndpi` refuses what is not an NDPI: it would be read with Philips' rules and published as a
    Philips slide. The tiled TIFF backend refuses an NDPI likewise."""
    for path, vendor in (
        (synthetic_jpeg_tiff, "generic-tiff"),
        (sample("CMU-1-Small-Region.svs"), "aperio"),
    ):
        with pytest.raises(
            UnsupportedSlide, match=f"not a {backend} slide: OpenSlide reads it as {vendor}"
        ):
            open_slide(path, backend)
    run = run_wsi("info", "--backend", backend, str(synthetic_jpeg_tiff))
    assert (run.returncode, run.stdout) == (1, "")
    says = f"not a {backend} slide: OpenSlide reads it as generic-tiff"
    assert run.stderr == f"wsi: error: {synthetic_jpeg_tiff}: {says}\n"
    ndpi = sample("hamamatsu/test3-DAPI-2-(387).ndpi")
    with pytest.raises(UnsupportedSlide, match="not a tiff slide: OpenSlide reads it as hamamatsu"):
        open_slide(ndpi, "tiff")


def test_dicom_properties_come_from_the_header() -> None:
    with open_slide(sample("highdicom/sm_image.dcm")) as src:
        props = src.properties
        assert props.mpp_x == pytest.approx(0.499)
        assert props.vendor_properties["dicom.Manufacturer"] == "Test Manufacturer"
        assert props.icc_profile and props.icc_profile[36:40] == b"acsp"


@pytest.mark.parametrize("name", BROKEN)
def test_broken_or_foreign_files_give_a_library_error(
    name: str, slide_path: Callable[[str], Path]
) -> None:
    path = slide_path(name)
    with pytest.raises(WsiError):
        open_slide(path)


def test_corrupt_tile_or_image_is_a_corrupt_slide_error() -> None:
    with (
        open_slide(sample("openslide-python-fixtures/unreadable.svs")) as src,
        pytest.raises(CorruptSlide),
    ):
        for name in src.associated_names:
            src.read_associated(name)


def test_missing_or_junk_file(tmp_path: Path) -> None:
    with pytest.raises(SlideNotFound):
        open_slide(tmp_path / "nope.svs")
    junk = tmp_path / "junk.svs"
    junk.write_bytes(io.BytesIO(b"\x00" * 4096).getvalue())
    with pytest.raises(UnsupportedSlide):
        open_slide(junk)


def test_a_folder_of_slide_files_says_to_convert_them_one_by_one(tmp_path: Path) -> None:
    """A folder is a slide only as a DICOM series (a MIRAX slide is its .mrxs file): a plain
    folder of SVS files said "no backend can read this slide", as a broken file does."""
    for name in ("a.svs", "b.svs"):
        shutil.copyfile(sample("openslide-python-fixtures/small.svs"), tmp_path / name)
    with pytest.raises(UnsupportedSlide, match="neither a DICOM series nor a MIRAX slide"):
        open_slide(tmp_path)
    run = run_wsi("convert", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress")
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr == (
        f"wsi: error: {tmp_path}: this folder is neither a DICOM series nor a MIRAX slide: "
        "convert the slide files in it one by one (each file as its own argument)\n"
    )


def test_a_dicom_folder_holding_other_slide_files_is_refused(tmp_path: Path) -> None:
    """A folder of DICOM instances beside other slide files converted the DICOM series alone,
    exit 0: the other slides were left out without a word. A series folder holds its instances
    and sidecars only (the watcher waits on anything else there); hidden files do not count."""
    fixtures = sample("openslide-python-fixtures")
    series = tmp_path / "series"
    series.mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copyfile(fixtures / name, series / name)
    (series / "notes.json").write_text("{}")
    (series / ".DS_Store").write_bytes(b"\0")
    assert open_slide(series).levels  # instances, a sidecar and a dotfile: a slide
    shutil.copyfile(fixtures / "small.svs", series / "small.svs")
    with pytest.raises(UnsupportedSlide, match=r"holds 1 file\(s\) that are not DICOM"):
        open_slide(series)
    run = run_wsi("convert", str(series), "--out", str(tmp_path / "out"), "--no-progress")
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr == (
        f"wsi: error: {series}: no backend can read this slide (dicom: this folder holds 1 "
        "file(s) that are not DICOM beside its instances: a DICOM series folder holds its "
        "instances and sidecars only. Convert the slide files in it one by one (each file as "
        "its own argument))\n"
    )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
