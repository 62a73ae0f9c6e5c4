"""Every slide generator in sample_data/ runs as a script: `python sample_data/X.py --help`, from
another folder and with nothing on PYTHONPATH, the way the README and a new user run them. A
generator that imports its neighbours only as `sample_data.*` fails there (ModuleNotFoundError)
although the test suite, which imports it as a package, passes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "sample_data"
SCRIPTS = sorted(
    path.name
    for path in SAMPLE_DATA.glob("*.py")
    if "__main__" in path.read_text() and "argparse" in path.read_text()
)


def test_the_generators_are_found() -> None:
    expected = {"generate.py", "make_bif.py", "make_leica.py", "make_ndpi.py", "make_philips.py"}
    assert expected | {"make_standins.py", "make_mirax.py", "make_j2k.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_generator_runs_as_a_script(script: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, str(SAMPLE_DATA / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:")
