"""Time from a slide landing in a watch folder to its first tile served, and to published.

Starts `wsi serve --watch` on loopback in a fresh folder, lands each slide atomically (copied
under a temporary name, then renamed, as scanners do), and polls the service:

    .venv/bin/python bench/ingest.py [--quiet-seconds 2] [--big]   # --big adds a 40k x 30k slide

Landing -> first tile covers the quiet period (the watcher waits that long for the copy to be
over), content hashing, the job and the on-the-fly read from the source; landing -> published
adds the whole conversion.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsi.slide_id import content_slide_id  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return 0, b""


def measure(base: str, inbox: Path, slide: Path, timeout: float) -> dict[str, float | str]:
    slide_id = content_slide_id(slide)
    tmp = inbox / f".{slide.name}.part"
    shutil.copy(slide, tmp)
    tmp.rename(inbox / slide.name)
    landed = time.perf_counter()
    first_tile = published = None
    while time.perf_counter() - landed < timeout:
        if first_tile is None and get(f"{base}/slides/{slide_id}/tiles/0/0/0")[0] == 200:
            first_tile = time.perf_counter() - landed
        status, body = get(f"{base}/slides/{slide_id}")
        if status == 200 and json.loads(body)["status"] == "ready":
            published = time.perf_counter() - landed
            if first_tile is None:
                first_tile = published
            break
        time.sleep(0.02)
    if published is None:
        raise SystemExit(f"{slide.name}: not published within {timeout} s")
    return {
        "slide": slide.name,
        "bytes": slide.stat().st_size,
        "first_tile_s": round(first_tile or 0.0, 2),
        "published_s": round(published, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quiet-seconds", type=float, default=2.0)
    parser.add_argument("--big", action="store_true", help="also a generated 40000x30000 slide")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    slides = [ROOT / "sample_data" / "CMU-1-Small-Region.svs"]
    if args.big:
        big = ROOT / "bench" / "out" / "slide_40000x30000_seed0.tif"
        if not big.exists():
            from sample_data.generate import generate

            big.parent.mkdir(parents=True, exist_ok=True)
            generate(big, 40000, 30000)
        slides.append(big)
    with tempfile.TemporaryDirectory() as work:
        inbox, store = Path(work) / "inbox", Path(work) / "data"
        inbox.mkdir()
        port = free_port()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.cli",
                "serve",
                "--store",
                str(store),
                "--watch",
                str(inbox),
                "--port",
                str(port),
                "--quiet-seconds",
                str(args.quiet_seconds),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while get(f"{base}/healthz")[0] != 200:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the service did not start")
                time.sleep(0.1)
            rows = [measure(base, inbox, s, args.timeout) for s in slides]
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(f"quiet period {args.quiet_seconds} s (the watcher's wait for a copy to be over)")
    print(f"{'slide':34} {'bytes':>13} {'first tile s':>13} {'published s':>12}")
    for r in rows:
        print(f"{r['slide']:34} {r['bytes']:>13,} {r['first_tile_s']:>13} {r['published_s']:>12}")


if __name__ == "__main__":
    main()
