"""IIIF Image API 3.0 conformance, judged by the community's validator (`iiif-validator` on PyPI)
at compliance level 2, against `wsi serve` on a real port. The validator checks pixels: it needs
its own test image (10 x 10 squares of known colours), which we make and convert like a slide."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import pyvips
from iiif_validator.validator import ValidationInfo

import wsi
from server.settings import ServerSettings

from .helpers import serving

IDENTIFIER = "67352ccc-d1b0-11e1-89ae-279075081939"  # the validator's own test image id
VALIDATOR = Path(sys.executable).parent / "iiif-validate.py"


def squares_image(path: Path) -> Path:
    """The validator's test image: 1000 x 1000, square (x, y) of 100 px in colorInfo[x][y]."""
    colors = ValidationInfo().colorInfo
    pixels = np.zeros((1000, 1000, 3), np.uint8)
    for x in range(10):
        for y in range(10):
            pixels[y * 100 : (y + 1) * 100, x * 100 : (x + 1) * 100] = colors[x][y]
    image = pyvips.Image.new_from_array(pixels, interpretation="srgb")
    image.tiffsave(
        str(path), tile=True, tile_width=256, tile_height=256, pyramid=True,
        compression="jpeg", Q=95, bigtiff=True,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("iiif")
    source = squares_image(root / "squares.tif")
    store = root / "store"
    wsi.convert_slide(source, wsi.Store(wsi.StoreSettings(str(store))), slide_id=IDENTIFIER)
    with serving(ServerSettings(store=str(store))) as base:
        yield base.removeprefix("http://")


@pytest.mark.parametrize("level", [1, 2])
def test_iiif_validator_finds_no_failure(server: str, level: int) -> None:
    done = subprocess.run(
        [sys.executable, str(VALIDATOR), "-s", server, "-p", "iiif/3", "-i", IDENTIFIER,
         "--version", "3.0", "--level", str(level)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    report = done.stdout + done.stderr
    assert "FAIL" not in report, report
    assert done.returncode == 0, report
    assert " 0 failures)" in report, report
