"""Benchmark tile serving on loopback: ours against Orthanc and against aiohttp's ceiling.

Every workload in one run, with the same client settings for every server (wrk when installed,
``--connections`` 64 keep-alive connections, ``--duration`` seconds after a ``--warmup``), each
server in its own process(es), servers and load generator sharing the same CPUs by default
(``--server-cpus``/``--client-cpus`` pin them apart; the split is printed):

* (a) ``ours-hot``       - ``wsi serve --processes N`` (``server.processes``; N = ``--processes``,
  default the CPUs): ``/slides/{id}/tiles/{level}/{col}/{row}``, cycling through ``--tiles`` random
  interior tiles of every level from ``--hot-min-level`` (1) with at least 2x2 tiles, all fetched
  once before (hot). Level 0 is left out by default so that the hot set is hot for Orthanc too:
  its parsed-instance cache holds about 128 MB of DICOM instances, and a hot set over the whole
  40,000 x 30,000 slide (~250 MB of 10 MB instances) makes it re-parse an instance for most
  tiles (65 tiles/s instead of ~10,000);
* (b) ``ours-random``    - a fresh ``wsi serve`` of N processes with its tile cache off
  (``--tile-cache-mb 0``): random tiles across the whole base level (``--random-requests``
  addresses drawn with a seed, far more than the level's tiles are requested in the run), the
  store's files read once before (page cache warm): one range read per tile through the cached
  shard index;
* (c) ``ours-frames``    - the same server: DICOMweb WADO-RS single frames of the base level's
  instance, random, with the Accept header of wsidicom's web client
  (``multipart/related; type="application/octet-stream"; transfer-syntax=*``);
* (d) ``fixed-1``, ``fixed-N`` - aiohttp returning one in-memory tile (the median-size hot tile)
  from 1 and from N processes on one port (``SO_REUSEPORT``): the ceilings;
* (e) ``orthanc-hot``, ``orthanc-random``, ``orthanc-frames`` - Orthanc with its WSI and DICOMweb
  plugins (`serve_orthanc`; **it listens on 0.0.0.0 while it runs**, answering loopback only):
  ``/wsi/tiles/{series}/{level}/{x}/{y}`` for the same hot tiles and for random base-level tiles,
  and WADO-RS frames (``/dicom-web/studies/.../frames/N``) random over the base level's instances
  (the Dicomizer splits it at 10 MB per instance). If Orthanc is not installed or does not start,
  one line says so and the rest is measured;
* ``openslide-hot`` (only with ``--servers ...,openslide``) - "the OpenSlide DeepZoom way":
  ``DeepZoomGenerator(OpenSlide(src)).get_tile`` and a PIL JPEG encode per request;
* ``base-*`` (only with ``--base DIR``) - (a)-(c) again with the ``server`` and ``wsi`` packages of
  another checkout (``git archive HEAD server wsi | tar -x -C DIR``): before and after a change,
  in the same run.

Targets (issue 11): hot >= Orthanc's hot; random >= 20x Orthanc's; WADO-RS frames >= 120x
Orthanc's; p99 of hot <= 2x the N-process ceiling's p99. Anything but a 200 counts as an error.

Then cold tiles (`serve_cold`: each tile once from a fresh server, local store and SeaweedFS);
``--no-cold`` skips them, ``--no-s3`` skips SeaweedFS.

Usage::

    python bench/serve.py                                 # 40000x30000 generated slide, all
    python bench/serve.py --duration 3 --warmup 1 --no-cold
    python bench/serve.py --servers ours,fixed --processes 2 --server-cpus 0 --client-cpus 1
    python bench/serve.py --base /tmp/base --servers ours --no-cold

The slide is generated (once) by ``sample_data/generate.py`` into ``bench/out/`` and converted
into ``bench/out/serve-store``; results are printed and written to ``bench/out/serve.json``.

This module holds the set-up, the workloads and the run; beside it ``serve_options.py`` (the
options), ``serve_servers.py`` (the servers measured), ``serve_load.py`` (server processes, load
generators, results), ``serve_report.py`` (the table and the verdicts), ``serve_cold.py`` and
``serve_orthanc.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import serve_orthanc
from convert_sources import ensure_source  # bench/convert_sources.py: the shared generated slide
from serve_cold import Cold, Tile, print_cold, run_cold
from serve_load import (
    READY_TIMEOUT_S,
    LoadSettings,
    Result,
    Running,
    fetch_all,
    is_jpeg,
    is_jpeg_part,
    measure,
    median_result,
    pin,
    server_process,
)
from serve_options import parse_args
from serve_report import print_table, verdicts
from serve_servers import serve

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
"""What wsidicom's web client asks for frames with: the stored JPEG bytes, one part each."""
VALIDATED = 32
"""Random addresses fetched (and checked) once before a random workload is measured."""


