"""DICOM level objects streamed to S3 while their level is written (`wsi.store.head_last`),
against the SeaweedFS the tests start: no mocks.

A level object's DICOM header describes the frames actually stored, so it is known only when the
level ends, yet it comes first. The frames go up as parts 2..N of a multipart upload while the
level is encoded; part 1 (the header and the first frames) and the last part (the rest and the
index) at the end. The objects must be byte-identical to a local conversion's (both views, a
TILED_SPARSE level, levels too small for a multipart upload), go up before the level ends, leave
nothing behind when the conversion fails, map store failures to `StoreError`, and still work in
a process forked after obstore ran (which uses s3fs).

SeaweedFS enforces S3's 5 MiB minimum part size, so the slide's tiles are large (JPEG quality 100,
noise): level 0 is about 20 MB, several parts; the levels below it are single PUTs.
"""

from __future__ import annotations

import io
import multiprocessing
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pydicom
import pytest

import wsi
from wsi.errors import StoreError
from wsi.published.layout import SlideKeys
from wsi.slide_id import content_slide_id
from wsi.store.head_last import open_head_last
from wsi.store.parts import MIN_PART_BYTES, ObjectParts, upload_part

from .conftest import make_tiff
from .s3server import SeaweedFS
from .s3server import seaweedfs as _seaweedfs_fixture  # noqa: F401

pytestmark = pytest.mark.s3

PART = MIN_PART_BYTES
"""The smallest part S3 (and SeaweedFS) accepts, where a test sets the part size."""
BOTH = ("zarr", "dicom")
_MiB = 1024 * 1024


