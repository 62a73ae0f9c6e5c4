"""Many machines, simulated with processes, and the one-command cluster (`server.cluster`).

1. Three `wsi worker` processes on one PostgreSQL job table and one S3 store (SeaweedFS) convert
   twelve generated slides; one worker is SIGKILLed mid-conversion: every slide ends published
   once, the killed one byte-identical to a clean conversion; two `wsi serve` instances on that
   store and job table give the same `/slides`, `/jobs` and tiles.
2. `./dev cluster`'s entry point starts every role; each answers, and a slide dropped into its
   watch folder ends published and visible on both services.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import psycopg

from server.cluster import Cluster, ClusterSettings
from server.cluster_roles import http_json, http_status, tcp_open, wait_until
from wsi.ingest.queue import JobState, open_queue
from wsi.ingest.scan import find_candidates
from wsi.ingest.source_files import submit_slide
from wsi.store.objects import Store, StoreSettings

from .conftest import make_tiff
from .helpers import free_port, wsi_process
from .pgserver import PostgresServer, postgres  # noqa: F401 - the session fixture
from .s3server import SeaweedFS
from .s3server import seaweedfs as _seaweedfs_fixture  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SLIDES = 12
LEASE = "8"
"""Seconds: long enough that a worker slowed down by a busy machine keeps its job; a killed
one's job is taken over this long after its last heartbeat."""


def _conversion_of(worker: int) -> int | None:
    """The pid of the `wsi convert` process `worker` runs now (its child), if any."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == worker and b"convert" in (stat.parent / "cmdline").read_bytes():
                return int(stat.parent.name)
    return None


def _ended(pid: int) -> bool:
    """Whether process `pid` has exited (gone, or a zombie nobody reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _under_way(database: str, job_id: str, pids: set[int]) -> int | None:
    """The pid of the worker (one of `pids`) converting job `job_id` right now: the job is
    running under its name and its `wsi convert` child runs."""
    with open_queue(database) as queue:
        job = queue.get(job_id)
    pid = int((job.worker or "h:0:x").split(":")[1])
    if job.state is not JobState.RUNNING or pid not in pids:
        return None
    return pid if _conversion_of(pid) is not None else None


def _all_ended(database: str) -> bool:
    with open_queue(database) as queue:
        jobs = queue.list(limit=1000)
    return len(jobs) == SLIDES and all(j.state.terminal for j in jobs)


def _events(database: str) -> dict[str, list[str]]:
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT w.id, e.type::text FROM procrastinate_events e JOIN wsi_jobs w "
            "ON w.job_id = e.job_id ORDER BY e.id"
        ).fetchall()
    found: dict[str, list[str]] = {}
    for job_id, kind in rows:
        found.setdefault(job_id, []).append(kind)
    return found


def _same_answers(bases: list[str], path: str) -> Any:
    answers = [http_json(base + path) for base in bases]
    assert answers[0][0] == 200, answers[0]
    assert all(a == answers[0] for a in answers), path
    return answers[0][1]