# --------------------------------------------------------------------------------------------
# Set-up: slide, store, addresses


def convert(src: Path, store: Path) -> str:
    import wsi

    result = wsi.convert_slide(src, wsi.Store(wsi.StoreSettings(str(store))))
    print(
        f"store: {store} (slide {result.slide_id}, "
        f"{'already converted' if result.skipped else f'converted in {result.seconds:.1f} s'})",
        flush=True,
    )
    return result.slide_id


def choose_tiles(
    levels: list[dict[str, Any]], limits: list[tuple[int, int]], n: int, min_level: int
) -> list[Tile]:
    """`n` random interior tiles of every level from `min_level` with at least 2x2 full tiles,
    full tiles also in the geometry of the other servers (`limits`: their (width, height) per
    level)."""
    candidates: list[Tile] = []
    for level in levels:
        k = level["level"]
        if k < min_level:
            continue
        size = level["tile_width"]
        other_w, other_h = limits[k] if k < len(limits) else (0, 0)
        cols = min(level["width"], other_w) // size
        rows = min(level["height"], other_h) // size
        if cols >= 2 and rows >= 2:
            candidates += [(k, c, r) for r in range(rows) for c in range(cols)]
    if not candidates:
        raise SystemExit("the slide has no level with 2x2 full tiles; use a larger slide")
    rng = random.Random(0)
    return rng.sample(candidates, min(n, len(candidates)))


def deepzoom_levels(src: Path, tile_size: int) -> list[tuple[int, int]]:
    """OpenSlide DeepZoom's level sizes, ours first (level 0 = full resolution)."""
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    with openslide.OpenSlide(str(src)) as slide:
        dz = DeepZoomGenerator(slide, tile_size=tile_size, overlap=0, limit_bounds=False)
        return list(reversed(dz.level_dimensions))


def random_cells(cols: int, rows: int, n: int, seed: int) -> list[tuple[int, int]]:
    """`n` (col, row) drawn uniformly over a level's whole grid (repeats allowed)."""
    rng = random.Random(seed)
    return [(rng.randrange(cols), rng.randrange(rows)) for _ in range(n)]


def random_frames(instances: list[tuple[str, int]], n: int, seed: int) -> list[str]:
    """`n` frame URLs drawn uniformly over the frames of `instances` ((path up to `/frames/`,
    frame count) each): a frame of the level, wherever its instance."""
    rng = random.Random(seed)
    weights = [count for _, count in instances]
    paths = []
    for path, count in rng.choices(instances, weights=weights, k=n):
        paths.append(f"{path}{rng.randrange(count) + 1}")
    return paths


def our_base_frames(url: str) -> list[tuple[str, int]]:
    """The base level's DICOM instance of the (only) slide, from our QIDO-RS: (path up to
    `/frames/`, Number of Frames)."""
    with urllib.request.urlopen(f"{url}/dicomweb/instances?includefield=all") as response:
        docs = json.load(response)

    def value(doc: dict[str, Any], tag: str) -> Any:
        return doc.get(tag, {}).get("Value", [None])[0]

    widest = max(docs, key=lambda d: int(value(d, "00480006") or 0))
    path = (
        f"/dicomweb/studies/{value(widest, '0020000D')}/series/{value(widest, '0020000E')}"
        f"/instances/{value(widest, '00080018')}/frames/"
    )
    return [(path, int(value(widest, "00280008")))]


def warm_page_cache(folder: Path) -> int:
    """Read every file under `folder` once (the OS keeps them in its page cache); bytes read."""
    total = 0
    for path in folder.rglob("*"):
        if path.is_file():
            total += len(path.read_bytes())
    return total


# --------------------------------------------------------------------------------------------
# The workloads


