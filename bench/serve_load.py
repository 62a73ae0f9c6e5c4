"""What every serving workload of `bench/serve.py` shares: server processes, the load generators
(wrk, or aiohttp clients) and the measured result, with the servers' CPU time.

Kept apart from `serve.py` (the workloads), `serve_report.py` (the report) and `serve_cold.py`
(cold tiles) so that each stays readable; all of them run as parts of one benchmark, never alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil

SERVE_SCRIPT = Path(__file__).resolve().with_name("serve.py")
READY_TIMEOUT_S = 60.0


def pin(cpus: list[int] | None) -> None:
    """Restrict this process (and the children it starts later) to `cpus` (Linux only)."""
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Running:
    """A started server: its base URL and process id (CPU time is read for it and its
    descendants)."""

    url: str
    pid: int


def wait_ready(url: str, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    """Return once `url` answers 200; SystemExit when the process ends or never answers."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start; see {log}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(15)


@contextlib.contextmanager
def server_process(kind: str, argv: list[str], log: Path) -> Iterator[Running]:
    """Starts one of `serve.py`'s servers (`--serve kind`); yields it once /healthz answers;
    stops it afterwards."""
    port = free_port()
    command = [sys.executable, str(SERVE_SCRIPT), "--serve", kind, "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen([*command, *argv], stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url + "/healthz", proc, f"{kind} server", log)
            yield Running(url, proc.pid)
        finally:
            stop(proc)


# --------------------------------------------------------------------------------------------
# Load generation


@dataclass
class Result:
    server: str
    client: str
    tiles_per_s: float
    """200 responses per second (a tile, a frame: one stored image each)."""
    p50_ms: float
    p99_ms: float
    responses: int
    errors: int
    mb_per_s: float
    seconds: float
    load_cores: float
    """CPU the load generator used (CPU seconds per second): near its process/thread count, the
    load generator, not the server, is the bottleneck."""
    server_cores: float = 0.0
    """CPU the server used (all its threads, and its serving processes)."""

    @property
    def cpu_us_per_tile(self) -> float:
        """The server's CPU time per tile served (microseconds): unlike tiles/s, it does not
        move with what else the machine runs."""
        return self.server_cores / self.tiles_per_s * 1e6 if self.tiles_per_s else float("nan")


def median_result(rounds: Sequence[Result]) -> Result:
    """One workload's rounds as one result: the median of each figure, taken separately (the
    round with the median rate need not have the median p99). Errors and responses are summed:
    a failed request in any round shows."""
    first = rounds[0]
    return Result(
        first.server,
        first.client,
        statistics.median(r.tiles_per_s for r in rounds),
        statistics.median(r.p50_ms for r in rounds),
        statistics.median(r.p99_ms for r in rounds),
        sum(r.responses for r in rounds),
        sum(r.errors for r in rounds),
        statistics.median(r.mb_per_s for r in rounds),
        statistics.median(r.seconds for r in rounds),
        statistics.median(r.load_cores for r in rounds),
        statistics.median(r.server_cores for r in rounds),
    )


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


async def _load(
    urls: list[str], headers: Mapping[str, str], connections: int, duration: float, offset: int
) -> tuple[list[float], int, int, float]:
    latencies: list[float] = []
    errors = 0
    nbytes = 0
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=dict(headers)
    ) as session:
        start = time.perf_counter()
        deadline = start + duration

        async def worker(i: int) -> None:
            nonlocal errors, nbytes
            k = offset + i
            while time.perf_counter() < deadline:
                url = urls[k % len(urls)]
                k += connections
                t0 = time.perf_counter()
                try:
                    async with session.get(url) as response:
                        body = await response.read()
                        ok = response.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok, body = False, b""
                if ok:
                    latencies.append(time.perf_counter() - t0)
                    nbytes += len(body)
                else:
                    errors += 1

        await asyncio.gather(*(worker(i) for i in range(connections)))
        elapsed = time.perf_counter() - start
    return latencies, errors, nbytes, elapsed


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _load_process(
    urls: list[str], headers: dict[str, str], connections: int, duration: float, offset: int
) -> tuple[list[float], int, int, float, float]:
    cpu = _cpu_seconds(resource.RUSAGE_SELF)
    done = asyncio.run(_load(urls, headers, connections, duration, offset))
    return (*done, _cpu_seconds(resource.RUSAGE_SELF) - cpu)


