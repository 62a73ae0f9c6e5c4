"""The cold tiles of `bench/s3.py`: level-0 tiles of a slide in SeaweedFS, each read once,
interleaved: a bare range GET (the bench's aiohttp client on a presigned URL, the reference of
the target; and obstore in this process), `tile_bytes` of a fresh `PublishedStore` (library),
`GET /slides/<id>/tiles/0/<c>/<r>` from `wsi serve --processes 1` now and with its ranges read
through obstore's coroutines (before), and a tile in the server's cache (the HTTP exchange
alone); the ratios and their part of the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from convert_sources import OUT  # bench/convert_sources.py
from s3_convert import LAUNCH, verdict
from s3_reads import summary_ms, tile_spans

from wsi.store.objects import Store

if TYPE_CHECKING:
    from tests.s3server import SeaweedFS

COLD_TARGET = 1.2
SIGNED_FOR = timedelta(hours=1)
BEFORE_COLD = "import wsi.store.aio as a; a.on_loop_allowed = lambda *_: False; "
"""Prefix of a launcher whose server reads tile ranges through obstore's coroutines: 'before'."""

COLD_ROWS = {
    "bare": "bare GET (aiohttp)",
    "bare_obstore": "bare GET (obstore)",
    "library": "library tile_bytes",
    "http": "wsi serve HTTP",
    "http_before": "wsi serve HTTP, before",
    "hot": "HTTP hot tile",
}
"""The cold measurements: the same-client bare GET is the reference of the verdict."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def presigned(store: Store, key: str) -> str:
    """A presigned GET URL of object `key` (obstore's signer, the store's credentials): what a
    plain HTTP client fetches ranges of, with the bench's own client settings."""
    import obstore

    fast = store.obstore_client()
    assert fast is not None
    return str(obstore.sign(fast.client, "GET", key, SIGNED_FOR))


@contextlib.contextmanager
def serving(store: Store, server: SeaweedFS, prefix: str, name: str) -> Iterator[int]:
    """`wsi serve --processes 1` on the store (launched after `prefix`), until the block ends:
    its port."""
    port = free_port()
    argv = [
        sys.executable,
        "-c",
        prefix + LAUNCH,
        "serve",
        "--store",
        store.url,
        "--port",
        str(port),
        "--processes",
        "1",
        "--s3-endpoint",
        server.endpoint_url,
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / f"s3-serve-{name}.log").open("w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                        break
                except OSError as exc:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"wsi serve did not start: {log.name}") from exc
                    time.sleep(0.2)
            yield port
        finally:
            proc.terminate()
            proc.wait(30)


@dataclass(frozen=True)
class ColdPlan:
    """Which tiles each cold row reads: `rounds` rounds, every tile a different one."""

    slide_id: str
    key: str
    """The level-0 shard."""
    url: str
    """A presigned GET URL of that shard (the bare aiohttp GETs)."""
    cells: list[tuple[int, int]]
    """(col, row) of level 0, three per round: library, HTTP now, HTTP before."""
    bare_spans: list[tuple[int, int]]
    """[start, end) of stored tiles in the shard, two per round: aiohttp, obstore."""
    rounds: int