def test_three_workers_one_killed_every_slide_published_once(
    postgres: PostgresServer,  # noqa: F811
    seaweedfs: SeaweedFS,
    tmp_path: Path,
) -> None:
    database = postgres.database()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(SLIDES):
        # One slide takes seconds to convert, so that its worker is surely killed mid-way.
        size = (4000, 3000) if i == 0 else (1200, 900)
        make_tiff(inbox / f"slide-{i:02d}.tif", *size, pyramid=False, seed=100 + i)
    store_url = seaweedfs.url(f"cluster-{os.getpid()}")
    endpoint = seaweedfs.endpoint_url
    with open_queue(database) as queue:
        jobs = [submit_slide(queue, c) for c in find_candidates(inbox)]
    assert len({j.slide_id for j in jobs}) == SLIDES

    fast = ["--jobs", database, "--lease-seconds", LEASE, "--poll-seconds", "0.2"]
    with contextlib.ExitStack() as stack:
        workers = []
        for i in range(3):  # three "machines": each its own state folder and spool
            args = ["worker", "--store", store_url, "--s3-endpoint", endpoint, *fast,
                    "--state", str(tmp_path / f"machine-{i}")]  # fmt: skip
            workers.append(stack.enter_context(wsi_process(tmp_path / f"worker-{i}.log", *args)))
        pids = {w.pid for w in workers}
        victim_job = next(j.id for j in jobs if j.source.endswith("slide-00.tif"))
        victim_pid = wait_until(
            lambda: _under_way(database, victim_job, pids), "the big conversion under way", 120
        )
        conversion = _conversion_of(victim_pid)
        os.kill(victim_pid, signal.SIGKILL)  # the worker; its conversion ends with its stdin
        victim = next(w for w in workers if w.pid == victim_pid)
        victim.wait(10)
        assert conversion is not None
        wait_until(lambda: _ended(conversion), "its conversion to end with its stdin", 30)
        wait_until(lambda: _all_ended(database), "every job to end", 300)
        for w in workers:
            assert w is victim or w.poll() is None, (tmp_path / "worker-0.log").read_text()

    with open_queue(database) as queue:
        ended = {j.id: j for j in queue.list(limit=1000)}
    assert all(j.state is JobState.DONE for j in ended.values()), ended
    events = _events(database)
    for job_id, job in ended.items():  # each published once: one success, and one attempt ...
        assert events[job_id].count("succeeded") == 1
        if job_id != victim_job:
            assert job.attempts == 1 and events[job_id].count("started") == 1, events[job_id]
    # ... but the killed one, taken over by another worker once its lease ran out.
    assert ended[victim_job].attempts == 2 and ended[victim_job].worker is None
    assert str(victim_pid) not in (ended[victim_job].worker or "")
    store = Store(StoreSettings(store_url, endpoint_url=endpoint))
    assert sorted(store.published_slides()) == sorted(cast(str, j.slide_id) for j in jobs)

    # The killed job's slide, byte for byte what a clean conversion writes.
    slide_id = ended[victim_job].slide_id
    assert slide_id is not None
    clean_url = seaweedfs.url(f"clean-{os.getpid()}")
    source = ended[victim_job].source
    clean = subprocess.run(
        [sys.executable, "-m", "wsi.cli", "convert", source, "--out", clean_url,
         "--s3-endpoint", endpoint, "--slide-id", slide_id, "--no-progress"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert clean.returncode == 0, clean.stderr
    reference = Store(StoreSettings(clean_url, endpoint_url=endpoint))
    keys = store.list_keys(slide_id)
    assert keys and keys == reference.list_keys(slide_id)
    for key in keys:
        assert store.get(key) == reference.get(key), key

    _two_services_answer_alike(database, store_url, endpoint, tmp_path, slide_id)
    postgres.drop(database)


def _two_services_answer_alike(
    database: str, store_url: str, endpoint: str, tmp_path: Path, slide_id: str
) -> None:
    """Two `wsi serve` on the store and job table, without watch folders: the same slides,
    jobs and tiles, and a job submitted after they started (queued: no worker runs) shown as
    converting by both."""
    late = tmp_path / "late"
    late.mkdir()
    make_tiff(late / "late.tif", 600, 400, pyramid=False, seed=999)
    ports = [free_port(), free_port()]
    bases = [f"http://127.0.0.1:{p}" for p in ports]
    with contextlib.ExitStack() as stack:
        for i, port in enumerate(ports):
            args = ["serve", "--store", store_url, "--s3-endpoint", endpoint, "--jobs", database,
                    "--port", str(port), "--processes", "1", "--poll-seconds", "0.2"]  # fmt: skip
            stack.enter_context(wsi_process(tmp_path / f"serve-{i}.log", *args))
        for base in bases:
            wait_until(
                cast(Callable[[], bool], lambda b=base: http_status(f"{b}/healthz") == 200),
                "a service",
                60,
            )
        with open_queue(database) as queue:
            [candidate] = find_candidates(late)
            queued = submit_slide(queue, candidate)

        def both_show_it() -> bool:
            listed = [http_json(f"{b}/slides")[1] or {} for b in bases]
            return all(
                any(s["id"] == queued.slide_id for s in doc.get("slides", [])) for doc in listed
            )

        wait_until(both_show_it, "both services to show the queued slide", 30)
        slides = _same_answers(bases, "/slides")
        assert len(slides["slides"]) == SLIDES + 1
        status = {s["id"]: s["status"] for s in slides["slides"]}
        assert status.pop(queued.slide_id) == "converting"
        assert set(status.values()) == {"ready"}
        jobs = _same_answers(bases, "/jobs")["jobs"]
        assert len(jobs) == SLIDES + 1 and jobs[0]["id"] == queued.id  # newest first
        _same_answers(bases, f"/slides/{slide_id}")
        tiles = [_bytes(f"{b}/slides/{slide_id}/tiles/0/0/0") for b in bases]
        assert tiles[0] and tiles[0] == tiles[1]
        # A cancel through one is what the other shows.
        assert http_json(f"{bases[1]}/jobs/{queued.id}", None)[1]["state"] == "queued"
        cancel = _request(f"{bases[0]}/jobs/{queued.id}", "DELETE")
        assert cancel == 200
        assert http_json(f"{bases[1]}/jobs/{queued.id}")[1]["state"] == "cancelled"


def _bytes(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


def _request(url: str, method: str) -> int:
    import urllib.request

    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status)


def test_dev_cluster_starts_every_role_and_publishes_a_dropped_slide() -> None:
    # PostgreSQL may run as another user (under root): the folder must be reachable by it, which
    # pytest's private temp folders are not.
    folder = Path(tempfile.mkdtemp(prefix="wsi-cluster-"))
    ports = (free_port(), free_port())
    cluster = Cluster(ClusterSettings(folder, serve_ports=ports, quiet_seconds=0.5))
    try:
        cluster.start()
        names = {r.name for r in cluster.roles}
        assert {"postgresql", "seaweedfs", "serve 1", "serve 2", "worker 1", "worker 2"} <= names
        assert all(r.alive for r in cluster.roles)
        for base in cluster.serve_urls:
            assert http_status(f"{base}/healthz") == 200
            assert http_status(f"{base}/readyz") == 200
        if cluster.dask_scheduler is not None:  # `distributed` installed: the Dask roles too
            assert {"dask scheduler", "dask worker 1", "dask worker 2"} <= names
            assert tcp_open(int(cluster.dask_scheduler.rsplit(":", 1)[1]))
        with psycopg.connect(cluster.jobs_url, connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        part = folder / "case.writing"
        make_tiff(part, 700, 500, pyramid=False, seed=7)
        part.rename(cluster.inbox / "case.tif")

        def published_everywhere() -> list[str] | None:
            ids = []
            for base in cluster.serve_urls:
                doc = http_json(f"{base}/slides")[1] or {}
                ready = [s["id"] for s in doc.get("slides", []) if s["status"] == "ready"]
                jobs = (http_json(f"{base}/jobs")[1] or {}).get("jobs", [])
                if not ready or [j["state"] for j in jobs] != ["done"]:
                    return None
                ids.append(ready)
            return ids[0] if all(i == ids[0] for i in ids) else None

        [slide_id] = wait_until(published_everywhere, "the slide published on both", 120)
        for base in cluster.serve_urls:
            jobs = http_json(f"{base}/jobs")[1]["jobs"]
            assert [(j["slide_id"], j["state"]) for j in jobs] == [(slide_id, "done")]
        env = {**os.environ, **cluster.s3_env()}
        listed = subprocess.run(
            [sys.executable, "-m", "server.cli", "list", cluster.store_url,
             "--s3-endpoint", cluster.s3_endpoint],
            capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip
        assert listed.stdout.split() == [slide_id], listed.stderr
    finally:
        roles = list(cluster.roles)
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)
    assert roles and all(r.proc is not None and r.proc.poll() is not None for r in roles)