class Stop(Exception):
    """Raised from the progress callback to fail a conversion mid-way."""


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4096 x 4096, about half of its 256 px cells blank glass (left out: sparse levels), the
    rest noise at JPEG quality 100 (level 0 about 20 MB)."""
    path = tmp_path_factory.mktemp("stream") / "slide.tif"
    return make_tiff(path, 4096, 4096, pyramid=False, quality=100)


@pytest.fixture(scope="module")
def local_results(
    slide: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, ...], wsi.Store]:
    """The slide converted into a local folder, per set of views (filled on demand)."""
    return {}


def local_store(
    cache: dict[tuple[str, ...], wsi.Store], slide: Path, formats: tuple[str, ...], root: Path
) -> wsi.Store:
    if formats not in cache:
        store = wsi.Store(wsi.StoreSettings(str(root / "-".join(formats))))
        wsi.convert_slide(slide, store, wsi.ConvertSettings(formats=formats))
        cache[formats] = store
    return cache[formats]


def s3_store(server: SeaweedFS, **options: Any) -> wsi.Store:
    url = server.url(f"stream-{uuid.uuid4().hex[:12]}")
    endpoint = options.pop("endpoint_url", server.endpoint_url)
    return wsi.Store(wsi.StoreSettings(url, endpoint, **options))


def etag_parts(store: wsi.Store, key: str) -> int:
    """Parts of the upload that made an object (S3's ETag of a multipart object ends in -N);
    0 for an object sent with one PUT."""
    etag = str(store.fs.info(store.path(key))["ETag"]).strip('"')
    return int(etag.rsplit("-", 1)[1]) if "-" in etag else 0


def uploads(store: wsi.Store) -> list[dict[str, Any]]:
    """The store's unfinished multipart uploads, each with its parts' numbers."""
    bucket, _, root = store.full_url()[len("s3://") :].partition("/")
    found = store.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=root + "/")
    out = []
    for upload in found.get("Uploads", []):
        listed = store.fs.call_s3(
            "list_parts", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
        )
        numbers = sorted(int(p["PartNumber"]) for p in listed.get("Parts", []))
        out.append({"key": upload["Key"][len(root) + 1 :], "parts": numbers})
    return out


def noise(n: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# -- whole conversions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "formats", [BOTH, ("dicom",), ("zarr",)], ids=["both-views", "dicom-only", "zarr-only"]
)
def test_objects_are_byte_identical_to_a_local_conversion(
    seaweedfs: SeaweedFS,
    slide: Path,
    local_results: dict[tuple[str, ...], wsi.Store],
    tmp_path_factory: pytest.TempPathFactory,
    formats: tuple[str, ...],
) -> None:
    local = local_store(local_results, slide, formats, tmp_path_factory.mktemp("local"))
    store = s3_store(seaweedfs)
    result = wsi.convert_slide(slide, store, wsi.ConvertSettings(formats=formats))
    sid = result.slide_id
    manifest = store.read_manifest(sid)
    assert manifest == local.read_manifest(sid)
    assert store.list_keys(sid) == local.list_keys(sid)
    for key, meta in manifest["objects"].items():
        remote = store.get(f"{sid}/{key}")
        assert remote == local.get(f"{sid}/{key}"), key
        assert f"{google_crc32c.value(remote):08x}" == meta["crc32c"], key
    assert uploads(store) == []

    keys = SlideKeys(sid)
    level0, last = (keys.shard(str(k)) for k in (0, len(manifest["levels"]) - 1))
    size0 = manifest["objects"][keys.in_slide(level0)]["size"]
    assert size0 > 16 * _MiB
    assert etag_parts(store, level0) >= 3  # 5 MiB with the header, 8 MiB parts, the rest
    size1 = manifest["objects"][keys.in_slide(keys.shard("1"))]["size"]
    assert size1 < MIN_PART_BYTES
    assert etag_parts(store, keys.shard("1")) == 0  # one PUT
    if "dicom" in formats:  # blank glass left out of level 0, none in the smallest level
        header = dicom_header(store, level0)
        assert header.DimensionOrganizationType == "TILED_SPARSE"
        assert 0 < header.NumberOfFrames < 16 * 16
        assert dicom_header(store, last).DimensionOrganizationType == "TILED_FULL"


def test_a_conversion_to_s3_never_imports_s3fs(seaweedfs: SeaweedFS, slide: Path) -> None:
    """Everything a first conversion asks of S3, level 0's numbered parts included, goes through
    obstore and the store's botocore client: s3fs, aiobotocore and aiohttp would add ~0.4 s."""
    store = s3_store(seaweedfs)
    argv = [sys.executable, "-X", "importtime", "-m", "server.cli", "convert", str(slide)]
    argv += ["--out", store.url, "--s3-endpoint", seaweedfs.endpoint_url, "--no-progress"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert {"obstore", "botocore.client"} <= imported  # the imports were listed
    assert not {"s3fs", "aiobotocore", "aiohttp"} & imported
    sid = content_slide_id(slide)
    assert store.published_slides() == [sid]
    assert etag_parts(store, SlideKeys(sid).shard("0")) >= 3  # numbered parts, head last


def dicom_header(store: wsi.Store, key: str) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(store.get(key)), stop_before_pixels=True)


def test_frames_go_up_while_the_level_is_written(seaweedfs: SeaweedFS, slide: Path) -> None:
    """Near the end of the conversion, level 0's upload already holds parts 2 and up and not
    part 1 (the header comes last), and no level object is visible yet. With one part in flight
    at a time, a part is whole before the next one is sent."""
    store = s3_store(seaweedfs, upload_part_bytes=PART, upload_concurrency=1)
    sid = content_slide_id(slide)
    seen: list[list[dict[str, Any]]] = []
    listed: list[list[str]] = []

    def progress(done: int, total: int) -> None:
        if not seen and done >= 0.9 * total:
            seen.append(uploads(store))
            listed.append(store.list_keys(sid))

    wsi.convert_slide(slide, store, progress=progress)
    assert seen, "the progress callback never ran past 90%"
    level0 = SlideKeys(sid).shard("0")
    (upload,) = [u for u in seen[0] if u["key"] == level0]
    assert upload["parts"][:1] == [2], upload
    assert listed[0] == [], listed[0]
    assert etag_parts(store, level0) > upload["parts"][-1]  # part 1 and the last came after
    assert uploads(store) == []


def test_a_failed_conversion_leaves_no_object_and_no_upload(
    seaweedfs: SeaweedFS, slide: Path
) -> None:
    store = s3_store(seaweedfs, upload_part_bytes=PART, upload_concurrency=1)
    seen: list[list[dict[str, Any]]] = []

    def progress(done: int, total: int) -> None:
        if done >= 0.9 * total:
            seen.append(uploads(store))
            raise Stop

    with pytest.raises(Stop):
        wsi.convert_slide(slide, store, progress=progress)
    assert seen and any(u["parts"] for u in seen[0]), seen  # parts had gone up
    assert uploads(store) == []
    assert store.list_keys(content_slide_id(slide)) == []
    assert store.published_slides() == []


def _convert_in_child(settings: wsi.StoreSettings, slide: Path, answers: Any) -> None:
    store = wsi.Store(settings)
    result = wsi.convert_slide(slide, store)
    answers.put((store.obstore_client() is None, result.slide_id))


def test_a_process_forked_after_obstore_ran_converts_through_s3fs(
    seaweedfs: SeaweedFS,
    slide: Path,
    local_results: dict[tuple[str, ...], wsi.Store],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    local = local_store(local_results, slide, BOTH, tmp_path_factory.mktemp("local"))
    store = s3_store(seaweedfs)
    store.put("warm", b"obstore has run in this process")
    assert store.obstore_client() is not None
    context = multiprocessing.get_context("fork")
    answers = context.Queue()
    child = context.Process(target=_convert_in_child, args=(store.settings, slide, answers))
    child.start()
    try:
        through_s3fs, sid = answers.get(timeout=120)
    finally:
        child.join(60)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert through_s3fs
    manifest = store.read_manifest(sid)
    assert manifest == local.read_manifest(sid)
    for key in manifest["objects"]:
        assert store.get(f"{sid}/{key}") == local.get(f"{sid}/{key}"), key
    assert etag_parts(store, SlideKeys(sid).shard("0")) >= 3
    assert uploads(store) == []


# -- one head-last object -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "parts"),
    [
        # No part sent while writing: `Store.put` at the end, one PUT up to a part, else its
        # own multipart upload (obstore's, in parts of the store's size).
        ((), 0),
        ((1,), 0),
        ((PART - 1,), 2),
        ((PART, 1), 2),
        ((3 * PART + 5,), 4),  # one write: all of it is held for part 1
        ((PART,) * 4, 5),  # part 1, three of a write each, the last with the tail only
        ((_MiB,) * 13 + (7,), 3),  # part 1 (5 writes), part 2 (5), the rest and the tail
    ],
    ids=["empty", "1", "part-1", "part+1", "one-large-write", "parts", "many-writes"],
)
def test_head_last_objects_hold_head_body_and_tail(
    seaweedfs: SeaweedFS, sizes: tuple[int, ...], parts: int
) -> None:
    store = s3_store(seaweedfs, upload_part_bytes=PART)
    body = [noise(n, seed=i) for i, n in enumerate(sizes)]
    head, tail = noise(1001, seed=90), noise(77, seed=91)
    with open_head_last(store, "o/object") as target:
        for data in body:
            target.write(data)
        stored = target.finish(head, tail)
        assert not store.exists("o/object")  # appears when the block ends
    whole = head + b"".join(body) + tail
    assert store.get("o/object") == whole
    assert (stored.key, stored.size) == ("o/object", len(whole))
    assert stored.crc32c == f"{google_crc32c.value(whole):08x}"
    assert etag_parts(store, "o/object") == parts
    assert uploads(store) == []


def test_an_unfinished_head_last_object_is_discarded(seaweedfs: SeaweedFS) -> None:
    store = s3_store(seaweedfs, upload_part_bytes=PART, upload_concurrency=1)
    with pytest.raises(wsi.WsiError, match="never finished"), open_head_last(store, "o/x") as obj:
        for i in range(3):
            obj.write(noise(PART, seed=i))
        # One part in flight at a time: part 2 was whole before part 3 was sent.
        assert [u["parts"][:1] for u in uploads(store)] == [[2]]
    assert uploads(store) == []
    assert not store.exists("o/x")


def test_an_unreachable_store_is_a_one_line_store_error(seaweedfs: SeaweedFS) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nobody listens there
    store = s3_store(seaweedfs, endpoint_url=f"http://127.0.0.1:{port}", upload_part_bytes=PART)
    with pytest.raises(StoreError) as caught, open_head_last(store, "o/y") as obj:
        for i in range(2):
            obj.write(noise(PART, seed=i))
    message = str(caught.value)
    assert "\n" not in message and "o/y" in message and "connect" in message.lower(), message


# -- one part -----------------------------------------------------------------------------------


def test_a_part_for_an_unknown_upload_is_a_one_line_store_error(seaweedfs: SeaweedFS) -> None:
    store = s3_store(seaweedfs)
    with pytest.raises(StoreError) as caught:
        upload_part(store, "o/z", "no-such-upload", 2, noise(1000))
    message = str(caught.value)
    assert message.startswith("cannot upload part 2 of o/z: HTTP 404"), message
    assert "\n" not in message


def test_a_part_sent_while_the_store_is_down_is_a_store_error_saying_so(
    seaweedfs: SeaweedFS,
) -> None:
    store = s3_store(seaweedfs)
    parts = ObjectParts.begin(store, "o/down", "run")
    try:
        with seaweedfs.outage(), pytest.raises(StoreError) as caught:
            parts.put(store, 2, noise(1000))
        assert "connect" in str(caught.value) and "\n" not in str(caught.value), caught.value
        first = parts.put(store, 1, noise(PART, seed=3))  # the store is back: it goes up
        last = parts.put(store, 2, b"end")
        parts.complete(store, [first, last])
        assert store.get("o/down") == noise(PART, seed=3) + b"end"
    finally:
        parts.abort(store)
