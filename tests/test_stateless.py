"""Stateless serving: two `wsi serve` instances on one store, one PostgreSQL job table and one
state folder (a shared mount on real machines) answer alike, whichever of them watches the
folder, found a slide, or is asked.

Both watch the same folder (its lease lets one scan it) and run no conversions; a `wsi worker`
converts. Auth is on (a loopback address other than 127.0.0.1), so a URL signed by one instance
opens on the other: the signing key is configuration, not process state.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest

from server.auth import sign
from server.cluster_roles import wait_until

from .conftest import make_tiff, sample
from .helpers import wsi_process
from .pgserver import PostgresServer, postgres  # noqa: F401 - the session fixture

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.2"
"""Loopback, but not one of the addresses the service trusts without auth."""
TOKEN = "tok-stateless-shared-1"
KEY = "signing-key-shared-by-every-instance"


def _can_listen(host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, 0))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _get(url: str, token: bool = True) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {TOKEN}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())
    except OSError:
        return 0, b""


def _json(url: str) -> Any:
    status, body = _get(url)
    return json.loads(body) if status == 200 else None


def _same(bases: list[str], path: str) -> Any:
    """`path`'s answer, the same JSON from every instance."""
    answers = [_get(base + path) for base in bases]
    assert answers[0][0] == 200, (path, answers[0])
    docs = [json.loads(body) for _, body in answers]
    assert all(d == docs[0] for d in docs[1:]), (path, docs)
    return docs[0]


def test_two_instances_answer_alike(postgres: PostgresServer, tmp_path: Path) -> None:  # noqa: F811
    if not _can_listen(HOST):
        pytest.fail(f"cannot listen on {HOST}: this test needs the whole 127.0.0.0/8 loopback")
    database = postgres.database()
    inbox, store, state = tmp_path / "inbox", tmp_path / "store", tmp_path / "state"
    inbox.mkdir()
    env = {**os.environ, "WSI_TOKENS": f"lab:{TOKEN}", "WSI_SIGNING_KEY": KEY}
    ingest = ["--store", str(store), "--jobs", database, "--state", str(state),
              "--poll-seconds", "0.2", "--lease-seconds", "3"]  # fmt: skip
    ports = [_free_port(), _free_port()]
    bases = [f"http://{HOST}:{p}" for p in ports]
    pids: set[int] = set()
    with contextlib.ExitStack() as stack:
        for i, port in enumerate(ports):
            args = ["serve", *ingest, "--watch", str(inbox), "--workers", "0",
                    "--quiet-seconds", "0.3", "--processes", "1", "--host", HOST,
                    "--port", str(port), "--verify-every-hours", "1"]  # fmt: skip
            pids.add(
                stack.enter_context(wsi_process(tmp_path / f"serve-{i}.log", *args, env=env)).pid
            )
        for base in bases:
            wait_until(
                cast(Callable[[], bool], lambda b=base: _get(f"{b}/healthz")[0] == 200),
                "an instance",
                60,
            )

        # A good slide and a broken one (a TIFF cut short), landed as scanners land them.
        part = tmp_path / "good.writing"
        make_tiff(part, 900, 700, pyramid=False, seed=5)
        part.rename(inbox / "good.tif")
        (inbox / "broken.svs").write_bytes(sample("CMU-1-Small-Region.svs").read_bytes()[:20000])

        def both_list_two_jobs() -> bool:
            return all(len((_json(f"{b}/jobs") or {}).get("jobs", [])) == 2 for b in bases)

        wait_until(both_list_two_jobs, "both instances to list the two jobs", 60)

        def converting_on_both() -> list[str] | None:
            found = []
            for base in bases:
                slides = (_json(f"{base}/slides") or {}).get("slides", [])
                found.append(sorted(s["id"] for s in slides if s["status"] == "converting"))
            return found[0] if found[0] and all(f == found[0] for f in found) else None

        converting = wait_until(converting_on_both, "the queued slides shown on both", 30)
        _same(bases, "/jobs")
        _same(bases, "/slides")
        jobs = _same(bases, "/jobs")["jobs"]
        good = next(j["slide_id"] for j in jobs if j["name"] == "good")
        assert good in converting
        # A converting slide's tile, from its source, alike; a URL signed by one opens on both.
        expires = int(time.time()) + 600
        signed = f"/slides/{good}/tiles/0/0/0?exp={expires}&sig={sign(KEY, 'tiles', good, expires)}"
        tiles = [_get(base + signed, token=False) for base in bases]
        assert tiles[0][0] == 200 and tiles[0] == tiles[1]
        assert _get(f"{bases[1]}/slides/{good}/tiles/0/0/0", token=False)[0] == 401

        worker = ["worker", *ingest]
        with wsi_process(tmp_path / "worker.log", *worker, env=env):

            def both_ended() -> bool:
                for base in bases:
                    listed = (_json(f"{base}/jobs") or {}).get("jobs", [])
                    if not listed or any(j["state"] in ("queued", "running") for j in listed):
                        return False
                return True

            wait_until(both_ended, "the worker to end both jobs", 120)
        jobs = {j["name"]: j for j in _same(bases, "/jobs")["jobs"]}
        assert (jobs["good"]["state"], jobs["broken"]["state"]) == ("done", "failed")
        slides = _same(bases, "/slides")["slides"]
        assert [(s["id"], s["status"]) for s in slides] == [(good, "ready")]
        _same(bases, f"/slides/{good}")
        quarantined = _same(bases, "/quarantine")
        assert "broken" in json.dumps(quarantined)
        _same(bases, "/storage")
        published = [_get(base + signed, token=False) for base in bases]
        assert published[0][0] == 200 and published[0] == published[1]

        # The integrity check ran in one of them (its lease), and both show its result.
        def checked_alike() -> Any:
            docs = [_json(f"{base}/integrity") for base in bases]
            ran = docs[0] is not None and docs[0]["last_run"] is not None
            return docs[0] if ran and all(d == docs[0] for d in docs) else None

        report = wait_until(checked_alike, "both to show the same integrity check", 60)
        assert report["scheduled"] and report["damaged"] == []
        with psycopg.connect(database) as conn:
            holders = conn.execute(
                "SELECT holder FROM wsi_leases WHERE name LIKE 'integrity:%'"
            ).fetchall()
        assert len(holders) == 1 and int(holders[0][0].split(":")[1]) in pids
    postgres.drop(database)
    shutil.rmtree(tmp_path / "store", ignore_errors=True)
