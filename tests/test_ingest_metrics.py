"""Ingest in `/metrics`, through real services: jobs by state (`wsi_jobs`), slides in quarantine
(`wsi_quarantined_slides`) and ingest loops down (`wsi_ingest_loops_down`), counted once
whatever the number of serving processes; a job table or quarantine that cannot be read leaves
its figure out and `/metrics` still answers. The quarantine count agrees with `GET /quarantine`
(`list_quarantine`) and reads a bounded number of names."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.settings import ServerSettings
from wsi.ingest.quarantine import count_quarantine, list_quarantine
from wsi.ingest.settings import IngestSettings
from wsi.ingest.source_files import move_source

from .conftest import sample
from .pgserver import PostgresServer, database, postgres  # noqa: F401 - fixtures
from .test_processes import Service, _until, service

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
STATES = ("queued", "running", "done", "failed", "cancelled")
INGEST_TIMEOUT_S = 180.0
"""Both slides dropped are converted or quarantined well within this, even on a busy host."""


def _parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for one in family.samples:
            samples[(one.name, tuple(sorted(one.labels.items())))] = one.value
    return samples


def _jobs(samples: Samples) -> dict[str, float]:
    return {
        dict(labels)["state"]: value
        for (name, labels), value in samples.items()
        if name == "wsi_jobs"
    }


def _ingest(samples: Samples) -> dict[str, Any]:
    """The ingest figures of one scrape (None where a figure is left out)."""
    return {
        "jobs": _jobs(samples) or None,
        "job_table_up": samples.get(("wsi_job_table_up", ())),
        "quarantined": samples.get(("wsi_quarantined_slides", ())),
        "loops_down": samples.get(("wsi_ingest_loops_down", ())),
    }


def _drop(inbox: Path, name: str, still: bool = False) -> None:
    """Copy a sample into `inbox` under a hidden name (the watcher skips it), then rename it:
    the watcher sees it whole. `still`: its mtime an hour back, so that the converter's
    "cannot read" is final at once (a copy still under way would be retried instead)."""
    source = sample(name)
    hidden = inbox / f".{source.name}"
    shutil.copy(source, hidden)
    if still:
        an_hour_ago = time.time() - 3600
        os.utime(hidden, (an_hour_ago, an_hour_ago))
    hidden.rename(inbox / source.name)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_jobs_and_quarantine_are_counted_once(tmp_path: Path, processes: int) -> None:
    """A good slide and a broken one dropped into a watch folder: once both jobs ended,
    `/metrics` says 1 done, 1 failed, 1 slide in quarantine, no loop down; with 2 processes,
    from either one, the same figures (the job table and the quarantine are the service's,
    not a process's: nothing is added up)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    watch = ["--watch", str(inbox), "--quiet-seconds", "0.3", "--poll-seconds", "0.2"]
    with service(tmp_path / "svc", tmp_path / "store", processes, *watch) as svc:
        before = _ingest(_parse(svc.get("/metrics")[1].decode()))
        assert before["jobs"] == dict.fromkeys(STATES, 0.0) and before["job_table_up"] == 1.0
        assert before["quarantined"] == 0.0  # no quarantine folder yet: nothing in quarantine
        # Not `loops_down` yet: until the ingest process's first status after its loops
        # started, the other process counts that whole process down, as its `/readyz` does.
        _drop(inbox, "openslide-python-fixtures/small.svs")
        _drop(inbox, "openslide-python-fixtures/unopenable.tiff", still=True)

        def ended(s: Service) -> list[dict[str, Any]] | None:
            jobs = s.json("/jobs")["jobs"]
            finished = len(jobs) == 2 and all(j["state"] in ("done", "failed") for j in jobs)
            return jobs if finished else None

        jobs = _until(lambda: ended(svc), INGEST_TIMEOUT_S, "both jobs to end")
        assert sorted(j["state"] for j in jobs) == ["done", "failed"], jobs

        # The worker fails a job, then moves its source into quarantine.
        def quarantined(s: Service) -> Samples | None:
            samples = _parse(s.get("/metrics")[1].decode())
            return samples if samples.get(("wsi_quarantined_slides", ())) else None

        _until(lambda: quarantined(svc), INGEST_TIMEOUT_S, "the broken slide's quarantine")
        if processes > 1:
            statuses = svc.statuses
            _until(lambda: "ingest" in statuses().get(0, {}), 30.0, "process 0's ingest status")
        expected = {
            "jobs": {**dict.fromkeys(STATES, 0.0), "done": 1.0, "failed": 1.0},
            "job_table_up": 1.0,
            "quarantined": 1.0,
            "loops_down": 0.0,
        }
        # New connections: with 2 processes both answer among these, with high probability.
        for _ in range(10):
            status, body, _ = svc.get("/metrics")
            assert status == 200
            assert _ingest(_parse(body.decode())) == expected
        assert len(list_quarantine(tmp_path / "store.state" / "quarantine")) == 1


def _service(tmp: Path, jobs_db: str = "") -> ServerSettings:
    """`wsi serve --watch <tmp>/inbox` without workers, its state in `<tmp>/state`."""
    (tmp / "inbox").mkdir(exist_ok=True)
    ingest = IngestSettings(
        workers=0, poll_seconds=0.1, state_dir=str(tmp / "state"), jobs_db=jobs_db
    )
    return ServerSettings(store=str(tmp / "store"), watch=(str(tmp / "inbox"),), ingest=ingest)


async def _scrape(c: TestClient[Any, Any]) -> Samples:
    r = await c.get("/metrics")
    assert r.status == 200, await r.text()
    return _parse(await r.text())


def test_a_job_table_or_quarantine_that_cannot_be_read_leaves_its_figure_out(
    tmp_path: Path,
    postgres: PostgresServer,  # noqa: F811
    database: str,  # noqa: F811
) -> None:
    """PostgreSQL down: `/metrics` still answers, with `wsi_job_table_up 0` and no `wsi_jobs`
    (a made-up 0 would hide the jobs waiting there); the quarantine folder replaced by a file:
    no `wsi_quarantined_slides`. The rest is answered, and both come back."""
    quarantine = tmp_path / "state" / "quarantine"

    async def main() -> None:
        async with TestClient(TestServer(create_app(_service(tmp_path, database)))) as c:
            figures = _ingest(await _scrape(c))
            assert figures["job_table_up"] == 1.0 and figures["jobs"] == dict.fromkeys(STATES, 0)

            with postgres.outage():
                samples = await _scrape(c)
                figures = _ingest(samples)
                assert (figures["jobs"], figures["job_table_up"]) == (None, 0.0)
                # The rest: whatever the watcher's loop makes of the outage, it is reported.
                assert figures["quarantined"] == 0.0 and figures["loops_down"] is not None
                assert any(name == "wsi_http_requests_total" for name, _ in samples)

            quarantine.parent.mkdir(parents=True, exist_ok=True)
            quarantine.write_bytes(b"")  # a file in the folder's place
            figures = _ingest(await _scrape(c))
            assert figures["job_table_up"] == 1.0 and figures["jobs"] == dict.fromkeys(STATES, 0)
            assert figures["quarantined"] is None and figures["loops_down"] == 0.0

            quarantine.unlink()
            shutil.copy(sample("openslide-python-fixtures/small.svs"), tmp_path / "a.svs")
            move_source(tmp_path / "a.svs", quarantine, "conversion failed")
            assert _ingest(await _scrape(c))["quarantined"] == 1.0

    asyncio.run(main())


def test_a_service_without_ingest_reports_no_ingest_figures(tmp_path: Path) -> None:
    settings = ServerSettings(store=str(tmp_path / "store"))

    async def main() -> None:
        async with TestClient(TestServer(create_app(settings))) as c:
            samples = await _scrape(c)
            assert set(_ingest(samples).values()) == {None}
            assert ("wsi_serving_processes", ()) in samples

    asyncio.run(main())


def test_the_quarantine_count_is_what_get_quarantine_lists(tmp_path: Path) -> None:
    """Entries are real folders that are not hidden: the same ones `list_quarantine` lists (a
    file, a hidden folder, a link to a folder are not entries). A missing folder holds none;
    one that cannot be listed is an error, never 0."""
    quarantine = tmp_path / "quarantine"
    assert count_quarantine(quarantine) == 0  # not made yet
    for i in range(4):
        shutil.copy(sample("openslide-python-fixtures/small.svs"), tmp_path / f"s{i}.svs")
        move_source(tmp_path / f"s{i}.svs", quarantine, "unreadable")
    (quarantine / ".partial").mkdir()
    (quarantine / "stray.txt").write_text("not an entry")
    (quarantine / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    assert count_quarantine(quarantine) == len(list_quarantine(quarantine)) == 4
    # Bounded: at most `most` names are read, however many entries there are.
    assert count_quarantine(quarantine, most=2) <= 2
    assert count_quarantine(quarantine, most=0) == 0

    moved = tmp_path / "moved"
    quarantine.rename(moved)
    quarantine.write_bytes(b"")
    with pytest.raises(OSError):
        count_quarantine(quarantine)
    quarantine.unlink()
    quarantine.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OSError):
        count_quarantine(quarantine)
