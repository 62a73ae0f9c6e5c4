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

This module holds the options and the run; beside it ``s3_convert.py`` (the conversions),
``s3_reads.py`` (range, range64, index, sample) and ``s3_cold.py`` (the cold tiles).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from convert_sources import OUT, ROOT, ensure_source  # bench/convert_sources.py
from s3_cold import bench_cold, report_cold
from s3_convert import bench_convert, report_convert
from s3_reads import bench_reads, bench_sample, report_reads

sys.path.insert(0, str(ROOT))

from tests import s3server
from wsi.store.objects import Store, StoreSettings


def report(results: dict[str, Any]) -> None:
    report_convert(results)
    report_reads(results)
    report_cold(results)


def cold_only(src: Path, server: s3server.SeaweedFS, requests: int, results: dict[str, Any]) -> int:
    """`--cold-only`: the slide converted once into SeaweedFS, then `bench_cold`."""
    from wsi.convert import convert_slide

    store = Store(StoreSettings(server.url("cold"), server.endpoint_url))
    slide_id = convert_slide(src, store).slide_id
    results["cold"] = bench_cold(store, slide_id, server, requests)
    report_cold(results)
    write(results, "s3-cold.json")
    return 0


def write(results: dict[str, Any], name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text(json.dumps(results, indent=2))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
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
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
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
            write(results, "s3-convert.json")
            return 0
        store = Store(StoreSettings(results["convert"]["kept"], server.endpoint_url))
        (slide_id,) = store.published_slides()
        results["reads"] = bench_reads(store, slide_id, args.requests)
        results["sample"] = bench_sample(src, server, max(3, args.repeat))
        results["cold"] = bench_cold(store, slide_id, server, args.requests)
    report(results)
    write(results, "s3.json")
    return 0


@contextlib.contextmanager
def _server(base: Path) -> Iterator[s3server.SeaweedFS]:
    """SeaweedFS with this process's AWS_* environment pointing at it (restored afterwards)."""
    with s3server.run_seaweedfs(base) as server, s3server.pointed_at(server):
        yield server


if __name__ == "__main__":
    sys.exit(main())
