"""Slides that live in a bucket: `wsi convert s3://...` and `POST /jobs` with an `s3://` URL.

The source is staged (downloaded into a spool folder), converted and published; the result must
equal a conversion of the same file from a local folder, byte for byte (the staged copy keeps the
object's modification time, which DICOM dates fall back to). Only prefixes the service was told
about are accepted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
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
from wsi.codecs import jpegtran
from wsi.ingest.queue import JobState, SQLiteJobQueue
from wsi.ingest.settings import IngestSettings
from wsi.ingest.spool import RESERVED, ROOM_POLL_SECONDS
from wsi.ingest.staging import remote_slide_id
from wsi.ingest.worker import Worker
from wsi.slide_id import content_slide_id
from wsi.store.objects import StoreSettings

from .conftest import sample
from .helpers import run_wsi, wait_until, wsi_process
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


def test_the_cli_says_when_its_download_waits_for_room(
    tmp_path: Path, seaweedfs: SeaweedFS, drop: dict[str, Any]
) -> None:
    """`wsi convert s3://...` whose download finds the spool's quota held by the copies of
    conversions running beside it waits, and says so in one line (it waited in silence, like
    a hang); it converts once they end."""
    env = {**os.environ, **seaweedfs.env}
    url = f"s3://{drop['prefix']}/scans/case.svs"
    size = str(drop["slide"].stat().st_size)
    spool = tmp_path / "spool"
    beside = spool / f"wsi-staged-{os.getpid()}-beside"  # a live process's copy
    beside.mkdir(parents=True)
    (beside / RESERVED).write_text(f"{size}\n")
    log = tmp_path / "convert.log"
    args = ["convert", url, "--out", str(tmp_path / "store"), "--spool", str(spool)]
    args += ["--spool-quota-bytes", size, "--max-source-bytes", size, "--no-progress"]
    with wsi_process(log, *args, env=env) as proc:

        async def says() -> bool:
            return "waiting for room in the spool" in log.read_text()

        asyncio.run(wait_until(says, 60))
        assert proc.poll() is None  # still waiting
        shutil.rmtree(beside)  # that conversion ended
        assert proc.wait(120) == 0, log.read_text()
    said = log.read_text()
    assert said.count("waiting for room") == 1 and content_slide_id(drop["slide"]) in said


def test_post_jobs_with_s3_sources(
    tmp_path: Path, seaweedfs: SeaweedFS, drop: dict[str, Any]
) -> None:
    """First a service that only serves and queues (no workers): the bucket slide is downloaded
    at submit and viewable from that copy, status converting. Then the same service with a
    worker: it converts the copy, publishes, and the copy goes."""
    prefix = drop["prefix"]
    spool = tmp_path / "store.state" / "spool"  # in the state folder beside the store
    settings = ServerSettings(
        store=str(tmp_path / "store"),
        s3_sources=(f"s3://{prefix}/scans/",),
        s3_endpoint=seaweedfs.endpoint_url,
        ingest=IngestSettings(
            poll_seconds=0.2, quarantine_dir=str(tmp_path / "quarantine"), workers=0
        ),
    )
    sid = content_slide_id(drop["slide"])
    with wsi.open_slide(drop["slide"]) as src:
        first_tile = src.read_encoded_tile(0, 0, 0)
    # Published, the same tile is stored with optimal Huffman tables: the same coefficients.
    published_tile = jpegtran.transcode(first_tile).data
    submitted: dict[str, dict[str, Any]] = {}

    async def queue_and_view() -> None:
        async with TestClient(TestServer(create_app(settings))) as c:

            async def post(source: str) -> tuple[int, dict[str, Any]]:
                resp = await c.post("/jobs", json={"source": source})
                return resp.status, await resp.json()

            # Refused: outside the allowed prefix, spelled to escape it, missing, not a URL.
            for source, words in [
                # The allowed prefix itself: as a folder slide, every object under it.
                (f"s3://{prefix}/scans/", "prefix"),
                (f"s3://{prefix}/scans", "prefix"),
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
        async with TestClient(
            TestServer(create_app(replace(settings, ingest=replace(settings.ingest, workers=1))))
        ) as c:

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
            assert tile.status == 200 and await tile.read() == published_tile

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


def test_post_jobs_refuses_a_source_over_the_caps(
    tmp_path: Path, seaweedfs: SeaweedFS, drop: dict[str, Any]
) -> None:
    """A folder slide with more objects than `WSI_MAX_SOURCE_OBJECTS`: refused at submit,
    before anything is downloaded."""
    prefix = drop["prefix"]
    for i in range(3):
        drop["fs"].pipe_file(f"{prefix}/scans/crowd/{i}.dcm", b"x")
    settings = ServerSettings(
        store=str(tmp_path / "store"),
        s3_sources=(f"s3://{prefix}/scans/",),
        s3_endpoint=seaweedfs.endpoint_url,
        ingest=IngestSettings(workers=0, max_source_objects=2, state_dir=str(tmp_path / "st")),
    )

    async def main() -> None:
        async with TestClient(TestServer(create_app(settings))) as c:
            resp = await c.post("/jobs", json={"source": f"s3://{prefix}/scans/crowd/"})
            assert resp.status == 400 and "over 2 objects" in (await resp.json())["error"]
            assert (await (await c.get("/jobs")).json())["jobs"] == []

    asyncio.run(main())
    assert [p for p in (tmp_path / "st" / "spool").rglob("*") if p.is_file()] == []


def _jobs_api(c: TestClient) -> Any:
    async def jobs() -> list[dict[str, Any]]:
        return (await (await c.get("/jobs")).json())["jobs"]

    return jobs


def test_a_copy_made_ahead_leaves_room_for_a_conversion(
    tmp_path: Path, seaweedfs: SeaweedFS, drop: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The copy `POST /jobs` makes ahead of the conversion would leave less than one largest
    source free in the spool: it is not made, and the job waits (queued, not failed); a worker
    then converts it, downloading it with the spool's whole quota."""
    size = drop["slide"].stat().st_size
    state = tmp_path / "state"
    settings = ServerSettings(
        store=str(tmp_path / "store"),
        s3_sources=(f"s3://{drop['prefix']}/scans/",),
        s3_endpoint=seaweedfs.endpoint_url,
        ingest=IngestSettings(
            workers=0,
            poll_seconds=0.2,
            state_dir=str(state),
            max_source_bytes=size,
            spool_quota_bytes=size + size // 2,
        ),
    )
    url = f"s3://{drop['prefix']}/scans/case.svs"

    async def submit() -> None:
        async with TestClient(TestServer(create_app(settings))) as c:
            resp = await c.post("/jobs", json={"source": url})
            assert resp.status == 202

            async def refused() -> bool:
                return "no room in the spool" in caplog.text

            await wait_until(refused, 60)
            jobs = await _jobs_api(c)()
            assert [(j["state"], j["error"]) for j in jobs] == [("queued", None)]

    caplog.set_level(logging.INFO, logger="wsistore.staged")
    asyncio.run(submit())
    assert not list((state / "spool").rglob(".ready"))  # no copy

    async def convert() -> None:
        running = replace(settings, ingest=replace(settings.ingest, workers=1))
        async with TestClient(TestServer(create_app(running))) as c:

            async def done() -> list[dict[str, Any]]:
                jobs = await _jobs_api(c)()
                return jobs if jobs and jobs[0]["state"] in ("done", "failed") else []

            (job,) = await wait_until(done)
            assert job["state"] == "done" and job["attempts"] == 1, job

    asyncio.run(convert())


