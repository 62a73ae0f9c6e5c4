"""S3 I/O through obstore against s3fs (before/after, one run), and conversion to SeaweedFS
against the same conversion to a local folder.

Starts SeaweedFS (``tests/s3server.py``'s launcher, loopback, free ports) and measures, with the
two clients interleaved so that the shared machine's noise falls on both alike:

* ``convert``  - ``wsi convert SLIDE --out`` a local folder and ``s3://`` three ways: as it is
                 (DICOM level objects streamed in numbered parts while they are encoded, the rest
                 through obstore); with each DICOM level object spooled and uploaded when its
                 level ends (before: `open_head_last` switched to its spooling form); and with
                 obstore switched off (every call through s3fs, the path of a process forked
                 after obstore ran). Wall time, CPU time of the converter and of SeaweedFS, and
                 peak RSS of the converter's process tree, medians of interleaved rounds.
                 Target: S3 / local <= 1.15.
* ``range``    - one tile-sized range read at a time (the level-0 shard's real tile spans, in
                 random order): p50/p90/p99, for s3fs and obstore, async (the server's path) and
                 blocking (the CLI's and the converter's path).
* ``range64``  - 64 concurrent tile reads: requests/s and MB/s.
* ``index``    - every level's shard index (the tail of each shard): p50.
* ``sample``   - the content id of the source slide in the bucket (`remote_slide_id`: 66
                 sampled ranges): s3fs reading them one by one vs obstore's `get_ranges`.
* ``cold``     - cold tiles, each read once, interleaved: ``GET /slides/<id>/tiles/0/<c>/<r>``
                 from ``wsi serve --processes 1`` (HTTP; now, and with its ranges read through
                 obstore's coroutines: before) against a bare range GET of a tile of the same
                 shard with the same aiohttp client and keep-alive session (a presigned URL:
                 the reference of the target, p50 <= 1.2x) and with obstore in this process (a
                 second reference: no Python HTTP client); `tile_bytes` through a fresh
                 `PublishedStore` (library); a tile in the server's cache (the HTTP exchange).

Usage::

    .venv/bin/python bench/s3.py                     # 40000 x 30000, --repeat 3
    .venv/bin/python bench/s3.py --width 8000 --height 6000 --repeat 1 --requests 200
    .venv/bin/python bench/s3.py --convert-only --repeat 3  # the conversion part alone
    .venv/bin/python bench/s3.py --cold-only --requests 300 # the cold tiles alone

Prints a table and writes ``bench/out/s3.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
sys.path.insert(0, str(ROOT))

from convert import tree_rss  # noqa: E402  bench/convert.py
from convert_sources import ensure_source  # noqa: E402  bench/convert_sources.py

from tests import s3server  # noqa: E402
from wsi.store.objects import Store, StoreSettings  # noqa: E402

S3FS_ONLY = "import wsi.store.obstore_s3 as o; o._RUNTIME.pid = -1; "
"""Prefix of a launcher that switches obstore off (every S3 call through s3fs)."""
SPOOLED = (
    f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); "
    "import spooled_upload; spooled_upload.install(); "
)
"""Prefix of a launcher whose DICOM level objects are spooled and written through obstore when
their level ends, header first (the converter before they were streamed in parts)."""
LAUNCH = "import sys; from server.cli import main; sys.exit(main())"
CONVERT_TARGET = 1.15
COLD_TARGET = 1.2


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    return {f"p{q}_ms": percentile(values, q) * 1000 for q in (50, 90, 99)}


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_convert(src: Path, out: str, prefix: str, log: Path, server_pid: int) -> dict[str, Any]:
    code = prefix + LAUNCH
    argv = [sys.executable, "-c", code, "convert", str(src), "--out", out, "--no-progress"]
    with log.open("w") as f:
        server_cpu = cpu_seconds(server_pid)
        own_cpu = children_cpu()
        start = time.perf_counter()
        proc = psutil.Popen(argv, stdout=f, stderr=subprocess.STDOUT)
        peak = 0
        while True:
            peak = max(peak, tree_rss(proc))
            try:
                code_ = proc.wait(timeout=0.02)
                break
            except psutil.TimeoutExpired:
                continue
        seconds = time.perf_counter() - start
    if code_ != 0:
        raise RuntimeError(f"{argv} failed ({code_}): {log.read_text()[-2000:]}")
    return {
        "seconds": seconds,
        "peak_rss_mb": peak / 1e6,
        "cpu_s": children_cpu() - own_cpu,
        "server_cpu_s": cpu_seconds(server_pid) - server_cpu,
    }


CONVERT_MODES = {
    "local": None,
    "s3 (now)": "",
    "s3 spooled (before)": SPOOLED,
    "s3 via s3fs": S3FS_ONLY,
}
"""Launcher prefixes; None: a local folder."""


def bench_convert(
    src: Path, server: s3server.SeaweedFS, repeat: int, work: Path, with_s3fs: bool = True
) -> dict[str, Any]:
    modes = {m: p for m, p in CONVERT_MODES.items() if with_s3fs or p != S3FS_ONLY}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    kept = ""
    for r in range(repeat):
        for number, (mode, prefix) in enumerate(modes.items()):
            out = str(work / f"local-{r}") if prefix is None else server.url(f"conv-{number}-{r}")
            log = work / f"convert-{number}-{r}.log"
            runs[mode].append(run_convert(src, out, prefix or "", log, server.current_pid))
            run = runs[mode][-1]
            print(
                f"  convert {mode:20s} run {r + 1}: {run['seconds']:.2f} s, CPU {run['cpu_s']:.2f}"
                f" s + SeaweedFS {run['server_cpu_s']:.2f} s",
                flush=True,
            )
            if prefix is None:
                shutil.rmtree(out)
            elif prefix or r < repeat - 1:
                Store(StoreSettings(out)).fs.rm(out[len("s3://") :], recursive=True)
            else:
                kept = out
    medians = {
        m: {
            "seconds": statistics.median(x["seconds"] for x in rs),
            "cpu_s": statistics.median(x["cpu_s"] for x in rs),
            "server_cpu_s": statistics.median(x["server_cpu_s"] for x in rs),
            "peak_rss_mb": max(x["peak_rss_mb"] for x in rs),
            "runs": rs,
        }
        for m, rs in runs.items()
    }
    ratio = medians["s3 (now)"]["seconds"] / medians["local"]["seconds"]
    before = medians["s3 spooled (before)"]["seconds"] / medians["local"]["seconds"]
    s3fs_ratio = (
        medians["s3 via s3fs"]["seconds"] / medians["local"]["seconds"] if with_s3fs else None
    )

    def paired(mode: str) -> float:
        """Median over rounds of (mode / local) within each round: the runs next to each other
        share the machine's load best."""
        pairs = zip(runs[mode], runs["local"], strict=True)
        return statistics.median(a["seconds"] / b["seconds"] for a, b in pairs)

    return {
        "modes": medians,
        "ratio": ratio,
        "ratio_before": before,
        "ratio_s3fs": s3fs_ratio,
        "paired_ratio": paired("s3 (now)"),
        "paired_ratio_before": paired("s3 spooled (before)"),
        "kept": kept,
    }


