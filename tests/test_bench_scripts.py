"""Every benchmark script starts: `python bench/X.py --help` imports it with its neighbours (the
way it is run) and parses its options. A benchmark that no longer imports is found here, not by
the next person who needs its figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(
    path.name
    for path in BENCH.glob("*.py")
    if "__main__" in path.read_text() and "argparse" in path.read_text()
)


def test_the_scripts_are_found() -> None:
    assert {"convert.py", "serve.py", "patches.py", "s3.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_benchmark_script_starts(script: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=BENCH.parent,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:")
