"""The conversion part of `bench/s3.py`: `wsi convert` into a local folder and into SeaweedFS
(now; with the DICOM level objects spooled, as before; with obstore off), interleaved round by
round, each run's wall time, CPU time (the converter's and SeaweedFS's) and peak RSS; the medians,
the S3 / local ratios and their part of the report.

Every run is a fresh `wsi` process started after a launcher prefix (`LAUNCH`), which is how the
"before" variants are switched on without a second copy of the converter.
"""

from __future__ import annotations

import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from convert import tree_rss  # bench/convert.py
from convert_sources import ROOT  # bench/convert_sources.py

from wsi.store.objects import Store, StoreSettings

if TYPE_CHECKING:
    from tests.s3server import SeaweedFS

LAUNCH = "import sys; from server.cli import main; sys.exit(main())"
"""`wsi ARGS` as `python -c PREFIX + LAUNCH ARGS`: the prefix switches a 'before' on."""
S3FS_ONLY = "import wsi.store.obstore_s3 as o; o._RUNTIME.pid = -1; "
"""Prefix of a launcher that switches obstore off (every S3 call through s3fs)."""
SPOOLED = (
    f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); "
    "import spooled_upload; spooled_upload.install(); "
)
"""Prefix of a launcher whose DICOM level objects are spooled and written through obstore when
their level ends, header first (the converter before they were streamed in parts)."""
CONVERT_TARGET = 1.15

CONVERT_MODES = {
    "local": None,
    "s3 (now)": "",
    "s3 spooled (before)": SPOOLED,
    "s3 via s3fs": S3FS_ONLY,
}
"""Launcher prefixes; None: a local folder."""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of process `pid` (SeaweedFS)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def children_cpu() -> float:
    """User + system CPU seconds of this process's waited-for children (the converters)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_convert(src: Path, out: str, prefix: str, log: Path, server_pid: int) -> dict[str, Any]:
    """One `wsi convert SRC --out OUT` after launcher `prefix`: seconds, peak RSS of its process
    tree (MB), its CPU seconds and SeaweedFS's meanwhile."""
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


def convert_round(
    src: Path,
    server: SeaweedFS,
    modes: dict[str, str | None],
    runs: dict[str, list[dict[str, Any]]],
    r: int,
    repeat: int,
    work: Path,
) -> str:
    """Round `r`: every mode once, in order, appended to `runs`. Every output is removed but the
    last round's plain S3 conversion, whose location is returned ('' otherwise): the slide the
    read measurements read."""
    kept = ""
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
    return kept


def medians(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per mode: median seconds and CPU seconds, the largest peak RSS, and every run."""
    return {
        m: {
            "seconds": statistics.median(x["seconds"] for x in rs),
            "cpu_s": statistics.median(x["cpu_s"] for x in rs),
            "server_cpu_s": statistics.median(x["server_cpu_s"] for x in rs),
            "peak_rss_mb": max(x["peak_rss_mb"] for x in rs),
            "runs": rs,
        }
        for m, rs in runs.items()
    }


def paired_ratio(runs: dict[str, list[dict[str, Any]]], mode: str) -> float:
    """Median over rounds of (mode / local) within each round: the runs next to each other share
    the machine's load best."""
    pairs = zip(runs[mode], runs["local"], strict=True)
    return statistics.median(a["seconds"] / b["seconds"] for a, b in pairs)


def bench_convert(
    src: Path, server: SeaweedFS, repeat: int, work: Path, with_s3fs: bool = True
) -> dict[str, Any]:
    """`repeat` interleaved rounds of every conversion mode (`--no-s3fs`: not the s3fs one)."""
    modes = {m: p for m, p in CONVERT_MODES.items() if with_s3fs or p != S3FS_ONLY}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    kept = ""
    for r in range(repeat):
        kept = convert_round(src, server, modes, runs, r, repeat, work) or kept
    by_mode = medians(runs)
    local = by_mode["local"]["seconds"]
    return {
        "modes": by_mode,
        "ratio": by_mode["s3 (now)"]["seconds"] / local,
        "ratio_before": by_mode["s3 spooled (before)"]["seconds"] / local,
        "ratio_s3fs": by_mode["s3 via s3fs"]["seconds"] / local if with_s3fs else None,
        "paired_ratio": paired_ratio(runs, "s3 (now)"),
        "paired_ratio_before": paired_ratio(runs, "s3 spooled (before)"),
        "kept": kept,
    }


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def report_convert(results: dict[str, Any]) -> None:
    """The conversion table: medians per mode, the ratios and the verdict."""
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
