"""Benchmark random patches decoded to numpy: our reader against OpenSlide and zarr-python.

The same random ``--size`` patches (top-left corners uniform over the level, inside it) of level
0 and level 1, in ONE run, with the same ``--threads`` for every contender; every contender
writes each patch as (size, size, 3) uint8 RGB into a preallocated array:

* ``ours-local``      - ``open_published(store/<id>).patches(level, coords, size)``, the reader's
                        pool with ``--threads`` threads (its S3 and local reads are asynchronous);
* ``ours-s3``         - the same on SeaweedFS (started with the launcher of ``tests/s3server.py``
                        on 127.0.0.1, the slide converted into it); ``--no-s3`` skips it;
* ``openslide-shared``- OpenSlide ``read_region`` on the source file, ``--threads`` threads
                        sharing one ``OpenSlide`` handle, RGBA -> RGB by dropping alpha (the
                        slide is opaque);
* ``openslide-own``   - the same with one handle per thread;
* ``zarr``            - zarr-python 3 on our local output:
                        ``zarr.open_group(...)[str(level)][:, y:y+size, x:x+size]``, moved to
                        channels-last, from ``--threads`` threads (zarr's own pool set to the
                        same number).

Every contender opens its handles afresh for each run (no tile cache carried between runs; the
files are in the OS page cache, read once before). The runs are interleaved (a, b, c, ... a, b,
...), ``--repeat`` times, and the median patches/s is reported. The faster of the two OpenSlide
variants is "openslide" in the ratios. Every contender's pixels are compared with ours-local's
(exact equality expected: level 0 and the exact-2x level 1 are the source's own JPEG tiles).

Targets: ours-local >= 2x openslide and >= 2x zarr; ours-s3 >= openslide.

Usage::

    python bench/patches.py                          # 40000x30000 generated slide, 3 repeats
    python bench/patches.py --width 8000 --height 6000 --patches 500 --repeat 1
    python bench/patches.py --src some.svs --no-s3

The slide is generated once by ``sample_data/generate.py`` into ``bench/out/`` and converted
into ``bench/out/patches-store``; results are printed and written to ``bench/out/patches.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from convert_sources import ensure_source, warm_page_cache  # bench/convert_sources.py
from serve import convert  # bench/serve.py
from serve_cold import seaweedfs  # bench/serve_cold.py

from wsi.codecs.colour import srgb_to_lab
from wsi.pyramid.background import DELTA_E76

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
S3_PREFIX = "patches"

TARGET_LOCAL_VS_OPENSLIDE = 2.0
TARGET_LOCAL_VS_ZARR = 2.0
TARGET_S3_VS_OPENSLIDE = 1.0

Reader = Callable[[int, np.ndarray, np.ndarray], None]
"""read(level, coords, out): fills out[i] with the patch at coords[i] of that level."""


@dataclass
class Contender:
    name: str
    description: str
    open: Callable[[], tuple[Reader, Callable[[], None]]]
    """Fresh handles for one run: the reader and how to close it."""
    server_pid: int | None = None
    """The S3 server's process, whose CPU time the run also costs."""


@dataclass
class Result:
    name: str
    level: int
    size: int
    """Patch width and height (pixels)."""
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    """CPU time of this process (all threads) per run."""
    server_cpu_seconds: list[float] = field(default_factory=list)
    """CPU time of the S3 server per run (ours-s3 only)."""
    mismatches: int | None = None
    """Patches with a pixel beyond the blank-glass tolerance of ours-local's (None: not
    compared)."""
    tolerated: int = 0
    """Patches that differ from ours-local's only within that tolerance: blank glass, which
    the store keeps as its fill grey while OpenSlide decodes the source's glass."""

    def patches_per_s(self, n: int) -> float:
        return n / statistics.median(self.seconds)

    def megapixels_per_s(self, n: int) -> float:
        return self.patches_per_s(n) * self.size * self.size / 1e6

    def cpu_ms_per_patch(self, n: int) -> tuple[float, float | None]:
        """Median CPU milliseconds per patch: this process, and the S3 server (or None)."""
        ours = statistics.median(self.cpu_seconds) / n * 1000
        if not self.server_cpu_seconds:
            return ours, None
        return ours, statistics.median(self.server_cpu_seconds) / n * 1000


