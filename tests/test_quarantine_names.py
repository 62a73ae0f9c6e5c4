"""A slide whose file name is not UTF-8 (`Gr\\xfcn.svs`, Latin-1 from an old Windows share) that
fails for good, through a real service: quarantined by a real worker, then `GET /quarantine`,
`GET /jobs` and the console show its name with U+FFFD (`wsi.model.readable`), with and without
de-identification, on SQLite and PostgreSQL; and its Retry puts back the exact file."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from server.app import create_app
from server.settings import ServerSettings
from wsi.ingest.settings import IngestSettings

from .browser import AppThread, Chromium
from .conftest import sample
from .helpers import settled, wait_until
from .pgserver import PostgresServer, postgres  # noqa: F401 - the session fixture

NAME = b"Gr\xfcn.svs"
"""The slide's file name: Latin-1, not UTF-8."""
SHOWN = "Gr\ufffdn.svs"
"""How every answer and page shows it: the undecodable byte as U+FFFD."""
UNREADABLE = sample("openslide-python-fixtures/unreadable.svs")
"""A slide the converter fails on for good (its error line quotes the file's name)."""


@pytest.fixture(params=["sqlite", "postgres"])
def jobs_db(request: pytest.FixtureRequest) -> Iterator[str]:
    """The job table: the state folder's SQLite file (""), or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield ""
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    url = server.database()
    yield url
    server.drop(url)


def service(tmp: Path, *, workers: int, deidentify: bool, jobs_db: str) -> ServerSettings:
    """`wsi serve --watch <tmp>/inbox` with its state in `<tmp>/state`."""
    ingest = IngestSettings(
        workers=workers,
        quiet_seconds=0.3,
        poll_seconds=0.1,
        state_dir=str(tmp / "state"),
        jobs_db=jobs_db,
        deidentify=deidentify,
    )
    return ServerSettings(store=str(tmp / "store"), watch=(str(tmp / "inbox"),), ingest=ingest)


def inbox_slide(tmp: Path) -> bytes:
    """The slide's path in the watch folder, as the file system names it."""
    return os.fsencode(tmp / "inbox") + b"/" + NAME


def quarantine_by_a_worker(tmp: Path, *, deidentify: bool, jobs_db: str) -> None:
    """Drop the slide into the watch folder of a service with one worker, and wait until the
    worker has failed its job and moved it into quarantine (its `REASON.txt` written whole)."""
    (tmp / "inbox").mkdir()
    shutil.copy(os.fsencode(UNREADABLE), inbox_slide(tmp))
    settled(tmp / "inbox")  # still for an hour: quarantined at the first failure
    quarantine = tmp / "state" / "quarantine"

    def reason_written() -> bool:
        if not quarantine.is_dir():
            return False
        reasons = [e / "REASON.txt" for e in quarantine.iterdir() if e.is_dir()]
        return any(r.is_file() and r.read_bytes().endswith(b"\n") for r in reasons)

    async def main() -> None:
        settings = service(tmp, workers=1, deidentify=deidentify, jobs_db=jobs_db)
        async with TestClient(TestServer(create_app(settings))) as c:

            async def done() -> bool:
                jobs = (await (await c.get("/jobs")).json())["jobs"]
                failed = [j for j in jobs if j["state"] == "failed"]
                return bool(failed) and await asyncio.to_thread(reason_written)

            await wait_until(done, 120)

    asyncio.run(main())


@pytest.mark.parametrize("deidentify", [False, True], ids=["names", "deidentified"])
def test_a_name_that_is_not_utf8_is_shown_and_its_retry_finds_the_file(
    tmp_path: Path, jobs_db: str, deidentify: bool
) -> None:
    quarantine_by_a_worker(tmp_path, deidentify=deidentify, jobs_db=jobs_db)
    [entry] = os.listdir(os.fsencode(tmp_path / "state" / "quarantine"))
    assert entry == NAME  # quarantined under its exact name
    # The same state folder and job table, no worker now: nothing moves the slide meanwhile.
    settings = service(tmp_path, workers=0, deidentify=deidentify, jobs_db=jobs_db)

    async def main() -> None:
        async with TestClient(TestServer(create_app(settings))) as c:
            listed = await c.get("/quarantine")
            text = await listed.text()
            jobs_text = await (await c.get("/jobs")).text()
            # Both at once: the listing answers, and no answer holds an undecodable byte
            # (escaped by the converter, or a lone surrogate as JSON writes it).
            assert (listed.status, "\\udc" in text, "\\udc" in jobs_text) == (200, False, False), (
                text,
                jobs_text,
            )
            [quarantined] = json.loads(text)["quarantined"]
            [job] = json.loads(jobs_text)["jobs"]
            assert job["state"] == "failed" and job["error"]
            if deidentify:
                assert quarantined["name"] is None
                for shown in (text, jobs_text):
                    assert "Gr" not in shown  # not even part of the name
                assert f"slide {job['slide_id']}" in job["error"]
                assert f"slide {job['slide_id']}" in quarantined["reason"]
            else:
                assert quarantined["name"] == SHOWN
                assert job["error"].startswith(f"wsi: error: {SHOWN}: ")
                assert SHOWN in quarantined["reason"]
                assert job["source"] == SHOWN and job["name"] == "Gr\ufffdn"

            r = await c.post(f"/quarantine/{quarantined['ref']}/retry")
            retried: dict[str, Any] = await r.json()
            assert r.status == 202, retried
            # Back under its exact name, and a job at once for that very file.
            assert await asyncio.to_thread(os.path.isfile, inbox_slide(tmp_path))
            with open(inbox_slide(tmp_path), "rb") as f:
                assert f.read() == UNREADABLE.read_bytes()
            assert not os.listdir(tmp_path / "state" / "quarantine")
            assert retried["job"] is not None and retried["job"]["state"] == "queued"
            assert "\\udc" not in json.dumps(retried)
            if not deidentify:
                assert retried["job"]["source"] == SHOWN
            assert (await (await c.get("/quarantine")).json())["quarantined"] == []

    asyncio.run(main())


def test_the_console_lists_it_and_its_retry_button_puts_it_back(tmp_path: Path) -> None:
    """The console (a real headless Chromium): the entry and its Retry button, not "Quarantine
    unavailable"; the button puts the exact file back."""
    quarantine_by_a_worker(tmp_path, deidentify=False, jobs_db="")
    settings = service(tmp_path, workers=0, deidentify=False, jobs_db="")
    row = f"""Array.from(document.querySelectorAll('#quarantine tbody tr')).find(tr =>
        tr.querySelector('.name').textContent === {json.dumps(SHOWN)})"""

    async def main() -> None:
        with AppThread(create_app(settings)) as app:
            async with Chromium(1280, 1000) as b:
                await b.goto(app.url + "/console")
                panel = "document.getElementById('quarantine').innerText"
                # Filled: with its entries, or with why there are none.
                await b.wait_for(
                    f"{panel}.includes({json.dumps(SHOWN)}) || {panel}.includes('unavail')", 60
                )
                shown = await b.evaluate(panel)
                assert "Quarantine unavailable" not in shown, shown
                assert f"wsi: error: {SHOWN}: " in shown
                await b.evaluate(
                    f"{row}.querySelector('button[data-action=\"retry-quarantined\"]').click()"
                )
                await b.wait_for(f"{panel}.includes('Nothing in quarantine')", 60)
        # The page saw the quarantine empty after the move: the file was back before.
        assert await asyncio.to_thread(os.path.isfile, inbox_slide(tmp_path))

    asyncio.run(main())