def tile_spans(store: Store, slide_id: str) -> tuple[str, dict[int, tuple[int, int]], list[Any]]:
    """The level-0 shard's key, its stored tiles' [start, end) spans by chunk number (blank
    glass is not stored, nor read), and every level's (key, index range)."""
    from wsi.published import layout
    from wsi.published.layout import SlideAttributes, SlideKeys

    keys = SlideKeys(slide_id)
    manifest = store.manifest(slide_id)
    attrs = SlideAttributes.from_root_metadata(store.get(keys.root_metadata), "root")
    indexes = []
    spans: dict[int, tuple[int, int]] = {}
    for number, entry in enumerate(attrs.levels):
        key = keys.shard(entry.path)
        size = manifest.object(keys.in_slide(key)).size
        tiles = -(-entry.width // entry.tile_width) * -(-entry.height // entry.tile_height)
        start, end = layout.index_range(size, tiles, key)
        indexes.append((key, start, end))
        if number == 0:
            index = layout.decode_index(store.get_range(key, start, end), tiles, key)
            spans = {
                chunk: (int(o), int(o + n))
                for chunk, (o, n) in enumerate(index)
                if n != layout.EMPTY_CHUNK
            }
    return indexes[0][0], spans, indexes


async def _timed(make: Callable[[], Awaitable[Any]]) -> float:
    t0 = time.perf_counter()
    await make()
    return time.perf_counter() - t0


def bench_reads(store: Store, slide_id: str, requests: int) -> dict[str, Any]:
    import s3fs

    key, by_chunk, indexes = tile_spans(store, slide_id)
    spans = list(by_chunk.values())
    path = store.path(key)
    rng = random.Random(5)
    picks = [rng.choice(spans) for _ in range(requests)]
    fast = store.obstore_client()
    assert fast is not None
    slow = Store(store.settings)
    slow._obstore = None  # the s3fs path of the same store: before
    result: dict[str, Any] = {
        "tiles": len(spans),
        "mean_tile_bytes": statistics.mean(e - s for s, e in spans),
    }

    async def go() -> None:
        fs = s3fs.S3FileSystem(asynchronous=True, skip_instance_cache=True, **store.storage_options)
        session = await fs.set_session()
        try:
            clients: dict[str, Callable[[int, int], Awaitable[Any]]] = {
                "s3fs async": lambda s, e: fs._cat_file(path, start=s, end=e),
                "obstore async": lambda s, e: fast.get_range_async(key, s, e),
            }
            for client in clients.values():  # connections open
                await client(*picks[0])
            one: dict[str, list[float]] = {c: [] for c in clients}
            for s, e in picks:
                for name, client in clients.items():
                    one[name].append(await _timed(lambda c=client, s=s, e=e: c(s, e)))
            for name, fn in (
                ("s3fs blocking", slow.get_range),
                ("obstore blocking", fast.get_range),
            ):
                fn(key, *picks[0])
                one[name] = []
            for s, e in picks:
                for name, fn in (
                    ("s3fs blocking", slow.get_range),
                    ("obstore blocking", fast.get_range),
                ):
                    t0 = time.perf_counter()
                    fn(key, s, e)
                    one[name].append(time.perf_counter() - t0)
            result["range"] = {n: summary_ms(v) for n, v in one.items()}

            conc: dict[str, list[float]] = {c: [] for c in clients}
            total = 4 * requests
            nbytes = sum(e - s for s, e in (picks * 4))
            for _ in range(2):
                for name, client in clients.items():
                    gate = asyncio.Semaphore(64)

                    async def limited(
                        s: int, e: int, c: Any = client, g: asyncio.Semaphore = gate
                    ) -> None:
                        async with g:
                            await c(s, e)

                    t0 = time.perf_counter()
                    await asyncio.gather(*(limited(s, e) for s, e in picks * 4))
                    conc[name].append(time.perf_counter() - t0)
            result["range64"] = {
                n: {"req_per_s": total / min(v), "mb_per_s": nbytes / min(v) / 1e6}
                for n, v in conc.items()
            }

            idx: dict[str, list[float]] = {c: [] for c in clients}
            for _ in range(max(1, requests // (2 * len(indexes)))):
                for k, s, e in indexes:
                    p = store.path(k)
                    idx["s3fs async"].append(
                        await _timed(lambda p=p, s=s, e=e: fs._cat_file(p, start=s, end=e))
                    )
                    idx["obstore async"].append(
                        await _timed(lambda k=k, s=s, e=e: fast.get_range_async(k, s, e))
                    )
            result["index"] = {n: summary_ms(v) for n, v in idx.items()}
        finally:
            await session.close()

    asyncio.run(go())
    return result


def bench_sample(src: Path, server: s3server.SeaweedFS, rounds: int) -> dict[str, Any]:
    from wsi.ingest import staging
    from wsi.slide_id import content_slide_id, hash_slide_files
    from wsi.store.obstore_s3 import bucket_range_reader

    store = Store(StoreSettings(server.url("sources")))
    with src.open("rb") as f:
        store.put("slide.tif", f.read())
    url = server.url("sources/slide.tif")
    bucket, key = staging.parse_s3_url(url)
    fs = staging._filesystem(None)
    files = staging._remote_slide_files(fs, bucket, key, staging.StagingLimits())
    expected = content_slide_id(src)
    times: dict[str, list[float]] = {"s3fs (before)": [], "obstore get_ranges": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        assert hash_slide_files(fs, files) == expected
        times["s3fs (before)"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert hash_slide_files(fs, files, bucket_range_reader(None)) == expected
        times["obstore get_ranges"].append(time.perf_counter() - t0)
    store.delete("slide.tif")
    return {n: {"median_ms": statistics.median(v) * 1000} for n, v in times.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SIGNED_FOR = timedelta(hours=1)
BEFORE_COLD = "import wsi.store.aio as a; a.on_loop_allowed = lambda *_: False; "
"""Prefix of a launcher whose server reads tile ranges through obstore's coroutines: 'before'."""


def presigned(store: Store, key: str) -> str:
    """A presigned GET URL of object `key` (obstore's signer, the store's credentials): what a
    plain HTTP client fetches ranges of, with the bench's own client settings."""
    import obstore

    fast = store.obstore_client()
    assert fast is not None
    return str(obstore.sign(fast.client, "GET", key, SIGNED_FOR))


@contextlib.contextmanager
def serving(store: Store, server: s3server.SeaweedFS, prefix: str, name: str) -> Iterator[int]:
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


COLD_ROWS = {
    "bare": "bare GET (aiohttp)",
    "bare_obstore": "bare GET (obstore)",
    "library": "library tile_bytes",
    "http": "wsi serve HTTP",
    "http_before": "wsi serve HTTP, before",
    "hot": "HTTP hot tile",
}
"""The cold measurements: the same-client bare GET is the reference of the verdict."""


def bench_cold(store: Store, slide_id: str, server: s3server.SeaweedFS, n: int) -> dict[str, Any]:
    """Cold level-0 tiles, each read once, interleaved: a bare range GET of a tile with the bench's
    aiohttp client (a presigned URL, the same keep-alive session as the HTTP rows) and with
    obstore in this process; `tile_bytes` of a fresh `PublishedStore`; and `GET .../tiles/0/...`
    from `wsi serve` now and with its ranges read through obstore's coroutines (before); and the
    same client's GET of a tile in the server's cache (the HTTP exchange alone)."""
    import aiohttp

    from wsi.published.layout import SlideAttributes, SlideKeys
    from wsi.published.store import PublishedStore

    key, by_chunk, _ = tile_spans(store, slide_id)
    fast = store.obstore_client()
    assert fast is not None
    keys = SlideKeys(slide_id)
    attrs_level = SlideAttributes.from_root_metadata(store.get(keys.root_metadata), "r").levels[0]
    cols = -(-attrs_level.width // attrs_level.tile_width)
    rng = random.Random(9)
    chunks = rng.sample(sorted(by_chunk), min(5 * n, len(by_chunk)))
    n = len(chunks) // 5
    cells = [(c % cols, c // cols) for c in chunks[: 3 * n]]
    bare_spans = [by_chunk[c] for c in chunks[3 * n :]]
    url = presigned(store, key)
    times: dict[str, list[float]] = {name: [] for name in COLD_ROWS}
    with (
        serving(store, server, "", "now") as port,
        serving(store, server, BEFORE_COLD, "before") as port_before,
    ):

        async def go() -> None:
            async with PublishedStore(store) as published, aiohttp.ClientSession() as client:

                async def fetch(target: str, headers: dict[str, str] | None = None) -> float:
                    t0 = time.perf_counter()
                    async with client.get(target, headers=headers) as resp:
                        await resp.read()
                        assert resp.status in (200, 206), (target, resp.status)
                    return time.perf_counter() - t0

                slide = await published.slide(slide_id)
                base = f"http://127.0.0.1:{port}/slides/{slide_id}/tiles/0"
                before = f"http://127.0.0.1:{port_before}/slides/{slide_id}/tiles/0"
                await fetch(f"{base}/0/0")  # opens the slide and the index
                await fetch(f"{before}/0/0")
                await fetch(url, {"Range": "bytes=0-0"})  # opens the connection
                await slide.tile_bytes(0, 0, 0)
                for i in range(n):
                    s, e = bare_spans[2 * i]
                    times["bare"].append(await fetch(url, {"Range": f"bytes={s}-{e - 1}"}))
                    s, e = bare_spans[2 * i + 1]
                    t0 = time.perf_counter()
                    await fast.get_range_async(key, s, e)
                    times["bare_obstore"].append(time.perf_counter() - t0)
                    col, row = cells[3 * i]
                    t0 = time.perf_counter()
                    await slide.tile_bytes(0, col, row)
                    times["library"].append(time.perf_counter() - t0)
                    col, row = cells[3 * i + 1]
                    times["http"].append(await fetch(f"{base}/{col}/{row}"))
                    col, row = cells[3 * i + 2]
                    times["http_before"].append(await fetch(f"{before}/{col}/{row}"))
                    times["hot"].append(await fetch(f"{base}/0/0"))  # in the tile cache

        asyncio.run(go())
    result: dict[str, Any] = {COLD_ROWS[name]: summary_ms(v) for name, v in times.items()}
    p50 = {name: result[row]["p50_ms"] for name, row in COLD_ROWS.items()}
    result["ratio_http"] = p50["http"] / p50["bare"]
    result["ratio_http_before"] = p50["http_before"] / p50["bare"]
    result["ratio_library"] = p50["library"] / p50["bare"]
    result["ratio_http_vs_obstore"] = p50["http"] / p50["bare_obstore"]
    result["ratio_http_beyond_exchange"] = (p50["http"] - p50["hot"]) / p50["bare"]
    return result


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def report_convert(results: dict[str, Any]) -> None:
    conv = results["convert"]
    print("\n== conversion of", results["source"], "(median of", results["repeat"], "runs)")
    for mode, m in conv["modes"].items():
        print(
            f"  {mode:20s} {m['seconds']:7.2f} s   CPU {m['cpu_s']:6.2f} s + SeaweedFS"
            f" {m['server_cpu_s']:5.2f} s   peak RSS {m['peak_rss_mb']:6.0f} MB"
        )
    print(
        f"  S3 / local = {conv['ratio']:.3f} (target <= {CONVERT_TARGET}) "
        f"{verdict(conv['ratio'] <= CONVERT_TARGET)}; before (spooled): "
        f"{conv['ratio_before']:.3f}"
        + (f"; everything via s3fs: {conv['ratio_s3fs']:.3f}" if conv["ratio_s3fs"] else "")
    )
    print(
        f"  per-round pairs: S3 / local = {conv['paired_ratio']:.3f}, "
        f"before (spooled) / local = {conv['paired_ratio_before']:.3f} (medians)"
    )


def report(results: dict[str, Any]) -> None:
    report_convert(results)
    reads = results["reads"]
    print(
        f"\n== reads ({reads['tiles']} stored level-0 tiles, mean {reads['mean_tile_bytes']:.0f} B)"
    )
    for name, s in reads["range"].items():
        print(
            f"  range one at a time  {name:17s} p50 {s['p50_ms']:6.2f}  p90 {s['p90_ms']:6.2f}"
            f"  p99 {s['p99_ms']:6.2f} ms"
        )
    for name, s in reads["range64"].items():
        print(
            f"  range 64 concurrent  {name:17s} {s['req_per_s']:8.0f} req/s  "
            f"{s['mb_per_s']:7.1f} MB/s"
        )
    for name, s in reads["index"].items():
        print(
            f"  shard index          {name:17s} p50 {s['p50_ms']:6.2f}  p99 {s['p99_ms']:6.2f} ms"
        )
    for name, s in results["sample"].items():
        print(f"  content id (66 ranges) {name:19s} {s['median_ms']:7.1f} ms")
    report_cold(results)


def report_cold(results: dict[str, Any]) -> None:
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
        f"  for reference: HTTP / bare GET (obstore in this process) ="
        f" {cold['ratio_http_vs_obstore']:.2f}; library / bare GET (aiohttp) ="
        f" {cold['ratio_library']:.2f}; (HTTP - HTTP hot tile) / bare GET (aiohttp) ="
        f" {cold['ratio_http_beyond_exchange']:.2f}"
    )


def cold_only(src: Path, server: s3server.SeaweedFS, requests: int, results: dict[str, Any]) -> int:
    """`--cold-only`: the slide converted once into SeaweedFS, then `bench_cold`."""
    from wsi.convert import convert_slide

    store = Store(StoreSettings(server.url("cold"), server.endpoint_url))
    slide_id = convert_slide(src, store).slide_id
    results["cold"] = bench_cold(store, slide_id, server, requests)
    report_cold(results)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "s3-cold.json").write_text(json.dumps(results, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=40_000)
    parser.add_argument("--height", type=int, default=30_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument(
        "--convert-only",
        action="store_true",
        help="only the conversions (writes bench/out/s3-convert.json)",
    )
    parser.add_argument(
        "--no-s3fs", action="store_true", help="leave out the conversion with obstore off"
    )
    parser.add_argument(
        "--cold-only",
        action="store_true",
        help="convert once, then only the cold tiles (writes bench/out/s3-cold.json)",
    )
    args = parser.parse_args(argv)
    src = ensure_source(args.width, args.height, args.seed)
    results: dict[str, Any] = {"source": src.name, "repeat": args.repeat}
    with tempfile.TemporaryDirectory(prefix="wsi-bench-s3-") as tmp, _server(Path(tmp)) as server:
        if args.cold_only:
            return cold_only(src, server, args.requests, results)
        work = Path(tmp) / "work"
        work.mkdir()
        results["convert"] = bench_convert(src, server, args.repeat, work, not args.no_s3fs)
        if args.convert_only:
            report_convert(results)
            OUT.mkdir(parents=True, exist_ok=True)
            (OUT / "s3-convert.json").write_text(json.dumps(results, indent=2))
            return 0
        store = Store(StoreSettings(results["convert"]["kept"], server.endpoint_url))
        (slide_id,) = store.published_slides()
        results["reads"] = bench_reads(store, slide_id, args.requests)
        results["sample"] = bench_sample(src, server, max(3, args.repeat))
        results["cold"] = bench_cold(store, slide_id, server, args.requests)
    report(results)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "s3.json").write_text(json.dumps(results, indent=2))
    return 0


@contextlib.contextmanager
def _server(base: Path) -> Iterator[s3server.SeaweedFS]:
    """SeaweedFS with this process's AWS_* environment pointing at it (restored afterwards)."""
    with s3server.run_seaweedfs(base) as server, s3server.pointed_at(server):
        yield server


if __name__ == "__main__":
    sys.exit(main())
