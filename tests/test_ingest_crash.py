"""`wsi serve --watch` as real processes, hurt mid-job: the whole service SIGKILLed (server and
its conversion subprocess), and the S3 server going away under a running conversion. The job
must end done, once, with the same bytes an uninterrupted conversion writes.

Every wait here has a deadline; the service runs in its own session so that whatever happens,
the test stops it (and every process it started) by process id.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import wsi
from wsi.ingest.queue import SQLiteJobQueue
from wsi.ingest.settings import IngestSettings
from wsi.store.objects import MANIFEST, TEMP_MARK

from .s3server import SeaweedFS
from .s3server import seaweedfs as _seaweedfs_fixture  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
Job = dict[str, Any]

SERVICE_ENV = {"WSI_LEASE_SECONDS": "3", "WSI_POLL_SECONDS": "0.2"}
"""A SIGKILLed worker's job is taken over 3 s after its last heartbeat."""
START_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 120.0
FAIL_TIMEOUT_S = 60.0
"""With the store down, an attempt fails within seconds: a few SDK retries of each call it still
makes (the failed upload, its abort, the cleanup); about 15 s on a loaded 2-core machine."""
HTTP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 45.0
"""SIGTERM lets running conversions finish for 30 s (IngestSettings.stop_timeout)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def land(source: Path, inbox: Path) -> Path:
    """Drop a slide the way scanners do: copied under a dotfile name (ignored by the watcher),
    then renamed in one step. copy2 keeps the mtime (the DICOM dates derive from it)."""
    partial = inbox / f".{source.name}"
    shutil.copy2(source, partial)
    final = inbox / source.name
    os.rename(partial, final)
    return final


def _kill(processes: list[psutil.Process]) -> None:
    for p in processes:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(processes, timeout=10)


class Service:
    """`python -m wsi.cli serve ...` in its own session, stdout and stderr to a log file."""

    def __init__(self, workdir: Path, args: list[str], env: dict[str, str], port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.cmd = [sys.executable, "-m", "server.cli", "serve", *args, "--port", str(port)]
        self.env = {
            **os.environ,
            **env,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        self.log_path = workdir / f"service-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._seen: dict[int, psutil.Process] = {}
        """Every process the service was seen to run (conversions), so none outlives the test."""

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        with self.log_path.open("ab") as log:
            log.write(f"$ {' '.join(self.cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=self.workdir,  # the service's working folder: never where its state goes
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_for(
            lambda: self.get("/healthz")[0] == 200, START_TIMEOUT_S, "the service to start"
        )

    @property
    def pgid(self) -> int:
        assert self.proc is not None
        return self.proc.pid  # session (and group) leader: start_new_session

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def get(self, path: str) -> tuple[int, bytes]:
        """Status and body; (0, b"") when nothing answers."""
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), bytes(exc.read())
        except (urllib.error.URLError, OSError):
            return 0, b""

    def get_json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, f"GET {path}: {status} {body[:300]!r}\n{self.log_tail()}"
        return json.loads(body)

    def jobs(self) -> list[Job]:
        return list(self.get_json("/jobs")["jobs"])

    def wait_for(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the service exited ({self.proc.returncode}) while waiting for {what}:\n"
                    + self.log_tail()
                )
            result = check()
            if result:
                return result
            time.sleep(0.05)
        raise AssertionError(f"timed out ({timeout:.0f} s) waiting for {what}:\n{self.log_tail()}")

    def wait_job(self, check: Callable[[Job], bool], timeout: float, what: str) -> Job:
        def one() -> Job | None:
            jobs = self.jobs()
            assert len(jobs) <= 1, f"one slide landed, jobs: {jobs}"
            return jobs[0] if jobs and check(jobs[0]) else None

        job: Job = self.wait_for(one, timeout, what)
        return job

    def descendants(self) -> list[psutil.Process]:
        """The service's running subprocesses (its conversions), remembered for cleanup."""
        assert self.proc is not None
        try:
            found = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for p in found:
            self._seen.setdefault(p.pid, p)
        return found

    def kill_everything(self, conversions: list[psutil.Process]) -> None:
        """SIGKILL the service's process group and its conversions at once, as a container or
        cgroup kill does (whatever process group or session a conversion runs in)."""
        assert self.proc is not None
        os.killpg(self.pgid, signal.SIGKILL)
        _kill(conversions)
        self.proc.wait(10)

    def close(self) -> None:
        """SIGTERM the service, SIGKILL it if it does not stop; kill any conversion left."""
        if self.proc is not None and self.proc.poll() is None:
            self.descendants()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pgid, signal.SIGKILL)
                self.proc.wait(10)
        _kill([p for p in self._seen.values() if p.is_running()])


@contextlib.contextmanager
def service(workdir: Path, args: list[str], env: dict[str, str], port: int) -> Iterator[Service]:
    svc = Service(workdir, args, env, port)
    try:
        yield svc
    finally:
        svc.close()


