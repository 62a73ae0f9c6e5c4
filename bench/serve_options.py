"""The options of `bench/serve.py`: the slide, the load, the servers measured and their CPUs, the
cold tiles, and the internal options of one server process (`--serve KIND`, which the benchmark
passes to the processes it starts); their checks, and the defaults that depend on the CPUs this
process may use (threads, processes, load generators).
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from convert_sources import OUT  # bench/convert_sources.py

SERVERS = ("ours", "fixed", "orthanc", "openslide")
DEFAULT_SERVERS = ("ours", "fixed", "orthanc")


def cpu_split(server: str, client: str) -> tuple[list[int] | None, list[int] | None]:
    """CPU lists for the servers and the load generator: 'all' (or a single CPU) means no
    pinning; 'auto' gives the servers the first half of this process's CPUs and the load the
    rest; else a list such as '0-3,8'."""
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    half = len(available) // 2

    def choose(text: str, auto: list[int]) -> list[int] | None:
        if text == "all" or len(available) < 2:
            return None
        if text == "auto":
            return auto
        cpus: list[int] = []
        for part in text.split(","):
            low, _, high = part.partition("-")
            cpus.extend(range(int(low), int(high or low) + 1))
        return cpus

    return choose(server, available[:half]), choose(client, available[half:])


def add_slide_options(parser: argparse.ArgumentParser) -> None:
    """The slide served (generated or given) and the local store it is converted into."""
    parser.add_argument("--src", type=Path, help="existing slide (default: generate one)")
    parser.add_argument("--width", type=int, default=40000, help="generated slide width")
    parser.add_argument("--height", type=int, default=30000, help="generated slide height")
    parser.add_argument("--seed", type=int, default=0, help="generated slide seed")
    parser.add_argument("--store", type=Path, default=OUT / "serve-store", help="local store")
    parser.add_argument(
        "--slide-id", help="a slide already published in --store: serve it, convert nothing"
    )


def add_load_options(parser: argparse.ArgumentParser) -> None:
    """How hard and how long every server is loaded, and with which addresses."""
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per workload")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before that")
    parser.add_argument("--tiles", type=int, default=1024, help="distinct tiles in the hot set")
    parser.add_argument(
        "--hot-min-level",
        type=int,
        default=1,
        help="hot tiles from this level down (default 1: see the module's docstring)",
    )
    parser.add_argument(
        "--random-requests",
        type=int,
        default=100_000,
        help="random addresses per random workload (cycled through if the run asks more)",
    )


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """Which servers are measured, the load generator, and the CPUs, threads and processes
    of each."""
    parser.add_argument(
        "--servers",
        default=",".join(DEFAULT_SERVERS),
        help=f"subset of {','.join(SERVERS)} (default {','.join(DEFAULT_SERVERS)})",
    )
    parser.add_argument(
        "--base",
        type=Path,
        help="a checkout's folder holding `server` and `wsi`: also measure ours from it (base-*)",
    )
    parser.add_argument(
        "--client",
        choices=("auto", "wrk", "aiohttp"),
        default="auto",
        help="load generator (auto: wrk when installed)",
    )
    parser.add_argument(
        "--client-procs",
        type=int,
        default=0,
        help="wrk threads / aiohttp processes (default: the client CPUs, at most 4)",
    )
    parser.add_argument("--server-cpus", default="all", help="e.g. 0-3; auto: first half; all")
    parser.add_argument("--client-cpus", default="all", help="e.g. 4-7; auto: second half; all")
    parser.add_argument(
        "--threads", type=int, default=0, help="server thread pools (default: the server CPUs)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="N: our serving processes (`wsi serve --processes`) and the fixed tile's second "
        "ceiling (default: the server CPUs)",
    )
    parser.add_argument(
        "--tile-cache-mb", type=int, default=256, help="our tile cache per process (hot tiles)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="every server's workloads this many times, round after round; the table shows "
        "each workload's medians and the ratios are those of the medians",
    )


def add_cold_options(parser: argparse.ArgumentParser) -> None:
    """The cold tiles (`serve_cold`) and where the results go."""
    parser.add_argument("--no-cold", dest="cold", action="store_false", help="skip cold tiles")
    parser.add_argument(
        "--no-s3",
        dest="s3",
        action="store_false",
        help="skip the cold tiles from SeaweedFS (the local store's cold tiles still run)",
    )
    parser.add_argument(
        "--cold-connections", type=int, default=8, help="concurrent connections, 2nd cold pass"
    )
    parser.add_argument(
        "--cold-tiles", type=int, default=2000, help="cold tiles per pass (0: every tile)"
    )
    parser.add_argument("--json", type=Path, default=OUT / "serve.json", help="results file")


def add_internal_options(parser: argparse.ArgumentParser) -> None:
    """Internal: run one server (the benchmark starts these itself); not in --help."""
    parser.add_argument("--serve", choices=("ours", "fixed", "openslide"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store-url", help=argparse.SUPPRESS)
    parser.add_argument("--s3-endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--tile-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fixed-tile", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--code-root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--cpus", type=lambda s: [int(c) for c in s.split(",")], help=argparse.SUPPRESS
    )


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One readable error (argparse's, exit 2) for options that cannot work together."""
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = sorted(set(args.servers) - set(SERVERS))
    if unknown or not args.servers:
        parser.error(f"--servers: choose from {', '.join(SERVERS)} (got {args.servers})")
    if args.connections < 1 or args.duration <= 0 or args.warmup < 0 or args.tiles < 1:
        parser.error("--connections, --duration and --tiles must be positive, --warmup >= 0")
    if args.processes < 0 or args.tile_cache_mb < 0 or args.random_requests < 1:
        parser.error("--processes, --tile-cache-mb must be >= 0, --random-requests positive")
    if args.rounds < 1:
        parser.error("--rounds must be positive")
    if args.cold_connections < 1 or args.cold_tiles < 0:
        parser.error("--cold-connections must be positive, --cold-tiles >= 0")
    if args.client == "wrk" and shutil.which("wrk") is None:
        parser.error("--client wrk: wrk is not installed (apt-get install wrk)")
    if args.base is not None and not (args.base / "server" / "app.py").exists():
        parser.error(f"--base {args.base}: no server/app.py there")


def resolve_cpus(args: argparse.Namespace) -> None:
    """The CPU lists of the servers and the load, and the defaults that follow from them:
    threads and processes = the server CPUs, load generators = the client CPUs (at most 4)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    args.server_cpu_list, args.client_cpu_list = cpu_split(args.server_cpus, args.client_cpus)
    server_cpus = len(args.server_cpu_list) if args.server_cpu_list else cpus or 1
    client_cpus = len(args.client_cpu_list) if args.client_cpu_list else cpus or 1
    args.threads = args.threads or server_cpus
    args.processes = args.processes or server_cpus
    args.client_procs = args.client_procs or min(4, client_cpus)


def parse_args(argv: Sequence[str] | None, description: str) -> argparse.Namespace:
    """The options of `bench/serve.py` (`description`: the first line of its --help), checked,
    with the CPU-dependent defaults filled in."""
    parser = argparse.ArgumentParser(description=description)
    add_slide_options(parser)
    add_load_options(parser)
    add_server_options(parser)
    add_cold_options(parser)
    add_internal_options(parser)
    args = parser.parse_args(argv)
    check(parser, args)
    resolve_cpus(args)
    return args
