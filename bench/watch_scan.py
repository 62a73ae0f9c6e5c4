"""CPU of one poll of a quiet watch folder: a full scan (every file grouped into its slide, as
each poll did before) against a poll answered from the last scan (`ScanMemo`: the folders
listed again, nothing grouped), interleaved in one run, medians of CPU seconds.

The inbox is `--files` small files named like slides (`.svs`: no probe reads them), in
`--folders` folders (the watched one and case folders under it), made once in a temporary
folder:

    .venv/bin/python bench/watch_scan.py --files 5000 --folders 1 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsi.ingest.scan import _find_candidates_cached  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--folders", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        folders = [root] + [root / f"case {i}" for i in range(1, args.folders)]
        for folder in folders:
            folder.mkdir(exist_ok=True)
        for i in range(args.files):
            (folders[i % len(folders)] / f"slide {i:06d}.svs").write_bytes(b"II*\0" + bytes(60))
        found, memo = _find_candidates_cached(root, None)
        assert len(found) == args.files, len(found)
        full, poll = [], []
        for _ in range(args.rounds):
            started = time.process_time()
            again, _ = _find_candidates_cached(root, None)  # no memo: a full scan
            full.append(time.process_time() - started)
            started = time.process_time()
            same, memo = _find_candidates_cached(root, memo)
            poll.append(time.process_time() - started)
            assert again == same == found
    f, p = statistics.median(full), statistics.median(poll)
    print(f"{args.files} files in {args.folders} folder(s), CPU seconds, medians of {args.rounds}")
    print(f"full scan {f:.4f}  poll from the last scan {p:.4f}  ({f / p:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
