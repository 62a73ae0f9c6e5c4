"""The console (`/console`) in a real headless Chromium against a real service: auth on, the
token typed into the page; a queued job cancelled and retried, a quarantined slide retried and
its job taken to done by a real worker, a broken slide failing into quarantine; the storage
panel; a phone-sized screen; no JavaScript; a store that answers 503. And the REST routes the
console uses, as scripts call them."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

import wsi
from server.app import create_app
from server.settings import ServerSettings
from wsi.ingest.queue import SQLiteJobQueue
from wsi.ingest.settings import IngestSettings
from wsi.ingest.source_files import move_source

from .browser import AppThread, Chromium
from .conftest import sample
from .helpers import drain, settled, wait_until

TOKEN = "console-test-token"
KEY = "console-test-signing-key-0123456789"
SIDECAR = {"accession_number": "S24-0042", "specimen_id": "B2"}
REASON = "conversion failed: the store was unavailable (/srv/scanner/inbox/case-b.svs)"


def setup_service(tmp: Path, *, auth: bool, deidentify: bool = False) -> ServerSettings:
    """A store with one published slide; a good slide (`case-b.svs`, its sidecar naming it
    `S24-0042 · B2` of case S24-0042) in quarantine, put there as a worker does; a good
    (`case-c.tif`) and a broken (`broken.tiff`) slide in the watch folder. No worker runs in
    the service: jobs stay queued until a test runs one."""
    inbox, store, state = tmp / "inbox", tmp / "store", tmp / "state"
    inbox.mkdir()
    wsi.convert_slide(sample("CMU-1-Small-Region.svs"), wsi.Store(wsi.StoreSettings(str(store))))
    shutil.copy(sample("openslide-python-fixtures/small.svs"), tmp / "case-b.svs")
    (tmp / "case-b.svs.json").write_text(json.dumps(SIDECAR))
    move_source(tmp / "case-b.svs", state / "quarantine", REASON)
    shutil.copy(sample("openslide-python-fixtures/boxes.tiff"), inbox / "case-c.tif")
    shutil.copy(sample("openslide-python-fixtures/unopenable.tiff"), inbox / "broken.tiff")
    settled(inbox / "broken.tiff")
    ingest = IngestSettings(
        workers=0, quiet_seconds=0.3, poll_seconds=0.1, state_dir=str(state), deidentify=deidentify
    )
    extra: dict[str, Any] = {"host": "0.0.0.0", "tokens": (TOKEN,), "signing_key": KEY}
    return ServerSettings(
        store=str(store), watch=(str(inbox),), ingest=ingest, **(extra if auth else {})
    )


def call(url: str, method: str = "GET", token: str | None = TOKEN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


JOB_ROWS = """Array.from(document.querySelectorAll('#jobs tbody tr')).map(tr =>
    [tr.querySelector('.name').textContent, tr.querySelector('.badge').textContent])"""


def click(panel: str, name: str, action: str) -> str:
    """JavaScript: click the `action` button of the row of `panel` whose name is `name`."""
    return f"""(() => {{
        const row = Array.from(document.querySelectorAll('#{panel} tbody tr')).find(tr =>
            tr.querySelector('.name').textContent === {json.dumps(name)} &&
            tr.querySelector('button[data-action="{action}"]'));
        if (!row) return false;
        row.querySelector('button[data-action="{action}"]').click();
        return true;
    }})()"""


def has_rows(*rows: tuple[str, str]) -> str:
    """JavaScript: whether the jobs table holds each (name, state) row (as many times)."""
    return f"""(() => {{
        const shown = {JOB_ROWS}.map(r => r.join('|'));
        const wanted = {json.dumps(["|".join(r) for r in rows])};
        return wanted.every(w => shown.filter(s => s === w).length >=
            wanted.filter(x => x === w).length);
    }})()"""


def test_console_jobs_quarantine_storage_with_a_typed_token(tmp_path: Path) -> None:
    settings = setup_service(tmp_path, auth=True)
    inbox, state = tmp_path / "inbox", tmp_path / "state"

    async def main() -> None:
        with AppThread(create_app(settings)) as app:
            async with Chromium(1280, 1000) as b:
                await b.goto(app.url + "/console")
                await b.wait_for("!document.getElementById('login').hidden")
                # Nothing shown, nothing read, until a token is given.
                assert await b.evaluate("document.getElementById('panels').hidden")
                assert "CMU-1" not in await b.evaluate("document.body.innerText")
                api = [(p, s) for _, p, s in app.requests if p in ("/jobs", "/storage")]
                assert api and all(s == 401 for _, s in api)

                await b.evaluate("document.getElementById('token').focus()")
                await b.send("Input.insertText", {"text": TOKEN})
                await b.evaluate("document.querySelector('#login button').click()")
                await b.wait_for("!document.getElementById('panels').hidden")
                assert await b.evaluate("sessionStorage.getItem('wsi-console-token')") == TOKEN
                await b.wait_for(has_rows(("case-c", "queued"), ("broken", "queued")))
                text = await b.evaluate("document.getElementById('storage').innerText")
                assert "CMU-1-Small-Region" in text and "1 published slide" in text
                quarantine = await b.evaluate("document.getElementById('quarantine').innerText")
                assert "case-b.svs" in quarantine
                assert "conversion failed: the store was unavailable (case-b.svs)" in quarantine
                assert "/srv/scanner" not in quarantine  # no path reaches the page

                # Cancel a queued job (no worker runs: it stays queued until cancelled).
                assert await b.evaluate(click("jobs", "case-c", "cancel-job"))
                await b.wait_for(has_rows(("case-c", "cancelled"), ("broken", "queued")))
                _, listed = call(app.url + "/jobs")
                states = {j["name"]: j["state"] for j in listed["jobs"]}
                assert states == {"case-c": "cancelled", "broken": "queued"}
                # ... and run it again: a new job for the same slide.
                assert await b.evaluate(click("jobs", "case-c", "retry-job"))
                await b.wait_for(has_rows(("case-c", "cancelled"), ("case-c", "queued")))

                # Retry the quarantined slide: back in the watch folder, a job at once.
                assert await b.evaluate(click("quarantine", "case-b.svs", "retry-quarantined"))
                await b.wait_for(has_rows(("case-b", "queued")))
                await b.wait_for(
                    "document.getElementById('quarantine').innerText"
                    ".includes('Nothing in quarantine')"
                )
                assert (inbox / "case-b.svs").is_file()
                assert not list((state / "quarantine").iterdir())

                # A real worker takes the queue: two slides published, the broken one fails
                # for good and is quarantined.
                ingest = settings.ingest
                queue = SQLiteJobQueue(ingest.jobs_path(settings.store))
                await asyncio.to_thread(drain, queue, settings.store, ingest)
                queue.close()
                await b.wait_for(
                    has_rows(
                        ("S24-0042 · B2", "done"),
                        ("case-c", "done"),
                        ("case-c", "cancelled"),
                        ("broken", "failed"),
                    ),
                    60,
                )
                await b.wait_for(
                    "document.getElementById('quarantine').innerText.includes('broken.tiff')"
                )
                quarantine = await b.evaluate("document.getElementById('quarantine').innerText")
                assert "Unsupported TIFF compression" in quarantine
                storage = await b.evaluate("document.getElementById('storage').innerText")
                assert "3 published slides" in storage
                assert all(n in storage for n in ("CMU-1-Small-Region", "S24-0042 · B2", "case-c"))
                failed = await b.evaluate(
                    "document.querySelector('#jobs tbody .badge.failed').closest('tr').innerText"
                )
                assert "broken.tiff: OpenSlide cannot open" in failed and "/tmp" not in failed
                _, used = call(app.url + "/storage")
                assert used["count"] == 3
                assert used["total_bytes"] == sum(s["stored_bytes"] for s in used["slides"])
                for s in used["slides"]:
                    manifest = json.loads(
                        (Path(settings.store) / s["id"] / "manifest.json").read_text()
                    )
                    assert s["stored_bytes"] == manifest["stored_bytes"]
                health = await b.evaluate("document.getElementById('health').innerText")
                assert "reachable" in health and "ok" in health
                integrity = await b.evaluate("document.getElementById('integrity').innerText")
                assert (
                    integrity.strip().endswith(("Never run.", "never")) or "Last run" in integrity
                )

                await b.evaluate("window.scrollTo(0, 0)")
                shot = await b.screenshot()
                # The README's picture: written to docs/ only when asked
                # (WSI_SCREENSHOTS=docs), so a test run never changes the repository.
                folder = Path(os.environ.get("WSI_SCREENSHOTS") or tmp_path)
                folder.mkdir(exist_ok=True)
                shot.save(folder / "console.png", optimize=True)
                assert (folder / "console.png").stat().st_size < 300_000
                # Its source is in quarantine now: a job retry says where to retry it.
                assert await b.evaluate(click("jobs", "broken", "retry-job"))
                problem = await b.wait_for(
                    "!document.getElementById('problem').hidden && "
                    "document.getElementById('problem').textContent"
                )
                assert problem.startswith("Could not retry") and "quarantine" in problem
                bad = [m for m in b.console if "Content Security Policy" in m or "exception" in m]
                assert not bad, bad

    asyncio.run(main())


def test_console_on_a_phone_sized_screen(tmp_path: Path) -> None:
    settings = setup_service(tmp_path, auth=False)

    async def main() -> None:
        with AppThread(create_app(settings)) as app:
            async with Chromium(390, 844) as b:
                await b.goto(app.url + "/console")
                # Auth is off (loopback): no token asked, the panels show at once.
                await b.wait_for(has_rows(("case-c", "queued")))
                await b.wait_for("document.querySelectorAll('#quarantine tbody tr').length == 1")
                layout = await b.evaluate(
                    """({
                    page: document.documentElement.scrollWidth,
                    sections: Array.from(document.querySelectorAll('main section')).map(
                        s => s.getBoundingClientRect().right),
                    buttons: Array.from(document.querySelectorAll('button.action')).map(
                        e => e.getBoundingClientRect().right),
                    thead: getComputedStyle(document.querySelector('#jobs thead')).display,
                    login: document.getElementById('login').hidden,
                })"""
                )
                assert layout["page"] <= 390, layout
                assert layout["sections"] and max(layout["sections"]) <= 390, layout
                assert len(layout["buttons"]) >= 2 and max(layout["buttons"]) <= 390, layout
                assert layout["thead"] == "none" and layout["login"]
                # The cancel button works at this size too.
                assert await b.evaluate(click("jobs", "case-c", "cancel-job"))
                await b.wait_for(has_rows(("case-c", "cancelled")))

    asyncio.run(main())


def test_console_without_javascript_says_so(tmp_path: Path) -> None:
    settings = setup_service(tmp_path, auth=True)

    async def main() -> None:
        with AppThread(create_app(settings)) as app:
            async with Chromium(390, 844) as b:
                await b.send("Emulation.setScriptExecutionDisabled", {"value": True})
                await b.goto(app.url + "/console")
                await b.wait_for("document.readyState === 'complete'")
                shown = await b.evaluate(
                    """(() => { const n = document.getElementById('noscript');
                    return n && n.offsetHeight > 0 ? n.textContent : ''; })()"""
                )
                assert "The console needs JavaScript" in shown and "/openapi.json" in shown
                assert await b.evaluate("document.getElementById('panels').hidden")
                assert not [p for _, p, _ in app.requests if p in ("/jobs", "/storage")]

    asyncio.run(main())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_console_says_when_the_store_answers_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "console-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "console-test")
    settings = ServerSettings(
        store="s3://nowhere/slides", s3_endpoint=f"http://127.0.0.1:{_closed_port()}"
    )

    async def main() -> None:
        with AppThread(create_app(settings)) as app:
            async with Chromium(1024, 768) as b:
                await b.goto(app.url + "/console")
                problem = await b.wait_for(
                    "!document.getElementById('problem').hidden && "
                    "document.getElementById('problem').textContent",
                    60,
                )
                assert "The service is unavailable (HTTP 503" in problem
                health = await b.evaluate("document.getElementById('health').innerText")
                assert "unreachable" in health
                storage = await b.evaluate("document.getElementById('storage').innerText")
                assert "Storage unavailable" in storage

    asyncio.run(main())


def test_console_without_ingest_says_so_once(tmp_path: Path) -> None:
    """A service without watch folders or an S3 source has no job table: the jobs panel gives
    the service's reason once ("Ingest is not enabled: ingest is not enabled ..." it said)."""
    wsi.convert_slide(sample("CMU-1-Small-Region.svs"), wsi.Store(wsi.StoreSettings(str(tmp_path))))

    async def main() -> str:
        with AppThread(create_app(ServerSettings(store=str(tmp_path)))) as app:
            async with Chromium(1024, 768) as b:
                await b.goto(app.url + "/console")
                text: str = await b.wait_for(
                    "document.getElementById('jobs').innerText.includes('not enabled') && "
                    "document.getElementById('jobs').innerText"
                )
                return text

    text = asyncio.run(main())
    assert text.lower().count("not enabled") == 1, text
    assert "Ingest is not enabled (start with --watch or --s3-source)." in text, text