@dataclass
class Runs:
    """What the run measured, by workload name, and why something was not measured."""

    results: dict[str, Result] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    hot: list[Tile] = field(default_factory=list)
    rounds: list[dict[str, Result]] = field(default_factory=list)
    """Each round's results, when there were several (`results` then holds their medians)."""

    def end_round(self) -> None:
        """Keep this round's results apart; `results` becomes the medians of every round."""
        self.rounds.append(self.results)
        names = dict.fromkeys(name for done in self.rounds for name in done)
        self.results = {
            name: median_result([done[name] for done in self.rounds if name in done])
            for name in names
        }

    def add(self, name: str, result: Result) -> None:
        self.results[name] = result
        print(
            f"  {name:<16}{result.tiles_per_s:10,.0f}/s  p50 {result.p50_ms:6.2f} ms  "
            f"p99 {result.p99_ms:6.2f} ms  errors {result.errors}",
            flush=True,
        )


@dataclass(frozen=True)
class Context:
    args: argparse.Namespace
    load: LoadSettings
    src: Path
    slide_id: str
    levels: list[dict[str, Any]]
    cpus_arg: list[str]


def ours_argv(ctx: Context, tile_cache_mb: int, code_root: Path | None) -> list[str]:
    args = ctx.args
    argv = ["--store", str(args.store.resolve()), "--threads", str(args.threads)]
    argv += ["--processes", str(args.processes), "--tile-cache-mb", str(tile_cache_mb)]
    if code_root is not None:
        argv += ["--code-root", str(code_root)]
    return argv + ctx.cpus_arg


