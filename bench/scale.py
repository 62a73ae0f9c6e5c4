"""Scale-out benchmark: one slide's pyramid on a Dask cluster against one process, at equal cores.

For each slide, interleaved `--repeat` times:

* ``plain`` - `convert_slide` in this process with `--workers` threads (what `wsi convert` does);
* ``dask``  - the same conversion with its bands on a `distributed.LocalCluster` of `--workers`
  single-threaded worker processes, started once beforehand (as a `tcp://` cluster would be
  running already; its start-up is measured and printed on its own line).

Both outputs are compared file by file (they must be byte-identical), and the ratio of the best
times (the runs least disturbed by whatever else the machine runs) is checked against the target
(1.15x); the ratio of the medians is printed beside it, and so are the CPU seconds each way took
(the plain process; the coordinator's process, which also runs the scheduler, plus the worker
processes): on a machine others share, where wall times swing, the CPU shows what the
distributed path costs beyond the work itself. From the fastest dask run's band
durations the bench predicts the time on more workers of the same speed (one core each, like
the measured ones): the coordinator's own time (the run's wall time outside the span in which
bands ran) plus a greedy schedule, in band order, of the band durations each increased by the
per-task overhead measured in the run ((span x workers - sum of durations) / bands:
scheduling, transfer, idle slots). The critical path is the coordinator's time plus the
longest band and the overhead: no number of workers goes below it, only smaller bands
(`--band-rows`).

Slides: the 40,000 x 30,000 base-only TIFF of `bench/convert.py` (JPEG tiles: level 0 copied,
every other level built) and a JPEG 2000 Aperio SVS of `sample_data/make_j2k.py` (every tile
decoded and encoded; J2K decoding dominates).

Usage::

    python bench/scale.py                                  # both slides, 2 workers, 1 repeat
    python bench/scale.py --slides j2k --repeat 3
    python bench/scale.py --width 8000 --height 6000 --j2k-size 4000   # a quick look

Results go to ``bench/out/scale.json``. The machine may be shared: only ratios mean anything.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

if not __package__:  # run as a script: make `wsi` importable from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from convert_sources import OUT, ensure_j2k_source, ensure_source  # bench/convert_sources.py

import wsi
from wsi.convert import ConvertSettings, convert_slide
from wsi.pyramid.builder import PyramidSettings
from wsi.pyramid.cluster import BandResult, ClusterOptions

TARGET_RATIO = 1.15
PREDICT_WORKERS = (4, 16, 64)


@dataclass
class DaskRun:
    seconds: float
    coordinator_cpu: float
    """CPU seconds of this process (coordinator, scheduler, nannies) during the run."""
    workers_cpu: float
    """CPU seconds of the worker processes during the run."""
    bands: list[BandResult] = field(default_factory=list)

    @property
    def span(self) -> float:
        """Seconds from the first band's start to the last band's end."""
        return max(b.finished for b in self.bands) - min(b.started for b in self.bands)

    @property
    def durations(self) -> list[float]:
        return [b.seconds for b in sorted(self.bands, key=lambda b: b.band)]

    def overhead(self, workers: int) -> float:
        """Per-task overhead: the span's worker time not spent inside a band, per band."""
        return max(0.0, (self.span * workers - sum(self.durations)) / len(self.bands))

    @property
    def coordinator(self) -> float:
        """The run's time outside the bands' span: planning, the last joins, publishing."""
        return max(0.0, self.seconds - self.span)


def cpu_seconds(processes: Sequence[psutil.Process]) -> float:
    """User and system CPU seconds of `processes` (all their threads) so far."""
    return sum(sum(p.cpu_times()[:2]) for p in processes)


def schedule(durations: Sequence[float], workers: int) -> float:
    """Makespan of the tasks given in order to whichever of `workers` is free first."""
    free = [0.0] * workers
    for duration in durations:
        heapq.heappush(free, heapq.heappop(free) + duration)
    return max(free)


def predict(run: DaskRun, measured_workers: int, workers: int) -> tuple[float, float]:
    """(predicted seconds, critical path) on `workers` workers."""
    overhead = run.overhead(measured_workers)
    tasks = [d + overhead for d in run.durations]
    return run.coordinator + schedule(tasks, workers), run.coordinator + max(tasks)


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def run_plain(src: Path, out: Path, workers: int) -> tuple[float, float]:
    """(seconds, CPU seconds) of `wsi convert` with `workers` threads, here."""
    settings = ConvertSettings(pyramid=PyramidSettings(workers=workers))
    here = [psutil.Process()]
    cpu, start = cpu_seconds(here), time.perf_counter()
    convert_slide(src, wsi.Store(wsi.StoreSettings(str(out))), settings)
    return time.perf_counter() - start, cpu_seconds(here) - cpu


def run_dask(
    src: Path, out: Path, address: str, band_rows: int, workers: Sequence[psutil.Process]
) -> DaskRun:
    bands: list[BandResult] = []
    options = ClusterOptions(address, band_rows=band_rows, threads=1, on_band=bands.append)
    here = [psutil.Process()]
    cpu, worker_cpu, start = cpu_seconds(here), cpu_seconds(workers), time.perf_counter()
    convert_slide(src, wsi.Store(wsi.StoreSettings(str(out))), cluster=options)
    seconds = time.perf_counter() - start
    return DaskRun(seconds, cpu_seconds(here) - cpu, cpu_seconds(workers) - worker_cpu, bands)


