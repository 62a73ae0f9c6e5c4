"""Instructions per request of one serving process, counted by valgrind's callgrind: the
before/after measure of the hot path that a noisy machine does not move.

Requests per second on this project's shared 2-core machines move by 25% from run to run, more
than most changes to the hot path; the instructions a server process executes per request are
the same within 1-2% from run to run (and whatever else the machine is doing), so a change of a
few percent shows. Each server runs under callgrind (about 50x slower, so few requests),
answers ``--warmup`` requests, has its counters zeroed, answers ``--requests`` more over one
keep-alive connection, and its count is read from the dump. Servers: ours (`wsi serve`, one
process, as `bench/serve.py` starts it), ours from another checkout (``--base DIR``, as in
`bench/serve.py`) and the fixed in-memory tile of aiohttp (the floor: parsing, routing one
route, answering). Workloads: a plain tile, a DeepZoom tile (hot, one address each) and a
WADO-RS frame (cycling over 97 frames of the base level, the tile cache holding them after the
warm-up) of the slide `bench/serve.py` converts (run that once first).

Usage::

    python bench/serve_instructions.py                  # ours and the fixed tile
    python bench/serve_instructions.py --base /tmp/base # and a checkout before a change
    python bench/serve_instructions.py --only plain      # one workload (~5 minutes less each)
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve_load import free_port, stop, wait_ready

BENCH = Path(__file__).resolve().parent
SERVE_SCRIPT = BENCH / "serve.py"
STORE = BENCH / "out" / "serve-store"
WADO_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
FRAMES_CYCLED = 97
SHORT_NAMES = {"plain": "plain tile", "deepzoom": "DeepZoom tile", "frame": "WADO-RS frame"}


def get(conn: http.client.HTTPConnection, path: str, accept: str | None = None) -> bytes:
    conn.request("GET", path, headers={"Accept": accept} if accept else {})
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise SystemExit(f"{path}: {response.status} {body[:200]!r}")
    return body


def workloads(port: int) -> dict[str, tuple[list[str], str | None]]:
    """Name -> (paths cycled through, Accept header) for the slide in `STORE`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    slides = json.loads(get(conn, "/slides"))["slides"]
    sid = slides[0]["id"]
    docs = json.loads(get(conn, "/dicomweb/instances?includefield=all"))

    def value(doc: dict[str, dict[str, list[str]]], tag: str) -> str:
        return str(doc.get(tag, {}).get("Value", [0])[0])

    base = max(docs, key=lambda d: int(value(d, "00480006") or 0))
    frames = (
        f"/dicomweb/studies/{value(base, '0020000D')}/series/{value(base, '0020000E')}"
        f"/instances/{value(base, '00080018')}/frames/"
    )
    conn.close()
    return {
        "plain tile": ([f"/slides/{sid}/tiles/2/3/3"], None),
        "DeepZoom tile": ([f"/slides/{sid}_files/14/3_3.jpeg"], None),
        "WADO-RS frame": ([f"{frames}{n}" for n in range(1, FRAMES_CYCLED + 1)], WADO_ACCEPT),
    }


def count(
    argv: list[str], paths: list[str], accept: str | None, requests: int, warmup: int, work: Path
) -> float:
    """Instructions per request of the server `serve.py --serve ...argv` for `paths`."""
    port = free_port()
    out = work / f"callgrind.{port}"
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    command += [sys.executable, str(SERVE_SCRIPT), "--port", str(port), *argv]
    log = work / f"server.{port}.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_started(port, proc, log)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            for i in range(warmup):
                get(conn, paths[i % len(paths)], accept)
            control(proc.pid, "-z")
            for i in range(requests):
                get(conn, paths[i % len(paths)], accept)
            control(proc.pid, "-d")
            conn.close()
            return total_instructions(out, proc.pid) / requests
        finally:
            stop(proc)


def wait_started(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Return once the server under callgrind answers /healthz (its start takes minutes)."""
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"the server under callgrind did not start; see {log}")


def control(pid: int, flag: str) -> None:
    subprocess.run(["callgrind_control", flag, str(pid)], check=True, capture_output=True)


def total_instructions(out: Path, pid: int) -> int:
    """The instructions of the dump `callgrind_control -d` wrote (`out.<n>`, the newest)."""
    deadline = time.monotonic() + 60
    while True:
        dumps = sorted(out.parent.glob(f"{out.name}.*"), key=lambda p: p.stat().st_mtime)
        for dump in reversed(dumps):
            found = re.search(r"^(?:summary|totals): (\d+)", dump.read_text(), re.M)
            if found:
                return int(found.group(1))
        if time.monotonic() > deadline:
            raise SystemExit(f"no callgrind dump of process {pid} in {out.parent}")
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="a checkout holding `server` and `wsi`")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument(
        "--only", choices=sorted(SHORT_NAMES), action="append", help="this workload (repeatable)"
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    if not STORE.is_dir():
        raise SystemExit(f"no {STORE}: run bench/serve.py once (it converts the slide)")
    ours = ["--serve", "ours", "--store", str(STORE), "--processes", "1"]
    servers = {"ours": ours}
    if args.base is not None:
        servers["base"] = [*ours, "--code-root", str(args.base.resolve())]
    with tempfile.TemporaryDirectory(prefix="wsi-instructions-") as tmp:
        work = Path(tmp)
        fixed_tile = work / "tile.jpg"
        port = free_port()
        command = [sys.executable, str(SERVE_SCRIPT), "--port", str(port), *ours]
        probe = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            wait_ready(f"http://127.0.0.1:{port}/healthz", probe, "server", work / "none")
            loads = workloads(port)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            fixed_tile.write_bytes(get(conn, loads["plain tile"][0][0]))
            conn.close()
        finally:
            stop(probe)
        fixed = ["--serve", "fixed", "--fixed-tile", str(fixed_tile), "--processes", "1"]
        print(f"instructions per request (callgrind, {args.requests} after {args.warmup})")
        floor = count(fixed, ["/tile"], None, args.requests, args.warmup, work)
        print(f"  {'fixed aiohttp tile (floor)':28s} {floor:10,.0f}")
        wanted = {SHORT_NAMES[n] for n in args.only} if args.only else set(loads)
        for name, (paths, accept) in loads.items():
            if name not in wanted:
                continue
            counts = {
                server: count(argv, paths, accept, args.requests, args.warmup, work)
                for server, argv in servers.items()
            }
            mine = counts["ours"]
            line = f"  {name + ', ours':28s} {mine:10,.0f}  {mine / floor:.2f}x floor"
            if "base" in counts:
                line += f"; base {counts['base']:,.0f}, ours/base {mine / counts['base']:.3f}"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
