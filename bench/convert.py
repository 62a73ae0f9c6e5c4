"""Benchmark ``wsi convert`` against other converters on one synthetic slide.

Converts the same slide, side by side, with:

* ``wsi``               - our CLI with default settings: publishes both the
                          OME-Zarr and the DICOM-WSI view from the same stored
                          objects, and copies the source's exact-2x JPEG levels
                          instead of re-deriving them;
* ``wsi-zarr``          - the same with ``--format zarr`` (OME-Zarr view only);
* ``wsi-no-reuse``      - our CLI with ``--no-reuse-levels`` (both views):
                          every level is derived from the base by DCT-scaled
                          decoding (the honest comparison with a full
                          re-encode);
* ``wsi-no-reuse-zarr`` - ``--no-reuse-levels --format zarr``;
* ``vips``              - libvips ``tiffsave`` of a tiled JPEG pyramid
                          (through pyvips, in its own Python process; for a
                          JPEG 2000 source the system's ``vips`` CLI, since
                          pyvips' bundled libvips has no JPEG 2000 loader);
* ``wsi-keep-j2k``      - ``--keep-jpeg2000``: a JPEG 2000 source's base tiles
                          kept as they are (``--j2k``);
* ``wsi-keep-jpeg``     - ``--keep-source-jpeg --keep-background``: the source's
                          JPEG tiles stored byte for byte (no Huffman
                          optimisation, no blank-glass test);
* ``wsi-no-huffman``    - ``--keep-source-jpeg``: the source's JPEG tiles byte
                          for byte, blank glass still dropped (the defaults
                          without Huffman optimisation);
* ``wsidicomizer``      - conversion to DICOM WSI (on an NDPI, through
                          opentile's passthrough: ``--ndpi``).
* ``orthanc``           - OrthancWSIDicomizer (Debian package ``orthanc-wsi``)
                          to DICOM WSI in its default passthrough mode (source
                          JPEG tiles copied), ``--threads`` = cores; left out,
                          with one line, when the binary is missing.

Every tool runs as a subprocess. For each run we measure the wall time, the
peak RSS of the process tree (polled every ~20 ms, summing the RSS of the
process and all its descendants; shared pages are counted once per process,
so this is an upper bound) and the bytes written to its output directory,
which is fresh for every run (regular files only, each inode counted once, so
hard links are not double counted). The views the output gives are detected
from the files themselves after the run: ``zarr`` (a ``zarr.json`` or
``.zgroup``), ``dicom`` (a file with the Part 10 ``DICM`` magic at offset 128)
and ``tiff`` (a file with a TIFF/BigTIFF header). Each tool runs ``--repeat``
times, interleaved (a, b, c, d, a, b, ...), and the median time is reported.

After the table two checks are printed, from the medians and output sizes:
the DICOM overhead of publishing both views (``wsi`` vs ``wsi-zarr`` and
``wsi-no-reuse`` vs ``wsi-no-reuse-zarr``; target <= 10% slower) and the
bytes stored for both views together (``wsi`` and ``wsi-no-reuse``; target
<= 1.05x the source for a JPEG source).

Usage::

    python bench/convert.py                        # 40000x30000, 3 repeats
    python bench/convert.py --width 8000 --height 6000 --repeat 1
    python bench/convert.py --src some.tif --tools wsi,vips
    python bench/convert.py --base-only --tools wsi,vips   # level 0 only: all levels built

The slide is generated (once) by ``sample_data/generate.py`` into
``bench/out/``; the table is printed and the results are written to
``bench/out/convert.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
from convert_checks import (
    BASE_ONLY_MAX_RSS_MB,
    BASE_ONLY_TARGET_SPEEDUP,
    ORTHANC_TARGET_SPEEDUP,
    ORTHANC_TOOLS,
    base_only_checks,
    both_views_checks,
    dicom_overhead_checks,
    format_checks,
    format_speedup_checks,
    format_wsidicomizer_checks,
    speedup_checks,
    wsidicomizer_checks,
)
from convert_report import TOOL_WIDTH, document, format_table
from convert_results import Result, Run
from convert_sources import (
    OUT,
    ROOT,
    ensure_j2k_source,
    ensure_ndpi_source,
    ensure_source,
    source_compression,
    source_dimensions,
    source_files,
    source_levels,
    warm_page_cache,
)

from wsi.published.layout.keys import MANIFEST
from wsi.published.layout.manifest import MADE_HERE

#: Tools run on a JPEG 2000 source (Aperio 33005) and their speed-up over vips aimed at.
J2K_TOOLS: tuple[str, ...] = ("wsi", "wsi-zarr", "wsi-keep-j2k", "vips")
J2K_TARGET_SPEEDUP = 2.0

#: How often the process tree's memory is sampled.
POLL_INTERVAL_S = 0.02

#: Order of the views in the "views" column.
VIEW_ORDER = ("zarr", "dicom", "tiff")
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

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
    #: The views the output should give, as detected by ``detect_views``.
    views: str
    command: Callable[[Path, Path], list[str]]
    #: An executable that must be on PATH (the tool is left out, with one line, without it).
    binary: str | None = None


def _wsi_command(*extra: str) -> Callable[[Path, Path], list[str]]:
    """Our CLI (the console script next to this interpreter, else on PATH)."""
    local = Path(sys.executable).with_name("wsi")
    exe = str(local) if local.exists() else "wsi"
    return lambda src, out: [exe, "convert", str(src), "--out", str(out), "--no-progress", *extra]


def _vips_command(src: Path, out: Path) -> list[str]:
    if source_compression(src).startswith("APERIO_JP2000"):
        # pyvips-binary's libvips has no JPEG 2000 loader; the system's vips (Debian
        # libvips-tools: OpenJPEG and OpenSlide) reads the slide through OpenSlide.
        tiled = ["--tile", "--pyramid", "--compression", "jpeg", "--Q", "85", "--bigtiff"]
        tiled += ["--tile-width", "256", "--tile-height", "256"]
        return ["vips", "tiffsave", str(src), str(out / "out.tif"), *tiled]
    return [sys.executable, "-c", VIPS_SCRIPT, str(src), str(out / "out.tif")]


def _orthanc_command(src: Path, out: Path) -> list[str]:
    threads = str(os.cpu_count() or 1)
    return ["OrthancWSIDicomizer", "--threads", threads, "--folder", str(out), str(src)]


def _wsidicomizer_command(src: Path, out: Path) -> list[str]:
    local = Path(sys.executable).with_name("wsidicomizer")
    exe = str(local) if local.exists() else "wsidicomizer"
    # wsidicomizer insists on creating its output folder itself.
    return [exe, "-i", str(src), "-o", str(out / "dicom")]


TOOLS: tuple[Tool, ...] = (
    Tool(
        "wsi",
        "wsi convert (defaults: OME-Zarr + DICOM views, reuses exact-2x source levels)",
        "zarr+dicom",
        _wsi_command(),
    ),
    Tool(
        "wsi-zarr",
        "wsi convert --format zarr (OME-Zarr view only, reuses exact-2x source levels)",
        "zarr",
        _wsi_command("--format", "zarr"),
    ),
    Tool(
        "wsi-no-reuse",
        "wsi convert --no-reuse-levels (both views, all levels derived from the base)",
        "zarr+dicom",
        _wsi_command("--no-reuse-levels"),
    ),
    Tool(
        "wsi-no-reuse-zarr",
        "wsi convert --no-reuse-levels --format zarr (OME-Zarr view only)",
        "zarr",
        _wsi_command("--no-reuse-levels", "--format", "zarr"),
    ),
    Tool(
        "wsi-keep-jpeg",
        "wsi convert --keep-source-jpeg --keep-background (source tiles byte for byte)",
        "zarr+dicom",
        _wsi_command("--keep-source-jpeg", "--keep-background"),
    ),
    Tool(
        "wsi-no-huffman",
        "wsi convert --keep-source-jpeg (source tiles byte for byte, blank glass dropped)",
        "zarr+dicom",
        _wsi_command("--keep-source-jpeg"),
    ),
    Tool(
        "wsi-keep-j2k",
        "wsi convert --keep-jpeg2000 (a JPEG 2000 source's base tiles kept as they are)",
        "zarr+dicom",
        _wsi_command("--keep-jpeg2000"),
    ),
    Tool("vips", "pyvips tiffsave, tiled JPEG Q85 pyramid, BigTIFF", "tiff", _vips_command),
    Tool(
        "wsidicomizer",
        "wsidicomizer -i SRC -o DIR (DICOM WSI)",
        "dicom",
        _wsidicomizer_command,
    ),
    Tool(
        "orthanc",
        "OrthancWSIDicomizer --threads CORES --folder DIR (DICOM WSI, passthrough)",
        "dicom",
        _orthanc_command,
        "OrthancWSIDicomizer",
    ),
)


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
    """Total size of the regular files under ``path``, each inode counted once.

    Hard links (e.g. a DICOM export linking to the stored level objects) are
    the same bytes on disk, so they count once; symlinks are not followed.
    """
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def detect_views(path: Path) -> str:
    """The views the files under ``path`` give, e.g. ``"zarr+dicom"`` (``"none"``)."""
    found: set[str] = set()
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            if name in ("zarr.json", ".zgroup"):
                found.add("zarr")
                continue
            file = os.path.join(dirpath, name)
            if not stat.S_ISREG(os.lstat(file).st_mode):
                continue
            with open(file, "rb") as f:
                head = f.read(132)
            if head[128:132] == b"DICM":
                found.add("dicom")
            elif head[:4] in TIFF_MAGICS:
                found.add("tiff")
    return "+".join(view for view in VIEW_ORDER if view in found) or "none"


def levels_made(path: Path) -> tuple[int, int] | None:
    """(levels made by the conversion, levels published) from the level origins of the manifest
    under `path` (`wsi.published.layout.manifest`), or None where there is none: the bytes of a
    level made here are pixels the source did not store, which a size target against the
    source cannot count."""
    for manifest in path.glob(f"*/{MANIFEST}"):
        origins = json.loads(manifest.read_text()).get("levels") or []
        if origins:
            made = sum(1 for origin in origins if origin.get("method") in MADE_HERE)
            return made, len(origins)
    return None


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
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
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
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        log.seek(0)
        output = log.read()
    views = detect_views(out_dir)
    made = levels_made(out_dir)
    run = Run(seconds, peak, dir_bytes(out_dir), returncode, views, None, cpu, made)
    if returncode != 0:
        run.error = f"exit {returncode}: {last_line(output)}"
    shutil.rmtree(out_dir)  # keep the disk free for the next run
    return run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, help="existing slide (default: generate one)")
    parser.add_argument("--width", type=int, default=40000, help="generated slide width")
    parser.add_argument("--height", type=int, default=30000, help="generated slide height")
    parser.add_argument("--seed", type=int, default=0, help="generated slide seed")
    parser.add_argument(
        "--ndpi",
        action="store_true",
        help="generate a Hamamatsu NDPI (sample_data/make_ndpi.py) instead of a TIFF; "
        "wsi is then also compared with wsidicomizer (target >= 2x)",
    )
    parser.add_argument(
        "--j2k",
        action="store_true",
        help="generate an Aperio JPEG 2000 SVS (sample_data/make_j2k.py) instead of a TIFF; "
        f"the tools default to {','.join(J2K_TOOLS)} (target >= {J2K_TARGET_SPEEDUP:g}x vips)",
    )
    parser.add_argument(
        "--base-only",
        action="store_true",
        help="generate the slide with level 0 only (every other level is built by each "
        f"tool); wsi is then checked against vips (target >= {BASE_ONLY_TARGET_SPEEDUP:g}x, "
        f"peak RSS <= {BASE_ONLY_MAX_RSS_MB} MB)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool (median reported)")
    parser.add_argument(
        "--tools",
        default=None,
        metavar="NAME[,NAME...]",
        help="comma-separated subset of the tools (default: all; with --j2k, its tools): "
        + "; ".join(f"{t.name} = {t.description}" for t in TOOLS),
    )
    parser.add_argument("--json", type=Path, default=OUT / "convert.json", help="results file")
    parser.add_argument(
        "--work",
        type=Path,
        default=OUT,
        help="where each run's output and log go (runs/, logs/): another folder lets two "
        "benchmarks run at once without removing each other's output",
    )
    args = parser.parse_args(argv)
    if args.tools is None:
        args.tools = ",".join(J2K_TOOLS if args.j2k else (t.name for t in TOOLS))
    known = {t.name for t in TOOLS}
    args.tools = [name.strip() for name in args.tools.split(",") if name.strip()]
    unknown = sorted(set(args.tools) - known)
    if unknown:
        parser.error(
            f"unknown tool(s): {', '.join(unknown)} "
            f"(choose from: {', '.join(t.name for t in TOOLS)})"
        )
    if not args.tools:
        parser.error("--tools names no tool")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def compile_bytecode() -> None:
    """Byte-compile our packages, as an installation from a wheel is: the Python tools compared
    (pyvips, wsidicomizer) come with bytecode in site-packages, while an editable checkout is
    compiled at its first import, and not at all where PYTHONDONTWRITEBYTECODE is set (then
    every run would compile ~80 modules, ~0.1 s)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    packages = [str(ROOT / name) for name in ("wsi", "server")]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *packages], env=env, check=True)