# ---------------------------------------------------------------------------------------------
# The REST routes, as a script calls them


async def _json(response: Any) -> Any:
    return json.loads(await response.text())


def test_admin_routes_need_a_token_and_the_page_needs_none(tmp_path: Path) -> None:
    settings = setup_service(tmp_path, auth=True)
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def main() -> None:
        async with TestClient(TestServer(create_app(settings))) as c:
            page = await c.get("/console")
            assert page.status == 200 and page.content_type == "text/html"
            csp = page.headers["Content-Security-Policy"]
            assert "script-src 'self';" in csp and "unsafe" not in csp
            html = await page.text()
            assert "<noscript>" in html and "<script>" not in html  # no inline script
            for method, path in (
                ("GET", "/quarantine"),
                ("GET", "/watch"),
                ("GET", "/storage"),
                ("POST", "/quarantine/0123456789abcdef/retry"),
                ("POST", "/jobs/x/retry"),
                ("GET", "/console/"),
            ):
                r = await c.request(method, path)
                assert r.status == 401, (method, path, r.status)
            ready = await _json(await c.get("/readyz"))
            assert ready["status"] == "ready" and ready["store"] == "reachable"
            assert ready["job_table"] == "ok" and ready["down"] == []
            spec = await _json(await c.get("/openapi.json", headers=auth))
            for path in (
                "/console",
                "/quarantine",
                "/quarantine/{ref}/retry",
                "/watch",
                "/storage",
                "/jobs/{job_id}/retry",
            ):
                assert path in spec["paths"], path
            [entry] = (await _json(await c.get("/quarantine", headers=auth)))["quarantined"]
            assert entry["name"] == "case-b.svs" and entry["files"] == 2  # with its sidecar
            assert "/srv" not in json.dumps(entry) and str(tmp_path) not in json.dumps(entry)

            r = await c.post("/quarantine/ffffffffffffffff/retry", headers=auth)
            assert r.status == 404
            r = await c.post("/quarantine/..%2F..%2Fetc/retry", headers=auth)
            assert r.status == 404
            # A slide of the same name already in the watch folder: nothing moves.
            (tmp_path / "inbox" / "case-b.svs").write_bytes(b"another slide")
            r = await c.post(f"/quarantine/{entry['ref']}/retry", headers=auth)
            assert r.status == 409 and "same name" in (await _json(r))["error"]
            assert (tmp_path / "state" / "quarantine" / "case-b.svs" / "case-b.svs").is_file()
            assert (tmp_path / "inbox" / "case-b.svs").read_bytes() == b"another slide"

            async def queued() -> dict[str, Any]:
                jobs = (await _json(await c.get("/jobs", headers=auth)))["jobs"]
                found = {j["name"]: j for j in jobs}
                return found if {"case-c", "broken"} <= set(found) else {}

            jobs = await wait_until(queued, 30)
            r = await c.post(f"/jobs/{jobs['case-c']['id']}/retry", headers=auth)
            assert r.status == 409 and "is queued" in (await _json(r))["error"]
            assert (await c.post("/jobs/nope/retry", headers=auth)).status == 404
            watched = await _json(await c.get("/watch", headers=auth))
            [folder] = watched["folders"]
            assert {s["name"] for s in folder["slides"]} >= {"case-c", "broken"}
            assert all(s["job"]["state"] == "queued" for s in folder["slides"] if s["job"])

    asyncio.run(main())


def test_under_deidentification_the_quarantine_names_no_file(tmp_path: Path) -> None:
    settings = setup_service(tmp_path, auth=False, deidentify=True)

    async def main() -> None:
        async with TestClient(TestServer(create_app(settings))) as c:
            text = await (await c.get("/quarantine")).text()
            [entry] = json.loads(text)["quarantined"]
            assert entry["name"] is None and "case-b" not in text
            assert entry["reason"] == "conversion failed: the store was unavailable (the slide)"
            watched = await (await c.get("/watch")).text()
            assert "case-c" not in watched and "broken" not in watched

    asyncio.run(main())
