"""`wsi serve --processes N` as real processes: N serving processes answer exactly as one does,
`/metrics` adds up over them, a killed one is replaced while the others keep answering, ingest
runs once, SIGTERM stops them all (exit 0, nothing left behind), a port in use is one line."""

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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

import wsi
from server.cli import _add_serve, serve_settings
from tests.conftest import ROOT
from wsi.cli import build_parser
from wsi.errors import InvalidArgument

T = TypeVar("T")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
TILE_ROUTE = "/slides/{slide_id}/tiles/{level}/{col}/{row}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _until(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Service:
    """`wsi serve` in its own session, its private folder under `tmp` (TMPDIR)."""

    def __init__(self, tmp: Path, store: Path, processes: int, *extra: str) -> None:
        self.tmp = tmp
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.processes = processes
        self.log = tmp / "service.log"
        command = [sys.executable, "-m", "server.cli", "serve", "--store", str(store)]
        command += ["--port", str(self.port), "--processes", str(processes), *extra]
        env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.seen: set[int] = set()
        """Every process the service ran (checked gone after it stops)."""

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
        """Status, body and headers, over a new connection (so that the kernel may pick any
        of the serving processes)."""
        request = urllib.request.Request(self.base + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return int(response.status), bytes(response.read()), response.headers
        except urllib.error.HTTPError as exc:
            return int(exc.code), bytes(exc.read()), exc.headers

    def json(self, path: str) -> Any:
        status, body, _ = self.get(path)
        assert status == 200, (path, status, body[:300])
        return json.loads(body)

    def serving_pids(self) -> list[int]:
        """The serving processes now running (the supervisor's children but its
        multiprocessing resource tracker)."""
        pids = []
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children():
                with contextlib.suppress(psutil.Error):
                    if "spawn_main" in " ".join(child.cmdline()):
                        pids.append(child.pid)
        with contextlib.suppress(psutil.Error):
            self.seen |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        return sorted(pids)

    def statuses(self) -> dict[int, dict[str, Any]]:
        """The status files the processes keep in the supervisor's private folder."""
        found: dict[int, dict[str, Any]] = {}
        for path in self.tmp.glob("wsi-serve-*/process-*.json"):
            with contextlib.suppress(OSError, ValueError):
                doc = json.loads(path.read_text())
                found[int(doc["process"])] = doc
        return found

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, self.log.read_text()
            with contextlib.suppress(OSError):
                status, body, _ = self.get("/readyz")
                if status == 200:
                    if self.processes == 1:
                        return True
                    doc = json.loads(body)
                    return (
                        doc.get("processes") == self.processes
                        and len(self.serving_pids()) == self.processes
                    )
            return False

        _until(ready, START_TIMEOUT_S, f"{self.processes} process(es) to answer")
        self.seen.add(self.proc.pid)

    def stop(self) -> int:
        """SIGTERM to the supervisor alone; its exit status, once every process it ran is
        gone (checked in /proc)."""
        self.serving_pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        left: list[int] = []
        try:
            code = self.proc.wait(STOP_TIMEOUT_S)
            # What the supervisor ran ends with it by itself: the serving processes before it
            # exits, multiprocessing's resource tracker once the supervisor's end of its pipe
            # is closed (a moment after). Wait for that, within a bound, before any kill.
            deadline = time.monotonic() + STOP_TIMEOUT_S
            left = [pid for pid in self.seen if _alive(pid)]
            while left and time.monotonic() < deadline:
                time.sleep(0.05)
                left = [pid for pid in left if _alive(pid)]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        assert not left, f"processes left behind: {left}\n{self.log.read_text()}"
        return code


def _alive(pid: int) -> bool:
    """A process in /proc that is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextlib.contextmanager
def service(tmp: Path, store: Path, processes: int, *extra: str) -> Iterator[Service]:
    svc = Service(tmp, store, processes, *extra)
    try:
        svc.wait_ready()
        yield svc
    finally:
        code = svc.stop()
    assert code == 0, svc.log.read_text()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, synthetic_jpeg_tiff: Path) -> Path:
    root = tmp_path_factory.mktemp("store")
    wsi.convert_slide(synthetic_jpeg_tiff, wsi.Store(wsi.StoreSettings(str(root))))
    return root


def _metrics(svc: Service) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    _, body, _ = svc.get("/metrics")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _tiles_counted(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    key = ("wsi_http_requests_total", (("route", TILE_ROUTE), ("status", "200")))
    return samples.get(key, 0.0)


def _by_process(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> list[float]:
    found = {
        dict(labels)["process"]: value
        for (name, labels), value in samples.items()
        if name == "wsi_process_http_requests_total"
    }
    return [found[k] for k in sorted(found)]


def _normalized(svc: Service, path: str, headers: dict[str, str] | None = None) -> bytes:
    """A body as any server on the same store must answer it: the service's own address and a
    multipart boundary (random per response) replaced by constants."""
    status, body, response_headers = svc.get(path, headers)
    assert status == 200, (path, status, body[:300])
    body = body.replace(svc.base.encode(), b"BASE")
    content_type = response_headers.get("Content-Type", "")
    if "boundary=" in content_type:
        boundary = content_type.split("boundary=")[1].split(";")[0].strip('"')
        body = body.replace(boundary.encode(), b"BOUNDARY")
    return body


def _urls(svc: Service) -> list[tuple[str, dict[str, str] | None]]:
    """Tiles, DeepZoom, IIIF info and a region, a DICOMweb frame of the store's slide."""
    (slide,) = svc.json("/slides")["slides"]
    sid = slide["id"]
    study = svc.json("/dicomweb/studies")[0]["0020000D"]["Value"][0]
    series = svc.json(f"/dicomweb/studies/{study}/series")[0]["0020000E"]["Value"][0]
    instances = svc.json(f"/dicomweb/studies/{study}/series/{series}/instances")
    sop = instances[0]["00080018"]["Value"][0]
    frames = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/1"
    return [
        (f"/slides/{sid}/tiles/0/0/0", None),
        (f"/slides/{sid}/tiles/1/1/1", None),
        (f"/slides/{sid}.dzi", None),
        (f"/slides/{sid}_files/9/0_0.jpeg", None),
        (f"/iiif/3/{sid}/info.json", None),
        (f"/iiif/3/{sid}/100,200,700,500/350,/0/default.jpg", None),
        (frames, None),
        (frames, {"Accept": 'multipart/related; type="application/octet-stream"'}),
        (f"/slides/{sid}", None),
    ]


@pytest.mark.slow
def test_two_processes_answer_as_one(tmp_path: Path, store: Path) -> None:
    """Every answer of a 2-process service equals the 1-process one, byte for byte; both
    processes answered; `/metrics` from any process counts the requests of both."""
    with (
        service(tmp_path / "one", store, 1) as one,
        service(tmp_path / "two", store, 2) as two,
    ):
        urls = _urls(one)
        expected = {(p, json.dumps(h)): _normalized(one, p, h) for p, h in urls}
        rounds = 8
        for _ in range(rounds):
            for path, headers in urls:
                assert _normalized(two, path, headers) == expected[(path, json.dumps(headers))]
        tiles = 2 * rounds

        def counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            samples = _metrics(two)
            return samples if _tiles_counted(samples) == tiles else None

        samples = _until(counted, 10.0, f"/metrics to count {tiles} tiles")
        per_process = _by_process(samples)
        assert len(per_process) == 2 and min(per_process) > 0, per_process
        every_route = sum(
            v for (name, _), v in samples.items() if name == "wsi_http_requests_total"
        )
        # The /metrics requests that counted themselves are in both sums.
        assert sum(per_process) == every_route
        assert every_route >= rounds * len(urls)
        assert samples[("wsi_serving_processes", ())] == 2
        latency = samples[("wsi_http_request_seconds_count", (("route", TILE_ROUTE),))]
        assert latency == tiles


@pytest.mark.slow
def test_a_killed_process_is_replaced(tmp_path: Path, store: Path) -> None:
    """SIGKILL of one serving process: the other keeps answering meanwhile, the supervisor
    starts a new one in its place, and the counts of the dead one are not lost."""
    with service(tmp_path, store, 2) as svc:
        (slide,) = svc.json("/slides")["slides"]
        tile = f"/slides/{slide['id']}/tiles/0/0/0"
        for _ in range(10):
            assert svc.get(tile)[0] == 200

        def flushed() -> bool:  # both processes have written those counts to their files
            counted = 0
            for doc in svc.statuses().values():
                for route, status, requests, *_ in doc["requests"]:
                    if route == TILE_ROUTE and status == 200:
                        counted += requests
            return counted == 10

        _until(flushed, 10.0, "the processes to write their counts")
        before = svc.serving_pids()
        victim = svc.statuses()[1]["pid"]
        assert victim in before
        os.kill(victim, signal.SIGKILL)
        # Gone from /proc: reaped by the supervisor, so every thread of it has exited and its
        # listening socket is closed (connections queued on it just then are reset).
        _until(lambda: not Path(f"/proc/{victim}").exists(), 10.0, "the killed process to go")
        for _ in range(20):  # answered by the survivor until the new one listens
            assert svc.get(tile)[0] == 200
        new = _until(
            lambda: [p for p in svc.serving_pids() if p not in before and _alive(p)],
            START_TIMEOUT_S,
            "a new serving process",
        )
        _until(lambda: svc.statuses().get(1, {}).get("pid") == new[0], 30.0, "its status")
        assert len(svc.serving_pids()) == 2
        _until(lambda: svc.json("/readyz").get("processes") == 2, 30.0, "both to answer /readyz")
        assert _tiles_counted(_metrics(svc)) == 30
        text = svc.log.read_text()
        assert f"(pid {victim}) ended (SIGKILL); restarting" in text, text


@pytest.mark.slow
def test_ingest_runs_once(tmp_path: Path, store: Path, synthetic_jpeg_tiff: Path) -> None:
    """With --watch, process 0 alone runs the watcher and the workers: a dropped slide is
    converted once (one job, one attempt); every process answers /jobs and /readyz from the
    shared job table and the ingest process's status."""
    inbox, out = tmp_path / "inbox", tmp_path / "published"
    inbox.mkdir()
    watch = ["--watch", str(inbox), "--quiet-seconds", "0.3", "--poll-seconds", "0.2"]
    with service(tmp_path / "svc", out, 2, *watch) as svc:
        partial = inbox / ".slide.tif"
        shutil.copy(synthetic_jpeg_tiff, partial)
        partial.rename(inbox / "slide.tif")

        def done() -> list[dict[str, Any]] | None:
            jobs = svc.json("/jobs")["jobs"]
            return jobs if jobs and all(j["state"] == "done" for j in jobs) else None

        jobs = _until(done, 120.0, "the job to be done")
        assert len(jobs) == 1 and jobs[0]["attempts"] == 1, jobs
        # Statuses are rewritten every STATUS_SECONDS: the job may end before the first one
        # written after the ingest roles started.
        _until(lambda: "ingest" in svc.statuses().get(0, {}), 30.0, "process 0's ingest status")
        statuses = svc.statuses()
        assert "ingest" in statuses[0] and "ingest" not in statuses[1], statuses
        for _ in range(8):  # from both processes, with high probability
            assert svc.json("/jobs")["jobs"] == jobs
            ready = svc.json("/readyz")
            assert ready["down"] == [] and ready["job_table"] == "ok", ready
            assert ready["integrity"]["status"] != "off", ready
            assert svc.json("/integrity")["scheduled"] is True
        assert wsi.Store(wsi.StoreSettings(str(out))).published_slides() == [jobs[0]["slide_id"]]
    assert len(list(inbox.iterdir())) == 1


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_port_in_use_is_one_line(tmp_path: Path, store: Path, processes: str) -> None:
    """One process or several: one error line, and no line before it saying that it serves."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        command = [sys.executable, "-m", "server.cli", "serve", "--store", str(store)]
        done = subprocess.run(
            [*command, "--port", str(port), "--processes", processes],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=False,
        )
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert f"port {port}" in line and "in use" in line, line
    assert done.stdout == ""


def test_processes_setting() -> None:
    """`--processes` over `WSI_PROCESSES` over the number of cores; `--tile-cache-mb` is per
    process, and the help says so."""
    parser = build_parser([_add_serve])
    assert serve_settings(parser.parse_args(["serve"]), {}).processes == (os.cpu_count() or 1)
    from_env = serve_settings(parser.parse_args(["serve"]), {"WSI_PROCESSES": "3"})
    assert from_env.processes == 3
    flags = parser.parse_args(["serve", "--processes", "1", "--tile-cache-mb", "64"])
    chosen = serve_settings(flags, {"WSI_PROCESSES": "3"})
    assert (chosen.processes, chosen.tile_cache_mb) == (1, 64)
    with pytest.raises(InvalidArgument):
        serve_settings(parser.parse_args(["serve", "--processes", "0"]), {})
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    assert "per process: N processes hold up to N x this" in " ".join(done.stdout.split())
