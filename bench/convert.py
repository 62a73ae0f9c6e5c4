"""Benchmark ``wsi convert`` against other converters on one synthetic slide.

Converts the same slide, side by side, with:

* ``wsi``              - our CLI with default settings (copies the source's
                         exact-2x JPEG levels instead of re-deriving them);
* ``wsi-no-reuse``     - our CLI with ``--no-reuse-levels``: every level is
                         derived from the base by DCT-scaled decoding (the
                         honest comparison with a full re-encode);
* ``vips``             - libvips ``tiffsave`` of a tiled JPEG pyramid
                         (through pyvips, in its own Python process);
* ``wsidicomizer``     - conversion to DICOM WSI.

Every tool runs as a subprocess. For each run we measure the wall time, the
peak RSS of the process tree (polled every ~20 ms, summing the RSS of the
process and all its descendants; shared pages are counted once per process,
so this is an upper bound) and the bytes written to its output directory,
which is fresh for every run. Each tool runs ``--repeat`` times, interleaved
(a, b, c, d, a, b, ...), and the median time is reported.

Usage::

    python bench/convert.py                        # 40000x30000, 3 repeats
    python bench/convert.py --width 8000 --height 6000 --repeat 1
    python bench/convert.py --src some.tif --tools wsi,vips

The slide is generated (once) by ``sample_data/generate.py`` into
``bench/out/``; the table is printed and the results are written to
``bench/out/convert.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
import pyvips

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
GENERATOR = ROOT / "sample_data" / "generate.py"

#: How often the process tree's memory is sampled.
POLL_INTERVAL_S = 0.02

#: The reference tool for the "vs vips" column.
REFERENCE = "vips"

VIPS_SCRIPT = """
import sys
import pyvips
src, out = sys.argv[1], sys.argv[2]
pyvips.Image.new_from_file(src, access="sequential").tiffsave(
    out, tile=True, pyramid=True, compression="jpeg", Q=85, bigtiff=True,
    tile_width=256, tile_height=256,
)
"""


@dataclasses.dataclass(frozen=True)
class Tool:
    """A converter under test: how to invoke it on ``src`` writing into ``out_dir``."""

    name: str
    description: str
    command: Callable[[Path, Path], list[str]]


def _wsi_command(*extra: str) -> Callable[[Path, Path], list[str]]:
    """Our CLI (the console script next to this interpreter, else on PATH)."""
    local = Path(sys.executable).with_name("wsi")
    exe = str(local) if local.exists() else "wsi"
    return lambda src, out: [exe, "convert", str(src), "--out", str(out), "--no-progress", *extra]


def _vips_command(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", VIPS_SCRIPT, str(src), str(out / "out.tif")]


def _wsidicomizer_command(src: Path, out: Path) -> list[str]:
    local = Path(sys.executable).with_name("wsidicomizer")
    exe = str(local) if local.exists() else "wsidicomizer"
    # wsidicomizer insists on creating its output folder itself.
    return [exe, "-i", str(src), "-o", str(out / "dicom")]


TOOLS: tuple[Tool, ...] = (
    Tool("wsi", "wsi convert (defaults: reuses exact-2x source levels)", _wsi_command()),
    Tool(
        "wsi-no-reuse",
        "wsi convert --no-reuse-levels (all levels derived from the base)",
        _wsi_command("--no-reuse-levels"),
    ),
    Tool("vips", "pyvips tiffsave, tiled JPEG Q85 pyramid, BigTIFF", _vips_command),
    Tool("wsidicomizer", "wsidicomizer -i SRC -o DIR (DICOM WSI)", _wsidicomizer_command),
)


@dataclasses.dataclass
class Run:
    """One measured invocation of a tool."""

    seconds: float
    peak_rss_bytes: int
    output_bytes: int
    returncode: int
    error: str | None = None


@dataclasses.dataclass
class Result:
    """All runs of one tool and their summary."""

    tool: str
    description: str
    command: list[str]
    runs: list[Run] = dataclasses.field(default_factory=list)

    @property
    def ok_runs(self) -> list[Run]:
        return [run for run in self.runs if run.error is None]

    @property
    def failed(self) -> bool:
        return not self.ok_runs

    @property
    def error(self) -> str | None:
        errors = [run.error for run in self.runs if run.error is not None]
        return errors[0] if errors else None

    @property
    def median_s(self) -> float | None:
        return statistics.median(r.seconds for r in self.ok_runs) if self.ok_runs else None

    @property
    def peak_rss_bytes(self) -> int | None:
        return max(r.peak_rss_bytes for r in self.ok_runs) if self.ok_runs else None

    @property
    def output_bytes(self) -> int | None:
        return self.ok_runs[-1].output_bytes if self.ok_runs else None


def tree_rss(proc: psutil.Process) -> int:
    """Sum of the RSS of ``proc`` and all its live descendants (0 if it is gone)."""
    total = 0
    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for member in members:
        with contextlib.suppress(psutil.Error):  # exited between listing and sampling
            total += member.memory_info().rss
    return total


def dir_bytes(path: Path) -> int:
    """Total size of the regular files under ``path``."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def last_line(*texts: str) -> str:
    """The last non-empty line of the first text that has one (for error reports)."""
    for text in texts:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return "(no output)"


