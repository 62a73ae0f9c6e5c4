"""A quarantined slide whose copy went on in quarantine is put back and converted.

A copy that stalls past the settle time leaves a half file the converter cannot read, and it is
quarantined. The writer still holds the file open and a rename keeps it the same file: the copy
goes on into the quarantine folder and the slide completes there, where nothing looked at it
again; the lab found it there, unconverted, whenever someone opened the console."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

import wsi
from server.app import create_app
from server.settings import ServerSettings
from wsi.ingest.quarantine import ResumedCopies, list_quarantine
from wsi.ingest.settings import IngestSettings
from wsi.slide_id import content_slide_id

from .conftest import sample
from .helpers import FakeClock, wait_until

SLIDE = "openslide-python-fixtures/small.svs"


def test_a_copy_that_goes_on_in_quarantine_is_converted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wsi.ingest")
    inbox, store, state = tmp_path / "inbox", tmp_path / "store", tmp_path / "state"
    inbox.mkdir()
    data = sample(SLIDE).read_bytes()
    cut = len(data) * 6 // 10
    writer = (inbox / "DOE^JANE.svs").open("wb")  # the scanner's copy, still open
    writer.write(data[:cut])
    writer.flush()
    stalled = time.time() - 3600  # still for longer than the settle time: quarantined at once
    os.utime(inbox / "DOE^JANE.svs", (stalled, stalled))
    settings = ServerSettings(
        store=str(store),
        watch=(str(inbox),),
        ingest=IngestSettings(quiet_seconds=0.3, poll_seconds=0.1, state_dir=str(state)),
    )

    async def main() -> list[dict[str, Any]]:
        async with TestClient(TestServer(create_app(settings))) as c:

            async def quarantined() -> list[Any]:
                return list((await (await c.get("/quarantine")).json())["quarantined"])

            await wait_until(quarantined, 120)
            writer.write(data[cut:])  # the copy goes on, into the quarantined file
            writer.close()

            async def converted() -> list[dict[str, Any]]:
                jobs = (await (await c.get("/jobs")).json())["jobs"]
                done = [j for j in jobs if j["state"] == "done"]
                return jobs if done and not await quarantined() else []

            return await wait_until(converted, 120)

    jobs = asyncio.run(main())
    assert sorted(j["state"] for j in jobs) == ["done", "failed"]
    sid = content_slide_id(inbox / "DOE^JANE.svs")  # the whole slide, back in the inbox
    assert wsi.Store(wsi.StoreSettings(str(store))).published_slides() == [sid]
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("wsi.ingest")]
    assert any("was written to after it was quarantined" in m for m in logged), logged
    assert not [m for m in logged if "DOE" in m]


def test_only_an_entry_written_to_since_and_still_again_goes_back(tmp_path: Path) -> None:
    """An entry nothing wrote to since it was quarantined stays, however old; one written to
    goes back once its files kept their sizes and mtimes for the quiet period, timed by the
    service's clock (file servers' clocks drift): seen changing, it waits again."""
    quarantine, inbox = tmp_path / "quarantine", tmp_path / "inbox"
    inbox.mkdir()
    for name in ("stays", "goes"):
        entry = quarantine / f"{name}.svs"
        entry.mkdir(parents=True)
        (entry / f"{name}.svs").write_bytes(b"half")
        old = time.time() - 3600
        os.utime(entry / f"{name}.svs", (old, old))
        (entry / "REASON.txt").write_text("cannot read it\n")
    clock = FakeClock()
    resumed = ResumedCopies(quarantine, quiet_seconds=5, clock=clock)
    assert resumed.put_back(inbox) == []
    with (quarantine / "goes.svs" / "goes.svs").open("ab") as f:
        f.write(b" and the rest")
    assert resumed.put_back(inbox) == []  # seen written: its quiet period starts
    clock.step(4)
    with (quarantine / "goes.svs" / "goes.svs").open("ab") as f:
        f.write(b", still coming")
    clock.step(4)
    assert resumed.put_back(inbox) == []  # changed since: it waits again
    clock.step(5)
    [ref] = resumed.put_back(inbox)
    assert (inbox / "goes.svs").read_bytes() == b"half and the rest, still coming"
    assert [e.name for e in list_quarantine(quarantine)] == ["stays.svs"] and ref
    clock.step(3600)
    assert resumed.put_back(inbox) == []
