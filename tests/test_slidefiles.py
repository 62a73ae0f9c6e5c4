"""Slide layout rules (`wsi.slidefiles`): the one definition of sidecars, companion folders, VMS
listed files, DICOM series grouping and the suffix lists, and the modules that use it agreeing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from sample_data.make_mirax import tissue_image, write_mirax
from server.converting import SourceSlides
from wsi.errors import CorruptSlide, SlideIncomplete
from wsi.ingest.scan import find_candidates
from wsi.ingest.worker import move_source
from wsi.metadata import sidecar_path as metadata_sidecar_path
from wsi.slide_id import local_slide_files
from wsi.slidefiles import (
    dicom_series_files,
    group_by_series,
    is_non_slide,
    is_temporary,
    readable_series_uid,
    series_uid,
    sidecar_names,
    sidecar_path,
    slide_parts,
)
from wsi.sources import open_slide

from .conftest import sample


def write(path: Path, data: bytes | str = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def expand(parts: list[Path]) -> set[Path]:
    """Files of `parts`, folders walked."""
    out: set[Path] = set()
    for p in parts:
        out |= {f for f in p.rglob("*") if f.is_file()} if p.is_dir() else {p}
    return out


# ---------------------------------------------------------------------------------------------
# Names


def test_sidecar_names_in_lookup_order() -> None:
    assert sidecar_names("case-7.svs") == ("case-7.svs.json", "case-7.json")
    assert sidecar_names("series") == ("series.json",)  # a folder slide: both are one name
    assert sidecar_names("a.b.mrxs") == ("a.b.mrxs.json", "a.b.json")
    assert sidecar_names("x.json") == ("x.json.json",)  # never the file itself


def test_sidecar_path_prefers_the_full_name(tmp_path: Path) -> None:
    slide = write(tmp_path / "case.svs")
    assert sidecar_path(slide) is None
    stem = write(tmp_path / "case.json", "{}")
    assert sidecar_path(slide) == stem
    full = write(tmp_path / "case.svs.json", "{}")
    assert sidecar_path(slide) == full
    assert metadata_sidecar_path is sidecar_path  # the metadata lookup is this one


@pytest.mark.parametrize(
    ("name", "temporary", "non_slide"),
    [
        ("scan.svs", False, False),
        ("scan.SVS.part", True, False),
        (".scan.svs.Xa1b2", True, False),
        ("~$lock.svs", True, False),
        ("scan.svs~", True, False),
        ("scan.crdownload", True, False),
        ("case.json", False, True),
        ("Data0001.dat", False, True),
        ("jobs.sqlite", False, True),
        ("jobs.sqlite-wal", False, True),
        ("macro.JPG", False, True),
        ("uid-1.2.3", False, False),
    ],
)
def test_name_rules(name: str, temporary: bool, non_slide: bool) -> None:
    assert (is_temporary(name), is_non_slide(name)) == (temporary, non_slide)


def test_the_services_source_scan_never_probes_non_slide_files(tmp_path: Path) -> None:
    """`--sources` folders follow the same name rules as watch folders: a job table in one is
    never opened by a reader (closing it would drop SQLite's locks)."""
    shutil.copy(sample("openslide-python-fixtures/small.svs"), tmp_path / "small.svs")
    shutil.copy(sample("CMU-1-Small-Region.svs"), tmp_path / "jobs.sqlite")
    shutil.copy(sample("openslide-python-fixtures/small.svs"), tmp_path / "copy.svs.part")
    found = SourceSlides((str(tmp_path),)).scan()
    assert list(found.values()) == [tmp_path / "small.svs"]


# ---------------------------------------------------------------------------------------------
# Multi-file slides: the watcher's candidate and the parts moved are the same files


@pytest.fixture(scope="module")
def mirax(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mirax")
    return write_mirax(folder / "slide.mrxs", tissue_image(600, 400), levels=2)


def test_mirax_parts(mirax: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    slide = inbox / mirax.name
    shutil.copyfile(mirax, slide)
    shutil.copytree(mirax.with_suffix(""), inbox / "slide")
    write(inbox / "slide.json", "{}")
    parts = slide_parts(slide)
    assert parts == [slide, inbox / "slide", inbox / "slide.json"]
    (candidate,) = find_candidates(inbox)
    assert candidate.complete and set(candidate.files) == expand(parts)
    # The id hashes the same files, less the sidecar (metadata, not pixels).
    hashed = {Path(f.path) for f in local_slide_files(slide)}
    assert hashed == expand(parts) - {inbox / "slide.json"}
    moved = move_source(slide, tmp_path / "done")
    assert not any(p.exists() for p in parts)
    with open_slide(moved) as src:  # whole where it landed
        assert src.levels[0].width == 600


VMS = """[Virtual Microscope Specimen]
NoLayers=1
ImageFile=scan.jpg
ImageFile(1,0)=scan-1.jpg
MapFile=scan.map
OptimisationFile=scan.opt
MacroImage=scan_macro.jpg
"""


def test_vms_parts_are_the_files_it_lists(tmp_path: Path) -> None:
    vms = write(tmp_path / "scan.vms", VMS)
    listed = [write(tmp_path / n) for n in ("scan.jpg", "scan-1.jpg", "scan.map", "scan.opt")]
    macro = write(tmp_path / "scan_macro.jpg")
    sidecar = write(tmp_path / "scan.vms.json", "{}")
    other = write(tmp_path / "other.jpg")
    parts = slide_parts(vms)
    assert parts[0] == vms and parts[-1] == sidecar
    assert set(parts) == {vms, *listed, macro, sidecar}
    (candidate,) = find_candidates(tmp_path)
    assert candidate.layout == "vms" and candidate.complete
    assert set(candidate.files) == set(parts)
    move_source(vms, tmp_path / "quarantine", "unreadable")
    assert other.exists() and not any(p.exists() for p in parts)


def test_vms_names_outside_its_folder_are_never_parts(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    outside = write(tmp_path / "precious.jpg")
    vms = write(inbox / "scan.vms", VMS.replace("ImageFile=scan.jpg", "ImageFile=../precious.jpg"))
    assert slide_parts(vms) == [vms]
    write(inbox / "sub" / "scan.map")
    assert slide_parts(vms) == [vms]  # only files beside it, never below
    assert outside.exists()


# ---------------------------------------------------------------------------------------------
# DICOM series


def dicom_copy(src: Path, dest: Path, series: str | None = None) -> Path:
    """A copy of a real DICOM instance, moved into another series when `series` is given."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(src)
    if series is not None:
        ds.SeriesInstanceUID = series
    ds.save_as(dest)
    return dest


def test_loose_instances_group_by_series(tmp_path: Path) -> None:
    b0 = sample("openslide-python-fixtures/boxes_0.dcm")
    b1 = sample("openslide-python-fixtures/boxes_1.dcm")
    base = str(pydicom.dcmread(b0).SeriesInstanceUID)
    assert str(pydicom.dcmread(b1).SeriesInstanceUID) == base
    a1, a0 = dicom_copy(b1, tmp_path / "a1"), dicom_copy(b0, tmp_path / "a0")
    other = dicom_copy(b0, tmp_path / "b0", series="1.2.826.0.1.3680043.8.498.1")
    broken = write(tmp_path / "c.dcm", b0.read_bytes()[:1000])  # still being written
    write(tmp_path / "notes.txt", "not a slide")

    instances = [broken, other, a1, a0]
    groups, unknown = group_by_series(instances, readable_series_uid, lambda p: p.name)
    assert sorted(groups) == sorted([[a0, a1], [other]]) and unknown == [broken]
    with pytest.raises(CorruptSlide):
        series_uid(broken)

    # The reader opens the series of the instance it is given; the watcher offers the first.
    # While a DICOM file beside it cannot be read, it may be one of the series still arriving:
    # not yet (the conversion is retried), rather than a slide without that instance.
    with pytest.raises(CorruptSlide):
        dicom_series_files(broken)
    series = {c.path: set(c.files) for c in find_candidates(tmp_path) if c.complete}
    assert series == {a0: {a0, a1}, other: {other}}
    for entry in (a0, a1, other):
        with pytest.raises(SlideIncomplete, match="still arriving"):
            dicom_series_files(entry)
    dicom_copy(b0, broken, series="1.2.826.0.1.3680043.8.498.2")  # its last bytes arrived
    assert dicom_series_files(a1) == [a1, a0]
    assert dicom_series_files(other) == [other]
    for entry, files in series.items():
        assert set(dicom_series_files(entry)) == files


def test_a_series_folder_is_its_dicom_files(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    f0 = dicom_copy(sample("openslide-python-fixtures/boxes_0.dcm"), folder / "x0")
    f1 = dicom_copy(sample("openslide-python-fixtures/boxes_1.dcm"), folder / "x1")
    write(folder / "README.txt", "scanner notes")
    assert dicom_series_files(folder) == [f0, f1]


def test_names_at_the_file_systems_limit(tmp_path: Path) -> None:
    """A slide named with 254 bytes (legal): looking for `<name>.json` beside it raised
    ENAMETOOLONG (the conversion failed, and was retried as if transient); and its second
    quarantine folder, `<name>-1`, could not be made."""
    from wsi.ingest.source_files import _new_folder

    slide = tmp_path / ("L" * 250 + ".tif")
    slide.write_bytes(b"not a slide")
    assert sidecar_path(slide) is None
    first = _new_folder(tmp_path / "quarantine", slide.name)
    second = _new_folder(tmp_path / "quarantine", slide.name)
    assert first.name == slide.name and second.is_dir() and second != first
    assert len(second.name.encode()) <= 255 and second.name.endswith("-1")


def test_a_header_element_declaring_gigabytes_gives_a_reason(tmp_path: Path) -> None:
    """A damaged DICOM header whose sequence declares ~4 GiB in a 5 KB file: under an
    address-space limit (as conversions are run by lab IT and by the corrupt-corpus test)
    pydicom's read of it is a MemoryError, which has no message; the error line said
    "cannot read DICOM header: " and nothing after."""
    data = sample("openslide-python-fixtures/boxes_0.dcm").read_bytes()
    undefined = b"\x28\x00\x10\x91SQ\x00\x00\xff\xff\xff\xff"  # PixelMeasuresSequence
    assert data.count(undefined) == 1
    path = tmp_path / "huge.dcm"
    path.write_bytes(data.replace(undefined, undefined[:8] + (0xFFFFFF09).to_bytes(4, "little")))
    code = (
        "import pathlib, resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))\n"
        "from wsi.errors import CorruptSlide\n"
        "from wsi.slidefiles import series_uid\n"
        "try:\n"
        "    series_uid(pathlib.Path(sys.argv[1]))\n"
        "except CorruptSlide as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    )
    assert done.stdout.startswith("cannot read DICOM header: ")
    assert len(done.stdout.strip()) > len("cannot read DICOM header:"), done.stdout
