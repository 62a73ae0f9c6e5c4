"""Health of ingest's folders, through a real service: `/readyz` is not ready while a watch
folder is missing or not a folder, and says which; `GET /quarantine` answers 503, never an
empty list, while the quarantine folder is there but cannot be listed."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from server.app import create_app
from server.settings import ServerSettings
from wsi.ingest.settings import IngestSettings
from wsi.ingest.source_files import move_source

from .conftest import sample


def service(tmp: Path, *watch: Path) -> ServerSettings:
    """`wsi serve --watch ...` without workers (nothing converts or moves a slide meanwhile),
    its state in `<tmp>/state`."""
    ingest = IngestSettings(workers=0, poll_seconds=0.1, state_dir=str(tmp / "state"))
    return ServerSettings(
        store=str(tmp / "store"), watch=tuple(str(w) for w in watch), ingest=ingest
    )


async def _answer(c: TestClient[Any, Any], method: str, path: str) -> tuple[int, dict[str, Any]]:
    r = await c.request(method, path)
    return r.status, json.loads(await r.text())


def test_readyz_is_not_ready_while_a_watch_folder_is_gone_or_not_a_folder(tmp_path: Path) -> None:
    first, second = tmp_path / "scanner-a", tmp_path / "scanner-b"
    first.mkdir()
    second.mkdir()

    async def main() -> None:
        async with TestClient(TestServer(create_app(service(tmp_path, first, second)))) as c:
            status, body = await _answer(c, "GET", "/readyz")
            assert status == 200 and body["status"] == "ready", body

            second.rename(tmp_path / "renamed-away")
            status, body = await _answer(c, "GET", "/readyz")
            assert status == 503 and body["status"] == 503, body
            assert body["error"] == "watch folders down: 2 (missing)"
            ok = [{"index": 1, "status": "ok"}, {"index": 2, "status": "ok"}]
            assert body["watch_folders"] == [ok[0], {"index": 2, "status": "missing"}]
            assert body["store"] == "reachable" and body["down"] == []  # the other parts
            # `/readyz` needs no credentials: no folder is named.
            assert "scanner" not in json.dumps(body) and str(tmp_path) not in json.dumps(body)

            second.write_bytes(b"")  # a file where the folder was
            status, body = await _answer(c, "GET", "/readyz")
            assert status == 503, body
            assert body["watch_folders"][1] == {"index": 2, "status": "not a folder"}
            assert body["error"] == "watch folders down: 2 (not a folder)"

            second.unlink()
            (tmp_path / "renamed-away").rename(second)
            status, body = await _answer(c, "GET", "/readyz")
            assert status == 200 and body["watch_folders"] == ok, body

    asyncio.run(main())


def test_quarantine_that_cannot_be_listed_is_an_error_not_an_empty_list(tmp_path: Path) -> None:
    inbox, quarantine = tmp_path / "inbox", tmp_path / "state" / "quarantine"
    inbox.mkdir()
    ref = "0123456789abcdef"

    async def main() -> None:
        async with TestClient(TestServer(create_app(service(tmp_path, inbox)))) as c:
            # Nothing ever quarantined: no folder, nothing in quarantine.
            assert not quarantine.exists()
            assert await _answer(c, "GET", "/quarantine") == (200, {"quarantined": []})

            quarantine.write_bytes(b"")  # a file in the folder's place
            unreadable = {
                "error": "the quarantine folder is not readable: it is not a folder",
                "status": 503,
            }
            assert await _answer(c, "GET", "/quarantine") == (503, unreadable)
            assert await _answer(c, "POST", f"/quarantine/{ref}/retry") == (503, unreadable)

            quarantine.unlink()
            quarantine.symlink_to(tmp_path / "nowhere")  # a link to nothing
            assert await _answer(c, "GET", "/quarantine") == (503, unreadable)

            # A folder again: its entry is listed, and retried.
            quarantine.unlink()
            shutil.copy(sample("openslide-python-fixtures/small.svs"), tmp_path / "case.svs")
            move_source(tmp_path / "case.svs", quarantine, "conversion failed")
            status, body = await _answer(c, "GET", "/quarantine")
            assert status == 200, body
            [entry] = body["quarantined"]
            assert entry["name"] == "case.svs"
            status, body = await _answer(c, "POST", f"/quarantine/{entry['ref']}/retry")
            assert status == 202 and (inbox / "case.svs").is_file(), body

    asyncio.run(main())
