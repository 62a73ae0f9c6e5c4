"""`wsi du`: what published slides cost, checked against the files on disk.

Every figure must equal what the file system says: the slide's total is the size of its folder,
a level's bytes the size of its shard, the source size what the source's files take (all of
them: a DICOM series, a MIRAX folder). Background not stored is counted from the shard indexes,
read here straight from the bytes as the Zarr sharding specification lays them out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sample_data.make_mirax import tissue_image, write_mirax

from .conftest import make_tiff, sample
from .helpers import run_wsi

MISSING = 2**64 - 1


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A store holding: a JPEG pyramid with blank tiles, CMU-1-Small-Region (SVS), a DICOM
    series of two instances (given by one of them), a MIRAX slide; and a DICOM-only store."""
    tmp = tmp_path_factory.mktemp("du")
    tiff = make_tiff(tmp / "blank-half.tif", 1800, 1300, seed=4)
    mirax = write_mirax(tmp / "mirax" / "slide.mrxs", tissue_image(900, 700, seed=2), levels=2)
    dicom = sample("openslide-python-fixtures/boxes_0.dcm")
    svs = sample("CMU-1-Small-Region.svs")
    store, dicom_only = tmp / "store", tmp / "dicom-only"
    ids = {}
    for name, path in (("tiff", tiff), ("svs", svs), ("dicom", dicom), ("mirax", mirax)):
        done = run_wsi("convert", str(path), "--out", str(store), "--no-progress")
        assert done.returncode == 0, done.stderr
        ids[name] = done.stdout.split("\t")[0]
    done = run_wsi("convert", str(svs), "--out", str(dicom_only), "--format", "dicom")
    assert done.returncode == 0, done.stderr
    sources = {
        "tiff": tiff.stat().st_size,
        "svs": svs.stat().st_size,
        "dicom": sum(p.stat().st_size for p in dicom.parent.glob("boxes_*.dcm")),
        "mirax": sum(p.stat().st_size for p in mirax.parent.rglob("*") if p.is_file()),
    }
    return {
        "store": store,
        "dicom_only": dicom_only,
        "ids": ids,
        "sources": sources,
        "tiff": tiff,
    }


def du(*args: str) -> dict[str, Any]:
    done = run_wsi("du", *args, "--json")
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def files_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def missing_tiles(shard: Path, tiles: int) -> int:
    """Entries of the shard index (the last 16 * tiles + 4 bytes) marked missing."""
    raw = shard.read_bytes()[-(16 * tiles + 4) : -4]
    index = np.frombuffer(raw, "<u8").reshape(tiles, 2)
    return int(((index[:, 0] == MISSING) & (index[:, 1] == MISSING)).sum())


def test_figures_equal_the_files(slides: dict[str, Any]) -> None:
    store: Path = slides["store"]
    doc = du(str(store), "--by-level")
    by_id = {s["slide"]: s for s in doc["slides"]}
    assert set(by_id) == set(slides["ids"].values())
    for name, sid in slides["ids"].items():
        slide, folder = by_id[sid], store / sid
        assert slide["bytes"] == files_bytes(folder), name
        assert slide["source_bytes"] == slides["sources"][name], name
        assert slide["ratio"] == pytest.approx(slide["bytes"] / slide["source_bytes"])
        for level in slide["levels"]:
            shard = folder / "slide.zarr" / str(level["level"]) / "c/0/0/0"
            assert level["bytes"] == shard.stat().st_size
            assert level["tier"] == "jpeg"
            assert level["missing_tiles"] == missing_tiles(shard, level["tiles"])
        associated = sum(
            p.stat().st_size for p in (folder / "slide.zarr" / "associated").rglob("c/0/0/0")
        )
        assert slide["associated_bytes"] == associated
        levels = sum(lv["bytes"] for lv in slide["levels"])
        assert sum(slide["tiers"].values()) == levels + associated
        assert slide["metadata_bytes"] == slide["bytes"] - levels - associated
    total = doc["total"]
    assert total["slides"] == 4
    assert total["bytes"] == files_bytes(store)
    assert total["source_bytes"] == sum(slides["sources"].values())
    assert total["ratio"] == pytest.approx(total["bytes"] / total["source_bytes"])


def test_background_estimate(slides: dict[str, Any], tmp_path: Path) -> None:
    """The estimate of what the blank tiles would have cost, against what they did cost: the
    same slide converted with `--keep-background` (its background is flat grey). Zarr view only,
    where the difference is the tiles alone (a sparse DICOM instance lists its frames' positions,
    which costs header bytes)."""
    sid = slides["ids"]["tiff"]
    stores = {}
    for name, flags in (("sparse", ()), ("kept", ("--keep-background",))):
        stores[name] = tmp_path / name
        args = ("convert", str(slides["tiff"]), "--out", str(stores[name]), "--format", "zarr")
        done = run_wsi(*args, *flags)
        assert done.returncode == 0, done.stderr
    [sparse] = du(str(stores["sparse"]), sid, "--by-level")["slides"]
    [full] = du(str(stores["kept"]), sid, "--by-level")["slides"]
    assert sparse["missing_tiles"] > 10  # half of the slide's tiles are blank
    assert full["missing_tiles"] == 0 and full["background_saved_bytes"] == 0
    saved = full["bytes"] - sparse["bytes"]
    assert 0.8 * saved < sparse["background_saved_bytes"] < 1.25 * saved
    assert sparse["missing_tiles"] == sum(lv["missing_tiles"] for lv in sparse["levels"])


