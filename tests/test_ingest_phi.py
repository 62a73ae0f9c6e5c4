"""Ingest keeps patient data where it belongs: a de-identifying service (`WSI_DEIDENTIFY`)
publishes no identifier, label or name and shows or writes no file name (file names are often
patients' names); what ingest writes is private whatever the umask; conversions never import
code from the folder the service was started from.

Real parts throughout: the service with a watch folder, `wsi convert` subprocesses, the SQLite
job table; what is published is read back with pydicom (DICOM headers) and as JSON (Zarr).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import tifffile
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image, ImageCms

import wsi
from server.app import create_app
from server.settings import ServerSettings
from wsi.convert import ConvertSettings
from wsi.export import export_dicom_location
from wsi.ingest.queue import JobState, SQLiteJobQueue
from wsi.ingest.settings import IngestSettings
from wsi.metadata import NEUTRAL_ICC_TEXT, neutral_icc_profile
from wsi.pseudonyms import published_ids
from wsi.slide_id import content_slide_id

from .conftest import sample
from .helpers import dicom_series, drain, run_wsi, wait_until

NAMES = ("Doe", "Jane", "MRN12345", "Roe", "Richard", "MRN55555", "Example Hospital")
"""What a scanner operator typed: in file names, the sidecar and the ICC profile's texts."""
GOOD = "Doe_Jane_MRN12345.svs"
BAD = "Roe_Richard_MRN55555.tiff"
OUR_LOGGERS = ("wsi", "wsistore", "server")
"""Loggers of this code (libraries' own debug logs, e.g. fsspec's "open file", are theirs)."""
SIDECAR = {
    "patient_name": "Doe^Jane",
    "patient_id": "MRN12345",
    "accession_number": "ACC-Doe-1",
    "institution_name": "St Example Hospital",
    "specimen_id": "Jane-specimen",
}


def assert_no_names(blob: bytes | str, where: str) -> None:
    """No name in `blob`, as ASCII/UTF-8 or as UTF-16 (ICC v4 texts are UTF-16)."""
    data = blob.encode() if isinstance(blob, str) else blob
    for name in NAMES:
        for spelling in (name.encode(), name.encode("utf-16-be")):
            assert spelling not in data, f"{name!r} in {where}"


def published_headers(store: Path, slide_id: str, tmp: Path) -> Iterator[tuple[str, bytes]]:
    """Every published text a reader gets: the manifest, each Zarr `zarr.json` (with the ICC
    profile it carries decoded), and each DICOM instance's header (file meta and data set,
    pixel data left out) as pydicom reads and writes it back."""
    root = store / slide_id
    for path in sorted(root.rglob("*.json")):
        yield str(path.relative_to(root)), path.read_bytes()
    attributes = json.loads((root / "slide.zarr" / "zarr.json").read_bytes())["attributes"]
    icc = attributes["wsistore"].get("icc_profile")
    if icc:
        yield "the Zarr ICC profile", base64.b64decode(icc)
    exported = tmp / f"dicom-{slide_id}"
    for path in export_dicom_location(str(root), str(exported)):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out = io.BytesIO()
        pydicom.dcmwrite(out, ds, enforce_file_format=True)
        yield path.name, out.getvalue()


def associated_images(store: Path, slide_id: str) -> list[str]:
    doc = json.loads((store / slide_id / "slide.zarr" / "zarr.json").read_bytes())
    return [a["name"] for a in doc["attributes"]["wsistore"]["associated_images"]]


def private(path: Path) -> bool:
    return path.stat().st_mode & 0o007 == 0


# ---------------------------------------------------------------------------------------------
# The service