def all_serving(server: Running, processes: int) -> None:
    """Wait until every serving process answers (`/metrics` counts those that published their
    status lately): the first one answers /healthz while the others may still be importing,
    which would eat the CPU of the first workload measured."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    wanted = f"wsi_serving_processes {float(processes)}"
    while True:
        with urllib.request.urlopen(f"{server.url}/metrics") as response:
            if wanted in response.read().decode():
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"{processes} serving processes did not all start")
        time.sleep(0.2)


def measure_ours(ctx: Context, runs: Runs, prefix: str, code_root: Path | None) -> None:
    """(a) hot tiles; then, from a fresh server with its tile cache off, (b) random base-level
    tiles and (c) random base-level WADO-RS frames."""
    args, load = ctx.args, ctx.load
    paths = [f"/slides/{ctx.slide_id}/tiles/{k}/{c}/{r}" for k, c, r in runs.hot]
    log = OUT / "logs" / f"serve-{prefix}-hot.log"
    argv = ours_argv(ctx, args.tile_cache_mb, code_root)
    with server_process("ours", argv, log) as ours:
        all_serving(ours, args.processes)
        fetch_all([ours.url + p for p in paths], load.connections)
        runs.add(f"{prefix}-hot", measure(f"{prefix}-hot", ours, paths, load))
    base = ctx.levels[0]
    cols = -(-base["width"] // base["tile_width"])
    rows = -(-base["height"] // base["tile_height"])
    cells = random_cells(cols, rows, args.random_requests, seed=3)
    tiles = [f"/slides/{ctx.slide_id}/tiles/0/{c}/{r}" for c, r in cells]
    log = OUT / "logs" / f"serve-{prefix}-cold-cache.log"
    with server_process("ours", ours_argv(ctx, 0, code_root), log) as ours:
        all_serving(ours, args.processes)
        fetch_all([ours.url + p for p in tiles[:VALIDATED]], load.connections)
        runs.add(f"{prefix}-random", measure(f"{prefix}-random", ours, tiles, load))
        frames = random_frames(our_base_frames(ours.url), args.random_requests, seed=4)
        accept = {"Accept": FRAME_ACCEPT}
        urls = [ours.url + p for p in frames[:VALIDATED]]
        fetch_all(urls, load.connections, accept, is_jpeg_part)
        runs.add(f"{prefix}-frames", measure(f"{prefix}-frames", ours, frames, load, accept))


def measure_fixed(ctx: Context, runs: Runs, body: bytes, tmp: Path) -> None:
    """(d) the ceilings: one fixed tile from 1 and from N processes."""
    fixed = tmp / "tile.jpg"
    fixed.write_bytes(body)
    counts = sorted({1, ctx.args.processes})
    for n in counts:
        name = f"fixed-{n}"
        argv = ["--fixed-tile", str(fixed), "--processes", str(n), *ctx.cpus_arg]
        with server_process("fixed", argv, OUT / "logs" / f"serve-{name}.log") as running:
            runs.add(name, measure(name, running, ["/tile"], ctx.load))


def measure_orthanc(ctx: Context, runs: Runs) -> None:
    """(e) Orthanc: hot tiles, random base-level tiles, random base-level WADO-RS frames."""
    why = serve_orthanc.missing()
    if why is not None:
        runs.notes.append(f"orthanc: not measured: {why}")
        print(runs.notes[-1], flush=True)
        return
    files = serve_orthanc.dicomize(ctx.src, OUT, serve_orthanc.dicomizer_threads())
    log = OUT / "logs" / "serve-orthanc.log"
    try:
        with serve_orthanc.orthanc(
            ctx.args.server_cpu_list, log, serve_orthanc.storage_cache_mb(files)
        ) as server:
            slide = serve_orthanc.upload(server, files)
            print(
                f"Orthanc {server.url}: {len(files)} instances uploaded, series {slide.series}",
                flush=True,
            )
            _orthanc_workloads(ctx, runs, server, slide)
    except (SystemExit, OSError) as exc:
        runs.notes.append(f"orthanc: not measured: {exc}")
        print(runs.notes[-1], flush=True)


def _orthanc_workloads(
    ctx: Context, runs: Runs, server: Running, slide: serve_orthanc.OrthancSlide
) -> None:
    load, series = ctx.load, slide.series
    hot = [f"/wsi/tiles/{series}/{k}/{c}/{r}" for k, c, r in runs.hot]
    fetch_all([server.url + p for p in hot], load.connections)
    runs.add("orthanc-hot", measure("orthanc-hot", server, hot, load))
    base = slide.levels[0]
    cells = random_cells(base["cols"], base["rows"], ctx.args.random_requests, seed=3)
    tiles = [f"/wsi/tiles/{series}/0/{c}/{r}" for c, r in cells]
    fetch_all([server.url + p for p in tiles[:VALIDATED]], load.connections)
    runs.add("orthanc-random", measure("orthanc-random", server, tiles, load))
    frames = random_frames(slide.frames, ctx.args.random_requests, seed=4)
    accept = {"Accept": FRAME_ACCEPT}
    urls = [server.url + p for p in frames[:VALIDATED]]
    fetch_all(urls, load.connections, accept, is_jpeg_part)
    runs.add("orthanc-frames", measure("orthanc-frames", server, frames, load, accept))


def measure_openslide(ctx: Context, runs: Runs) -> None:
    tile_size = ctx.levels[0]["tile_width"]
    paths = [f"/tiles/{k}/{c}/{r}" for k, c, r in runs.hot]
    argv = ["--src", str(ctx.src), "--tile-size", str(tile_size)]
    argv += ["--threads", str(ctx.args.threads), *ctx.cpus_arg]
    with server_process("openslide", argv, OUT / "logs" / "serve-openslide.log") as running:
        runs.add("openslide-hot", measure("openslide-hot", running, paths, ctx.load))


# --------------------------------------------------------------------------------------------
# The run


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv, (__doc__ or "").split("\n\n")[0])
    if args.serve:
        return serve(args)
    client = (
        "wrk"
        if args.client == "wrk" or (args.client == "auto" and shutil.which("wrk"))
        else "aiohttp"
    )
    load = LoadSettings(client, args.connections, args.duration, args.warmup, args.client_procs)
    (OUT / "logs").mkdir(parents=True, exist_ok=True)
    src = (args.src or ensure_source(args.width, args.height, args.seed)).resolve()
    slide_id = args.slide_id or convert(src, args.store.resolve())
    cpus_arg = ["--cpus", ",".join(map(str, args.server_cpu_list))] if args.server_cpu_list else []
    all_cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    pin(args.client_cpu_list)
    print(
        f"source: {src}\ncpus: {os.cpu_count()} (servers: {args.server_cpu_list or 'all'}, "
        f"load: {args.client_cpu_list or 'all'}), client: {client} x{args.client_procs}, "
        f"{args.connections} connections, {args.duration:g} s (+{args.warmup:g} s warm-up), "
        f"N = {args.processes}",
        flush=True,
    )
    runs, levels, body = prepare(args, load, src, slide_id)
    ctx = Context(args, load, src, slide_id, levels, cpus_arg)
    print(f"page cache: {warm_page_cache(args.store / slide_id) / 1e6:,.0f} MB read", flush=True)
    measure_servers(ctx, runs, body)
    cold: list[Cold] = []
    s3_direct: dict[str, Any] | None = None
    if args.cold:
        cold, s3_direct = run_cold(args, src, slide_id, levels, cpus_arg, all_cpus)
    print_table(runs.results, runs.notes, args)
    ratios = verdicts(runs.results, args, runs.rounds)
    cold_verdict = print_cold(cold, s3_direct) if args.cold else None
    report = document(ctx, client, runs, ratios, cold, s3_direct, cold_verdict)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults: {args.json}")
    return 0


def measure_servers(ctx: Context, runs: Runs, body: bytes) -> None:
    """Every workload of every server asked for (`--servers`, `--base`), one after the other,
    `--rounds` times (each round every server anew: a fresh Orthanc, fresh processes of ours);
    `body`: the fixed server's tile."""
    args = ctx.args
    for number in range(1, args.rounds + 1):
        if args.rounds > 1:
            print(f"round {number} of {args.rounds}", flush=True)
            runs.results = {}
        with tempfile.TemporaryDirectory(prefix="wsi-bench-serve-") as tmp:
            if "ours" in args.servers:
                measure_ours(ctx, runs, "ours", None)
            if args.base is not None:
                measure_ours(ctx, runs, "base", args.base.resolve())
            if "fixed" in args.servers:
                measure_fixed(ctx, runs, body, Path(tmp))
            if "orthanc" in args.servers:
                measure_orthanc(ctx, runs)
            if "openslide" in args.servers:
                measure_openslide(ctx, runs)
        if args.rounds > 1:
            runs.end_round()