def plan_cold(store: Store, slide_id: str, n: int) -> ColdPlan:
    """`n` rounds (fewer if the level has fewer than 5n stored tiles) of tiles drawn with a fixed
    seed."""
    from wsi.published.layout import SlideAttributes, SlideKeys

    key, by_chunk, _ = tile_spans(store, slide_id)
    keys = SlideKeys(slide_id)
    attrs_level = SlideAttributes.from_root_metadata(store.get(keys.root_metadata), "r").levels[0]
    cols = -(-attrs_level.width // attrs_level.tile_width)
    rng = random.Random(9)
    chunks = rng.sample(sorted(by_chunk), min(5 * n, len(by_chunk)))
    n = len(chunks) // 5
    cells = [(c % cols, c // cols) for c in chunks[: 3 * n]]
    bare_spans = [by_chunk[c] for c in chunks[3 * n :]]
    return ColdPlan(slide_id, key, presigned(store, key), cells, bare_spans, n)


async def read_cold(
    store: Store, plan: ColdPlan, port: int, port_before: int
) -> dict[str, list[float]]:
    """Every row's seconds per read, the rows interleaved round by round (connections, the slide
    and its index opened first, not counted)."""
    from aiohttp import ClientSession

    from wsi.published.store import PublishedStore

    fast = store.obstore_client()
    assert fast is not None
    times: dict[str, list[float]] = {name: [] for name in COLD_ROWS}
    async with PublishedStore(store) as published, ClientSession() as client:

        async def fetch(target: str, headers: dict[str, str] | None = None) -> float:
            t0 = time.perf_counter()
            async with client.get(target, headers=headers) as resp:
                await resp.read()
                assert resp.status in (200, 206), (target, resp.status)
            return time.perf_counter() - t0

        slide = await published.slide(plan.slide_id)
        base = f"http://127.0.0.1:{port}/slides/{plan.slide_id}/tiles/0"
        before = f"http://127.0.0.1:{port_before}/slides/{plan.slide_id}/tiles/0"
        await fetch(f"{base}/0/0")  # opens the slide and the index
        await fetch(f"{before}/0/0")
        await fetch(plan.url, {"Range": "bytes=0-0"})  # opens the connection
        await slide.tile_bytes(0, 0, 0)
        for i in range(plan.rounds):
            s, e = plan.bare_spans[2 * i]
            times["bare"].append(await fetch(plan.url, {"Range": f"bytes={s}-{e - 1}"}))
            s, e = plan.bare_spans[2 * i + 1]
            t0 = time.perf_counter()
            await fast.get_range_async(plan.key, s, e)
            times["bare_obstore"].append(time.perf_counter() - t0)
            col, row = plan.cells[3 * i]
            t0 = time.perf_counter()
            await slide.tile_bytes(0, col, row)
            times["library"].append(time.perf_counter() - t0)
            col, row = plan.cells[3 * i + 1]
            times["http"].append(await fetch(f"{base}/{col}/{row}"))
            col, row = plan.cells[3 * i + 2]
            times["http_before"].append(await fetch(f"{before}/{col}/{row}"))
            times["hot"].append(await fetch(f"{base}/0/0"))  # in the tile cache
    return times


def cold_result(times: dict[str, list[float]]) -> dict[str, Any]:
    """Percentiles per row and the ratios of the p50s to the bare GETs'."""
    result: dict[str, Any] = {COLD_ROWS[name]: summary_ms(v) for name, v in times.items()}
    p50 = {name: result[row]["p50_ms"] for name, row in COLD_ROWS.items()}
    result["ratio_http"] = p50["http"] / p50["bare"]
    result["ratio_http_before"] = p50["http_before"] / p50["bare"]
    result["ratio_library"] = p50["library"] / p50["bare"]
    result["ratio_http_vs_obstore"] = p50["http"] / p50["bare_obstore"]
    result["ratio_http_beyond_exchange"] = (p50["http"] - p50["hot"]) / p50["bare"]
    result["floor"] = cold_floor(p50)
    return result


def cold_floor(p50: dict[str, float]) -> float:
    """A floor of HTTP / bare GET: a cold tile through the service is at least the HTTP exchange
    a hot tile costs plus the range read the library makes (the same read, in this process),
    against the bare GET."""
    return (p50["hot"] + p50["library"]) / p50["bare"]


def bench_cold(store: Store, slide_id: str, server: SeaweedFS, n: int) -> dict[str, Any]:
    """Cold level-0 tiles, each read once, interleaved: a bare range GET of a tile with the bench's
    aiohttp client (a presigned URL, the same keep-alive session as the HTTP rows) and with
    obstore in this process; `tile_bytes` of a fresh `PublishedStore`; and `GET .../tiles/0/...`
    from `wsi serve` now and with its ranges read through obstore's coroutines (before); and the
    same client's GET of a tile in the server's cache (the HTTP exchange alone)."""
    plan = plan_cold(store, slide_id, n)
    with (
        serving(store, server, "", "now") as port,
        serving(store, server, BEFORE_COLD, "before") as port_before,
    ):
        times = asyncio.run(read_cold(store, plan, port, port_before))
    return cold_result(times)


def report_cold(results: dict[str, Any]) -> None:
    """The cold tiles' table, the verdict against the bare GET and the other ratios."""
    cold = results["cold"]
    print("\n== cold tiles (each read once; the bare GETs fetch tiles of the same shard)")
    for name in COLD_ROWS.values():
        s = cold[name]
        print(
            f"  {name:24s} p50 {s['p50_ms']:6.2f}  p90 {s['p90_ms']:6.2f}"
            f"  p99 {s['p99_ms']:6.2f} ms"
        )
    print(
        f"  HTTP / bare GET (aiohttp, the same client) = {cold['ratio_http']:.2f}"
        f" (target <= {COLD_TARGET}) {verdict(cold['ratio_http'] <= COLD_TARGET)};"
        f" before: {cold['ratio_http_before']:.2f}"
    )
    print(
        f"  floor: (HTTP hot tile + library tile_bytes) / bare GET = {cold['floor']:.2f}"
        " (the exchange and the read, each as cheap as measured here)"
    )
    print(
        f"  for reference: HTTP / bare GET (obstore in this process) ="
        f" {cold['ratio_http_vs_obstore']:.2f}; library / bare GET (aiohttp) ="
        f" {cold['ratio_library']:.2f}; (HTTP - HTTP hot tile) / bare GET (aiohttp) ="
        f" {cold['ratio_http_beyond_exchange']:.2f}"
    )
