"""A watch folder on a shared mount is watched by one service at a time: its lease in the job
table (`JobQueue.hold_lease` on SQLite and PostgreSQL, `wsi.ingest.lease.FolderLeases`), taken
over when its holder dies. The last test runs two real `wsi serve` processes on one folder and
one PostgreSQL job table and SIGKILLs the one that watches."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest

from server.cluster_roles import http_status, wait_until
from wsi.errors import InvalidArgument
from wsi.ingest.lease import FolderLeases, dead_local_holder, lease_name, store_lease_name
from wsi.ingest.queue import JobQueue, SQLiteJobQueue, open_queue
from wsi.ingest.watcher import FolderWatcher

from .conftest import make_tiff
from .helpers import FakeClock, free_port, wsi_process
from .pgserver import PostgresServer, postgres  # noqa: F401 - the session fixture

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000.0

QueueOpener = Callable[..., JobQueue]


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    postgres: PostgresServer,  # noqa: F811
) -> Iterator[QueueOpener]:
    """Opens queues on one table of the parametrised backend (closed at teardown)."""
    opened: list[JobQueue] = []
    target: str | Path = tmp_path / "jobs.sqlite"
    if request.param == "postgresql":
        target = postgres.database()

    def open_(**kwargs: Any) -> JobQueue:
        queue = open_queue(target, **kwargs)
        opened.append(queue)
        return queue

    yield open_
    for queue in opened:
        queue.close()
    if isinstance(target, str):
        postgres.drop(target)


def test_a_lease_has_one_holder_until_it_runs_out(opener: QueueOpener) -> None:
    clock = FakeClock()
    clock.now = T0
    queue = opener(clock=clock)
    assert queue.lease("watch:/in") is None
    assert queue.hold_lease("watch:/in", "a", 10)
    assert not queue.hold_lease("watch:/in", "b", 10)  # a holds it
    clock.step(8)
    assert queue.hold_lease("watch:/in", "a", 10)  # renewed: until T0 + 18
    clock.step(9)
    assert not queue.hold_lease("watch:/in", "b", 10)
    lease = queue.lease("watch:/in")
    assert lease is not None and (lease.holder, lease.until) == ("a", T0 + 18)
    clock.step(1.5)  # a stopped renewing: its lease ran out
    assert queue.hold_lease("watch:/in", "b", 10)
    assert not queue.hold_lease("watch:/in", "a", 10)  # and a does not get it back
    assert queue.hold_lease("watch:/other", "a", 10)  # leases are per name
    # A holder known dead is replaced at once; a live one is not.
    assert not queue.hold_lease("watch:/in", "c", 10, replacing="a")
    assert queue.hold_lease("watch:/in", "c", 10, replacing="b")
    # Dropped: free at once, and only by its holder.
    assert not queue.drop_lease("watch:/in", "b")
    assert queue.drop_lease("watch:/in", "c")
    assert queue.lease("watch:/in") is None
    assert queue.hold_lease("watch:/in", "b", 10)
    for bad in ("", "x" * 5000):
        with pytest.raises(InvalidArgument):
            queue.hold_lease(bad, "a", 10)
    with pytest.raises(InvalidArgument):
        queue.hold_lease("watch:/in", "a", 0)


def test_of_racing_takers_exactly_one_gets_a_free_lease(opener: QueueOpener) -> None:
    """Eight threads, each with its own queue (own connections), race for each of 20 leases."""
    queues = [opener() for _ in range(8)]
    for round_ in range(20):
        start = threading.Barrier(len(queues))
        won: list[str] = []

        def take(i: int, q: JobQueue, name: str = f"watch:/race/{round_}") -> None:
            start.wait()
            if q.hold_lease(name, f"holder-{i}", 30):
                won.append(f"holder-{i}")

        threads = [threading.Thread(target=take, args=(i, q)) for i, q in enumerate(queues)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, (round_, won)
        lease = queues[0].lease(f"watch:/race/{round_}")
        assert lease is not None and lease.holder == won[0]


def test_folder_leases_hand_a_folder_over_when_its_holder_stops(tmp_path: Path) -> None:
    table = FakeClock()  # the job table's clock
    table.now = T0
    local = FakeClock()  # each holder's monotonic clock (moved together here)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with SQLiteJobQueue(tmp_path / "jobs.sqlite", clock=table) as queue:
        other_host = "scanner-gw-2:4242:abcd"  # not this host: only the expiry frees its lease
        a = FolderLeases(queue, [inbox], 9, holder=other_host, clock=local)
        b = FolderLeases(queue, [inbox], 9, holder="b-host:1:b", clock=local)
        assert a.every == 3
        assert a.renew() == {inbox} and b.renew() == frozenset()
        lease = queue.lease(lease_name(inbox))
        assert lease is not None and lease.holder == other_host
        table.step(8)
        local.step(8)
        assert a.renew() == {inbox}  # renewed in time
        table.step(8.5)
        local.step(8.5)
        assert b.renew() == frozenset()  # a's lease (until T0 + 17) has not run out
        table.step(1)
        local.step(1)
        assert a.held() == frozenset()  # a has not renewed for 9.5 s: no longer trusts its lease
        assert b.renew() == {inbox}  # a silent for the lease time: b takes over
        assert a.renew() == frozenset()
        b.release()  # a clean stop frees it at once
        assert queue.lease(lease_name(inbox)) is None
        assert a.renew() == {inbox}


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that no longer runs (reaped)
    host = socket.gethostname()
    dead = f"{host}:{proc.pid}:dead"
    assert dead_local_holder(dead)
    assert not dead_local_holder(f"{host}:{os.getpid()}:me")
    assert not dead_local_holder(f"{host}:1:init")  # runs
    assert not dead_local_holder(f"another-host:{proc.pid}:x")
    assert not dead_local_holder("no pid here")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with SQLiteJobQueue(tmp_path / "jobs.sqlite") as queue:
        assert queue.hold_lease(lease_name(inbox), dead, 3600)
        leases = FolderLeases(queue, [inbox], 3600)
        assert leases.renew() == {inbox}  # not an hour later


class _CountingWatcher(FolderWatcher):
    polls = 0

    async def poll(self) -> list[Any]:
        found = await super().poll()
        self.polls += 1
        return found


def test_a_watcher_scans_only_the_folders_it_holds(tmp_path: Path) -> None:
    """Two watchers of one folder in one loop: the one without the lease reports nothing, over
    many more polls than the holder needed to report the slide."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    make_tiff(inbox / "a.tif", 300, 200, pyramid=False)

    async def main(queue: JobQueue) -> tuple[list[str], list[str], int]:
        stop = asyncio.Event()
        first = FolderLeases(queue, [inbox], 30, holder="first:1:a")
        assert first.renew() == {inbox}
        second = FolderLeases(queue, [inbox], 30, holder="second:1:b")
        watchers = {
            name: _CountingWatcher([inbox], 0.1, 0.05, False, stop_event=stop, leases=leases)
            for name, leases in (("first", first), ("second", second))
        }
        reports: dict[str, list[str]] = {"first": [], "second": []}

        async def watch(name: str) -> None:
            async for slide in watchers[name].events():
                reports[name].append(slide.path.name)

        tasks = [asyncio.create_task(watch(name)) for name in watchers]
        await asyncio.wait_for(_until_async(lambda: reports["first"]), 30)
        needed = watchers["first"].polls
        await asyncio.wait_for(_until_async(lambda: watchers["second"].polls > 3 * needed), 30)
        stop.set()
        await asyncio.gather(*tasks)
        return reports["first"], reports["second"], needed

    with SQLiteJobQueue(tmp_path / "jobs.sqlite") as queue:
        first, second, needed = asyncio.run(main(queue))
        assert first == ["a.tif"] and second == [] and needed >= 2
        assert queue.lease(lease_name(inbox)) is None  # both stopped: dropped