def document(
    ctx: Context,
    client: str,
    runs: Runs,
    ratios: dict[str, Any],
    cold: list[Cold],
    s3_direct: dict[str, Any] | None,
    cold_verdict: dict[str, Any] | None,
) -> dict[str, Any]:
    """The results file: the slide, the load and the machine, every workload's result and the
    verdicts, and the cold tiles (their passes, SeaweedFS read directly, their verdict)."""
    args = ctx.args
    return {
        "source": str(ctx.src),
        "slide_id": ctx.slide_id,
        "hot_tiles": len(runs.hot),
        "random_requests": args.random_requests,
        "connections": args.connections,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "client": f"{client} x{args.client_procs}",
        "server_cpus": args.server_cpu_list,
        "client_cpus": args.client_cpu_list,
        "cpus": os.cpu_count(),
        "processes": args.processes,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "rounds": args.rounds,
        "results": _as_json(runs.results),
        "each_round": [_as_json(done) for done in runs.rounds],
        "notes": runs.notes,
        "verdicts": ratios,
        "cold": {
            "tiles_per_pass": cold[0].tiles if cold else 0,
            "s3": bool(args.s3),
            "results": [asdict(c) for c in cold],
            "s3_direct": s3_direct,
            "verdict": cold_verdict,
        },
    }


def _as_json(results: dict[str, Result]) -> dict[str, Any]:
    return {k: {**asdict(v), "cpu_us_per_tile": v.cpu_us_per_tile} for k, v in results.items()}


def prepare(
    args: argparse.Namespace, load: LoadSettings, src: Path, slide_id: str
) -> tuple[Runs, list[dict[str, Any]], bytes]:
    """Our levels and the hot set (tiles that are full tiles for every server measured), and
    the median-size hot tile for the fixed server; from a short-lived server of ours."""
    runs = Runs()
    argv = ["--store", str(args.store.resolve()), "--threads", str(args.threads)]
    with server_process("ours", argv, OUT / "logs" / "serve-prepare.log") as ours:
        with urllib.request.urlopen(f"{ours.url}/slides/{slide_id}") as response:
            levels = json.load(response)["levels"]
        limits = [(lv["width"], lv["height"]) for lv in levels]
        if "openslide" in args.servers:
            dz = deepzoom_levels(src, levels[0]["tile_width"])
            limits = [(min(w, a), min(h, b)) for (w, h), (a, b) in zip(limits, dz, strict=False)]
        runs.hot = choose_tiles(levels, limits, args.tiles, args.hot_min_level)
        paths = [f"{ours.url}/slides/{slide_id}/tiles/{k}/{c}/{r}" for k, c, r in runs.hot]
        bodies = fetch_all(paths, load.connections, check=is_jpeg)
    print(
        f"hot set: {len(runs.hot)} tiles of {levels[0]['tile_width']} px from levels "
        f"{sorted({t[0] for t in runs.hot})}, median {statistics.median(map(len, bodies)):,.0f} "
        f"bytes; random: {args.random_requests:,} addresses over level 0",
        flush=True,
    )
    return runs, levels, sorted(bodies, key=len)[len(bodies) // 2]


if __name__ == "__main__":
    sys.exit(main())