def measure(command: Sequence[str], out_dir: Path, log_path: Path) -> Run:
    """Run ``command`` with a fresh ``out_dir``; time it and sample its tree's RSS."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w+") as log:
        start = time.perf_counter()
        proc = psutil.Popen(list(command), stdout=log, stderr=subprocess.STDOUT)
        peak = 0
        while True:
            peak = max(peak, tree_rss(proc))
            try:
                returncode = proc.wait(timeout=POLL_INTERVAL_S)
                break
            except psutil.TimeoutExpired:
                continue
        seconds = time.perf_counter() - start
        log.seek(0)
        output = log.read()
    run = Run(seconds, peak, dir_bytes(out_dir), returncode)
    if returncode != 0:
        run.error = f"exit {returncode}: {last_line(output)}"
    shutil.rmtree(out_dir)  # keep the disk free for the next run
    return run


def ensure_source(width: int, height: int, seed: int) -> Path:
    """The generated slide for this size and seed, generating it if missing."""
    path = OUT / f"slide_{width}x{height}_seed{seed}.tif"
    if not path.exists():
        print(f"generating {path} ...", flush=True)
        tmp = path.with_suffix(".tmp.tif")
        subprocess.run(
            [
                sys.executable,
                str(GENERATOR),
                str(tmp),
                f"--width={width}",
                f"--height={height}",
                f"--seed={seed}",
            ],
            check=True,
        )
        tmp.rename(path)
    return path


def warm_page_cache(path: Path) -> None:
    """Read the source once so that every tool, and every repeat, sees it cached."""
    with path.open("rb") as f:
        while f.read(16 << 20):
            pass


def versions() -> dict[str, str]:
    """Versions of the tools under test."""
    found = {"libvips": ".".join(str(pyvips.version(i)) for i in range(3))}
    for dist in ("wsistore", "pyvips", "wsidicomizer", "wsidicom", "opentile"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def reference_mps(results: Sequence[Result], megapixels: float) -> float | None:
    """MP/s of the reference tool (vips), if it ran."""
    for result in results:
        if result.tool == REFERENCE and result.median_s:
            return megapixels / result.median_s
    return None


def summary(
    result: Result, megapixels: float, source_bytes: int, ref_mps: float | None
) -> dict[str, object]:
    """One tool's results as a JSON-able dict."""
    mps = megapixels / result.median_s if result.median_s else None
    out = result.output_bytes
    return {
        "tool": result.tool,
        "description": result.description,
        "command": result.command,
        "median_s": result.median_s,
        "megapixels_per_s": mps,
        "peak_rss_bytes": result.peak_rss_bytes,
        "output_bytes": out,
        "output_to_source": out / source_bytes if out is not None else None,
        "vs_vips": mps / ref_mps if mps and ref_mps else None,
        "error": result.error,
        "runs": [dataclasses.asdict(run) for run in result.runs],
    }


