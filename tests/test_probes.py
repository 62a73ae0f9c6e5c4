"""`/readyz` and `/metrics` read what may hang (a network mount, a database host whose server is
stuck): a read that hangs holds one thread, however often a load balancer asks, and the rest of
the service goes on. Each probe used to take one more thread of the default executor, until
every `asyncio.to_thread` of the service waited behind them."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from server.app import create_app
from server.probes import Probes
from server.settings import ServerSettings
from wsi.errors import StoreError
from wsi.ingest.settings import IngestSettings

from .pgserver import PostgresServer, database, postgres  # noqa: F401 - fixtures

HANG_BOUND_S = 90.0
"""How long a batch of probes may take before the test calls it a hang (each answers in about
`READY_SECONDS`; the code before this test waited for ever)."""


def _probe_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"wsi-probe-{name}"]


def test_callers_share_one_flight_and_a_hung_one_starts_no_other() -> None:
    release = threading.Event()
    calls: list[int] = []

    def check() -> str:
        calls.append(1)
        release.wait()
        return "answered"

    def failing() -> str:
        raise StoreError("no store")

    async def main() -> None:
        probes = Probes()
        # Ten callers at once: one thread, every one told "no answer" at the limit.
        got = await asyncio.gather(*(probes.run("slow", check, 0.2) for _ in range(10)))
        assert got == [None] * 10 and len(calls) == 1
        assert probes.running() == ["slow"] and len(_probe_threads("slow")) == 1
        # Past its limit, the hung flight is not waited for, nor started again.
        assert await probes.run("slow", check, 0.2) is None
        assert len(calls) == 1 and len(_probe_threads("slow")) == 1
        # A longer limit joins the same flight, which answers once released.
        waiting = asyncio.ensure_future(probes.run("slow", check, 600.0))
        await asyncio.sleep(0)
        release.set()
        assert await waiting == "answered" and len(calls) == 1
        assert probes.running() == []
        # The next call is a new flight; another name is another flight; errors reach callers.
        assert await probes.run("slow", check, 600.0) == "answered" and len(calls) == 2
        with pytest.raises(StoreError, match="no store"):
            await probes.run("failing", failing, 600.0)

    asyncio.run(main())


def test_a_job_table_that_hangs_holds_one_thread_and_the_service_answers(
    tmp_path: Path,
    postgres: PostgresServer,  # noqa: F811
    database: str,  # noqa: F811
) -> None:
    """PostgreSQL stuck (its processes stopped: connections accepted, nothing answered, no TCP
    timeout): 45 probes of `/readyz` and `/metrics` each answer, saying the job table is not
    answering; one thread per hung read waits for it, and the default executor still runs."""
    (tmp_path / "inbox").mkdir()
    ingest = IngestSettings(
        workers=0, poll_seconds=0.1, state_dir=str(tmp_path / "state"), jobs_db=database
    )
    settings = ServerSettings(
        store=str(tmp_path / "store"), watch=(str(tmp_path / "inbox"),), ingest=ingest
    )

    async def answer(c: TestClient[Any, Any], path: str) -> tuple[int, str]:
        r = await c.get(path)
        return r.status, await r.text()

    async def main() -> None:
        async with TestClient(TestServer(create_app(settings))) as c:
            status, text = await answer(c, "/readyz")
            assert status == 200 and json.loads(text)["job_table"] == "ok", text
            with postgres.frozen():
                for _ in range(3):
                    batch = [answer(c, "/readyz") for _ in range(10)]
                    batch += [answer(c, "/metrics") for _ in range(5)]
                    got = await asyncio.wait_for(asyncio.gather(*batch), HANG_BOUND_S)
                    for status, text in got[:10]:
                        # A job table that cannot be read stops ingest, not serving.
                        assert status == 200, text
                        assert json.loads(text)["job_table"] == "not answering", text
                    for status, text in got[10:]:
                        assert status == 200 and "wsi_job_table_up 0.0" in text, text
                assert len(_probe_threads("job table")) == 1
                assert len(_probe_threads("job counts")) == 1
                done = asyncio.to_thread(lambda: "ran")
                assert await asyncio.wait_for(done, HANG_BOUND_S) == "ran"
            for _ in range(200):  # the stuck reads end once the server runs again
                status, text = await answer(c, "/readyz")
                if json.loads(text)["job_table"] == "ok":
                    break
                await asyncio.sleep(0.1)
            assert status == 200 and json.loads(text)["job_table"] == "ok", text

    asyncio.run(main())
