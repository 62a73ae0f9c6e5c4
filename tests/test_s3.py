"""Slides in real S3 (SeaweedFS, started by the `seaweedfs` fixture): no mocks.

A conversion into `s3://` must publish the same bytes as one into a local folder, be readable by
plain zarr-python straight from the bucket, and go through the CLI. What the store itself promises
on S3 (whole objects, listing, publication, keys) is the store contract, run on S3 by
`test_contract_stores.py`.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pytest
import zarr
import zarr.storage

import wsi
from wsi.slide_id import content_slide_id
from wsi.store.objects import MANIFEST

from .conftest import sample

# conftest.py imports the `seaweedfs` fixture too; importing it here as well keeps this file
# self-contained (the fixture is named explicitly, so the alias registers it as `seaweedfs`), and
# both definitions share one running server.
from .helpers import run_wsi
from .s3server import SeaweedFS
from .s3server import seaweedfs as _seaweedfs_fixture  # noqa: F401

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def small_svs() -> Path:
    return sample("CMU-1-Small-Region.svs")


def s3_store(server: SeaweedFS, prefix: str) -> wsi.Store:
    return wsi.Store(wsi.StoreSettings(server.url(prefix), endpoint_url=server.endpoint_url))


@pytest.fixture(scope="module")
def converted(
    seaweedfs: SeaweedFS, small_svs: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The sample converted once into S3 and once into a local folder."""
    store = s3_store(seaweedfs, "slides")
    result = wsi.convert_slide(small_svs, store)
    local = wsi.Store(wsi.StoreSettings(str(tmp_path_factory.mktemp("local-store"))))
    local_result = wsi.convert_slide(small_svs, local)
    return {"store": store, "result": result, "local": local, "local_result": local_result}


def test_convert_publishes_to_s3(
    converted: dict[str, Any], seaweedfs: SeaweedFS, small_svs: Path
) -> None:
    store, result = converted["store"], converted["result"]
    sid = content_slide_id(small_svs)
    assert result.slide_id == sid
    assert not result.skipped
    assert result.url == f"s3://{seaweedfs.bucket}/slides/{sid}/slide.zarr"
    assert store.published_slides() == [sid]
    assert store.is_published(sid)


def test_manifest_objects_exist_with_their_sizes(converted: dict[str, Any]) -> None:
    store, sid = converted["store"], converted["result"].slide_id
    manifest = store.read_manifest(sid)
    objects = manifest["objects"]
    assert "slide.zarr/zarr.json" in objects
    assert "slide.zarr/0/c/0/0/0" in objects
    for key, meta in objects.items():
        assert store.exists(f"{sid}/{key}"), key
        assert store.size(f"{sid}/{key}") == meta["size"], key
    assert manifest["stored_bytes"] == sum(m["size"] for m in objects.values())
    # Nothing else under the slide: no stray temporaries or half-finished uploads.
    assert store.list_keys(sid) == sorted([f"{sid}/{k}" for k in objects] + [f"{sid}/{MANIFEST}"])


def test_s3_objects_are_byte_identical_to_local(converted: dict[str, Any]) -> None:
    store, local = converted["store"], converted["local"]
    sid = converted["result"].slide_id
    assert converted["local_result"].slide_id == sid
    manifest = store.read_manifest(sid)
    assert manifest == local.read_manifest(sid)
    for key, meta in manifest["objects"].items():
        remote = store.get(f"{sid}/{key}")
        assert remote == local.get(f"{sid}/{key}"), key
        assert google_crc32c.Checksum(remote).hexdigest().decode() == meta["crc32c"], key


