"""The PostgreSQL job table beyond the queue contract (`test_contract_queues.py` runs that on
it): `wsi serve` and `wsi worker` sharing it as separate processes, refusals in one line without
the password, an outage ridden out, and procrastinate's own tools seeing the same jobs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import procrastinate
import psycopg
import pytest

from wsi.ingest.queue import (
    JobQueueUnavailable,
    JobState,
    SQLiteJobQueue,
    open_queue,
    redact_url,
)
from wsi.ingest.queue.pg_schema import PG_SCHEMA_VERSION, QUEUE_NAME
from wsi.ingest.queue.postgres import PostgresJobQueue
from wsi.ingest.settings import IngestSettings
from wsi.store.objects import Store, StoreSettings

from .conftest import sample
from .helpers import free_port, run_wsi, wsi_process
from .pgserver import PASSWORD, PostgresServer, database, postgres  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[1]


def _until(check: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _http(base: str, path: str, body: object = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        base + path, data=data, method="GET" if body is None else "POST"
    )
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
    except OSError:
        return 0, None


def test_worker_converts_a_slide_submitted_through_the_service(
    database: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    slide = inbox / "case.svs"
    shutil.copyfile(sample("CMU-1-Small-Region.svs"), slide)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    fast = ["--poll-seconds", "0.2", "--quiet-seconds", "0.5"]
    serve_log, worker_log = tmp_path / "serve.log", tmp_path / "worker.log"
    serve_args = ["serve", "--store", str(store), "--watch", str(inbox), "--port", str(port)]
    with wsi_process(serve_log, *serve_args, "--workers", "0", "--jobs", database, *fast) as serve:
        _until(lambda: _http(base, "/healthz")[0] == 200 or serve.poll() is not None, "serve")
        assert serve.poll() is None, serve_log.read_text()
        status, job = _http(base, "/jobs", {"source": str(slide)})
        assert status == 202, job
        assert job["state"] == "queued" and job["slide_id"]
        with open_queue(database) as queue:  # the job is in PostgreSQL, not in a local file
            assert queue.get(job["id"]).state is JobState.QUEUED
        assert not (Path(f"{store}.state") / "jobs.sqlite").exists()

        worker_args = ["worker", "--store", str(store), "--jobs", database, *fast]
        with wsi_process(worker_log, *worker_args) as worker:

            def finished() -> Any:
                assert worker.poll() is None, worker_log.read_text()
                got = _http(base, f"/jobs/{job['id']}")[1]
                return got if got and got["state"] in ("done", "failed") else None

            done = _until(finished, "the worker to convert the slide")
        assert done["state"] == "done", done
        assert done["attempts"] == 1 and done["progress"] == 100, (done, worker_log.read_text())
        assert _http(base, f"/slides/{job['slide_id']}")[1]["status"] == "ready"
        # The same slide again (the watcher sees it too): the same, done job.
        assert _http(base, "/jobs", {"source": str(slide)})[1]["id"] == job["id"]
        assert [j["id"] for j in _http(base, "/jobs")[1]["jobs"]] == [job["id"]]
    assert Store(StoreSettings(str(store))).published_slides() == [job["slide_id"]]

    with psycopg.connect(database) as conn:  # procrastinate's table holds the job's life
        row = conn.execute(
            "SELECT p.status::text, p.queue_name, p.task_name, p.queueing_lock FROM "
            "procrastinate_jobs p JOIN wsi_jobs w ON w.job_id = p.id WHERE w.id = %s",
            (job["id"],),
        ).fetchone()
        events = conn.execute(
            "SELECT e.type::text FROM procrastinate_events e JOIN wsi_jobs w "
            "ON w.job_id = e.job_id WHERE w.id = %s ORDER BY e.id",
            (job["id"],),
        ).fetchall()
    assert row == ("succeeded", QUEUE_NAME, "wsi.convert", f"slide:{job['slide_id']}")
    assert [e[0] for e in events] == ["deferred", "started", "succeeded"]
    for log in (serve_log, worker_log):
        text = log.read_text()
        assert PASSWORD not in text
    assert redact_url(database) in worker_log.read_text()  # where its jobs are, password-free


def _one_line_error(result: subprocess.CompletedProcess[str], *secrets: str) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsi: error: job table "), result.stderr
    for secret in secrets:
        assert secret not in result.stderr and secret not in result.stdout
    return lines[0]


def test_unreachable_or_wrong_job_table_is_one_line(
    postgres: PostgresServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    store = str(tmp_path / "store")
    dead = f"postgresql://wsi:{PASSWORD}@127.0.0.1:{free_port()}/jobs"
    line = _one_line_error(run_wsi("worker", "--store", store, "--jobs", dead), PASSWORD)
    assert "refused" in line and redact_url(dead) in line
    # The same through the environment, and for the service.
    env = {**os.environ, "WSI_JOBS_DB": dead}
    _one_line_error(run_wsi("worker", "--store", store, env=env), PASSWORD)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    serve = run_wsi(
        "serve", "--store", store, "--watch", str(inbox), "--port", str(free_port()), env=env
    )
    assert "refused" in _one_line_error(serve, PASSWORD)

    wrong = postgres.url(password="not-the-password-Zz9")
    line = _one_line_error(run_wsi("worker", "--store", store, "--jobs", wrong), "Zz9")
    assert "password authentication failed" in line
    missing = postgres.url("no_such_database")
    assert "does not exist" in _one_line_error(
        run_wsi("worker", "--store", store, "--jobs", missing), PASSWORD
    )
    bad = f"postgresql://wsi:{PASSWORD}@127.0.0.1:notaport/jobs"
    _one_line_error(run_wsi("worker", "--store", store, "--jobs", bad), PASSWORD)


def test_a_queue_rides_out_a_database_outage(postgres: PostgresServer, database: str) -> None:  # noqa: F811
    queue = open_queue(database)
    try:
        job = queue.submit("/scans/a.svs", slide_id="s1")
        with postgres.outage():
            for call in (lambda: queue.get(job.id), lambda: queue.claim("w", 30)):
                with pytest.raises(JobQueueUnavailable) as info:
                    call()
                message = str(info.value)
                assert "\n" not in message and PASSWORD not in message
                assert message.startswith(f"job table {redact_url(database)}: ")
        # Back: the same queue object reconnects; nothing was lost or half done.
        claimed = queue.claim("w", 30)
        assert claimed is not None and claimed.id == job.id and claimed.attempts == 1
        assert queue.complete(job.id, "w", "s1")
    finally:
        queue.close()


def test_a_silent_server_is_noticed_in_seconds_not_minutes(database: str) -> None:  # noqa: F811
    """The queue's TCP connections carry keepalives and a user timeout, so a server that goes
    silent (failover, dropped NAT entry) breaks a heartbeat or claim in ~30 s, not ~15 min. Read
    back from the socket itself: what the kernel will actually do."""
    queue = open_queue(database)
    try:
        assert isinstance(queue, PostgresJobQueue)
        queue.list()  # opens this thread's connection
        conn = queue._db._conn()
        params = conn.info.get_parameters()
        assert params["keepalives"] == "1" and params["tcp_user_timeout"] == "30000"
        sock = socket.socket(fileno=os.dup(conn.fileno()))  # a duplicate: closing it is harmless
        try:
            assert sock.family == socket.AF_INET
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            idle = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
            interval = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
            count = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
            assert idle + interval * count <= 60
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 30_000
        finally:
            sock.close()
    finally:
        queue.close()


def test_procrastinate_sees_and_manages_the_same_jobs(database: str) -> None:  # noqa: F811
    app = procrastinate.App(connector=procrastinate.SyncPsycopgConnector(conninfo=database))
    with app.open():
        app.schema_manager.apply_schema()  # a database procrastinate set up first
        with open_queue(database) as queue:
            first = queue.submit("/scans/a.svs", slide_id="s1")
            second = queue.submit("/scans/b.svs", slide_id="s2")
            listed = app.job_manager.list_jobs(queue=QUEUE_NAME)
            assert [j.queueing_lock for j in listed] == ["slide:s1", "slide:s2"]
            assert all(j.status == "todo" for j in listed)
            # Cancelled with procrastinate's own job manager: the queue sees it cancelled.
            assert listed[0].id is not None
            assert app.job_manager.cancel_job_by_id(listed[0].id)
            assert queue.get(first.id).state is JobState.CANCELLED
            claimed = queue.claim("w", 30)
            assert claimed is not None and claimed.id == second.id
            assert [j.status for j in app.job_manager.list_jobs(queue=QUEUE_NAME)] == [
                "cancelled",
                "doing",
            ]


def test_a_newer_schema_is_refused(database: str) -> None:  # noqa: F811
    open_queue(database).close()
    with psycopg.connect(database) as conn:
        conn.execute("UPDATE wsi_jobs_schema SET version = %s", (PG_SCHEMA_VERSION + 1,))
    with pytest.raises(JobQueueUnavailable, match="schema"):
        open_queue(database)


def test_the_url_chooses_the_backend(database: str, tmp_path: Path) -> None:  # noqa: F811
    with open_queue(database) as queue:
        assert isinstance(queue, PostgresJobQueue)
    with open_queue(tmp_path / "jobs.sqlite") as queue:
        assert isinstance(queue, SQLiteJobQueue)
    settings = IngestSettings(jobs_db=database)
    store = str(tmp_path / "store")
    settings.make_state(store)  # no local file or folder for the table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.sqlite", "store.state"]
    assert not (tmp_path / "store.state" / "jobs.sqlite").exists()
    described = settings.describe_state(store)
    assert redact_url(database) in described and PASSWORD not in described
    settings.check_watch_folders([str(tmp_path / "inbox")], store)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:secret@db:5432/jobs", "postgresql://u@db:5432/jobs"),
        ("postgres://u:s/e@c@r@db/jobs?sslmode=require", "postgres://u@db/jobs"),
        ("postgresql://db/jobs?password=secret", "postgresql://db/jobs"),
        ("postgresql://u@h1:5432,h2:5433/jobs", "postgresql://u@h1:5432,h2:5433/jobs"),
        ("/srv/state/jobs.sqlite", "/srv/state/jobs.sqlite"),
    ],
)
def test_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
