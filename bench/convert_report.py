"""The report of `bench/convert.py`: the table of every tool's medians (time, CPU, MP/s, the
speed against vips, peak RSS, bytes written) and the results file, which also carries the
source, the machine, the versions of the tools and the target checks of `convert_checks.py`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
from collections.abc import Sequence
from typing import Any

import pyvips
from convert_checks import REFERENCE
from convert_results import Result


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
        "expected_views": result.expected_views,
        "views": result.views,
        "median_s": result.median_s,
        "median_cpu_s": result.median_cpu_s,
        "cores_busy": result.cores_busy,
        "megapixels_per_s": mps,
        "peak_rss_bytes": result.peak_rss_bytes,
        "output_bytes": out,
        "output_to_source": out / source_bytes if out is not None else None,
        "vs_vips": mps / ref_mps if mps and ref_mps else None,
        "error": result.error,
        "runs": [dataclasses.asdict(run) for run in result.runs],
    }


TOOL_WIDTH = 19


def format_table(results: Sequence[Result], megapixels: float, source_bytes: int) -> str:
    """The results as a fixed-width text table."""
    ref_mps = reference_mps(results, megapixels)
    header = (
        f"{'tool':<{TOOL_WIDTH}}{'views':<12}{'median s':>9}{'CPU s':>7}{'cores':>6}"
        f"{'MP/s':>9}{'vs vips':>9}"
        f"{'peak RSS MB':>13}{'output bytes':>16}{'out/src':>9}"
    )
    lines = [header, "-" * len(header)]
    for result in results:
        row = summary(result, megapixels, source_bytes, ref_mps)
        name = f"{result.tool:<{TOOL_WIDTH}}"
        if result.failed:
            lines.append(f"{name}FAILED: {result.error}")
            continue
        vs = row["vs_vips"]
        views = result.views or "none"
        if views != result.expected_views:
            views += "!"
        lines.append(
            f"{name}{views:<12}{row['median_s']:>9.2f}{result.median_cpu_s or 0:>7.2f}"
            f"{result.cores_busy or 0:>6.2f}{row['megapixels_per_s']:>9.1f}"
            + (f"{vs:>8.2f}x" if isinstance(vs, float) else f"{'n/a':>9}")
            + f"{(result.peak_rss_bytes or 0) / 1e6:>13.0f}{row['output_bytes']:>16,}"
            f"{row['output_to_source']:>9.2f}"
        )
        if views.endswith("!"):
            lines.append(f"{'':<{TOOL_WIDTH}}(expected views: {result.expected_views})")
        if result.error:
            lines.append(f"{'':<{TOOL_WIDTH}}(some runs failed: {result.error})")
    return "\n".join(lines)


def document(
    source: dict[str, Any],
    repeat: int,
    results: Sequence[Result],
    checks: dict[str, Any],
) -> dict[str, Any]:
    """The results file: `source` (path, size, megapixels, bytes, compression), the machine,
    the versions, every tool's summary and the target `checks`."""
    megapixels, source_bytes = source["megapixels"], source["bytes"]
    ref_mps = reference_mps(results, megapixels)
    return {
        "source": source,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "versions": versions(),
        "repeat": repeat,
        "reference": REFERENCE,
        "results": [summary(r, megapixels, source_bytes, ref_mps) for r in results],
        "checks": checks,
    }