def test_a_conversion_waits_for_room_in_the_spool(
    tmp_path: Path, seaweedfs: SeaweedFS, drop: dict[str, Any]
) -> None:
    """A worker's conversion whose download finds the spool full (copies of conversions running
    beside it) waits, showing it is alive, and converts once room is free: never failed."""
    url = f"s3://{drop['prefix']}/scans/case.svs"
    size = drop["slide"].stat().st_size
    store = str(tmp_path / "store")
    settings = IngestSettings(
        poll_seconds=0.2,
        stall_timeout=10.0,  # the wait outlasts it: only signs of life keep the job going
        state_dir=str(tmp_path / "state"),
        max_source_bytes=size,
        spool_quota_bytes=size,
    )
    settings.make_state(store)
    spool = Path(settings.spool_path(store))
    beside = spool / f"wsi-staged-{os.getpid()}-beside"
    beside.mkdir()
    (beside / RESERVED).write_text(f"{size}\n")
    queue = SQLiteJobQueue(Path(settings.jobs_path(store)))
    job = queue.submit(url, remote_slide_id(url, seaweedfs.endpoint_url))

    def waiting_copy() -> Path | None:
        found = [p for p in spool.iterdir() if p != beside and not (p / RESERVED).exists()]
        return found[0] if found else None

    async def main() -> None:
        stop = asyncio.Event()
        worker = Worker(queue, StoreSettings(store), settings, name="test-worker")
        task = asyncio.create_task(worker.run(stop))

        async def waits() -> Path | None:
            return waiting_copy() if queue.get(job.id).state == JobState.RUNNING else None

        await wait_until(waits, 60)
        seen = time.monotonic()
        # Past the stall timeout, still running and waiting.
        while time.monotonic() - seen < settings.stall_timeout + 2 * ROOM_POLL_SECONDS:
            assert queue.get(job.id).state == JobState.RUNNING, queue.get(job.id).error
            await asyncio.sleep(0.2)
        shutil.rmtree(beside)  # the conversion beside it ended

        async def ended() -> bool:
            return queue.get(job.id).state.terminal

        await wait_until(ended, 120)
        stop.set()
        await asyncio.wait_for(task, 60)

    try:
        asyncio.run(main())
        finished = queue.get(job.id)
    finally:
        queue.close()
    assert finished.state == JobState.DONE and finished.attempts == 1, finished