def choose_source(args: argparse.Namespace) -> Path:
    """`--src`, else the slide generated for `--ndpi`, `--j2k`, `--base-only` or none of them."""
    if args.src:
        return args.src.resolve()
    if args.ndpi:
        return ensure_ndpi_source(args.width, args.height, args.seed).resolve()
    if args.j2k:
        return ensure_j2k_source(args.width, args.height, args.seed).resolve()
    return ensure_source(args.width, args.height, args.seed, args.base_only).resolve()


def describe_source(src: Path) -> dict[str, Any]:
    """What the table and the checks need of the source (and the results file says): path,
    width and height (pixels), megapixels, bytes of all its files, compression."""
    width, height = source_dimensions(src)
    return {
        "path": str(src),
        "width": width,
        "height": height,
        "megapixels": width * height / 1e6,
        "bytes": sum(f.stat().st_size for f in source_files(src)),
        "compression": source_compression(src),
    }


def available_tools(names: Sequence[str]) -> list[Tool]:
    """The tools named, in the table's order, less those whose binary is missing (one line
    each)."""
    tools = []
    for tool in (t for t in TOOLS if t.name in names):
        if tool.binary and shutil.which(tool.binary) is None:
            print(f"{tool.name}: {tool.binary} not found (apt-get install orthanc-wsi), not run")
            continue
        tools.append(tool)
    return tools


