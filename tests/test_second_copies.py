"""Another copy of a slide already converted (a scanner sending it again, a slide copied back
from a backup) is moved or deleted as its first copy was, not left in the watch folder.

The queue converts a slide once by content id, so the copy was never converted, and never moved
or deleted either: it lay in the inbox for ever under a name that is often the patient's, under
`--after delete` too."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from server.app import create_app
from server.settings import ServerSettings
from wsi.ingest.queue import SQLiteJobQueue
from wsi.ingest.scan import find_candidates
from wsi.ingest.settings import AfterSuccess, IngestSettings
from wsi.ingest.source_files import second_copy, submit_slide

from .conftest import sample
from .helpers import wait_until

SLIDE = "openslide-python-fixtures/small.svs"


def test_a_copy_is_told_from_the_jobs_own_files(tmp_path: Path) -> None:
    """The job's own files (which its worker moves, or left in place with a warning) are no
    second copy; the same bytes under another name, or under the same name once the first was
    moved away, are."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    first = inbox / "case.svs"
    shutil.copy(sample(SLIDE), first)
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    [candidate] = find_candidates(inbox)
    job = submit_slide(queue, candidate)
    assert second_copy(job, candidate) is None
    shutil.copy(first, inbox / "again.svs")
    copy = next(c for c in find_candidates(inbox) if c.path.name == "again.svs")
    files = second_copy(job, copy)
    assert files is not None and [Path(f.path).name for f in files] == ["again.svs"]
    first.rename(tmp_path / "moved.svs")
    shutil.copy(tmp_path / "moved.svs", first)  # the scanner sends it again, same name
    [resent] = [c for c in find_candidates(inbox) if c.path.name == "case.svs"]
    assert second_copy(job, resent) is not None


@pytest.mark.parametrize("policy", ["move", "delete"])
def test_a_second_copy_goes_where_the_first_went(
    tmp_path: Path, policy: AfterSuccess, caplog: pytest.LogCaptureFixture
) -> None:
    """Two copies dropped at once (one is a job, the other waits for it to end) and a third
    once the slide is published: one job, one conversion, an empty inbox; the copies in the
    done folder with `--after move`, gone with `--after delete`; the log names no file."""
    caplog.set_level(logging.INFO, logger="wsi.ingest")
    inbox, store, done = tmp_path / "inbox", tmp_path / "store", tmp_path / "done"
    inbox.mkdir()
    for name in ("DOE^JANE.svs", "DOE^JANE (1).svs"):
        shutil.copy(sample(SLIDE), inbox / name)
    settings = ServerSettings(
        store=str(store),
        watch=(str(inbox),),
        ingest=IngestSettings(
            after_success=policy,
            done_dir=str(done),
            quiet_seconds=0.3,
            poll_seconds=0.1,
            state_dir=str(tmp_path / "state"),
        ),
    )

    async def main() -> list[dict[str, Any]]:
        async with TestClient(TestServer(create_app(settings))) as c:

            async def emptied() -> list[dict[str, Any]]:
                jobs = (await (await c.get("/jobs")).json())["jobs"]
                finished = jobs and all(j["state"] == "done" for j in jobs)
                return jobs if finished and not list(inbox.iterdir()) else []

            await wait_until(emptied, 120)
            shutil.copy(sample(SLIDE), inbox / "DOE^JANE (2).svs")
            return await wait_until(emptied, 120)

    jobs = asyncio.run(main())
    assert len(jobs) == 1
    moved = sorted(p.name for p in done.iterdir()) if done.exists() else []
    if policy == "move":
        assert moved == ["DOE^JANE (1).svs", "DOE^JANE (2).svs", "DOE^JANE.svs"]
    else:
        assert moved == []
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("wsi.ingest")]
    said = f"another copy of slide {jobs[0]['slide_id']} (already published) was"
    assert sum(said in m for m in logged) == 2, logged
    assert not [m for m in logged if "DOE" in m]
