"""Slides that live in a bucket: `wsi convert s3://...` and `POST /jobs` with an `s3://` URL.

The source is staged (downloaded into a spool folder), converted and published; the result must
equal a conversion of the same file from a local folder, byte for byte (the staged copy keeps the
object's modification time, which DICOM dates fall back to). Only prefixes the service was told
about are accepted.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import s3fs
from aiohttp.test_utils import TestClient, TestServer

import wsi
from server.app import create_app
from server.settings import ServerSettings
from wsi.slide_id import content_slide_id

from .conftest import sample
from .helpers import run_wsi, wait_until
from .s3server import SeaweedFS
from .s3server import seaweedfs as _seaweedfs_fixture  # noqa: F401

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def drop(seaweedfs: SeaweedFS) -> dict[str, Any]:
    """A 'scanner bucket' prefix holding a slide, a DICOM series folder and a corrupt file."""
    fs = s3fs.S3FileSystem(**seaweedfs.storage_options())
    prefix = f"{seaweedfs.bucket}/drop-{uuid.uuid4().hex[:8]}"
    slide = sample("CMU-1-Small-Region.svs")
    fs.put_file(str(slide), f"{prefix}/scans/case.svs")
    series = sorted(p for p in sample("highdicom").rglob("*.dcm"))[:1]
    for p in series:
        fs.put_file(str(p), f"{prefix}/scans/series/{p.name}")
    fs.put_file(
        str(sample("openslide-python-fixtures/unopenable.tiff")), f"{prefix}/scans/broken.tiff"
    )
    fs.put_file(str(slide), f"{prefix}/elsewhere/case.svs")
    # The local reference: the same bytes with the object's modification time.
    mtime = fs.info(f"{prefix}/scans/case.svs")["LastModified"].timestamp()
    return {"fs": fs, "prefix": prefix, "slide": slide, "mtime": mtime, "series": series}


def _local_reference(tmp_path: Path, drop: dict[str, Any]) -> wsi.Store:
    local = tmp_path / "ref" / "case.svs"
    local.parent.mkdir()
    local.write_bytes(drop["slide"].read_bytes())
    os.utime(local, (drop["mtime"], drop["mtime"]))
    store = wsi.Store(wsi.StoreSettings(str(tmp_path / "ref-store")))
    wsi.convert_slide(local, store)
    return store


def test_cli_converts_an_s3_source(
    tmp_path: Path, seaweedfs: SeaweedFS, drop: dict[str, Any]
) -> None:
    env = {**os.environ, **seaweedfs.env}
    url = f"s3://{drop['prefix']}/scans/case.svs"
    out, spool = tmp_path / "store", tmp_path / "spool"
    done = run_wsi(
        "convert", url, "--out", str(out), "--spool", str(spool), "--no-progress", env=env
    )
    assert done.returncode == 0, done.stderr
    sid = done.stdout.split("\t")[0]
    assert sid == content_slide_id(drop["slide"])
    assert list(spool.iterdir()) == []  # the staged copy is gone
    reference = _local_reference(tmp_path, drop)
    store = wsi.Store(wsi.StoreSettings(str(out)))
    assert store.read_manifest(sid)["objects"] == reference.read_manifest(sid)["objects"]

    missing = run_wsi("convert", url + "-missing", "--out", str(out), "--no-progress", env=env)
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0 and "no such object" in missing.stderr
    bad = run_wsi("convert", "s3://Bad_Bucket/x.svs", "--out", str(out), env=env)
    assert bad.returncode == 1 and "bucket" in bad.stderr.lower()
    away = {**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"}
    unreachable = run_wsi("convert", url, "--out", str(out), "--no-progress", env=away)
    assert unreachable.returncode == 75, unreachable.stderr  # retryable: the store, not the slide


def test_post_jobs_with_s3_sources(
    tmp_path: Path, seaweedfs: SeaweedFS, drop: dict[str, Any]
) -> None:
    """First a service that only serves and queues (no workers): the bucket slide is downloaded
    at submit and viewable from that copy, status converting. Then the same service with a
    worker: it converts the copy, publishes, and the copy goes."""
    prefix = drop["prefix"]
    spool = tmp_path / "store" / ".spool"
    settings = ServerSettings(
        store=str(tmp_path / "store"),
        s3_sources=(f"s3://{prefix}/scans/",),
        s3_endpoint=seaweedfs.endpoint_url,
        poll_seconds=0.2,
        quarantine_dir=str(tmp_path / "quarantine"),
        workers=0,
    )
    sid = content_slide_id(drop["slide"])
    with wsi.open_slide(drop["slide"]) as src:
        first_tile = src.read_encoded_tile(0, 0, 0)
    submitted: dict[str, dict[str, Any]] = {}

    async def queue_and_view() -> None:
        async with TestClient(TestServer(create_app(settings))) as c:

            async def post(source: str) -> tuple[int, dict[str, Any]]:
                resp = await c.post("/jobs", json={"source": source})
                return resp.status, await resp.json()

            # Refused: outside the allowed prefix, spelled to escape it, missing, not a URL.
            for source, words in [
                (f"s3://{prefix}/elsewhere/case.svs", "prefix"),
                (f"s3://{prefix}/scans/../elsewhere/case.svs", "segment"),
                (f"s3://{prefix}/scans-other/case.svs", "prefix"),
                (f"s3://{prefix}/scans/missing.svs", "does not exist"),
                ("s3://", "bucket"),
            ]:
                status, body = await post(source)
                assert status == 400 and words in json.dumps(body).lower(), (source, body)

            status, job = await post(f"s3://{prefix}/scans/case.svs")
            assert status == 202 and job["slide_id"] == sid
            again = await post(f"s3://{prefix}/scans/case.svs")
            assert again[1]["id"] == job["id"]  # the same content: one job
            status, series = await post(f"s3://{prefix}/scans/series/")
            assert status == 202
            status, broken = await post(f"s3://{prefix}/scans/broken.tiff")
            assert status == 202
            submitted.update(case=job, series=series, broken=broken)

            async def viewable() -> dict[str, Any] | None:
                resp = await c.get(f"/slides/{sid}")
                return await resp.json() if resp.status == 200 else None

            summary = await wait_until(viewable, 60)
            assert summary["status"] == "converting"
            assert summary["job"] == {"id": job["id"], "state": "queued", "progress": 0.0}
            page = await (await c.get("/")).text()
            assert "converting (queued)" in page
            tile = await c.get(f"/slides/{sid}/tiles/0/0/0")
            assert tile.status == 200 and await tile.read() == first_tile
            listed = {s["id"]: s for s in (await (await c.get("/slides")).json())["slides"]}
            assert listed[sid]["job"]["id"] == job["id"]
            jobs = (await (await c.get("/jobs")).json())["jobs"]
            assert {j["state"] for j in jobs} == {"queued"}  # nothing converts here

    asyncio.run(queue_and_view())
    assert (spool / "copies" / sid / ".ready").is_file()  # kept for the job, across a restart

    async def convert() -> None:
        async with TestClient(TestServer(create_app(replace(settings, workers=1)))) as c:

            async def ended() -> dict[str, dict[str, Any]]:
                jobs = (await (await c.get("/jobs")).json())["jobs"]
                finished = all(j["state"] in ("done", "failed") for j in jobs)
                return {j["id"]: j for j in jobs} if finished and len(jobs) == 3 else {}

            jobs = await wait_until(ended)
            assert jobs[submitted["case"]["id"]]["state"] == "done"
            assert jobs[submitted["series"]["id"]]["state"] == "done"
            failed = jobs[submitted["broken"]["id"]]
            assert failed["state"] == "failed" and "Unsupported TIFF" in failed["error"]
            assert (await (await c.get(f"/slides/{sid}")).json())["status"] == "ready"
            tile = await c.get(f"/slides/{sid}/tiles/0/0/0")
            assert tile.status == 200 and await tile.read() == first_tile

    # The worker converts the copies: with the objects gone from the bucket it still can.
    fs = drop["fs"]
    held = {key: fs.cat_file(key) for key in fs.find(f"{prefix}/scans/")}  # a few MB
    assert len(held) == 2 + len(drop["series"])
    fs.rm(list(held))
    try:
        asyncio.run(convert())
    finally:
        for key, data in held.items():
            fs.pipe_file(key, data)
    assert not (tmp_path / "quarantine").exists()  # a bucket source is never moved
    # Every copy is gone once its job ended: nothing left in the spool.
    assert [p for p in spool.rglob("*") if p.is_file()] == []
    reference = _local_reference(tmp_path, drop)
    store = wsi.Store(wsi.StoreSettings(str(tmp_path / "store")))
    assert store.read_manifest(sid)["objects"] == reference.read_manifest(sid)["objects"]


def test_s3_sources_must_be_enabled(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    settings = ServerSettings(store=str(tmp_path / "store"), watch=(str(tmp_path / "inbox"),))

    async def main() -> None:
        async with TestClient(TestServer(create_app(settings))) as c:
            resp = await c.post("/jobs", json={"source": "s3://bucket/scans/case.svs"})
            assert resp.status == 400
            assert "not enabled" in (await resp.json())["error"]

    asyncio.run(main())
