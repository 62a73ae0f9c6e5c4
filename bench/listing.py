"""Listings and searches on a store of thousands of slides: `GET /slides`, the viewer's index
page and QIDO-RS `GET /dicomweb/studies`, from `wsi serve --processes 1` of this checkout and,
with `--base DIR`, of another one (its `server` and `wsi` packages with their compiled
extensions, e.g. `git archive <commit> server wsi`), side by side in one run.

The store is one converted slide (`sample_data/CMU-1-Small-Region.svs`) published again under
`--slides` ids, its objects hard-linked (`tests/slide_copies.py`): every slide is opened, and
described, as a different one would be. Each server is started fresh and asked, in turn:

* ``first``  - once, right after it answers `/healthz` (nothing described yet);
* ``within`` - `--rounds` times at once (within the service's 2 s re-check of a slide);
* ``after``  - `--rounds` times, each 2.5 s after the previous request (every slide's version
               read again);
* ``settled`` - once, from another fresh server, `--settle` seconds after it answered
               `/healthz` (a client arriving some time after a start: what the indexes filled
               at start are for);
* ``restart`` - once, right after `/healthz`, from a server started with the state folder
               (`WSI_STATE_DIR`) the first one left: a restart, where the indexes kept between
               starts are read back.

`first` and `settled` start with an empty state folder.

Prints the median seconds of each and the ratios (base / this checkout), and writes
``bench/out/listing.json``.

Usage::

    .venv/bin/python bench/listing.py --slides 2000 --base /tmp/base --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.slide_copies import copy_slide  # noqa: E402

OUT = ROOT / "bench" / "out"
SOURCE = ROOT / "sample_data" / "CMU-1-Small-Region.svs"
PATHS = {"slides": "/slides", "index": "/", "studies": "/dicomweb/studies"}
RECHECK = 2.5
"""Seconds between `after` requests: past the service's 2 s re-check."""


def make_store(slides: int) -> Path:
    """`slides` published copies of one converted slide (made once, kept in bench/out)."""
    store = OUT / f"listing-store-{slides}"
    done = store / ".complete"
    if done.exists():
        return store
    shutil.rmtree(store, ignore_errors=True)
    seed = OUT / "listing-seed"
    shutil.rmtree(seed, ignore_errors=True)
    run = [sys.executable, "-m", "server.cli", "convert", str(SOURCE), "--out", str(seed)]
    line = subprocess.run(run, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    first = line.split("\t")[0]
    store.mkdir(parents=True)
    shutil.move(str(seed / first), str(store / first))
    for i in range(slides):
        copy_slide(store, first, f"s{i:07d}{first[8:]}", f"slide {i}", f"case {i % 97}")
    shutil.rmtree(store / first)
    done.touch()
    return store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get(url: str) -> float:
    """Seconds for one GET answered 200 (its whole body read)."""
    headers = {"Accept": "application/dicom+json"} if "dicomweb" in url else {}
    started = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=600) as r:
        r.read()
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}")
    return time.perf_counter() - started


@contextlib.contextmanager
def started(code_root: Path | None, store: Path, state: Path) -> Iterator[str]:
    """A fresh `wsi serve --processes 1` of a checkout with its state in `state`, once it
    answers `/healthz`: its URL."""
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--store", str(store)]
    command += ["--port", str(port), "--processes", "1"]
    env = {**os.environ, "WSI_STATE_DIR": str(state)}
    # `-m` puts the working folder first on the path: the checkout whose code runs.
    server = subprocess.Popen(command, cwd=code_root or ROOT, stdout=subprocess.DEVNULL, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                get(base + "/healthz")
                break
            except OSError:
                time.sleep(0.1)
        yield base
    finally:
        server.terminate()
        server.wait(30)


def measure(
    code_root: Path | None, store: Path, rounds: int, settle: float
) -> dict[str, dict[str, float]]:
    """Per path: first, within and after (medians) from a fresh server with an empty state
    folder; `settled` from another one, `settle` seconds after its start; `restart` from a third
    one started with the state folder the first one left."""
    results: dict[str, dict[str, float]] = {}
    for name, path in PATHS.items():
        with tempfile.TemporaryDirectory() as work:
            kept, fresh = Path(work) / "kept", Path(work) / "fresh"
            with started(code_root, store, kept) as base:
                first = get(base + path)
                within = [get(base + path) for _ in range(rounds)]
                after = []
                for _ in range(rounds):
                    time.sleep(RECHECK)
                    after.append(get(base + path))
            with started(code_root, store, fresh) as base:
                time.sleep(settle)
                settled = get(base + path)
            with started(code_root, store, kept) as base:
                restart = get(base + path)
        results[name] = {
            "first": first,
            "within": statistics.median(within),
            "after": statistics.median(after),
            "settled": settled,
            "restart": restart,
        }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base", type=Path, help="another checkout's server and wsi packages")
    parser.add_argument(
        "--settle", type=float, default=60.0, help="seconds after a start before `settled`"
    )
    args = parser.parse_args()
    store = make_store(args.slides)
    runs = {"this": measure(None, store, args.rounds, args.settle)}
    if args.base:
        runs["base"] = measure(args.base.resolve(), store, args.rounds, args.settle)
    print(f"{args.slides} slides, medians of {args.rounds}, seconds")
    columns = ("first", "within", "after", "settled", "restart")
    print(f"{'':10}{'':6}" + "".join(f"{w:>10}" for w in columns))
    for name in PATHS:
        for code, found in runs.items():
            row = found[name]
            print(f"{name:10}{code:6}" + "".join(f"{row[w]:10.3f}" for w in row))
        if "base" in runs:
            ratios = [runs["base"][name][w] / runs["this"][name][w] for w in runs["this"][name]]
            print(f"{name:10}{'x':6}" + "".join(f"{r:9.1f}x" for r in ratios))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "listing.json").write_text(json.dumps({"slides": args.slides, **runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