def ratio_line(name: str, value: float, target: float) -> str:
    """One ratio against its target, as the report prints it."""
    verdict = "ok" if value >= target else "MISSED"
    return f"  {name:<22}{value:8.2f}x   target >= {target:g}x   {verdict}"


def cpu_seconds(pid: int | None) -> float:
    """CPU time so far of this process (pid None) or of another one."""
    if pid is None:
        return time.process_time()
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def split(n: int, parts: int) -> list[range]:
    """`n` items in `parts` contiguous ranges (some may be empty)."""
    bounds = [n * k // parts for k in range(parts + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(parts)]


# -- contenders -----------------------------------------------------------------------------------
def ours(location: str, threads: int, endpoint: str | None) -> Callable[[], tuple[Reader, Any]]:
    def start() -> tuple[Reader, Callable[[], None]]:
        from wsi import ReaderSettings, open_published

        slide = open_published(
            location, s3_endpoint=endpoint, settings=ReaderSettings(threads=threads)
        )

        def read(level: int, coords: np.ndarray, out: np.ndarray) -> None:
            slide.patches(level, coords, out.shape[2], out=out)

        return read, slide.close

    return start


def openslide_reader(src: Path, threads: int, shared: bool) -> Callable[[], tuple[Reader, Any]]:
    def start() -> tuple[Reader, Callable[[], None]]:
        import openslide

        handles = [openslide.OpenSlide(str(src)) for _ in range(1 if shared else threads)]
        pool = ThreadPoolExecutor(threads, thread_name_prefix="openslide")

        def read(level: int, coords: np.ndarray, out: np.ndarray) -> None:
            size = out.shape[2]
            ds = handles[0].level_downsamples[level]

            def part(k: int, numbers: range) -> None:
                handle = handles[0 if shared else k]
                for i in numbers:
                    x, y = coords[i]
                    location = (round(x * ds), round(y * ds))
                    rgba = handle.read_region(location, level, (size, size))
                    out[i] = np.asarray(rgba)[:, :, :3]

            list(pool.map(part, range(threads), split(len(coords), threads)))

        def close() -> None:
            pool.shutdown()
            for handle in handles:
                handle.close()

        return read, close

    return start


def zarr_reader(root: Path, threads: int) -> Callable[[], tuple[Reader, Any]]:
    def start() -> tuple[Reader, Callable[[], None]]:
        import zarr

        import wsi.codecs.zarr_jpeg  # noqa: F401  (registers our JPEG codec)

        zarr.config.set({"threading.max_workers": threads})
        group = zarr.open_group(str(root), mode="r")
        pool = ThreadPoolExecutor(threads, thread_name_prefix="zarr")

        def read(level: int, coords: np.ndarray, out: np.ndarray) -> None:
            array = group[str(level)]
            assert isinstance(array, zarr.Array), level
            size = out.shape[2]

            def part(numbers: range) -> None:
                for i in numbers:
                    x, y = coords[i]
                    out[i] = np.moveaxis(np.asarray(array[:, y : y + size, x : x + size]), 0, -1)

            list(pool.map(part, split(len(coords), threads)))

        return read, pool.shutdown

    return start


# -- the run --------------------------------------------------------------------------------------
def random_coords(width: int, height: int, size: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, width - size + 1, n)
    y = rng.integers(0, height - size + 1, n)
    return np.stack([x, y], axis=1)


def tiles_touched(coords: np.ndarray, size: int, tile: int) -> tuple[int, int]:
    """(tile reads one patch at a time would make, distinct tiles) for these patches."""
    c0, r0 = coords[:, 0] // tile, coords[:, 1] // tile
    c1, r1 = (coords[:, 0] + size - 1) // tile, (coords[:, 1] + size - 1) // tile
    touched = int(((c1 - c0 + 1) * (r1 - r0 + 1)).sum())
    distinct = {
        (c, r)
        for a, b, e, f in zip(c0.tolist(), r0.tolist(), c1.tolist(), r1.tolist(), strict=True)
        for r in range(b, f + 1)
        for c in range(a, e + 1)
    }
    return touched, len(distinct)


def run_all(
    contenders: Sequence[Contender],
    levels: Sequence[int],
    coords: dict[int, np.ndarray],
    size: int,
    repeat: int,
) -> list[Result]:
    results = {(c.name, k): Result(c.name, k, size) for c in contenders for k in levels}
    reference: dict[int, np.ndarray] = {}
    for turn in range(1, repeat + 1):
        for contender in contenders:
            for k in levels:
                out = np.zeros((len(coords[k]), size, size, 3), np.uint8)
                read, close = contender.open()
                try:
                    cpu, server = cpu_seconds(None), cpu_seconds(contender.server_pid)
                    start = time.perf_counter()
                    read(k, coords[k], out)
                    seconds = time.perf_counter() - start
                    cpu, server = (
                        cpu_seconds(None) - cpu,
                        cpu_seconds(contender.server_pid) - server,
                    )
                finally:
                    close()
                result = results[(contender.name, k)]
                result.seconds.append(seconds)
                result.cpu_seconds.append(cpu)
                if contender.server_pid is not None:
                    result.server_cpu_seconds.append(server)
                if contender.name == "ours-local" and k not in reference:
                    reference[k] = out
                elif turn == 1 and k in reference:
                    result.mismatches, result.tolerated = compare(out, reference[k])
                print(
                    f"  [{turn}/{repeat}] {contender.name:<17} level {k}: {seconds:7.2f} s "
                    f"{len(coords[k]) / seconds:9,.0f} patches/s",
                    flush=True,
                )
    for k in levels:
        results[("ours-local", k)].mismatches = 0
    return list(results.values())


def compare(out: np.ndarray, reference: np.ndarray) -> tuple[int, int]:
    """(patches differing beyond the blank-glass tolerance, patches differing only within it).
    A blank tile is stored as the slide's fill grey when every pixel of it is within Delta-E76
    `DELTA_E76` of that grey (`wsi.pyramid.background`), so a reader of the source may differ
    there by up to that much, and nowhere else."""
    differ = np.flatnonzero(~(out == reference).all(axis=(1, 2, 3)))
    beyond = 0
    for i in differ:
        delta = np.linalg.norm(srgb_to_lab(out[i]) - srgb_to_lab(reference[i]), axis=-1)
        beyond += int(delta.max() > DELTA_E76 + 1e-6)
    return beyond, len(differ) - beyond


def ratios(results: Sequence[Result], levels: Sequence[int], n: int) -> dict[str, Any]:
    """The three target ratios per level, with the faster OpenSlide variant as 'openslide'."""
    by = {(r.name, r.level): r.patches_per_s(n) for r in results}
    report: dict[str, Any] = {}
    for k in levels:
        variants = [v for v in ("openslide-shared", "openslide-own") if (v, k) in by]
        best = max(variants, key=lambda v: by[(v, k)]) if variants else None
        entry: dict[str, Any] = {"openslide": best}
        checks = [
            ("ours-local", best, TARGET_LOCAL_VS_OPENSLIDE, "local/openslide"),
            ("ours-local", "zarr", TARGET_LOCAL_VS_ZARR, "local/zarr"),
            ("ours-s3", best, TARGET_S3_VS_OPENSLIDE, "s3/openslide"),
        ]
        for ours_name, other, target, label in checks:
            if other is None or (ours_name, k) not in by or (other, k) not in by:
                continue
            value = by[(ours_name, k)] / by[(other, k)]
            entry[label] = {"ratio": value, "target": target, "ok": value >= target}
        report[f"level {k}"] = entry
    return report


def print_table(
    results: Sequence[Result], n: int, report: dict[str, Any], touched: dict[int, tuple[int, int]]
) -> None:
    print()
    print(
        f"{'contender':<18}{'level':>6}{'patches/s':>11}{'MP/s':>8}{'CPU ms/patch':>14}"
        f"{'pixels':>8}  runs (s)"
    )
    for r in results:
        rate = r.patches_per_s(n)
        runs = " ".join(f"{s:.2f}" for s in r.seconds)
        agree = "n/a" if r.mismatches is None else "same" if not r.mismatches else "DIFFER"
        if agree == "same" and r.tolerated:
            agree = "blank~"
        mine, server = r.cpu_ms_per_patch(n)
        cpu = f"{mine:.2f}" + (f"+{server:.2f}" if server is not None else "")
        print(
            f"{r.name:<18}{r.level:>6}{rate:11,.0f}{r.megapixels_per_s(n):8.1f}{cpu:>14}"
            f"{agree:>8}  {runs}"
        )
    print(
        "(medians over the runs; CPU: this process's threads, + the S3 server's for ours-s3; "
        "pixels: compared with ours-local, patch by patch; blank~: equal but where the store "
        f"keeps blank glass as its fill grey, within Delta-E76 {DELTA_E76})"
    )
    for k, (total, distinct) in touched.items():
        print(
            f"level {k}: the {n} patches touch {total} tiles, {distinct} distinct "
            f"({total / distinct:.2f} reads per distinct tile one patch at a time)"
        )
    for level, entry in report.items():
        print(f"\n{level} (openslide = {entry['openslide']}, the faster variant)")
        for label, check in entry.items():
            if label != "openslide":
                print(ratio_line(label, check["ratio"], check["target"]))


@contextlib.contextmanager
def s3_slide(src: Path, slide_id: str) -> Iterator[tuple[str, str, int]]:
    """The slide converted into SeaweedFS: (location, endpoint, server process id)."""
    import wsi

    with seaweedfs(None, None) as s3:
        url = s3.url(S3_PREFIX)
        start = time.perf_counter()
        result = wsi.convert_slide(
            src, wsi.Store(wsi.StoreSettings(url, endpoint_url=s3.endpoint_url))
        )
        print(f"SeaweedFS {s3.endpoint_url}: {url} ({time.perf_counter() - start:.1f} s)")
        if result.slide_id != slide_id:
            raise SystemExit(f"S3 slide id {result.slide_id} != local {slide_id}")
        yield f"{url}/{slide_id}", s3.endpoint_url, s3.pid


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--src", type=Path, help="existing slide (default: generate one)")
    parser.add_argument("--width", type=int, default=40000, help="generated slide width")
    parser.add_argument("--height", type=int, default=30000, help="generated slide height")
    parser.add_argument("--seed", type=int, default=0, help="generated slide and patch seed")
    parser.add_argument("--store", type=Path, default=OUT / "patches-store", help="local store")
    parser.add_argument("--patches", type=int, default=1000, help="random patches per level")
    parser.add_argument("--size", type=int, default=256, help="patch width and height")
    parser.add_argument("--levels", default="0,1", help="levels to read (default 0,1)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="threads of every contender"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per contender (median)")
    parser.add_argument("--no-s3", dest="s3", action="store_false", help="skip ours-s3")
    parser.add_argument("--json", type=Path, default=OUT / "patches.json", help="results file")
    args = parser.parse_args(argv)
    args.levels = [int(k) for k in args.levels.split(",") if k.strip()]
    if min(args.patches, args.size, args.threads, args.repeat) < 1 or not args.levels:
        parser.error("--patches, --size, --threads, --repeat and --levels must be positive")
    return args


def publish_locally(args: argparse.Namespace) -> tuple[Path, Path, str]:
    """The source (`--src` or generated) converted into `--store`, both read once into the page
    cache: (source, store, slide id)."""
    src = (args.src or ensure_source(args.width, args.height, args.seed)).resolve()
    store = args.store.resolve()
    slide_id = convert(src, store)
    warm_page_cache(src)
    for path in (store / slide_id).rglob("*"):
        if path.is_file():
            warm_page_cache(path)
    return src, store, slide_id


def draw_patches(
    args: argparse.Namespace, src: Path, location: str
) -> tuple[dict[int, np.ndarray], dict[int, tuple[int, int]]]:
    """Per level asked for, the random patches' top-left corners and the tiles they touch; a
    level OpenSlide sees otherwise than ours is refused (the pixels could not be compared)."""
    import openslide

    from wsi import open_published

    with open_published(location) as slide, openslide.OpenSlide(str(src)) as reference:
        sizes = {k: (slide.level(k).width, slide.level(k).height) for k in args.levels}
        tile = slide.level(0).tile_width
        for k in args.levels:
            if k >= reference.level_count or reference.level_dimensions[k] != sizes[k]:
                raise SystemExit(f"level {k}: OpenSlide's level differs from ours; pick others")
    coords = {
        k: random_coords(*sizes[k], args.size, args.patches, args.seed + k) for k in args.levels
    }
    touched = {k: tiles_touched(coords[k], args.size, tile) for k in args.levels}
    return coords, touched


def local_contenders(
    args: argparse.Namespace, src: Path, store: Path, slide_id: str
) -> list[Contender]:
    """Every contender but ours-s3, in the order they run."""
    location = str(store / slide_id)
    return [
        Contender("ours-local", "our reader, local store", ours(location, args.threads, None)),
        Contender(
            "openslide-shared",
            "OpenSlide read_region, one shared handle",
            openslide_reader(src, args.threads, shared=True),
        ),
        Contender(
            "openslide-own",
            "OpenSlide read_region, one handle per thread",
            openslide_reader(src, args.threads, shared=False),
        ),
        Contender(
            "zarr",
            "zarr-python on our local output",
            zarr_reader(store / slide_id / "slide.zarr", args.threads),
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    src, store, slide_id = publish_locally(args)
    coords, touched = draw_patches(args, src, str(store / slide_id))
    print(
        f"source: {src}\n{args.patches} patches of {args.size} px per level {args.levels}, "
        f"{args.threads} threads, {args.repeat} runs, cpus: {os.cpu_count()}",
        flush=True,
    )
    contenders = local_contenders(args, src, store, slide_id)
    with contextlib.ExitStack() as stack:
        if args.s3:
            s3_location, endpoint, pid = stack.enter_context(s3_slide(src, slide_id))
            reader = ours(s3_location, args.threads, endpoint)
            contenders.insert(1, Contender("ours-s3", "our reader, SeaweedFS", reader, pid))
        results = run_all(contenders, args.levels, coords, args.size, args.repeat)
    report = ratios(results, args.levels, args.patches)
    print_table(results, args.patches, report, touched)
    doc = document(args, src, slide_id, contenders, touched, results, report)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nresults: {args.json}")
    return 0


def document(
    args: argparse.Namespace,
    src: Path,
    slide_id: str,
    contenders: Sequence[Contender],
    touched: dict[int, tuple[int, int]],
    results: Sequence[Result],
    report: dict[str, Any],
) -> dict[str, Any]:
    """The results file: the run's settings and machine, the contenders, the tiles the patches
    touch, every run's seconds and CPU seconds, and the ratios."""
    return {
        "source": str(src),
        "slide_id": slide_id,
        "patches": args.patches,
        "size": args.size,
        "levels": args.levels,
        "threads": args.threads,
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "contenders": {c.name: c.description for c in contenders},
        "note": "seconds and cpu_seconds per run; cpu: this process's threads (all contenders "
        "run in it), server_cpu_seconds: SeaweedFS's",
        "tiles_touched": {str(k): {"touched": t, "distinct": d} for k, (t, d) in touched.items()},
        "results": [{**asdict(r), "patches_per_s": r.patches_per_s(args.patches)} for r in results],
        "ratios": report,
    }


if __name__ == "__main__":
    sys.exit(main())