def bench_slide(
    name: str,
    src: Path,
    address: str,
    workers: Sequence[psutil.Process],
    args: argparse.Namespace,
    scratch: Path,
) -> dict[str, Any]:
    plain: list[float] = []
    plain_cpu: list[float] = []
    dask: list[DaskRun] = []
    identical = True
    for repeat in range(args.repeat):
        a, b = scratch / f"{name}-plain-{repeat}", scratch / f"{name}-dask-{repeat}"
        seconds, cpu = run_plain(src, a, args.workers)
        plain.append(seconds)
        plain_cpu.append(cpu)
        print(f"  {name} plain {seconds:.1f} s, {cpu:.1f} CPU-s", flush=True)
        dask.append(run_dask(src, b, address, args.band_rows, workers))
        run = dask[-1]
        print(
            f"  {name} dask  {run.seconds:.1f} s, {run.coordinator_cpu + run.workers_cpu:.1f} "
            f"CPU-s ({len(run.bands)} bands)",
            flush=True,
        )
        identical = identical and tree(a) == tree(b)
        shutil.rmtree(a)
        shutil.rmtree(b)
    plain_s = min(plain)
    best = min(dask, key=lambda r: r.seconds)  # the least disturbed by a shared machine
    predictions = {w: predict(best, args.workers, w) for w in PREDICT_WORKERS}
    return {
        "slide": name,
        "source": str(src),
        "plain_s": plain,
        "dask_s": [r.seconds for r in dask],
        "plain_cpu_s": plain_cpu,
        "dask_coordinator_cpu_s": [r.coordinator_cpu for r in dask],
        "dask_workers_cpu_s": [r.workers_cpu for r in dask],
        "ratio": best.seconds / plain_s,
        "median_ratio": statistics.median(r.seconds for r in dask) / statistics.median(plain),
        "identical": identical,
        "bands": len(best.bands),
        "band_s": {
            "min": min(best.durations),
            "median": statistics.median(best.durations),
            "max": max(best.durations),
            "sum": sum(best.durations),
        },
        "overhead_s": best.overhead(args.workers),
        "coordinator_s": best.coordinator,
        "predicted": {
            str(w): {"seconds": p, "critical_path": c} for w, (p, c) in predictions.items()
        },
    }


def format_result(r: dict[str, Any]) -> str:
    band = r["band_s"]
    coordinator, workers = r["dask_coordinator_cpu_s"], r["dask_workers_cpu_s"]
    total = [c + w for c, w in zip(coordinator, workers, strict=True)]
    lines = [
        f"{r['slide']}: best of {len(r['plain_s'])}: plain {min(r['plain_s']):.1f} s, dask "
        f"{min(r['dask_s']):.1f} s: {r['ratio']:.3f}x "
        f"({'PASS' if r['ratio'] <= TARGET_RATIO else 'FAIL'}: <= {TARGET_RATIO}x; medians "
        f"{r['median_ratio']:.3f}x), "
        f"outputs {'byte-identical' if r['identical'] else 'DIFFER'}",
        f"  CPU (medians): plain {statistics.median(r['plain_cpu_s']):.1f} CPU-s, dask "
        f"{statistics.median(coordinator):.1f} coordinator + {statistics.median(workers):.1f} "
        f"workers = {statistics.median(total):.1f} CPU-s",
        f"  {r['bands']} bands: {band['min']:.2f}-{band['max']:.2f} s (median "
        f"{band['median']:.2f}, sum {band['sum']:.1f}); per-task overhead "
        f"{r['overhead_s']:.3f} s; coordinator alone {r['coordinator_s']:.1f} s",
        "",
        "  | workers | predicted s | speed-up vs 1 process | critical path s |",
        "  |--------:|------------:|----------------------:|----------------:|",
    ]
    plain = min(r["plain_s"])
    for workers, p in r["predicted"].items():
        lines.append(
            f"  | {workers:>7} | {p['seconds']:>11.1f} | {plain / p['seconds']:>20.1f}x "
            f"| {p['critical_path']:>15.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", default="base,j2k", help="base, j2k or both (comma-separated)")
    parser.add_argument("--width", type=int, default=40000, help="base-only slide width")
    parser.add_argument("--height", type=int, default=30000, help="base-only slide height")
    parser.add_argument("--j2k-size", type=int, default=10000, help="JPEG 2000 slide side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="cores: threads and processes")
    parser.add_argument(
        "--band-rows", type=int, default=0, help="base tile rows per band (0: chosen)"
    )
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", type=Path, default=OUT / "scale.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from distributed import LocalCluster

    sources = {}
    for name in args.slides.split(","):
        if name == "base":
            sources[name] = ensure_source(args.width, args.height, args.seed, base_only=True)
        elif name == "j2k":
            sources[name] = ensure_j2k_source(args.j2k_size, args.j2k_size, args.seed)
        else:
            raise SystemExit(f"unknown slide {name!r}")
    start = time.perf_counter()
    with LocalCluster(
        n_workers=args.workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address="127.0.0.1:0",
    ) as cluster:
        startup = time.perf_counter() - start
        print(f"LocalCluster of {args.workers} worker processes up in {startup:.1f} s", flush=True)
        workers = psutil.Process().children(recursive=True)
        with tempfile.TemporaryDirectory(dir=OUT, prefix="scale-") as scratch:
            results = [
                bench_slide(name, src, cluster.scheduler_address, workers, args, Path(scratch))
                for name, src in sources.items()
            ]
    print()
    for result in results:
        print(format_result(result))
        print()
    report = {"workers": args.workers, "band_rows": args.band_rows, "cluster_start_s": startup}
    report["cpus"] = os.cpu_count()
    report["results"] = results
    args.json.write_text(json.dumps(report, indent=2))
    ok = all(r["identical"] and r["ratio"] <= TARGET_RATIO for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
