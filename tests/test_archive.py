"""The archive tier: JPEG XL recompression of published slides, served as JPEG, restored exactly.

Every check reads real objects: byte comparisons of every stored object before, during and after
the archive, pixels through our reader, zarr-python (with the `wsistore.jpegxl` codec) and
OpenSlide, tiles and DICOMweb through the real service on a local port, a real `wsi archive`
process killed mid-way.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pydicom
import pytest
import requests
import zarr
from pydicom.encaps import generate_frames

import wsi
import wsi.codecs.zarr_jpeg
import wsi.codecs.zarr_jxl  # registers the codec with zarr-python
from server.settings import ServerSettings
from wsi.cli import main as wsi_main
from wsi.codecs import jxl
from wsi.errors import CorruptSlide, UnsupportedSlide
from wsi.export import export_dicom
from wsi.published import layout
from wsi.published.archive import (
    ArchiveSettings,
    archive,
    archive_due,
    form_header,
    restore,
)
from wsi.writers.dicom import (
    EMPTY_BOT,
    JPEG_XL_JPEG_RECOMPRESSION,
    PIXEL_DATA_HEADER,
    transfer_syntax,
    with_transfer_syntax,
)

from .conftest import make_tiff, sample
from .helpers import serving
from .test_dicom import dciodvfy
from .test_server_dicomweb import assert_json_error, parts

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def snapshot(root: Path, sid: str) -> dict[str, str]:
    """SHA-256 of every file of a slide's folder (the manifest included), by relative path."""
    folder = root / sid
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def stored_sizes(ds: pydicom.Dataset) -> list[int]:
    """Bytes of each stored chunk (a frame without its pad byte) of a DICOM instance, in stored
    order, from the shard index in its trailing padding element."""
    raw = ds[0xFFFCFFFC].value
    index = layout.decode_index(raw, (len(raw) - 4) // 16, "instance")
    return [n for _, n in sorted({(int(o), int(n)) for o, n in index[layout.stored_chunks(index)]})]


def published(root: Path, sid: str) -> dict[str, Any]:
    return json.loads((root / sid / "manifest.json").read_text())


def levels(root: Path, sid: str) -> list[dict[str, Any]]:
    doc = json.loads((root / sid / "slide.zarr" / "zarr.json").read_text())
    return doc["attributes"]["wsistore"]["levels"]


def zarr_pixels(root: Path, sid: str) -> list[np.ndarray]:
    """Every level read whole by plain zarr-python."""
    group = zarr.open_group(str(root / sid / "slide.zarr"), mode="r")
    return [np.asarray(_array(group, lv["path"])[:]) for lv in levels(root, sid)]


def _array(group: zarr.Group, path: str) -> zarr.Array:
    array = group[path]
    assert isinstance(array, zarr.Array), path
    return array


def openslide_pixels(root: Path, sid: str) -> np.ndarray:
    """Level 0 read by OpenSlide from its DICOM instance (RGBA)."""
    with openslide.OpenSlide(str(root / sid / "slide.zarr" / "0" / "c" / "0" / "0" / "0")) as osr:
        return np.asarray(osr.read_region((0, 0), 0, osr.level_dimensions[0]))


def reader_pixels(root: Path, sid: str) -> list[np.ndarray]:
    with wsi.open_published(str(root / sid)) as slide:
        return [
            slide.region(lv.index, 0, 0, lv.width, lv.height).transpose(2, 0, 1)
            for lv in slide.levels
        ]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The sample slide (levels, label, macro, thumbnail) and an odd-sized generated pyramid,
    converted into one store, with their objects and pixels before any archive."""
    root = tmp_path_factory.mktemp("archive") / "store"
    store = wsi.Store(wsi.StoreSettings(str(root)))
    odd = make_tiff(root.parent / "odd.tif", 1237, 1029, quality=80)
    sids = [
        wsi.convert_slide(sample("CMU-1-Small-Region.svs"), store).slide_id,
        wsi.convert_slide(odd, store).slide_id,
    ]
    return {
        "root": root,
        "store": store,
        "sids": sids,
        "before": {s: snapshot(root, s) for s in sids},
        "manifest": {s: published(root, s) for s in sids},
        "pixels": {s: zarr_pixels(root, s) for s in sids},
        "openslide": openslide_pixels(root, sids[0]),
    }


@pytest.mark.parametrize(
    ("which", "ratio"),
    [(0, 0.80), (1, 0.90)],  # a scanned slide; synthetic noise, which JPEG XL gains less on
)
def test_archive_then_restore_gives_back_every_byte(
    converted: dict[str, Any], which: int, ratio: float
) -> None:
    root, store, sid = converted["root"], converted["store"], converted["sids"][which]
    before, manifest = converted["before"][sid], converted["manifest"][sid]

    result = archive(store, sid, ArchiveSettings(batch_frames=7))  # batches cut mid-level
    archived = snapshot(root, sid)
    now = published(root, sid)
    assert set(archived) == set(before)  # the same objects: still one copy for both views
    changed = {k for k in before if archived[k] != before[k]}
    assert changed == {"manifest.json", *now["archived"]}
    assert result.objects == len(now["archived"])
    assert result.bytes_before == manifest["stored_bytes"]
    assert result.bytes_after == now["stored_bytes"] < ratio * manifest["stored_bytes"]
    for key, entry in now["archived"].items():  # the JPEG form of each replaced object
        assert entry == manifest["objects"][key]
    assert {lv["codec"] for lv in levels(root, sid)} == {"jpegxl"}
    # the archived manifest lists what is stored
    for key, entry in now["objects"].items():
        data = (root / sid / key).read_bytes()
        assert entry == {"size": len(data), "crc32c": layout.crc32c_hex(data)}
    assert archive(store, sid).objects == 0  # already archived: nothing to do

    restored = restore(store, sid)
    assert restored.bytes_after == manifest["stored_bytes"]
    assert snapshot(root, sid) == before  # every object, the manifest included, byte for byte
    assert published(root, sid) == manifest
    assert restore(store, sid).objects == 0
    assert sorted(p.name for p in (root / sid).iterdir()) == ["manifest.json", "slide.zarr"]


def test_archived_pixels_are_the_jpeg_pixels(converted: dict[str, Any]) -> None:
    root, store = converted["root"], converted["store"]
    for sid in converted["sids"]:
        archive(store, sid)
        expected = converted["pixels"][sid]  # zarr-python on the JPEG form
        for got in (zarr_pixels(root, sid), reader_pixels(root, sid)):
            assert len(got) == len(expected)
            for a, b in zip(got, expected, strict=True):
                np.testing.assert_array_equal(a, b)
        with wsi.open_published(str(root / sid)) as slide:
            lv = slide.levels[-1]
            patches = slide.patches(lv.index, [(0, 0), (lv.width - 50, lv.height - 50)], 100)
            np.testing.assert_array_equal(
                patches[0][: lv.height, : lv.width], expected[-1].transpose(1, 2, 0)[:100, :100]
            )
        restore(store, sid)
        assert snapshot(root, sid) == converted["before"][sid]
    # OpenSlide on the restored DICOM instance of level 0 reads what it read before the archive
    restored = openslide_pixels(root, converted["sids"][0])
    np.testing.assert_array_equal(restored, converted["openslide"])


def test_archived_instances_are_dicom_with_jpeg_xl_frames(converted: dict[str, Any]) -> None:
    root, store, sid = converted["root"], converted["store"], converted["sids"][0]
    jpeg_form = {
        i["key"]: pydicom.dcmread(root / sid / i["key"]) for i in published(root, sid)["dicom"]
    }
    archive(store, sid)
    try:
        for inst in published(root, sid)["dicom"]:
            path = root / sid / inst["key"]
            ds, old = pydicom.dcmread(path), jpeg_form[inst["key"]]
            assert ds.file_meta.TransferSyntaxUID == JPEG_XL_JPEG_RECOMPRESSION
            assert transfer_syntax(path.read_bytes()[:4096]) == JPEG_XL_JPEG_RECOMPRESSION
            assert ds.SOPInstanceUID == old.SOPInstanceUID == inst["sop_instance_uid"]
            # the data set is the same, element for element; only the frames, the shard index
            # that points at them (the trailing padding) and the lossy compression record are new
            recoded = (0x7FE00010, 0xFFFCFFFC, 0x00282112, 0x00282114)
            assert [e.tag for e in ds] == [e.tag for e in old]
            for e in old:
                if e.tag not in recoded:
                    assert ds[e.tag].value == e.value
            # PS3.3 C.7.6.1.1.5: one method and one ratio per step, JPEG first, then JPEG XL
            # with the JPEG ratio times what JPEG XL gained on the first 16 stored frames
            assert old.LossyImageCompressionMethod == "ISO_10918_1"
            assert list(ds.LossyImageCompressionMethod) == ["ISO_10918_1", "ISO_18181_1"]
            assert ds.LossyImageCompression == old.LossyImageCompression == "01"
            jpeg_sizes, jxl_sizes = stored_sizes(old)[:16], stored_sizes(ds)[:16]
            gained = float(old.LossyImageCompressionRatio) * sum(jpeg_sizes) / sum(jxl_sizes)
            assert [str(r) for r in ds.LossyImageCompressionRatio] == [
                str(old.LossyImageCompressionRatio),
                f"{gained:.2f}",
            ]
            assert dciodvfy(path) == ([], [])  # TILED_SPARSE: but for its frame count (see there)
            new_frames = list(generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
            old_frames = list(generate_frames(old.PixelData, number_of_frames=old.NumberOfFrames))
            assert len(new_frames) == len(old_frames) == ds.NumberOfFrames
            for new, jpeg in zip(new_frames, old_frames, strict=True):
                assert jxl.is_jxl(new)
                # both forms pad odd items with a NUL, which libjxl reads past as DICOM
                # readers hand it over
                rebuilt = jxl.jxl_to_jpeg(new)
                assert jpeg in (rebuilt, rebuilt + b"\0")
    finally:
        restore(store, sid)


def test_the_lossy_record_comes_back_exactly_or_the_archive_is_refused(tmp_path: Path) -> None:
    store = wsi.Store(wsi.StoreSettings(str(tmp_path / "store")))
    sid = wsi.convert_slide(make_tiff(tmp_path / "s.tif", 600, 400, quality=80), store).slide_id
    data = (tmp_path / "store" / sid / "slide.zarr" / "0" / "c" / "0" / "0" / "0").read_bytes()
    frames_start = PIXEL_DATA_HEADER + EMPTY_BOT
    header = data[: data.index(frames_start) + len(frames_start)]
    jpeg = pydicom.dcmread(io.BytesIO(header), stop_before_pixels=True)

    archived = form_header(header, layout.JPEGXL, (1000, 800))  # JPEG XL: 0.8x the JPEG bytes
    assert transfer_syntax(archived) == JPEG_XL_JPEG_RECOMPRESSION
    ds = pydicom.dcmread(io.BytesIO(archived), stop_before_pixels=True)
    assert list(ds.LossyImageCompressionMethod) == ["ISO_10918_1", "ISO_18181_1"]
    ratio = str(jpeg.LossyImageCompressionRatio)
    assert [str(r) for r in ds.LossyImageCompressionRatio] == [ratio, f"{float(ratio) * 1.25:.2f}"]
    assert form_header(archived, layout.JPEG) == header  # restore: byte for byte
    # without a sample (no frame stored) only the transfer syntax changes, both ways
    bare = form_header(header, layout.JPEGXL, (0, 0))
    assert bare == with_transfer_syntax(header, JPEG_XL_JPEG_RECOMPRESSION)
    assert form_header(bare, layout.JPEG) == header
    # a ratio padded with more than the one space of an odd length would not come back as it
    # was: refused before anything is written
    at = header.index(b"\x28\x00\x12\x21DS")
    (n,) = struct.unpack_from("<H", header, at + 6)
    value = header[at + 8 : at + 8 + n] + b"  "
    padded = header[: at + 6] + struct.pack("<H", len(value)) + value + header[at + 8 + n :]
    assert pydicom.dcmread(io.BytesIO(padded), stop_before_pixels=True).LossyImageCompressionRatio
    with pytest.raises(UnsupportedSlide, match="lossy compression record"):
        form_header(padded, layout.JPEGXL, (1000, 800))


def test_a_failed_restore_leaves_the_archive_served(converted: dict[str, Any]) -> None:
    root, store, sid = converted["root"], converted["store"], converted["sids"][1]
    archive(store, sid)
    manifest_path = root / sid / "manifest.json"
    doc = json.loads(manifest_path.read_text())
    key = sorted(doc["archived"])[0]
    doc["archived"][key]["crc32c"] = "00000000"  # a restore can no longer match it
    del doc["checksum"]  # as a manifest written before checksums: read as it is
    manifest_path.write_text(json.dumps(doc, indent=1, sort_keys=True))
    archived = snapshot(root, sid)
    with pytest.raises(CorruptSlide, match="would not give"):
        restore(store, sid)
    assert snapshot(root, sid) == archived  # still archived, still published, nothing left over
    assert sorted(p.name for p in (root / sid).iterdir()) == ["manifest.json", "slide.zarr"]
    with wsi.open_published(str(root / sid)) as slide:
        np.testing.assert_array_equal(
            slide.tile(0, 0, 0), converted["pixels"][sid][0].transpose(1, 2, 0)[:256, :256]
        )
    doc["archived"][key]["crc32c"] = converted["manifest"][sid]["objects"][key]["crc32c"]
    manifest_path.write_text(json.dumps(doc, indent=1, sort_keys=True))
    restore(store, sid)
    assert snapshot(root, sid) == converted["before"][sid]


def test_an_archived_slide_exports_its_jpeg_form(converted: dict[str, Any], tmp_path: Path) -> None:
    """`wsi export-dicom` of an archived slide wrote JPEG XL instances, which OpenSlide,
    wsidicom, pydicom and Orthanc all refuse ("Unsupported transfer syntax"), without a word:
    it writes each instance as it was before the archive, checked against the manifest's
    record; an instance that would differ fails the export, which leaves nothing."""
    root, store, sid = converted["root"], converted["store"], converted["sids"][0]
    before, manifest = converted["before"][sid], converted["manifest"][sid]
    archive(store, sid)
    archived = snapshot(root, sid)
    assert {i["key"] for i in manifest["dicom"]} <= set(published(root, sid)["archived"])
    exported = wsi_main(["export-dicom", str(root / sid), str(tmp_path / "export")])
    assert exported == 0
    names = {i["key"]: i for i in manifest["dicom"]}
    files = sorted((tmp_path / "export").iterdir())
    assert len(files) == len(names) >= 4  # levels, label, macro, thumbnail
    for key in names:
        matching = [f for f in files if hashlib.sha256(f.read_bytes()).hexdigest() == before[key]]
        assert len(matching) == 1, key  # byte for byte the instance before the archive
    for f in files:
        assert pydicom.dcmread(f).file_meta.TransferSyntaxUID == JPEG_BASELINE
    with openslide.OpenSlide(str(tmp_path / "export" / "level-0.dcm")) as osr:
        level0 = np.asarray(osr.read_region((0, 0), 0, osr.level_dimensions[0]))
    np.testing.assert_array_equal(level0, converted["openslide"])
    assert snapshot(root, sid) == archived  # the store was only read

    manifest_path = root / sid / "manifest.json"
    doc = json.loads(manifest_path.read_text())
    key = next(i["key"] for i in manifest["dicom"] if i["key"].endswith("/1/c/0/0/0"))
    doc["archived"][key]["crc32c"] = "00000000"  # its JPEG form no longer matches the record
    del doc["checksum"]
    manifest_path.write_text(json.dumps(doc, indent=1, sort_keys=True))
    with pytest.raises(CorruptSlide, match="before its archive"):
        export_dicom(store, sid, tmp_path / "again")
    assert not any((tmp_path / "again").iterdir())
    doc["archived"][key]["crc32c"] = manifest["objects"][key]["crc32c"]
    manifest_path.write_text(json.dumps(doc, indent=1, sort_keys=True))
    restore(store, sid)
    assert snapshot(root, sid) == before


def test_a_swap_killed_half_way_is_finished_by_the_next_run(
    converted: dict[str, Any], tmp_path: Path
) -> None:
    """The state a kill during the swap leaves (manifest gone, some objects moved in, the rest
    and the new manifest in the staging folder) is rolled forward, never left unpublished."""
    root, store, sid = converted["root"], converted["store"], converted["sids"][1]
    archive(store, sid)
    archived = snapshot(root, sid)
    objects = sorted(published(root, sid)["archived"])
    restore(store, sid)
    # Rebuild the archived version in a staging folder from a second store's archive.
    other = wsi.Store(wsi.StoreSettings(str(tmp_path / "other")))
    (tmp_path / "other").mkdir()
    os.system(f"cp -a {root / sid} {tmp_path / 'other'}/")
    archive(other, sid)
    staging = root / sid / "staging-killedswap"
    for key in [*objects, "manifest.json"]:
        target = staging / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((tmp_path / "other" / sid / key).read_bytes())
    (root / sid / "manifest.json").unlink()  # unpublished, as the swap starts
    for key in objects[: len(objects) // 2]:  # half of the objects already moved in
        os.replace(staging / key, root / sid / key)
    assert not store.is_published(sid)
    result = restore(store, sid)  # any run finishes the swap first, then does its own work
    assert result.objects == len(objects)
    assert snapshot(root, sid) == converted["before"][sid]
    # and the rolled-forward version was the archived one
    staging.mkdir()
    for key in [*objects, "manifest.json"]:
        (staging / key).parent.mkdir(parents=True, exist_ok=True)
        (staging / key).write_bytes((tmp_path / "other" / sid / key).read_bytes())
    (root / sid / "manifest.json").unlink()
    assert archive(store, sid).objects == 0  # the finished swap published the archive
    assert snapshot(root, sid) == archived
    restore(store, sid)


@pytest.mark.timeout(300)
def test_a_killed_archive_keeps_the_slide_served(tmp_path: Path) -> None:
    source = make_tiff(tmp_path / "big.tif", 6000, 5000, pyramid=False)
    root = tmp_path / "store"
    store = wsi.Store(wsi.StoreSettings(str(root)))
    sid = wsi.convert_slide(source, store).slide_id
    before = snapshot(root, sid)
    # One thread, ~500 level-0 tiles at a few ms each: seconds of work after the staging folder
    # appears, so the kill lands mid-way on any machine.
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "archive", str(root), sid, "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not any((root / sid).glob("staging-*/slide.zarr/0/c/0/0/*")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert published(root, sid).get("archived") is None
    assert {k: v for k, v in snapshot(root, sid).items() if "staging-" not in k} == before
    with wsi.open_published(str(root / sid)) as slide:
        assert slide.tile(0, 3, 2).shape == (256, 256, 3)
    result = archive(store, sid)  # the next run clears the leftovers and archives
    assert result.objects > 0
    assert not any((root / sid).glob("staging-*"))
    restore(store, sid)
    assert snapshot(root, sid) == before


def test_tiles_and_dicomweb_serve_the_jpeg_form(converted: dict[str, Any]) -> None:
    root, store, sid = converted["root"], converted["store"], converted["sids"][0]
    manifest = converted["manifest"][sid]
    inst = next(i for i in manifest["dicom"] if i["level"] == 0)
    study = json.loads((root / sid / "slide.zarr" / "zarr.json").read_text())["attributes"][
        "wsistore"
    ]["dicom"]
    instance_url = (
        f"/dicomweb/studies/{study['study_instance_uid']}/series/"
        f"{study['series_instance_uid']}/instances/{inst['sop_instance_uid']}"
    )
    urls = [f"/slides/{sid}/tiles/0/{c}/{r}" for c, r in ((0, 0), (3, 2), (8, 11))]
    urls += [
        f"/slides/{sid}/tiles/1/0/0",
        f"/slides/{sid}_files/12/1_1.jpeg",
        f"/iiif/3/{sid}/240,480,240,240/240,/0/default.jpg",
    ]

    def fetch() -> dict[str, Any]:
        with serving(ServerSettings(store=str(root))) as base, requests.Session() as http:
            out: dict[str, Any] = {}
            for url in urls:
                r = http.get(base + url)
                assert r.status_code == 200, (url, r.text)
                assert r.headers["Content-Type"] == "image/jpeg"
                out[url] = r.content
            r = http.get(f"{base}{instance_url}/frames/1,2,9")
            assert r.status_code == 200
            out["frames"] = [d for _, d in parts(r)]
            r = http.get(base + instance_url, headers={"Accept": "multipart/related; "
                         'type="application/dicom"'})  # fmt: skip
            assert r.status_code == 200
            [(ctype, out["instance"])] = parts(r)
            assert ctype.endswith(f"transfer-syntax={JPEG_BASELINE}")
            if published(root, sid).get("archived"):
                out["jxl"] = serve_jpeg_xl(http, base, instance_url)
            return out

    def serve_jpeg_xl(http: requests.Session, base: str, url: str) -> bytes:
        accept = 'multipart/related; type="image/jxl"'
        r = http.get(f"{base}{url}/frames/2", headers={"Accept": accept})
        assert r.status_code == 200, r.text
        [(ctype, frame)] = parts(r)
        assert ctype == f"image/jxl; transfer-syntax={JPEG_XL_JPEG_RECOMPRESSION}"
        assert jxl.is_jxl(frame)
        accept = 'multipart/related; type="application/dicom"; transfer-syntax='
        r = http.get(base + url, headers={"Accept": accept + JPEG_XL_JPEG_RECOMPRESSION})
        [(ctype, stored)] = parts(r)
        assert ctype.endswith(JPEG_XL_JPEG_RECOMPRESSION)
        assert stored == (root / sid / inst["key"]).read_bytes()
        return frame

    before = fetch()
    assert before["instance"] == (root / sid / inst["key"]).read_bytes()
    archive(store, sid)
    try:
        during = fetch()
        assert jxl.jxl_to_jpeg(during.pop("jxl")) == before["frames"][1]
        assert during == before  # tiles, DeepZoom, frames and the instance: the same bytes
    finally:
        restore(store, sid)
    assert fetch() == before
    # JPEG XL asked for by name from a slide in its JPEG form: 406 with a JSON body
    with serving(ServerSettings(store=str(root))) as base:
        r = requests.get(
            f"{base}{instance_url}/frames/1",
            headers={"Accept": 'multipart/related; type="image/jxl"'},
        )
        assert_json_error(r, 406)


def test_the_archive_policy_takes_slides_published_long_enough_ago(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = wsi.Store(wsi.StoreSettings(str(root)))
    sid = wsi.convert_slide(make_tiff(tmp_path / "a.tif", 700, 600), store).slide_id
    published_at = store.modified(f"{sid}/manifest.json")
    assert abs(published_at - time.time()) < 600
    day = 86400.0
    assert archive_due(store, 30, now=published_at + 29 * day) == []
    assert published(root, sid).get("archived") is None
    [result] = archive_due(store, 30, now=published_at + 31 * day)
    assert result.slide_id == sid and result.objects > 0
    assert published(root, sid)["archived"]
    assert archive_due(store, 30, now=published_at + 400 * day) == []  # archived already


def test_cli_archive_and_restore_print_one_line_per_slide(
    converted: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    root, sid = converted["root"], converted["sids"][1]
    assert wsi_main(["archive", str(root), sid, "no-such-slide"]) == 1
    out, err = capsys.readouterr()
    assert out.startswith(f"{sid}: archived ") and " bytes (0." in out
    assert err.strip() == "wsi: archive: no-such-slide: slide no-such-slide is not published"
    assert wsi_main(["restore", str(root), sid]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith(f"{sid}: restored ")
    assert snapshot(root, sid) == converted["before"][sid]


def test_a_dicom_only_slide_is_refused_in_one_line_and_skipped_by_the_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A slide published with `--format dicom` has no Zarr view, whose arrays the archive tier
    recodes: `wsi archive` said "no object <id>/slide.zarr/zarr.json" and the hourly policy
    would have warned so of every such slide each round."""
    root = tmp_path / "store"
    store = wsi.Store(wsi.StoreSettings(str(root)))
    settings = wsi.ConvertSettings(formats=("dicom",))
    sid = wsi.convert_slide(make_tiff(tmp_path / "a.tif", 700, 600), store, settings).slide_id
    before = snapshot(root, sid)
    for command in ("archive", "restore"):
        assert wsi_main([command, str(root), sid]) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err == (
            f"wsi: {command}: {sid}: slide {sid} has no Zarr view (published with --format "
            "dicom): the archive tier recodes the arrays the Zarr view describes; publish it "
            "again with --format both to archive it\n"
        )
    published_at = store.modified(f"{sid}/manifest.json")
    assert archive_due(store, 30, now=published_at + 31 * 86400.0) == []
    assert "not archived" not in caplog.text
    assert snapshot(root, sid) == before


def test_archive_needs_a_store_that_exists_and_can_be_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store path typed wrong made an empty store (its lock folder) and said the slide was
    not published; a file in the store's place, or a store it may not write in, was a
    traceback. Each is one error line now, and nothing is made."""
    file = tmp_path / "file"
    file.write_bytes(b"")
    for command in ("archive", "restore"):
        assert wsi_main([command, str(tmp_path / "typo"), "x1"]) == 1
        assert capsys.readouterr().err == f"wsi: error: store {tmp_path / 'typo'} does not exist\n"
        assert not (tmp_path / "typo").exists()
        assert wsi_main([command, str(file), "x1"]) == 1
        assert capsys.readouterr().err == f"wsi: error: store {file} is not a folder\n"
    root = tmp_path / "store"
    store = wsi.Store(wsi.StoreSettings(str(root)))
    sid = wsi.convert_slide(make_tiff(tmp_path / "a.tif", 700, 600), store).slide_id
    shutil.rmtree(root / ".wsistore-locks", ignore_errors=True)

    def refused(path: Any, mode: int = 0o777) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "mkdir", refused)  # root may write anywhere: as a store it may not
    assert wsi_main(["archive", str(root), sid]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"wsi: archive: {sid}: cannot make the lock folder in {root}: ")
    assert "Permission denied" in err and err.count("\n") == 1
