"""STOW-RS: whole-slide instances sent with dicomweb-client (the community's DICOMweb client)
land in the watch folder as a series folder, and ingest converts them as any scanner's drop."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image

import wsi
from server.settings import ServerSettings
from wsi.ingest.settings import IngestSettings
from wsi.ingest.source_files import (
    LEFTOVER_AGE_SECONDS,
    RECEIVING_PREFIX,
    remove_deletion_leftovers,
)

from .conftest import sample
from .helpers import serving

SERIES = [sample(f"openslide-python-fixtures/boxes_{i}.dcm") for i in (0, 1)]
"""A VL Whole Slide Microscopy series: a volume and a THUMBNAIL instance."""


def _settings(tmp_path: Path) -> ServerSettings:
    (tmp_path / "inbox").mkdir(exist_ok=True)
    return ServerSettings(
        store=str(tmp_path / "store"),
        watch=(str(tmp_path / "inbox"),),
        ingest=IngestSettings(
            quiet_seconds=0.3, poll_seconds=0.1, state_dir=str(tmp_path / "state")
        ),
    )


def test_instances_sent_by_stow_rs_are_converted(tmp_path: Path) -> None:
    """Sent with dicomweb-client, stored under their UIDs, converted by ingest: the published
    slide's base tile is the sent instance's frame, byte for byte (both are the stored JPEG);
    sent again, the same answer and nothing more."""
    datasets = [pydicom.dcmread(p) for p in SERIES]
    study = datasets[0].StudyInstanceUID
    series = datasets[0].SeriesInstanceUID
    with serving(_settings(tmp_path)) as base, requests.Session() as http:
        client = DICOMwebClient(f"{base}/dicomweb", session=http)
        answer = client.store_instances(datasets)
        kept = [str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence]
        assert kept == [str(d.SOPInstanceUID) for d in datasets]
        assert "FailedSOPSequence" not in answer
        folder = tmp_path / "inbox" / f"stow-{series}"
        for ds in datasets:
            assert (folder / f"{ds.SOPInstanceUID}.dcm").read_bytes() == SERIES[
                datasets.index(ds)
            ].read_bytes()
        again = client.store_instances(datasets, study_instance_uid=study)
        assert len(again.ReferencedSOPSequence) == 2
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            jobs = http.get(f"{base}/jobs").json()["jobs"]
            if jobs and all(j["state"] in ("done", "failed") for j in jobs):
                break
            time.sleep(0.2)
        assert [j["state"] for j in jobs] == ["done"], jobs
        [sid] = wsi.Store(wsi.StoreSettings(str(tmp_path / "store"))).published_slides()
    with wsi.open_published(f"{tmp_path / 'store'}/{sid}") as slide:
        assert (slide.width, slide.height) == (datasets[0].TotalPixelMatrixColumns,
                                               datasets[0].TotalPixelMatrixRows)  # fmt: skip
        # The stored tile is the frame's coefficients with optimal Huffman tables: the same
        # pixels, decoded by Pillow from what was sent.
        frame = next(pydicom.encaps.generate_frames(datasets[0].PixelData))
        sent = np.asarray(Image.open(io.BytesIO(frame)).convert("RGB"))
        tile = slide.tile(0, 0, 0)
        assert np.array_equal(tile, sent[: tile.shape[0], : tile.shape[1]])


def test_what_is_not_a_slide_instance_fails_alone(tmp_path: Path) -> None:
    """A part that is no DICOM, an instance of another SOP class, one of another study than
    the URL names, one sent again with other bytes: each in FailedSOPSequence with its PS3.4
    reason, the others kept (202); none kept is a 409; no watch folder, a 404; another media
    type, a 415; none of the failed left in the watch folder."""
    volume = pydicom.dcmread(SERIES[0])
    other_class = pydicom.dcmread(SERIES[1])
    other_class.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    other_class.SOPInstanceUID = "1.2.3.4.5"
    changed = pydicom.dcmread(SERIES[1])
    boundary = "stowtestboundary"

    def body(*parts: bytes) -> bytes:
        out = b""
        for part in parts:
            out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            out += part + b"\r\n"
        return out + f"--{boundary}--\r\n".encode()

    def encoded(ds: pydicom.Dataset) -> bytes:
        path = tmp_path / "part.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path.read_bytes()

    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    with serving(_settings(tmp_path)) as base:
        url = f"{base}/dicomweb/studies"
        first = requests.post(url, data=body(SERIES[1].read_bytes()), headers=headers, timeout=30)
        assert first.status_code == 200, first.text
        changed.ContentTime = "010203"  # the same SOP instance, other bytes
        sent = body(b"not dicom", encoded(other_class), encoded(changed), SERIES[0].read_bytes())
        r = requests.post(url, data=sent, headers=headers, timeout=30)
        assert r.status_code == 202, r.text
        doc = r.json()
        reasons = [i["00081197"]["Value"][0] for i in doc["00081198"]["Value"]]
        assert reasons == [0xC000, 0x0122, 0x0111]
        kept = [i["00081155"]["Value"][0] for i in doc["00081199"]["Value"]]
        assert kept == [str(volume.SOPInstanceUID)]
        elsewhere = requests.post(
            f"{url}/1.2.3", data=body(SERIES[0].read_bytes()), headers=headers, timeout=30
        )
        assert elsewhere.status_code == 409
        assert elsewhere.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
        wrong = requests.post(url, data=b"x", headers={"Content-Type": "application/dicom"})
        assert wrong.status_code == 415 and "error" in wrong.json()
    inbox = sorted(p.relative_to(tmp_path / "inbox") for p in (tmp_path / "inbox").rglob("*"))
    series = f"stow-{volume.SeriesInstanceUID}"
    assert [str(p) for p in inbox] == [
        series,
        f"{series}/{volume.SOPInstanceUID}.dcm",
        f"{series}/{pydicom.dcmread(SERIES[1]).SOPInstanceUID}.dcm",
    ]
    no_watch = ServerSettings(store=str(tmp_path / "store"))
    with serving(no_watch) as base:
        r = requests.post(f"{base}/dicomweb/studies", data=body(b"x"), headers=headers)
        assert r.status_code == 404 and "--watch" in json.loads(r.text)["error"]


def test_a_half_received_instance_is_swept_away(tmp_path: Path) -> None:
    """A service killed while receiving left a hidden half instance in the watch folder (or a
    series' folder) for ever, patient data no one was told was stored; the watcher's sweep
    removes one left alone past the leftovers' age, never one still being written."""
    series = tmp_path / "stow-1.2.3"
    series.mkdir()
    old = [tmp_path / f"{RECEIVING_PREFIX}a", series / f"{RECEIVING_PREFIX}b"]
    fresh = tmp_path / f"{RECEIVING_PREFIX}c"
    for path in (*old, fresh):
        path.write_bytes(b"half an instance")
    then = time.time() - LEFTOVER_AGE_SECONDS - 1
    for path in old:
        os.utime(path, (then, then))
    assert remove_deletion_leftovers(tmp_path) == 2
    assert [p.name for p in tmp_path.rglob(f"{RECEIVING_PREFIX}*")] == [fresh.name]


def test_an_instance_that_cannot_be_written_fails_alone(tmp_path: Path) -> None:
    """Where the series' folder should be there is a file (as a full disk or a folder not ours
    to write in fails): the instance fails with Out of Resources (A700), a 409, not a 500."""
    volume = pydicom.dcmread(SERIES[0])
    settings = _settings(tmp_path)
    (tmp_path / "inbox" / f"stow-{volume.SeriesInstanceUID}").write_bytes(b"in the way")
    boundary = "b0undary"
    body = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    body += SERIES[0].read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    with serving(settings) as base:
        r = requests.post(f"{base}/dicomweb/studies", data=body, headers=headers, timeout=30)
    assert r.status_code == 409, r.text
    [failed] = r.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xA700]
    assert failed["00081155"]["Value"] == [str(volume.SOPInstanceUID)]
    assert [p.name for p in (tmp_path / "inbox").iterdir()] == [f"stow-{volume.SeriesInstanceUID}"]