def format_table(results: Sequence[Result], megapixels: float, source_bytes: int) -> str:
    """The results as a fixed-width text table."""
    ref_mps = reference_mps(results, megapixels)
    header = (
        f"{'tool':<14}{'median s':>10}{'MP/s':>9}{'peak RSS MB':>13}"
        f"{'output bytes':>16}{'out/src':>9}{'vs vips':>9}"
    )
    lines = [header, "-" * len(header)]
    for result in results:
        row = summary(result, megapixels, source_bytes, ref_mps)
        if result.failed:
            lines.append(f"{result.tool:<14}FAILED: {result.error}")
            continue
        vs = row["vs_vips"]
        lines.append(
            f"{result.tool:<14}{row['median_s']:>10.2f}{row['megapixels_per_s']:>9.1f}"
            f"{(result.peak_rss_bytes or 0) / 1e6:>13.0f}{row['output_bytes']:>16,}"
            f"{row['output_to_source']:>9.2f}"
            + (f"{vs:>8.2f}x" if isinstance(vs, float) else f"{'n/a':>9}")
        )
        if result.error:
            lines.append(f"{'':<14}(some runs failed: {result.error})")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, help="existing slide (default: generate one)")
    parser.add_argument("--width", type=int, default=40000, help="generated slide width")
    parser.add_argument("--height", type=int, default=30000, help="generated slide height")
    parser.add_argument("--seed", type=int, default=0, help="generated slide seed")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool (median reported)")
    parser.add_argument(
        "--tools",
        default=",".join(t.name for t in TOOLS),
        help="comma-separated subset of: " + ", ".join(t.name for t in TOOLS),
    )
    parser.add_argument("--json", type=Path, default=OUT / "convert.json", help="results file")
    args = parser.parse_args(argv)
    known = {t.name for t in TOOLS}
    args.tools = [name.strip() for name in args.tools.split(",") if name.strip()]
    unknown = sorted(set(args.tools) - known)
    if unknown:
        parser.error(f"unknown tool(s): {', '.join(unknown)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    src = (args.src or ensure_source(args.width, args.height, args.seed)).resolve()
    header = pyvips.Image.new_from_file(str(src))
    width, height = header.width, header.height
    megapixels = width * height / 1e6
    source_bytes = src.stat().st_size
    print(f"source: {src} ({width}x{height}, {megapixels:,.1f} MP, {source_bytes:,} bytes)")
    print(f"cpus: {os.cpu_count()}, repeats: {args.repeat}", flush=True)
    warm_page_cache(src)

    tools = [t for t in TOOLS if t.name in args.tools]
    runs_dir = OUT / "runs"
    results = [Result(t.name, t.description, t.command(src, runs_dir / t.name)) for t in tools]
    for repeat in range(1, args.repeat + 1):
        for tool, result in zip(tools, results, strict=True):
            log = OUT / "logs" / f"{tool.name}-{repeat}.log"
            run = measure(result.command, runs_dir / tool.name, log)
            result.runs.append(run)
            status = "ok" if run.error is None else f"FAILED ({run.error})"
            print(
                f"  [{repeat}/{args.repeat}] {tool.name:<14}{run.seconds:8.2f} s"
                f"{run.peak_rss_bytes / 1e6:8.0f} MB{run.output_bytes:>15,} B  {status}",
                flush=True,
            )

    print()
    print(format_table(results, megapixels, source_bytes))
    ref_mps = reference_mps(results, megapixels)
    report = {
        "source": {
            "path": str(src),
            "width": width,
            "height": height,
            "megapixels": megapixels,
            "bytes": source_bytes,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "versions": versions(),
        "repeat": args.repeat,
        "reference": REFERENCE,
        "results": [summary(r, megapixels, source_bytes, ref_mps) for r in results],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
