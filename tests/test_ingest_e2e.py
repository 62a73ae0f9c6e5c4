"""`wsi serve --watch` end to end: a slide copied in pieces is taken only when complete,
converted once, viewable meanwhile and served from the store after; a corrupt slide dropped at
the same time ends in quarantine; the jobs API."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from server.app import create_app
from server.settings import ServerSettings
from wsi.ingest.settings import IngestSettings

from .conftest import sample
from .helpers import wait_until


def test_watch_folder_end_to_end(tmp_path: Path) -> None:
    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    settings = ServerSettings(
        store=str(store),
        watch=(str(inbox),),
        ingest=IngestSettings(
            quiet_seconds=1.0, poll_seconds=0.2, quarantine_dir=str(tmp_path / "quarantine")
        ),
    )
    data = sample("CMU-1-Small-Region.svs").read_bytes()

    async def main() -> None:
        async with TestClient(TestServer(create_app(settings))) as c:
            # Copied slowly, in pieces: no job while the copy is going on.
            target = inbox / "case.svs"
            with target.open("wb") as f:
                for i in range(0, len(data), len(data) // 5 + 1):
                    f.write(data[i : i + len(data) // 5 + 1])
                    f.flush()
                    await asyncio.sleep(0.4)
                    assert (await (await c.get("/jobs")).json())["jobs"] == []
                    # Not even viewable from its source: a partial file is never read.
                    assert (await (await c.get("/slides")).json())["slides"] == []
            (inbox / "broken.tiff").write_bytes(
                sample("openslide-python-fixtures/unopenable.tiff").read_bytes()
            )

            async def jobs_seen() -> list[Any]:
                jobs = (await (await c.get("/jobs")).json())["jobs"]
                return jobs if len(jobs) == 2 else []

            await wait_until(jobs_seen)

            async def finished() -> list[Any]:
                jobs = (await (await c.get("/jobs")).json())["jobs"]
                return jobs if all(j["state"] in ("done", "failed") for j in jobs) else []

            first = {Path(j["source"]).name: j for j in await wait_until(jobs_seen)}
            listed = await (await c.get("/slides")).json()
            assert first["case.svs"]["slide_id"] in {s["id"] for s in listed["slides"]}
            jobs = {Path(j["source"]).name: j for j in await wait_until(finished)}
            assert jobs["case.svs"]["state"] == "done"
            assert jobs["broken.tiff"]["state"] == "failed"
            # The job reads failed, then its source is moved (on a worker thread): wait for it.
            reason = tmp_path / "quarantine" / "broken.tiff" / "REASON.txt"

            async def quarantined() -> bool:
                return await asyncio.to_thread(reason.exists)

            await wait_until(quarantined)
            sid = jobs["case.svs"]["slide_id"]
            slide = await (await c.get(f"/slides/{sid}")).json()
            assert slide["status"] == "ready"
            assert (await c.get(f"/slides/{sid}/tiles/0/0/0")).status == 200
            assert (await c.get("/healthz")).status == 200
            one = await (await c.get(f"/jobs/{jobs['case.svs']['id']}")).json()
            assert one["state"] == "done"
            # Converted exactly once, even though the watcher keeps seeing the file.
            await asyncio.sleep(1.5)
            assert len((await (await c.get("/jobs")).json())["jobs"]) == 2

            for body, status in (
                ({"source": "/etc/passwd"}, 400),
                ({"source": 7}, 400),
                ({"nope": 1}, 400),
            ):
                r = await c.post("/jobs", json=body)
                assert r.status == status and (await r.json())["status"] == status
            assert (await c.get("/jobs/doesnotexist")).status == 404
            assert (await c.get("/jobs?state=bogus")).status == 400
            again = await c.post("/jobs", json={"source": str(target)})
            assert again.status == 202  # the same slide: the same (done) job
            assert (await again.json())["id"] == jobs["case.svs"]["id"]

    asyncio.run(main())


def test_jobs_api_absent_without_watch(tmp_path: Path) -> None:
    async def main() -> None:
        async with TestClient(TestServer(create_app(ServerSettings(store=str(tmp_path))))) as c:
            r = await c.get("/jobs")
            assert r.status == 404 and "ingest" in (await r.json())["error"]

    asyncio.run(main())