def test_table(slides: dict[str, Any]) -> None:
    store, ids = slides["store"], slides["ids"]
    done = run_wsi("du", str(store))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 + 4 + 1  # heading, one line per slide, total
    svs = next(line for line in lines if line.startswith(ids["svs"]))
    size = files_bytes(store / ids["svs"])
    assert f"{size:,}" in svs and f"{slides['sources']['svs']:,}" in svs
    assert f"{size / slides['sources']['svs']:.3f}x" in svs
    assert lines[-1].startswith("total (4 slides)") and f"{files_bytes(store):,}" in lines[-1]
    with_levels = run_wsi("du", str(store), ids["svs"], "--by-level").stdout.splitlines()
    assert sum(line.startswith("  level ") for line in with_levels) == 5


def test_dicom_only_slide(slides: dict[str, Any]) -> None:
    """Without the Zarr view, levels are described by their DICOM headers."""
    store: Path = slides["dicom_only"]
    [slide] = du(str(store), "--by-level")["slides"]
    folder = store / slide["slide"]
    assert slide["bytes"] == files_bytes(folder)
    assert slide["tiers"] == {"jpeg": slide["bytes"] - slide["metadata_bytes"]}
    widths = [lv["width"] for lv in slide["levels"]]
    assert widths == [2220, 1110, 555, 277, 138]
    for level in slide["levels"]:
        shard = folder / "slide.zarr" / str(level["level"]) / "c/0/0/0"
        assert level["bytes"] == shard.stat().st_size


def test_old_manifest_without_source_size(slides: dict[str, Any], tmp_path: Path) -> None:
    """Slides converted before the source size was recorded still report, without a ratio."""
    sid = slides["ids"]["svs"]
    copy = tmp_path / "old"
    shutil.copytree(slides["store"] / sid, copy / sid)
    manifest = json.loads((copy / sid / "manifest.json").read_text())
    del manifest["source_bytes"]
    del manifest["checksum"]  # nor a checksum (older still)
    (copy / sid / "manifest.json").write_text(json.dumps(manifest))
    doc = du(str(copy))
    assert doc["slides"][0]["source_bytes"] is None and doc["slides"][0]["ratio"] is None
    assert doc["total"]["ratio"] is None
    assert "n/a" in run_wsi("du", str(copy)).stdout.splitlines()[1]
    assert run_wsi("verify", str(copy)).returncode == 0  # and still verify


def test_an_unreadable_slide_does_not_hide_the_others(
    slides: dict[str, Any], tmp_path: Path
) -> None:
    copy = tmp_path / "store"
    shutil.copytree(slides["store"], copy)
    broken = slides["ids"]["svs"]
    (copy / broken / "slide.zarr" / "zarr.json").write_text("{")
    done = run_wsi("du", str(copy), "--json")
    assert done.returncode == 1
    doc = json.loads(done.stdout)
    assert [u["slide"] for u in doc["unreadable"]] == [broken]
    assert len(doc["slides"]) == 3
    assert doc["total"]["bytes"] == sum(s["bytes"] for s in doc["slides"])


def test_a_blank_tile_is_coded_once_per_coding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The estimate of the background not stored encodes a blank tile like the level's own;
    the slides of a store share a few codings, and encoding one for every level of every slide
    was a quarter of `wsi du`'s time (15 ms a slide)."""
    from PIL import Image

    import wsi
    from wsi.published import usage

    from .slide_copies import copy_slide

    store = tmp_path / "store"
    source = sample("CMU-1-Small-Region.svs")
    sid = wsi.convert_slide(source, wsi.Store(wsi.StoreSettings(str(store)))).slide_id
    for i in range(3):
        copy_slide(store, sid, f"copy-{i}", f"copy {i}", "case")
    remembered = getattr(usage, "_blank_jpeg_bytes", None)
    if remembered is not None:  # codings an earlier test remembered would go uncounted
        remembered.cache_clear()
    coded: list[str] = []
    save = Image.Image.save

    def spy(self: Image.Image, fp: Any, format: str | None = None, **params: Any) -> None:
        coded.append(str(format))
        save(self, fp, format, **params)

    monkeypatch.setattr(Image.Image, "save", spy)
    report = usage.store_usage(wsi.Store(wsi.StoreSettings(str(store))))
    assert len(report.slides) == 4
    sparse = [lv for lv in report.slides[0].levels if lv.missing_tiles]
    assert sparse  # some background left out: there is something to estimate
    assert 1 <= len(coded) <= len(sparse)
    estimates = {tuple(lv.saved_bytes for lv in slide.levels) for slide in report.slides}
    assert len(estimates) == 1