def wait_mid_write(
    svc: Service, job: Job, writing: Callable[[], bool], interval: float
) -> list[psutil.Process]:
    """Wait until `writing()` says the conversion is writing level 0, and return the conversion
    processes, still running; fail if the job ends first."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    next_check = 0.0
    while time.monotonic() < deadline:
        if writing():
            conversions = svc.descendants()
            if conversions:
                return conversions
        if time.monotonic() > next_check:  # the HTTP round trip is slow next to `writing`
            state = svc.get_json(f"/jobs/{job['id']}")["state"]
            assert state == "running", f"the conversion ended ({state}) before level 0 was seen"
            next_check = time.monotonic() + 0.2
        time.sleep(interval)
    raise AssertionError(f"the conversion did not reach level 0 in time:\n{svc.log_tail()}")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigkill_whole_service_mid_job(tmp_path: Path, medium_jpeg_tiff: Path) -> None:
    inbox, store_dir = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    args = ["--store", str(store_dir), "--watch", str(inbox), "--quiet-seconds", "0.5"]
    store = wsi.Store(wsi.StoreSettings(str(store_dir)))
    port = free_port()

    with service(tmp_path, args, SERVICE_ENV, port) as first:
        first.start()
        slide = land(medium_jpeg_tiff, inbox)
        job = first.wait_job(lambda j: j["state"] == "running", JOB_TIMEOUT_S, "a running job")
        sid = job["slide_id"]
        # Its level-0 shard (or the shard's temp file) exists: the conversion is half-way.
        shard = f"{sid}/slide.zarr/0/c/0/0/0*"
        conversions = wait_mid_write(first, job, lambda: any(store_dir.glob(shard)), 0.002)
        first.kill_everything(conversions)
        assert all(not p.is_running() for p in conversions)
    # Half a slide was written (the level-0 shard, or its temp file); none is visible.
    assert any(store_dir.glob(f"{sid}/slide.zarr/0/c/0/0/0*"))
    assert store.published_slides() == []

    # The same command again: it finds the job of the dead run, waits for its lease to run out
    # (the dead worker stopped heart-beating) and converts the slide again.
    with service(tmp_path, args, SERVICE_ENV, port) as second:
        second.start()
        done = second.wait_job(
            lambda j: j["state"] in ("done", "failed", "cancelled"), JOB_TIMEOUT_S, "the job to end"
        )
        assert done["state"] == "done", done
        assert done["id"] == job["id"] and done["slide_id"] == sid
        assert done["attempts"] >= 2 and done["error"] is None, done
        summary = second.get_json(f"/slides/{sid}")
        assert summary["status"] == "ready"
        status, tile = second.get(f"/slides/{sid}/tiles/0/0/0")
        assert status == 200 and tile[:2] == b"\xff\xd8"  # a JPEG, from the store
        assert len(second.jobs()) == 1

    assert store.published_slides() == [sid]
    manifest = store.read_manifest(sid)
    reference = wsi.Store(wsi.StoreSettings(str(tmp_path / "reference")))
    wsi.convert_slide(slide, reference)
    assert manifest["objects"] == reference.read_manifest(sid)["objects"]
    # Nothing of the killed attempt is left: exactly the manifest's objects, no temp files.
    keys = store.list_keys(sid, include_temporary=True)
    assert not [k for k in keys if TEMP_MARK in k]
    assert set(keys) == {f"{sid}/{k}" for k in manifest["objects"]} | {f"{sid}/{MANIFEST}"}


@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_s3_outage_mid_job(tmp_path: Path, medium_jpeg_tiff: Path, seaweedfs: SeaweedFS) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    prefix = f"ingest-{uuid.uuid4().hex[:12]}"
    url = seaweedfs.url(prefix)
    args = [
        "--store",
        url,
        "--s3-endpoint",
        seaweedfs.endpoint_url,
        "--watch",
        str(inbox),
        "--quiet-seconds",
        "0.5",
    ]
    env = {
        **SERVICE_ENV,
        **seaweedfs.env,
        "WSI_JOBS_DB": str(tmp_path / "jobs.sqlite"),
        # Few SDK retries (where the store does not configure its own; botocore's legacy default
        # of 4 more tries over up to 15 s could ride out a short outage inside one attempt): the
        # attempt fails within seconds, and the job's retry with backoff must bring the slide in.
        # Either way the server stays down until the attempt has failed.
        "AWS_RETRY_MODE": "standard",
        "AWS_MAX_ATTEMPTS": "2",
    }
    store = wsi.Store(wsi.StoreSettings(url, endpoint_url=seaweedfs.endpoint_url))

    with service(tmp_path, args, env, free_port()) as svc:
        svc.start()
        land(medium_jpeg_tiff, inbox)
        job = svc.wait_job(lambda j: j["state"] == "running", JOB_TIMEOUT_S, "a running job")
        sid = job["slide_id"]

        def uploading() -> bool:  # level 0 goes up as a multipart upload, invisible till done
            found = store.fs.call_s3(
                "list_multipart_uploads", Bucket=seaweedfs.bucket, Prefix=f"{prefix}/{sid}/"
            )
            return bool(found.get("Uploads"))

        wait_mid_write(svc, job, uploading, 0.02)
        down_since = time.monotonic()
        with seaweedfs.outage():
            # Down mid-upload, until the conversion has failed for it (and at least 3 s).
            failed = svc.wait_job(
                lambda j: j["error"] is not None,
                FAIL_TIMEOUT_S,
                "the attempt to fail while the store is down (a conversion that neither fails nor"
                " ends hangs, and keeps its job running: its worker heart-beats on)",
            )
            time.sleep(max(0.0, down_since + 3.0 - time.monotonic()))
        assert failed["state"] in ("queued", "running"), failed  # to be retried, not failed
        assert "connect" in failed["error"].lower(), failed["error"]
        done = svc.wait_job(
            lambda j: j["state"] in ("done", "failed", "cancelled"), JOB_TIMEOUT_S, "the job to end"
        )
        assert done["state"] == "done", done
        assert done["attempts"] >= 2 and done["error"] is None, done
        assert store.published_slides() == [sid]
        summary = svc.get_json(f"/slides/{sid}")
        assert summary["status"] == "ready"
        status, tile = svc.get(f"/slides/{sid}/tiles/0/0/0")
        assert status == 200 and tile[:2] == b"\xff\xd8"
    manifest = store.read_manifest(sid)
    assert manifest["slide_id"] == sid
    for key, meta in manifest["objects"].items():
        assert store.size(f"{sid}/{key}") == meta["size"], key


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_conversion_does_not_outlive_a_killed_service(
    tmp_path: Path, medium_jpeg_tiff: Path
) -> None:
    """SIGKILL of the service process alone (the OOM killer, `kill -9 PID`): its conversion must
    stop too, and so publish nothing behind the attempt that takes the job over."""
    inbox, store_dir = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    args = ["--store", str(store_dir), "--watch", str(inbox), "--quiet-seconds", "0.5"]
    with service(tmp_path, args, SERVICE_ENV, free_port()) as svc:
        svc.start()
        land(medium_jpeg_tiff, inbox)
        job = svc.wait_job(lambda j: j["state"] == "running", JOB_TIMEOUT_S, "a running job")
        shard = f"{job['slide_id']}/slide.zarr/0/c/0/0/0*"
        conversions = wait_mid_write(svc, job, lambda: any(store_dir.glob(shard)), 0.002)
        assert svc.proc is not None
        os.kill(svc.proc.pid, signal.SIGKILL)
        svc.proc.wait(10)
        # Left alone, an orphaned conversion ends within a second or two (publishing the slide).
        _, alive = psutil.wait_procs(conversions, timeout=10)
        _kill(alive)
    published = wsi.Store(wsi.StoreSettings(str(store_dir))).published_slides()
    assert not alive and published == [], (
        f"the conversion outlived its SIGKILLed service (still running: {len(alive)}) "
        f"and published {published}"
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_to_the_service_group_lets_the_conversion_finish(
    tmp_path: Path, medium_jpeg_tiff: Path
) -> None:
    """A terminal's Ctrl-C or `kill -TERM -PGID` signals the service's whole process group. The
    conversion runs in its own session, so only the service hears it: it stops taking jobs and
    lets the running conversion finish (within its 30 s stop timeout), then exits 0."""
    inbox, store_dir = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    args = ["--store", str(store_dir), "--watch", str(inbox), "--quiet-seconds", "0.5"]
    with service(tmp_path, args, SERVICE_ENV, free_port()) as svc:
        svc.start()
        land(medium_jpeg_tiff, inbox)
        job = svc.wait_job(lambda j: j["state"] == "running", JOB_TIMEOUT_S, "a running job")
        shard = f"{job['slide_id']}/slide.zarr/0/c/0/0/0*"
        conversions = wait_mid_write(svc, job, lambda: any(store_dir.glob(shard)), 0.002)
        assert svc.proc is not None
        os.killpg(svc.pgid, signal.SIGTERM)
        assert svc.proc.wait(STOP_TIMEOUT_S) == 0, svc.log_tail()
        _, alive = psutil.wait_procs(conversions, timeout=5)
        assert not alive
    published = wsi.Store(wsi.StoreSettings(str(store_dir))).published_slides()
    assert published == [job["slide_id"]], svc.log_tail()
    with SQLiteJobQueue(Path(IngestSettings().jobs_path(str(store_dir)))) as queue:
        finished = queue.get(job["id"])
    assert finished.state.value == "done" and finished.attempts == 1, finished