def test_a_deidentifying_service_names_no_patient_anywhere(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A slide named after its patient with a sidecar of identifiers, and a broken one: the job
    list, the errors, REASON.txt and the logs name no file; the published slide holds no
    identifier, label or macro (its Aperio thumbnail, of the scanned area only, stays)."""
    caplog.set_level(logging.DEBUG)
    inbox, store, state = tmp_path / "inbox", tmp_path / "store", tmp_path / "state"
    inbox.mkdir()
    shutil.copy(sample("CMU-1-Small-Region.svs"), inbox / GOOD)
    (inbox / f"{GOOD}.json").write_text(json.dumps(SIDECAR))
    shutil.copy(sample("openslide-python-fixtures/unopenable.tiff"), inbox / BAD)
    settings = ServerSettings(
        store=str(store),
        watch=(str(inbox),),
        ingest=IngestSettings(
            deidentify=True, quiet_seconds=0.5, poll_seconds=0.2, state_dir=str(state)
        ),
    )
    shown: list[str] = []

    async def main() -> dict[str, dict[str, Any]]:
        async with TestClient(TestServer(create_app(settings))) as c:

            async def ended() -> list[dict[str, Any]]:
                resp = await c.get("/jobs")
                shown.append(await resp.text())
                jobs = (await resp.json())["jobs"]
                over = len(jobs) == 2 and all(j["state"] in ("done", "failed") for j in jobs)
                return jobs if over else []

            jobs = await wait_until(ended, 120)
            for job in jobs:
                shown.append(await (await c.get(f"/jobs/{job['id']}")).text())
            return {j["state"]: j for j in jobs}

    jobs = asyncio.run(main())
    for text in shown:
        assert_no_names(text, "GET /jobs")
    done, failed = jobs["done"], jobs["failed"]
    assert done["source"] == f"slide {done['slide_id']}"
    assert failed["source"] == f"slide {failed['slide_id']}"
    assert "Unsupported TIFF compression" in failed["error"]
    assert f"slide {failed['slide_id']}" in failed["error"]

    reasons = list((state / "quarantine").rglob("REASON.txt"))
    assert len(reasons) == 1
    assert "Unsupported TIFF compression" in reasons[0].read_text()
    assert_no_names(reasons[0].read_text(), "REASON.txt")
    ours = [r.getMessage() for r in caplog.records if r.name.split(".")[0] in OUR_LOGGERS]
    assert_no_names("\n".join(ours), "our log")

    sid = done["slide_id"]  # the keyed pseudonym, which the file's content id does not give
    content_id = content_slide_id(inbox / GOOD)
    assert sid == published_ids(True).of(content_id) != content_id
    for where, blob in published_headers(store, sid, tmp_path):
        assert_no_names(blob, where)
    assert associated_images(store, sid) == ["thumbnail"]
    level0 = pydicom.dcmread(next((tmp_path / f"dicom-{sid}").glob("level-0.dcm")))
    assert level0.PatientIdentityRemoved == "YES" and str(level0.PatientName) == ""


def test_the_converter_names_no_file_in_its_errors(tmp_path: Path) -> None:
    broken = tmp_path / BAD
    shutil.copy(sample("openslide-python-fixtures/unopenable.tiff"), broken)
    out = str(tmp_path / "store")
    plain = run_wsi("convert", str(broken), "--out", out, "--no-progress")
    assert plain.returncode == 1 and BAD in plain.stderr  # without --deidentify: as before
    for extra, ref in [((), "source 1"), (("--slide-id", "case-7"), "slide case-7")]:
        done = run_wsi("convert", str(broken), "--out", out, "--deidentify", *extra)
        assert done.returncode == 1
        assert done.stderr.startswith(f"wsi: error: {ref}: ") and "Unsupported" in done.stderr
        assert_no_names(done.stderr, "stderr")


# ---------------------------------------------------------------------------------------------
# What a de-identified slide keeps


@pytest.mark.parametrize(
    ("label_in_thumbnail", "keep_label", "kept"),
    [("YES", False, False), ("YES", True, True), ("NO", False, True)],
)
def test_a_thumbnail_that_may_show_the_label_goes_unless_the_label_is_kept(
    tmp_path: Path, label_in_thumbnail: str, keep_label: bool, kept: bool
) -> None:
    series = dicom_series(tmp_path / "series", label_in_thumbnail)
    store = tmp_path / "store"
    settings = ConvertSettings(deidentify=True, keep_label=keep_label)
    result = wsi.convert_slide(series, wsi.Store(wsi.StoreSettings(str(store))), settings)
    assert associated_images(store, result.slide_id) == (["thumbnail"] if kept else [])
    plain = wsi.convert_slide(series, wsi.Store(wsi.StoreSettings(str(tmp_path / "plain"))))
    assert associated_images(tmp_path / "plain", plain.slide_id) == ["thumbnail"]


def _text_tag(kind: bytes, text: str) -> bytes:
    """An ICC tag of type `kind` ('text', v2 'desc' or v4 'mluc') holding `text`."""
    raw = text.encode("ascii")
    if kind == b"text":
        return b"text" + bytes(4) + raw + b"\0"
    if kind == b"desc":
        return (
            b"desc"
            + bytes(4)
            + struct.pack(">I", len(raw) + 1)
            + raw
            + b"\0"
            + struct.pack(">IIHB", 0, 0, 0, 0)
            + bytes(67)
        )
    utf16 = text.encode("utf-16-be")
    return b"mluc" + bytes(4) + struct.pack(">II4sII", 1, 12, b"enUS", len(utf16), 28) + utf16


def profile_naming_people() -> bytes:
    """lcms's sRGB profile, its texts and an extra private tag filled in by a scanner's site:
    description, copyright, device maker and model, in every text type ICC has."""
    base = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    (count,) = struct.unpack(">I", base[128:132])
    tags: dict[bytes, bytes] = {}
    for i in range(count):
        sig, offset, size = struct.unpack(">4sII", base[132 + 12 * i : 144 + 12 * i])
        tags[sig] = base[offset : offset + size]
    tags[b"desc"] = _text_tag(b"desc", "Scanner of Jane Doe")
    tags[b"cprt"] = _text_tag(b"text", "Copyright St Example Hospital")
    tags[b"dmnd"] = _text_tag(b"mluc", "Doe Imaging")
    tags[b"dmdd"] = _text_tag(b"mluc", "calibrated for MRN12345")
    tags[b"ZZZZ"] = _text_tag(b"text", "Richard Roe was here")
    table, body = b"", b""
    start = 132 + 12 * len(tags)
    for sig, data in tags.items():
        table += struct.pack(">4sII", sig, start + len(body), len(data))
        body += data + bytes(-len(data) % 4)
    header = bytearray(base[:128])
    header[0:4] = struct.pack(">I", start + len(body))
    return bytes(header) + struct.pack(">I", len(tags)) + table + body


def _transform(profile: bytes, pixels: np.ndarray) -> np.ndarray:
    """`pixels` converted from `profile` to sRGB by lcms."""
    source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    srgb = ImageCms.createProfile("sRGB")
    transform = ImageCms.buildTransform(source, srgb, "RGB", "RGB")
    return np.asarray(ImageCms.applyTransform(Image.fromarray(pixels), transform))


def test_a_deidentified_icc_profile_has_neutral_texts_and_the_same_colours(
    tmp_path: Path,
) -> None:
    profile = profile_naming_people()
    assert b"Jane Doe" in profile  # the test's profile names people, as lcms reads it
    assert "Jane Doe" in ImageCms.getProfileDescription(
        ImageCms.ImageCmsProfile(io.BytesIO(profile))
    )
    rng = np.random.default_rng(7)
    slide = tmp_path / "scan.tiff"
    pixels = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    tifffile.imwrite(
        slide, pixels, tile=(256, 256), photometric="rgb", compression="jpeg", iccprofile=profile
    )
    sample_pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for deidentify in (False, True):
        store = tmp_path / f"store-{deidentify}"
        result = wsi.convert_slide(
            slide, wsi.Store(wsi.StoreSettings(str(store))), ConvertSettings(deidentify=deidentify)
        )
        attributes = json.loads((store / result.slide_id / "slide.zarr" / "zarr.json").read_bytes())
        stored = base64.b64decode(attributes["attributes"]["wsistore"]["icc_profile"])
        level0 = export_dicom_location(str(store / result.slide_id), str(store / "dcm"))[0]
        in_dicom = bytes(pydicom.dcmread(level0).OpticalPathSequence[0].ICCProfile)
        assert in_dicom == stored
        if not deidentify:
            assert stored == profile  # the scanner's own profile, unchanged
            continue
        for where, blob in published_headers(store, result.slide_id, tmp_path):
            assert_no_names(blob, where)
        lcms = ImageCms.ImageCmsProfile(io.BytesIO(stored))
        assert ImageCms.getProfileDescription(lcms).strip() == NEUTRAL_ICC_TEXT
        assert ImageCms.getProfileCopyright(lcms).strip() == NEUTRAL_ICC_TEXT
        # Only its texts changed: colours convert exactly as with the scanner's profile.
        assert np.array_equal(_transform(stored, sample_pixels), _transform(profile, sample_pixels))


@pytest.mark.parametrize("junk", [b"", b"\0" * 200, b"x" * 132 + b"acsp", bytes(range(256)) * 4])
def test_what_is_not_an_icc_profile_is_not_kept(junk: bytes) -> None:
    assert neutral_icc_profile(junk) is None


# ---------------------------------------------------------------------------------------------
# Files ingest writes, and the code conversions run


def test_what_ingest_writes_is_private_whatever_the_umask(tmp_path: Path) -> None:
    """Job table (and its journal files), quarantine with REASON.txt, done: nothing any other
    user may read, with a umask of 0."""
    inbox, store, state = tmp_path / "inbox", tmp_path / "store", tmp_path / "state"
    inbox.mkdir()
    shutil.copy(sample("openslide-python-fixtures/small.svs"), inbox / "good.svs")
    shutil.copy(sample("openslide-python-fixtures/unopenable.tiff"), inbox / "broken.tiff")
    settings = ServerSettings(
        store=str(store),
        watch=(str(inbox),),
        ingest=IngestSettings(
            after_success="move", quiet_seconds=0.5, poll_seconds=0.2, state_dir=str(state)
        ),
    )
    journal: list[Path] = []

    async def main() -> None:
        async with TestClient(TestServer(create_app(settings))) as c:

            async def ended() -> bool:
                jobs = (await (await c.get("/jobs")).json())["jobs"]
                return len(jobs) == 2 and all(j["state"] in ("done", "failed") for j in jobs)

            await wait_until(ended, 120)
            for path in state.iterdir():  # SQLite's WAL files exist while the table is open
                if path.name.startswith("jobs.sqlite-"):
                    journal.append(path)
                    assert private(path), f"{path} is {oct(path.stat().st_mode)}"

    old = os.umask(0)
    try:
        asyncio.run(main())
    finally:
        os.umask(old)
    assert journal
    written = [state, state / "jobs.sqlite", state / "spool", state / "done"]
    # What ingest made: its folders and REASON.txt. The slides moved into them keep their own
    # modes, out of others' reach in folders they cannot enter.
    made = [*(state / "quarantine").rglob("*"), *(state / "done").rglob("*")]
    written += [state / "quarantine", *(p for p in made if p.is_dir() or p.name == "REASON.txt")]
    assert (state / "quarantine" / "broken.tiff" / "REASON.txt") in written
    assert (state / "done" / "good.svs") in written
    for path in written:
        assert private(path), f"{path} is {oct(path.stat().st_mode)}"


def test_a_module_in_the_working_folder_is_never_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `numpy.py` in the folder the service was started from: a conversion that imported it
    would run whatever it holds (here: leave a mark and fail)."""
    here, mark = tmp_path / "started-here", tmp_path / "imported"
    here.mkdir()
    (here / "numpy.py").write_text(
        f"open({str(mark)!r}, 'w').close()\nraise ImportError('the hostile numpy.py')\n"
    )
    monkeypatch.chdir(here)
    slide = sample("openslide-python-fixtures/small.svs")
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    job = queue.submit(str(slide), content_slide_id(slide))
    settings = IngestSettings(poll_seconds=0.1, state_dir=str(tmp_path / "state"))
    drain(queue, str(tmp_path / "store"), settings)
    assert not mark.exists()
    assert queue.get(job.id).state == JobState.DONE, queue.get(job.id).error


def test_job_errors_name_no_folder_and_no_identifier(tmp_path: Path) -> None:
    """Without de-identification a job's error names the slide's file, never the folders above
    it: scanners name folders after patients, with spaces and colons, which the directory filter
    took for the end of a path (`Doe Jane 1970-01-01/case.tiff` was shown). And a sidecar's
    malformed birth date is not quoted back in the error."""
    inbox, store, state = tmp_path / "inbox", tmp_path / "store", tmp_path / "state"
    folders = [inbox / "Doe Jane 1970-01-01", inbox / "MRN:12345 Roe"]
    broken = sample("openslide-python-fixtures/unopenable.tiff").read_bytes()
    for n, folder in enumerate(folders):
        folder.mkdir(parents=True)
        (folder / "case.tiff").write_bytes(broken + bytes(n))  # two slides, not one content
    shutil.copy(sample("CMU-1-Small-Region.svs"), inbox / "dated.svs")
    (inbox / "dated.svs.json").write_text(json.dumps({"patient_birth_date": "1970-01-31"}))
    settings = ServerSettings(
        store=str(store),
        watch=(str(inbox),),
        ingest=IngestSettings(quiet_seconds=0.5, poll_seconds=0.2, state_dir=str(state)),
    )

    async def main() -> list[dict[str, Any]]:
        async with TestClient(TestServer(create_app(settings))) as c:

            async def failed() -> list[dict[str, Any]]:
                jobs = (await (await c.get("/jobs")).json())["jobs"]
                over = len(jobs) == 3 and all(j["state"] == "failed" for j in jobs)
                return jobs if over else []

            return await wait_until(failed, 120)

    jobs = asyncio.run(main())
    errors = [j["error"] for j in jobs]
    reasons = [p.read_text() for p in (state / "quarantine").rglob("REASON.txt")]
    assert len(reasons) == 3
    for text in [*errors, *reasons]:
        for secret in ("Doe", "Jane", "MRN", "12345", "1970-01", str(tmp_path)):
            assert secret not in text, (secret, text)
    assert sum("case.tiff: " in e for e in errors) == 2, errors
    assert any("patient_birth_date must be YYYYMMDD" in e for e in errors), errors
