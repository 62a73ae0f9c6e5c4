"""Every benchmark script starts: `python bench/X.py --help` imports it with its neighbours (the
way it is run) and parses its options. A benchmark that no longer imports is found here, not by
the next person who needs its figures."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .s3server import SeaweedFS
from .s3server import seaweedfs as _seaweedfs_fixture  # noqa: F401

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


def _bench_module(name: str) -> Any:
    """A bench module imported the way its scripts import each other (bench/ on sys.path)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def test_rounds_are_reported_as_medians_of_each_figure() -> None:
    serve = _bench_module("serve")
    result = serve.Result

    def run(rate: float, p99: float, errors: int = 0) -> Any:
        return result("ours", "wrk", rate, 1.0, p99, 100, errors, 2.0, 5.0, 0.5, 1.5)

    runs = serve.Runs()
    for rate, p99, errors in ((100.0, 9.0, 0), (300.0, 3.0, 1), (200.0, 5.0, 0)):
        runs.results = {"ours-hot": run(rate, p99, errors)}
        if rate == 300.0:
            runs.results["orthanc-hot"] = run(50.0, 1.0)  # measured in one round only
        runs.end_round()
    hot = runs.results["ours-hot"]
    assert (hot.tiles_per_s, hot.p99_ms) == (200.0, 5.0)  # each the median of its own
    assert (hot.responses, hot.errors) == (300, 1)  # summed: a failure in any round shows
    assert runs.results["orthanc-hot"].tiles_per_s == 50.0
    assert [set(done) for done in runs.rounds] == [
        {"ours-hot"},
        {"ours-hot", "orthanc-hot"},
        {"ours-hot"},
    ]


def test_each_rounds_ratio_pairs_the_servers_of_that_round() -> None:
    report = _bench_module("serve_report")
    result = report.Result

    def rate(value: float) -> Any:
        return result("s", "wrk", value, 1.0, 1.0, 1, 0, 1.0, 1.0, 0.1, 1.0)

    rounds = [
        {"ours-frames": rate(1200.0), "orthanc-frames": rate(10.0)},
        {"ours-frames": rate(900.0)},  # Orthanc not measured in this round: no ratio
        {"ours-frames": rate(1000.0), "orthanc-frames": rate(20.0)},
    ]
    assert report._each_round(rounds, "ours-frames", "orthanc-frames") == [120.0, 50.0]


def test_the_size_target_is_not_applied_to_levels_made_from_pixels(tmp_path: Path) -> None:
    convert = _bench_module("convert")
    checks = _bench_module("convert_checks")
    slide = tmp_path / "0123456789abcdef01234567"
    slide.mkdir()
    origins = [
        {"level": 0, "method": "copied", "source_level": 0},
        {"level": 1, "method": "dct-half", "from_level": 0},
        {"level": 2, "method": "mean2x2", "from_level": 1},
    ]
    (slide / "manifest.json").write_text(json.dumps({"levels": origins}))
    assert convert.levels_made(tmp_path) == (2, 3)
    assert convert.levels_made(tmp_path / "nothing") is None

    def result(made: tuple[int, int] | None) -> Any:
        done = convert.Result("wsi", "", "zarr+dicom", [])
        done.runs.append(convert.Run(1.0, 1, 100, 0, "zarr+dicom", levels_made=made))
        return done

    def verdict(made: tuple[int, int] | None, source_bytes: int) -> Any:
        (check,) = checks.both_views_checks([result(made)], source_bytes, "JPEG")
        return check["ok"]

    assert verdict((0, 3), 100) is True  # every level copied: the target applies
    assert verdict((0, 3), 50) is False
    assert verdict(None, 50) is False  # no manifest to tell: the target applies
    assert verdict((2, 3), 50) is None  # levels made here: pixels the source does not hold


def test_a_bad_number_of_rounds_is_refused_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "serve.py"), "--rounds", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=BENCH.parent,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("--rounds must be positive")


def test_the_s3_floor_adds_the_stores_cpu_for_the_same_bytes_to_the_local_run() -> None:
    s3_convert = _bench_module("s3_convert")
    local = {"seconds": 4.0, "cpu_s": 7.0}
    stored = {"seconds": 1.0, "cpu_s": 0.2, "server_cpu_s": 2.0}
    assert s3_convert.cpu_floor(local, stored, 2) == pytest.approx(9.0 / 8.0)
    assert s3_convert.cpu_floor(local, {**stored, "server_cpu_s": 0.0}, 1) == pytest.approx(1.75)
    assert s3_convert.cpu_floor({"seconds": 1.0, "cpu_s": 0.5}, stored, 4) == 1.0  # cores idle


def test_the_cold_floor_is_a_hot_exchange_plus_the_librarys_read() -> None:
    s3_cold = _bench_module("s3_cold")
    p50 = {"bare": 1.0, "hot": 0.5, "library": 0.9, "http": 1.6}
    assert s3_cold.cold_floor(p50) == pytest.approx(1.4)


@pytest.mark.s3
def test_store_only_puts_every_file_as_it_is_then_removes_them(
    seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_convert = _bench_module("s3_convert")
    from wsi.store import Store, StoreSettings

    folder = tmp_path / "out"
    (folder / "sid" / "slide.zarr").mkdir(parents=True)
    files = {"sid/slide.zarr/zarr.json": b"{}", "sid/level-0.dcm": bytes(range(256)) * 4096}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    seen: dict[str, bytes] = {}
    put_file = s3_convert.put_file

    def keep(url: str, path: Path) -> None:
        put_file(url, path)
        key = path.relative_to(folder).as_posix()
        seen[key] = Store(StoreSettings(seaweedfs.url("plain"), seaweedfs.endpoint_url)).get(key)

    monkeypatch.setattr(s3_convert, "put_file", keep)
    result = s3_convert.store_only(folder, seaweedfs, "plain")
    assert seen == files
    assert result["bytes"] == sum(len(d) for d in files.values())
    assert result["server_cpu_s"] >= 0 and result["seconds"] > 0
    store = Store(StoreSettings(seaweedfs.url("plain"), seaweedfs.endpoint_url))
    assert store.list_keys("sid") == []
