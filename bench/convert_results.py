"""The measured runs of one converter and their medians: what `measure` in `convert.py` records
and what both the table there and the target checks in `convert_checks.py` read."""

from __future__ import annotations

import dataclasses
import statistics


@dataclasses.dataclass
class Run:
    """One measured invocation of a tool."""

    seconds: float
    peak_rss_bytes: int
    output_bytes: int
    returncode: int
    views: str = "none"
    error: str | None = None
    cpu_seconds: float = 0.0
    """User + system CPU time of the process tree (its waited-for descendants): on a machine
    shared with other work, the figure that the others' load does not inflate."""
    levels_made: tuple[int, int] | None = None
    """(levels made here, levels published) from our manifest's level origins; None for a tool
    that writes no manifest of ours."""


@dataclasses.dataclass
class Result:
    """All runs of one tool and their summary."""

    tool: str
    description: str
    expected_views: str
    command: list[str]
    runs: list[Run] = dataclasses.field(default_factory=list)

    @property
    def ok_runs(self) -> list[Run]:
        return [run for run in self.runs if run.error is None]

    @property
    def failed(self) -> bool:
        return not self.ok_runs

    @property
    def error(self) -> str | None:
        errors = [run.error for run in self.runs if run.error is not None]
        return errors[0] if errors else None

    @property
    def median_s(self) -> float | None:
        return statistics.median(r.seconds for r in self.ok_runs) if self.ok_runs else None

    @property
    def median_cpu_s(self) -> float | None:
        """Median CPU seconds (user + system) of the process tree: what the tool costs even
        when other work shares the machine and stretches its wall time."""
        return statistics.median(r.cpu_seconds for r in self.ok_runs) if self.ok_runs else None

    @property
    def cores_busy(self) -> float | None:
        """Median over runs of CPU seconds / wall seconds: how many cores the tool kept busy
        (the machine's core count when it leaves none idle)."""
        runs = [r.cpu_seconds / r.seconds for r in self.ok_runs if r.seconds > 0]
        return statistics.median(runs) if runs else None

    @property
    def peak_rss_bytes(self) -> int | None:
        return max(r.peak_rss_bytes for r in self.ok_runs) if self.ok_runs else None

    @property
    def output_bytes(self) -> int | None:
        return self.ok_runs[-1].output_bytes if self.ok_runs else None

    @property
    def levels_made(self) -> tuple[int, int] | None:
        """(made here, published) of the last successful run's output, when it says."""
        return self.ok_runs[-1].levels_made if self.ok_runs else None

    @property
    def views(self) -> str | None:
        """The views the last successful run's output gives."""
        return self.ok_runs[-1].views if self.ok_runs else None
