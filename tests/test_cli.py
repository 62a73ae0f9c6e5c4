"""The `wsi` command as a user runs it: JSON info, one line per slide, one line per error."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import sample


def wsi(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsi.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_info_prints_levels_properties_and_associated_images():
    run = wsi("info", str(sample("CMU-1-Small-Region.svs")))
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["backend"] == "tiff" and doc["vendor"] == "aperio"
    assert doc["levels"][0] == {
        "width": 2220,
        "height": 2967,
        "downsample": 1.0,
        "tile_width": 240,
        "tile_height": 240,
        "tile_codec": "jpeg",
    }
    assert doc["associated_images"]["label"] == {"height": 463, "width": 387}
    assert doc["mpp_x"] == 0.499 and doc["properties"]["aperio.AppMag"] == "20"
    assert doc["output_levels"][-1]["width"] <= 240


def test_convert_batch_goes_on_past_broken_slides(tmp_path):
    good = [sample("openslide-python-fixtures/small.svs"), sample("CMU-1-Small-Region.svs")]
    bad = [
        sample("openslide-python-fixtures/unopenable.tiff"),
        tmp_path / "missing.svs",
        sample("openslide-python-fixtures/unreadable.svs"),
    ]
    out = tmp_path / "out"
    run = wsi(
        "convert",
        str(bad[0]),
        str(good[0]),
        str(bad[1]),
        str(good[1]),
        str(bad[2]),
        "--out",
        str(out),
        "--no-progress",
    )
    assert run.returncode == 1
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        slide_id, where, rate = line.split("\t")
        assert (out / slide_id / "manifest.json").exists() and where.endswith("slide.zarr")
        assert rate.endswith("MP/s")
    errors = run.stderr.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("wsi: error: ") for e in errors)
    assert "Traceback" not in run.stderr
    listed = wsi("list", str(out))
    assert sorted(listed.stdout.split()) == sorted(line.split("\t")[0] for line in lines)
    again = wsi("convert", str(good[0]), "--out", str(out), "--no-progress")
    assert again.returncode == 0 and "already published" in again.stdout


def test_bad_arguments_are_one_line_and_nonzero(tmp_path):
    src = str(sample("openslide-python-fixtures/small.svs"))
    for args in (
        ["--quality", "0"],
        ["--tile-size", "100"],
        ["--workers", "-1"],
        ["--slide-id", "../x"],
    ):
        run = wsi("convert", src, "--out", str(tmp_path), "--no-progress", *args)
        assert run.returncode != 0
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert "Traceback" not in run.stderr
    run = wsi("info", str(tmp_path / "nothing.svs"))
    assert run.returncode == 1 and run.stderr.startswith("wsi: error: ")