async def _until_async(check: Callable[[], Any]) -> None:
    while not check():
        await asyncio.sleep(0.02)


# -- two services, one folder, one PostgreSQL job table ---------------------------------------

LEASE_SECONDS = 4.0


@contextlib.contextmanager
def _serve(log: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    with wsi_process(log, "serve", *args) as proc:
        yield proc


def _drop(inbox: Path, name: str, seed: int) -> None:
    """A slide landed as scanners land them: written beside, renamed in."""
    part = inbox.parent / f"{name}.writing"
    make_tiff(part, 400, 300, pyramid=False, seed=seed)
    part.rename(inbox / name)


def _holder_pid(database: str, inbox: Path) -> int | None:
    with psycopg.connect(database) as conn:
        row = conn.execute(
            "SELECT holder FROM wsi_leases WHERE name = %s AND until > extract(epoch FROM now())",
            (lease_name(inbox),),
        ).fetchone()
    return int(row[0].split(":")[1]) if row else None


def _jobs_by_slide(database: str) -> dict[str, int]:
    with psycopg.connect(database) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ  # one snapshot for both
        rows = conn.execute("SELECT slide_id, count(*) FROM wsi_jobs GROUP BY slide_id").fetchall()
        deferred = conn.execute(
            "SELECT count(*) FROM procrastinate_events WHERE type = 'deferred'"
        ).fetchone()
    counts = {str(r[0]): int(r[1]) for r in rows}
    assert deferred is not None and deferred[0] == sum(counts.values())
    return counts


def test_two_services_one_folder_one_watches_then_the_other_takes_over(
    postgres: PostgresServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    database = postgres.database()
    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    ports = [free_port(), free_port()]
    common = [
        "--store", str(store), "--watch", str(inbox), "--workers", "0", "--processes", "1",
        "--jobs", database, "--quiet-seconds", "0.5", "--poll-seconds", "0.2",
        "--lease-seconds", str(LEASE_SECONDS), "--verify-every-hours", "0",
    ]  # fmt: skip
    logs = [tmp_path / "serve-0.log", tmp_path / "serve-1.log"]
    with (
        _serve(logs[0], *common, "--port", str(ports[0])) as one,
        _serve(logs[1], *common, "--port", str(ports[1])) as two,
    ):
        procs = {one.pid: (one, 0), two.pid: (two, 1)}
        for port, proc in zip(ports, (one, two), strict=True):
            wait_until(
                cast(
                    Callable[[], bool],
                    lambda p=port, pr=proc: (
                        http_status(f"http://127.0.0.1:{p}/healthz") == 200 or pr.poll() is not None
                    ),
                ),
                "a service to start",
                60,
            )
        assert one.poll() is None and two.poll() is None, logs[0].read_text() + logs[1].read_text()
        holder = wait_until(lambda: _holder_pid(database, inbox), "a watcher's lease", 30)
        assert holder in procs
        for seed in range(3):
            _drop(inbox, f"first-{seed}.tif", seed)
        wait_until(lambda: len(_jobs_by_slide(database)) == 3, "3 jobs", 60)
        assert _holder_pid(database, inbox) == holder  # held, renewed, all along

        killed, _ = procs.pop(holder)
        survivor, other = next(iter(procs.values()))
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(10)
        start = time.monotonic()
        # The lease lapses, then the survivor's next renewal try takes it; a loaded machine
        # may delay either by seconds: the bound says 'soon', not how soon.
        bound = LEASE_SECONDS + LEASE_SECONDS / 3 + 10.0
        wait_until(lambda: _holder_pid(database, inbox) == survivor.pid, "the takeover", bound)
        took = time.monotonic() - start
        assert took <= bound

        for seed in range(3, 6):
            _drop(inbox, f"second-{seed}.tif", seed)
        wait_until(lambda: len(_jobs_by_slide(database)) == 6, "6 jobs", 60)
        assert survivor.poll() is None
        assert "taken over from a service that stopped renewing" in logs[other].read_text()
    counts = _jobs_by_slide(database)
    assert sorted(counts.values()) == [1] * 6  # each slide submitted exactly once
    postgres.drop(database)


# -- store-wide housekeeping: one worker of those sharing a job table runs it ----------------


def test_two_workers_one_store_one_runs_the_archive_policy(tmp_path: Path) -> None:
    """Two `wsi worker` with an archive policy on one store and one job table: the policy (a
    walk of the whole store, recoding slides) runs under the store's lease, in one of them at a
    time; SIGKILLing that one hands it to the other."""
    jobs, store = tmp_path / "jobs.sqlite", tmp_path / "store"
    name = store_lease_name("archive", str(store))
    args = ["--store", str(store), "--jobs", str(jobs), "--archive-after-days", "30",
            "--lease-seconds", str(LEASE_SECONDS), "--workers", "1"]  # fmt: skip

    def live_holder() -> int | None:
        with SQLiteJobQueue(jobs) as queue:
            lease = queue.lease(name)
        if lease is None or lease.until <= time.time():
            return None
        return int(lease.holder.split(":")[1])

    with (
        wsi_process(tmp_path / "worker-0.log", "worker", *args) as one,
        wsi_process(tmp_path / "worker-1.log", "worker", *args) as two,
    ):
        procs = {one.pid: one, two.pid: two}
        holder = wait_until(live_holder, "a worker to take the archive lease", 60)
        assert holder in procs
        # The other keeps trying and does not take it while its holder lives.
        other = next(p for pid, p in procs.items() if pid != holder)
        for _ in range(3):
            assert live_holder() == holder and other.poll() is None
            time.sleep(LEASE_SECONDS / 3)
        os.kill(holder, signal.SIGKILL)
        procs[holder].wait(10)
        taken = wait_until(
            lambda: (h := live_holder()) is not None and h != holder and h,
            "the other worker to take the archive lease over",
            LEASE_SECONDS * 2 + 10,
        )
        assert taken == other.pid
