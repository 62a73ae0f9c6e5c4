"""The Zarr view is OME-Zarr 0.5 as the community's models define it (`ome-zarr-models`, the
pydantic models of the NGFF specification): every published slide's group validates, pyramid
levels, scales and all; a group that breaks the specification does not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import zarr
from ome_zarr_models.v05.coordinate_transformations import PathScale, VectorScale
from ome_zarr_models.v05.image import Image
from pydantic import ValidationError

import wsi

from .conftest import make_tiff, sample


def _scale(transform: VectorScale | PathScale) -> list[float]:
    """The factors of a scale given inline (the writer never refers to a file of them)."""
    assert isinstance(transform, VectorScale), transform
    return transform.scale


@pytest.mark.parametrize("lossless", [False, True], ids=["jpeg", "lossless"])
def test_published_groups_validate(tmp_path: Path, lossless: bool) -> None:
    store = wsi.Store(wsi.StoreSettings(str(tmp_path / "store")))
    settings = wsi.ConvertSettings(
        wsi.PyramidSettings(lossless=lossless), formats=("zarr",) if lossless else ("zarr", "dicom")
    )
    for source in (sample("CMU-1-Small-Region.svs"), make_tiff(tmp_path / "g.tif", 1300, 900)):
        result = wsi.convert_slide(source, store, settings)
        image = Image.from_zarr(zarr.open_group(result.url, mode="r"))
        multiscale = image.attributes.ome.multiscales[0]
        levels = [d.path for d in multiscale.datasets]
        assert levels == [str(k) for k in range(len(levels))] and len(levels) >= 3
        scales = [_scale(d.coordinateTransformations[0]) for d in multiscale.datasets]
        assert scales[1][2] == pytest.approx(2 * scales[0][2])  # µm per pixel doubles


def test_a_group_breaking_the_specification_is_refused(tmp_path: Path) -> None:
    """The validation can fail: the same group with an axis type the specification forbids."""
    store = wsi.Store(wsi.StoreSettings(str(tmp_path / "store")))
    result = wsi.convert_slide(sample("CMU-1-Small-Region.svs"), store)
    broken = tmp_path / "broken.zarr"
    shutil.copytree(result.url, broken)
    meta = json.loads((broken / "zarr.json").read_text())
    meta["attributes"]["ome"]["multiscales"][0]["axes"][1]["type"] = "time"
    meta["attributes"]["ome"]["multiscales"][0]["axes"][2]["type"] = "time"
    (broken / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(ValidationError):
        Image.from_zarr(zarr.open_group(str(broken), mode="r"))
