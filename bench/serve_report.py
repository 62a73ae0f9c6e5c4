"""The report of `bench/serve.py`: one table of every workload measured, and the ratios
against the targets (ours against Orthanc, our hot tiles' p99 against the N-process ceiling's,
and against `--base`, for information). Cold tiles have theirs in `serve_cold`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from serve_load import Result

TARGETS = {"hot": 1.0, "random": 20.0, "frames": 120.0}
"""Ours / Orthanc, per workload (tiles or frames per second)."""
TARGET_P99_VS_CEILING = 2.0
"""Our hot tiles' p99 at most this multiple of the N-process fixed tile's p99."""


def print_table(results: Mapping[str, Result], notes: list[str], args: argparse.Namespace) -> None:
    """The table of every workload measured, with the CPU split and what may have skewed it."""
    print()
    if args.rounds > 1:
        print(f"medians of {args.rounds} rounds (each round's figures above)")
    print(
        f"{'workload':<17}{'client':<10}{'per s':>10}{'p50 ms':>9}{'p99 ms':>9}{'MB/s':>8}"
        f"{'errors':>8}{'srv CPU':>9}{'us CPU/req':>11}{'load CPU':>10}"
    )
    for name, r in results.items():
        print(
            f"{name:<17}{r.client:<10}{r.tiles_per_s:10,.0f}{r.p50_ms:9.2f}{r.p99_ms:9.2f}"
            f"{r.mb_per_s:8.1f}{r.errors:8d}{r.server_cores:9.2f}{r.cpu_us_per_tile:11.1f}"
            f"{r.load_cores:10.2f}"
        )
    servers = len(args.server_cpu_list or []) or "all"
    clients = len(args.client_cpu_list or []) or "all"
    print(
        f"(per s: 200 responses per second; CPU: cores busy on average. Servers on {servers} "
        f"CPU(s), the load generator on {clients}, {args.client_procs} thread(s)/process(es); "
        f"N = {args.processes} processes)"
    )
    saturated = [n for n, r in results.items() if r.load_cores >= 0.9 * args.client_procs]
    if saturated:
        print(f"NOTE: the load generator was CPU-bound for {', '.join(saturated)}")
    if any(r.errors for r in results.values()):
        print("WARNING: some requests failed; see bench/out/logs/serve-*.log")
    for note in notes:
        print(note)


def verdicts(
    results: Mapping[str, Result],
    args: argparse.Namespace,
    rounds: Sequence[Mapping[str, Result]] = (),
) -> dict[str, Any]:
    """Ratios and the issue's targets (from `results`: with several `rounds`, their medians);
    printed, and returned for the JSON. Each round's own ratio to Orthanc is shown beside it:
    how far the machine moved the figure."""
    found = results
    out: dict[str, Any] = {}
    print()

    def line(label: str, value: float, target: str, ok: bool) -> None:
        print(f"  {label:<34}{value:9.2f}   target {target:<10}{'ok' if ok else 'MISSED'}")

    for kind, target in TARGETS.items():
        ours, theirs = found.get(f"ours-{kind}"), found.get(f"orthanc-{kind}")
        if ours and theirs and theirs.tiles_per_s:
            ratio = ours.tiles_per_s / theirs.tiles_per_s
            ok = ratio >= target and not ours.errors
            each = _each_round(rounds, f"ours-{kind}", f"orthanc-{kind}")
            out[f"{kind}/orthanc"] = {"ratio": ratio, "target": target, "ok": ok, "rounds": each}
            line(f"{kind}: ours / Orthanc", ratio, f">= {target:g}x", ok)
            if each:
                print(f"    each round: {', '.join(f'{r:.2f}' for r in each)}")
    ceiling = found.get(f"fixed-{args.processes}")
    hot = found.get("ours-hot")
    if hot and ceiling:
        ratio = hot.p99_ms / ceiling.p99_ms
        ok = ratio <= TARGET_P99_VS_CEILING
        out["hot_p99/ceiling_p99"] = {"ratio": ratio, "target": TARGET_P99_VS_CEILING, "ok": ok}
        line(f"hot p99 / fixed-{args.processes} p99", ratio, f"<= {TARGET_P99_VS_CEILING:g}x", ok)
        ratio = hot.tiles_per_s / ceiling.tiles_per_s
        out["hot/ceiling"] = ratio
        print(f"  {'hot: ours / fixed-' + str(args.processes):<34}{ratio:9.2f}   (information)")
    for kind in ("hot", "random", "frames"):
        before, after = found.get(f"base-{kind}"), found.get(f"ours-{kind}")
        if before and after and before.tiles_per_s:
            ratio = after.tiles_per_s / before.tiles_per_s
            out[f"{kind}/base"] = ratio
            print(f"  {kind + ': ours / base (before)':<34}{ratio:9.2f}   (information)")
    return out


def _each_round(rounds: Sequence[Mapping[str, Result]], ours: str, theirs: str) -> list[float]:
    """Ours / theirs in each round both were measured in."""
    return [
        done[ours].tiles_per_s / done[theirs].tiles_per_s
        for done in rounds
        if ours in done and theirs in done and done[theirs].tiles_per_s
    ]
