"""The conversion part of `bench/s3.py`: `wsi convert` into a local folder and into SeaweedFS
(now; with the DICOM level objects spooled, as before; with obstore off), interleaved round by
round, each run's wall time, CPU time (the converter's and SeaweedFS's) and peak RSS; the medians,
the S3 / local ratios and their part of the report.

Every run is a fresh `wsi` process started after a launcher prefix (`LAUNCH`), which is how the
"before" variants are switched on without a second copy of the converter.
"""

from __future__ import annotations

import http.client
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

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


STORE_ONLY = "store only (plain PUTs)"
"""The local conversion's output PUT as it is into SeaweedFS: what storing the bytes costs."""
PUT_THREADS = 2
PUT_CHUNK = 1 << 20


def put_file(url: str, path: Path) -> None:
    """One presigned PUT of a file's bytes, streamed from disk."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=120, blocksize=PUT_CHUNK)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        with path.open("rb") as body:
            size = str(path.stat().st_size)
            conn.request("PUT", target, body=body, headers={"Content-Length": size})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"PUT {path.name}: HTTP {response.status}")
    finally:
        conn.close()


def store_only(folder: Path, server: SeaweedFS, prefix: str) -> dict[str, Any]:
    """Every file of `folder` (a local conversion's output) PUT as it is into SeaweedFS under
    `prefix`, one plain presigned PUT per object, PUT_THREADS at a time, then removed: the
    store's own CPU for these bytes, with no converter and none of our upload code (the floor
    of what a conversion into it costs beyond a local one)."""
    import obstore

    store = Store(StoreSettings(server.url(prefix), server.endpoint_url))
    fast = store.obstore_client()
    assert fast is not None
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    urls = [
        str(obstore.sign(fast.client, "PUT", p.relative_to(folder).as_posix(), timedelta(hours=1)))
        for p in files
    ]
    server_cpu = cpu_seconds(server.current_pid)
    own_cpu = time.process_time()
    start = time.perf_counter()
    with ThreadPoolExecutor(PUT_THREADS) as pool:
        list(pool.map(put_file, urls, files))
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "peak_rss_mb": 0.0,
        "cpu_s": time.process_time() - own_cpu,
        "server_cpu_s": cpu_seconds(server.current_pid) - server_cpu,
        "bytes": sum(p.stat().st_size for p in files),
    }
    store.fs.rm(server.url(prefix)[len("s3://") :], recursive=True)
    return result


def cpu_floor(local: dict[str, Any], stored: dict[str, Any], cores: int) -> float:
    """A floor of S3 / local wall time on `cores` cores shared with the store: the S3 conversion
    does the local one's work (its CPU) and the store does at least what storing the same bytes
    costs it (`stored`'s server CPU), all on the same cores, against the local wall time; and
    never below 1 (a local conversion that leaves cores idle, a small slide's, is no faster
    for it)."""
    return max(1.0, (local["cpu_s"] + stored["server_cpu_s"]) / (cores * local["seconds"]))


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
            runs[STORE_ONLY].append(store_only(Path(out), server, f"plain-{r}"))
            stored = runs[STORE_ONLY][-1]
            print(
                f"  {STORE_ONLY:27s} run {r + 1}: {stored['seconds']:.2f} s for"
                f" {stored['bytes'] / 1e6:.0f} MB, SeaweedFS {stored['server_cpu_s']:.2f} s",
                flush=True,
            )
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
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in [*modes, STORE_ONLY]}
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
        "cores": psutil.cpu_count(),
        "floor": cpu_floor(by_mode["local"], by_mode[STORE_ONLY], psutil.cpu_count() or 1),
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
        f"  floor on {conv['cores']} cores shared with SeaweedFS: (local CPU + SeaweedFS CPU"
        f" storing the same bytes) / (cores x local s) = {conv['floor']:.3f}"
    )
    print(
        f"  per-round pairs: S3 / local = {conv['paired_ratio']:.3f}, "
        f"before (spooled) / local = {conv['paired_ratio_before']:.3f} (medians)"
    )