def test_zarr_python_reads_level0_from_s3(converted: dict[str, Any], seaweedfs: SeaweedFS) -> None:
    result, local_result = converted["result"], converted["local_result"]
    # from_url + storage_options lets zarr build an asynchronous S3FileSystem on its own loop.
    remote_store = zarr.storage.FsspecStore.from_url(
        result.url, storage_options=seaweedfs.storage_options(), read_only=True
    )
    remote = zarr.open_group(store=remote_store, mode="r")
    local = zarr.open_group(
        store=zarr.storage.LocalStore(local_result.url, read_only=True), mode="r"
    )
    manifest = converted["store"].read_manifest(result.slide_id)
    ome: Any = remote.attrs["ome"]
    assert ome["multiscales"][0]["datasets"][0]["path"] == "0"
    level0, local0 = remote["0"], local["0"]
    assert isinstance(level0, zarr.Array)
    assert isinstance(local0, zarr.Array)
    assert level0.shape == (3, manifest["height"], manifest["width"])
    assert level0.dtype == np.uint8
    pixels = np.asarray(level0[:])
    expected = np.asarray(local0[:])
    assert np.array_equal(pixels, expected)
    assert pixels.std() > 1  # real image content, not the fill value
    # A window inside the shard: partial (byte-range) reads give the same pixels.
    window = np.asarray(level0[:, 300:700, 500:1100])
    assert np.array_equal(window, expected[:, 300:700, 500:1100])


def test_converting_again_is_a_no_op(converted: dict[str, Any], small_svs: Path) -> None:
    again = wsi.convert_slide(small_svs, converted["store"])
    assert again.skipped
    assert again.slide_id == converted["result"].slide_id
    assert again.stored_bytes == converted["result"].stored_bytes


def test_cli_converts_into_s3_then_reports_already_published(
    seaweedfs: SeaweedFS, small_svs: Path
) -> None:
    env = {**os.environ, **seaweedfs.env}
    url = seaweedfs.url("cli")
    cmd = [
        "convert",
        str(small_svs),
        "--out",
        url,
        "--s3-endpoint",
        seaweedfs.endpoint_url,
        "--no-progress",
    ]
    sid = content_slide_id(small_svs)

    first = run_wsi(*cmd, env=env)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert len(lines) == 1, first.stdout
    slide_id, slide_url, rate = lines[0].split("\t")
    assert slide_id == sid
    assert slide_url == f"{url}/{sid}/slide.zarr"
    assert rate.endswith("MP/s")

    second = run_wsi(*cmd, env=env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == [f"{sid}\t{url}/{sid}/slide.zarr\talready published"]

    listed = run_wsi("list", url, "--s3-endpoint", seaweedfs.endpoint_url, env=env)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [sid]
    assert s3_store(seaweedfs, "cli").published_slides() == [sid]


def test_export_dicom_from_s3_opens_in_openslide(
    converted: dict[str, Any], seaweedfs: SeaweedFS, tmp_path: Path
) -> None:
    """The DICOM view straight out of the bucket: the objects are downloaded as they are."""
    import openslide

    from wsi.export import export_dicom_location

    slide_id = converted["result"].slide_id
    files = export_dicom_location(
        f"{seaweedfs.url('slides')}/{slide_id}", tmp_path, seaweedfs.endpoint_url
    )
    assert {f.name for f in files} >= {"level-0.dcm", "label.dcm", "thumbnail.dcm"}
    local = converted["local"]
    assert (tmp_path / "level-0.dcm").read_bytes() == local.get(f"{slide_id}/slide.zarr/0/c/0/0/0")
    with openslide.OpenSlide(str(tmp_path / "level-0.dcm")) as slide:
        assert slide.dimensions == (2220, 2967)


def test_a_new_attempt_aborts_uploads_a_failed_one_left(
    seaweedfs: SeaweedFS, small_svs: Path
) -> None:
    """An upload whose abort could not reach the store (it was down) stays, billed, until
    someone aborts it: the next conversion of the slide does."""
    store = s3_store(seaweedfs, f"leftover-{uuid.uuid4().hex[:8]}")
    sid = content_slide_id(small_svs)
    bucket, _, root = store.path(sid).partition("/")
    key = f"{root}/slide.zarr/0/c/0/0/0"
    upload = store.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    store.fs.call_s3(
        "upload_part",
        Bucket=bucket,
        Key=key,
        UploadId=upload["UploadId"],
        PartNumber=1,
        Body=b"x" * 1024,
    )

    def unfinished() -> list[str]:
        found = store.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=root + "/")
        return [u["UploadId"] for u in found.get("Uploads", [])]

    assert unfinished() == [upload["UploadId"]]
    wsi.convert_slide(small_svs, store)
    assert unfinished() == []
    assert store.published_slides() == [sid]