def run_aiohttp(
    server: str,
    urls: list[str],
    headers: Mapping[str, str],
    connections: int,
    duration: float,
    procs: int,
) -> Result:
    procs = max(1, min(procs, connections))
    shares = [connections // procs + (1 if i < connections % procs else 0) for i in range(procs)]
    with cf.ProcessPoolExecutor(procs) as pool:
        futures = [
            pool.submit(_load_process, urls, dict(headers), share, duration, sum(shares[:i]) * 7919)
            for i, share in enumerate(shares)
        ]
        parts = [f.result() for f in futures]
    latencies = sorted(x for part in parts for x in part[0])
    seconds = max(p[3] for p in parts)
    return Result(
        server,
        f"aiohttp x{procs}",
        len(latencies) / seconds,
        percentile(latencies, 50) * 1000,
        percentile(latencies, 99) * 1000,
        len(latencies),
        sum(p[1] for p in parts),
        sum(p[2] for p in parts) / seconds / 1e6,
        seconds,
        sum(p[4] for p in parts) / seconds,
    )


WRK_SCRIPT = """
local paths = {%s}
local headers = %s
local i = 0
init = function(args)
  i = tonumber(wrk.thread:get("offset") or "0")
end
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i %% #paths) + 1], headers)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"us":%%d,"bytes":%%d,"errors":%%d,"p50":%%d,"p99":%%d}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
setup = function(thread)
  n = (n or 0) + 1
  thread:set("offset", tostring(n * 7919))
end
"""
"""Cycles through the paths (each wrk thread from its own offset); requests other than 2xx/3xx
count as errors."""


def _lua_table(headers: Mapping[str, str]) -> str:
    return "{" + ",".join(f"[{json.dumps(k)}]={json.dumps(v)}" for k, v in headers.items()) + "}"


def run_wrk(
    server: str,
    base: str,
    paths: list[str],
    headers: Mapping[str, str],
    connections: int,
    duration: float,
    threads: int,
) -> Result:
    threads = max(1, min(threads, connections))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % (",".join(json.dumps(p) for p in paths), _lua_table(headers)))
    cpu = _cpu_seconds(resource.RUSAGE_CHILDREN)
    try:
        command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s"]
        command += ["--timeout", "30s", "-s", script.name, base]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script.name)
    line = next((x for x in output.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise SystemExit(f"unexpected wrk output:\n{output}")
    doc = json.loads(line[8:])
    seconds = doc["us"] / 1e6
    ok = doc["requests"] - doc["errors"]
    return Result(
        server,
        f"wrk -t{threads}",
        ok / seconds,
        doc["p50"] / 1000,
        doc["p99"] / 1000,
        ok,
        doc["errors"],
        doc["bytes"] / seconds / 1e6,
        seconds,
        (_cpu_seconds(resource.RUSAGE_CHILDREN) - cpu) / seconds,
    )


def is_jpeg(body: bytes) -> bool:
    return body[:2] == b"\xff\xd8"


def is_jpeg_part(body: bytes) -> bool:
    """A multipart/related body whose (first) part is a JPEG."""
    return body.startswith(b"--") and b"\r\n\r\n\xff\xd8" in body[:1024]


def fetch_all(
    urls: list[str],
    connections: int,
    headers: Mapping[str, str] | None = None,
    check: Callable[[bytes], bool] = is_jpeg,
) -> list[bytes]:
    """Every URL once (fills caches); each must be a 200 that passes `check`."""

    async def go() -> list[bytes]:
        connector = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
            semaphore = asyncio.Semaphore(connections)

            async def one(url: str) -> bytes:
                async with semaphore, session.get(url) as response:
                    body = await response.read()
                    if response.status != 200 or not check(body):
                        raise SystemExit(f"{url}: status {response.status}, not the image asked")
                    return body

            return list(await asyncio.gather(*(one(u) for u in urls)))

    return asyncio.run(go())


@dataclass(frozen=True)
class LoadSettings:
    """The client settings, the same for every server."""

    client: str
    """'wrk' or 'aiohttp'."""
    connections: int
    duration: float
    warmup: float
    procs: int
    """wrk threads, or aiohttp client processes."""


def measure(
    name: str,
    server: Running,
    paths: list[str],
    load: LoadSettings,
    headers: Mapping[str, str] | None = None,
) -> Result:
    """The warm-up, then the measured load (with the server's CPU use)."""
    base = server.url
    sent = dict(headers or {})

    def run(seconds: float) -> Result:
        if load.client == "wrk":
            return run_wrk(name, base, paths, sent, load.connections, seconds, load.procs)
        urls = [base + p for p in paths]
        return run_aiohttp(name, urls, sent, load.connections, seconds, load.procs)

    if load.warmup > 0:
        run(load.warmup)
    before = tree_cpu(server.pid)
    result = run(load.duration)
    used = sum(cpu - before.get(pid, 0.0) for pid, cpu in tree_cpu(server.pid).items())
    result.server_cores = used / result.seconds
    return result


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of a process and of each of its descendants (serving processes)."""
    root = psutil.Process(pid)
    found: dict[int, float] = {}
    for process in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            found[process.pid] = times.user + times.system
    return found
