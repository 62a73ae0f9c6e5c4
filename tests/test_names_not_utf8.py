"""File names that are not UTF-8 (a Latin-1 name from an old Windows share, Shift-JIS from a
scanner's PC): Python gives their undecodable bytes as lone surrogates (PEP 383), which no
database text, JSON page or DICOM attribute can hold. One such slide in a watch folder stopped
the watcher of the whole folder (its job could not be stored), and one such published slide
made the viewer's slide list a 400 for every slide."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from server.app import create_app
from server.settings import ServerSettings
from wsi.errors import InvalidArgument
from wsi.ingest.lease import lease_name
from wsi.ingest.privacy import redact, source_names
from wsi.ingest.queue import SQLiteJobQueue
from wsi.ingest.settings import IngestSettings
from wsi.metadata import SlideMetadata
from wsi.model import readable
from wsi.published.layout.manifest import Manifest

from .conftest import sample
from .helpers import run_wsi, wait_until

LATIN1_NAME = b"M\xfcller Jane.svs"
SHOWN_STEM = "M\ufffdller Jane"


def test_a_watched_slide_named_in_latin1_converts_and_shows(tmp_path: Path) -> None:
    inbox, store, done = tmp_path / "inbox", tmp_path / "store", tmp_path / "done"
    inbox.mkdir()
    settings = ServerSettings(
        store=str(store),
        watch=(str(inbox),),
        ingest=IngestSettings(
            quiet_seconds=0.5, poll_seconds=0.2, after_success="move", done_dir=str(done)
        ),
    )
    source = os.path.join(os.fsencode(inbox), LATIN1_NAME)
    shutil.copyfile(sample("CMU-1-Small-Region.svs"), source)

    async def main() -> None:
        async with TestClient(TestServer(create_app(settings))) as c:

            async def finished() -> list[Any]:
                jobs = (await (await c.get("/jobs")).json())["jobs"]
                return jobs if jobs and jobs[0]["state"] in ("done", "failed") else []

            (job,) = await wait_until(finished)
            assert job["state"] == "done", job["error"]
            assert (job["source"], job["name"]) == (SHOWN_STEM + ".svs", SHOWN_STEM)
            listed = (await (await c.get("/slides")).json())["slides"]
            assert [s["name"] for s in listed] == [SHOWN_STEM]
            home = await c.get("/")
            assert home.status == 200 and SHOWN_STEM in await home.text()
            # "\udcfc" in JSON names the byte 0xFC of a file name; "\ud800" no byte at all.
            r = await c.post("/jobs", json={"source": str(inbox / "\ud800.svs")})
            assert r.status == 400 and "lone surrogate" in (await r.json())["error"]

            async def moved() -> bool:
                return not await asyncio.to_thread(os.path.exists, source)

            await wait_until(moved)

    asyncio.run(main())
    # The file itself keeps its exact name where it was moved to.
    assert [os.fsencode(p.name) for p in done.rglob("*") if p.is_file()] == [LATIN1_NAME]


def test_a_published_name_holding_a_lone_surrogate_is_served_readable(tmp_path: Path) -> None:
    """A manifest written before names were made readable (or by hand) with `"\\udcfc"`."""
    store = tmp_path / "store"
    result = run_wsi("convert", str(sample("CMU-1-Small-Region.svs")), "--out", str(store))
    assert result.returncode == 0, result.stderr
    (manifest_path,) = store.glob("*/manifest.json")
    manifest = Manifest.from_bytes(manifest_path.read_bytes())
    old = dataclasses.replace(manifest, name="M\udcfcller", case="\udcfc-1")
    manifest_path.write_bytes(old.to_bytes())
    assert b'"M\\udcfcller"' in manifest_path.read_bytes()

    async def main() -> None:
        async with TestClient(TestServer(create_app(ServerSettings(store=str(store))))) as c:
            home = await c.get("/")
            assert home.status == 200 and "M\ufffdller" in await home.text()
            (slide,) = (await (await c.get("/slides")).json())["slides"]
            assert (slide["name"], slide["case"]) == ("M\ufffdller", "\ufffd-1")

    asyncio.run(main())


def test_deidentified_messages_lose_a_latin1_name_as_stored() -> None:
    """Stored messages hold such a name `readable`: redaction finds it in that spelling too."""
    source = os.fsdecode(b"/in/M\xfcller Jane/M\xfcller.svs")
    stored = readable(f"cannot read {source}: not a slide")
    shown = redact(stored, source_names(source), "slide 1")
    assert "ller" not in shown and shown == "cannot read slide 1: not a slide"


def test_a_watch_folder_named_in_latin1_has_a_lease(tmp_path: Path) -> None:
    folder = os.path.join(os.fsencode(tmp_path), b"Eing\xe4nge")
    os.mkdir(folder)
    name = lease_name(os.fsdecode(folder))
    assert name == readable(name) and name.endswith("/Eing%E4nge")
    with SQLiteJobQueue(tmp_path / "jobs.sqlite") as queue:
        assert queue.hold_lease(name, "w", 30)
        assert not queue.hold_lease(name, "other", 30)


def test_a_sidecar_value_that_is_not_unicode_is_refused_in_one_line() -> None:
    with pytest.raises(InvalidArgument, match="patient_name is not Unicode text"):
        SlideMetadata.from_mapping({"patient_name": "M\udcfcller"})