def run_rounds(tools: Sequence[Tool], results: Sequence[Result], repeat: int, work: Path) -> None:
    """`repeat` rounds of every tool in turn (a, b, c, a, b, c, ...), each run appended to its
    tool's result and printed."""
    for turn in range(1, repeat + 1):
        for tool, result in zip(tools, results, strict=True):
            log = work / "logs" / f"{tool.name}-{turn}.log"
            run = measure(result.command, work / "runs" / tool.name, log)
            result.runs.append(run)
            status = "ok" if run.error is None else f"FAILED ({run.error})"
            print(
                f"  [{turn}/{repeat}] {tool.name:<{TOOL_WIDTH}}{run.seconds:8.2f} s"
                f"{run.peak_rss_bytes / 1e6:8.0f} MB{run.output_bytes:>15,} B"
                f"  {run.views:<11} cpu {run.cpu_seconds:.2f} s {status}",
                flush=True,
            )


def print_checks(results: Sequence[Result], src: Path, source: dict[str, Any]) -> dict[str, Any]:
    """The target checks after the table, printed; returned for the results file."""
    overhead = dicom_overhead_checks(results)
    stored = both_views_checks(results, source["bytes"], source["compression"])
    checks_text = format_checks(overhead, stored)
    if checks_text:
        print()
        print(checks_text)
    contender = wsidicomizer_checks(results, src)
    if contender:
        print(format_wsidicomizer_checks(contender))
    orthanc = speedup_checks(results, "orthanc", ORTHANC_TOOLS, ORTHANC_TARGET_SPEEDUP)
    base_only = base_only_checks(results, source_levels(src))
    if orthanc or base_only:
        print(format_speedup_checks([*orthanc, *base_only]))
    return {
        "dicom_overhead": overhead,
        "both_views_stored": stored,
        "vs_wsidicomizer": contender,
        "vs_orthanc": orthanc,
        "base_only_vs_vips": base_only,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    src = choose_source(args)
    source = describe_source(src)
    megapixels, source_bytes = source["megapixels"], source["bytes"]
    print(
        f"source: {src} ({source['width']}x{source['height']}, {megapixels:,.1f} MP, "
        f"{source_bytes:,} bytes, {source['compression']})"
    )
    print(f"cpus: {os.cpu_count()}, repeats: {args.repeat}", flush=True)
    for part in source_files(src):
        warm_page_cache(part)
    compile_bytecode()

    tools = available_tools(args.tools)
    results = [
        Result(t.name, t.description, t.views, t.command(src, args.work / "runs" / t.name))
        for t in tools
    ]
    run_rounds(tools, results, args.repeat, args.work)

    print()
    print(format_table(results, megapixels, source_bytes))
    checks = print_checks(results, src, source)
    report = document(source, args.repeat, results, checks)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
