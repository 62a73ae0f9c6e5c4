"""Shared fixtures: sample slides, synthetic slides made with libvips, stores, reference pixels.

Where test slides come from, the one place that says so:

* `sample(name)`: a file (or folder) of `sample_data/`, in the repository;
* `standin:NAME`: made on first use by `sample_data/make_standins.py`, for a slide the repository
  may not carry (its licence is not stated) but whose property under test can be reproduced;
* `shared:NAME`: the original of such a slide, in `../shared/sample-slides/` beside the clone.
  Parameters naming one are marked `shared_slides` (see `shared()`): the default run deselects
  them, CI runs them with `-m shared_slides`, and selected without the folder they fail.

Parametrised tests take the `slide_path` fixture, which resolves all three kinds of name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sample_data.make_standins import STANDINS

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "sample_data"
SHARED = ROOT.parent / "shared" / "sample-slides"
STANDIN_PREFIX = "standin:"
SHARED_PREFIX = "shared:"


def sample(name: str) -> Path:
    """A slide (or folder of slides) of sample_data/; failing loudly beats skipping."""
    path = BUNDLED / name
    assert path.exists(), f"missing sample slide {path}"
    return path


def shared(name: str, *values: object) -> pytest.ParameterSet:
    """A test parameter naming `../shared/sample-slides/NAME` (then any further values of the
    parameter set), marked `shared_slides` so that only a run that asks for them needs them."""
    return pytest.param(SHARED_PREFIX + name, *values, marks=pytest.mark.shared_slides)


def _shared_sample(name: str) -> Path:
    path = SHARED / name
    assert path.exists(), (
        f"missing sample slide {path}: tests marked shared_slides need ../shared/sample-slides"
        " beside the clone (the default run deselects them: -m 'not shared_slides')"
    )
    return path


@pytest.fixture(scope="session")
def slide_path(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Resolves a slide name: `standin:NAME` (written once per session), `shared:NAME`, or a
    path inside sample_data/."""
    folder = tmp_path_factory.mktemp("standins")

    def resolve(name: str) -> Path:
        if name.startswith(SHARED_PREFIX):
            return _shared_sample(name.removeprefix(SHARED_PREFIX))
        if name.startswith(STANDIN_PREFIX):
            stem = name.removeprefix(STANDIN_PREFIX)
            path = folder / stem
            if not path.exists():
                STANDINS[stem](path)
            return path
        return sample(name)

    return resolve


def make_tiff(
    path: Path,
    width: int,
    height: int,
    *,
    tile: int = 256,
    compression: str = "jpeg",
    pyramid: bool = True,
    seed: int = 0,
    quality: int = 85,
) -> Path:
    """A small pyramidal TIFF with tissue-like noise and white background, via libvips."""
    import pyvips

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    base = pyvips.Image.new_from_array(small).resize(32, kernel="linear")
    base = base.crop(0, 0, min(width, base.width), min(height, base.height))
    if base.width < width or base.height < height:
        base = base.embed(0, 0, width, height, extend="copy")
    noise = pyvips.Image.gaussnoise(width, height, sigma=25, mean=0, seed=seed)
    image = (base + noise.bandjoin([noise, noise])).cast("uchar")
    cells = (rng.random((-(-height // 256), -(-width // 256))) > 0.5).astype(np.uint8) * 255
    mask = (
        pyvips.Image.new_from_array(cells).resize(256, kernel="nearest").crop(0, 0, width, height)
    )
    image = (mask > 128).ifthenelse(image, [245, 245, 245])
    kwargs = {"Q": quality} if compression == "jpeg" else {}
    image.tiffsave(
        str(path),
        tile=True,
        pyramid=pyramid,
        compression=compression,
        tile_width=tile,
        tile_height=tile,
        bigtiff=True,
        **kwargs,
    )
    return path


@pytest.fixture(scope="session")
def synthetic_jpeg_tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Odd-sized JPEG pyramid (exact 2x levels made by libvips), 3 x 2 tile rows of edge cases."""
    return make_tiff(tmp_path_factory.mktemp("syn") / "syn.tif", 1237, 1029)


@pytest.fixture(scope="session")
def medium_jpeg_tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Large enough that a conversion takes a few seconds (used to kill one mid-way)."""
    return make_tiff(tmp_path_factory.mktemp("med") / "medium.tif", 12000, 9000, pyramid=False)


def area_reference(level0: np.ndarray, k: int) -> np.ndarray:
    """Exact 2^k area downsample in float (sizes rounded down at each step)."""
    ref = level0.astype(np.float64)
    for _ in range(k):
        h, w = ref.shape[0] // 2 * 2, ref.shape[1] // 2 * 2
        ref = ref[:h, :w]
        ref = (ref[0::2, 0::2] + ref[0::2, 1::2] + ref[1::2, 0::2] + ref[1::2, 1::2]) / 4
    return ref


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def openslide_level0(path: Path) -> np.ndarray:
    """Level 0 as OpenSlide reads it (RGB, transparent parts composited on white)."""
    import openslide

    with openslide.OpenSlide(str(path)) as slide:
        rgba = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))
    alpha = rgba[..., 3:4].astype(np.float64) / 255
    return np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)


@pytest.fixture(scope="session", autouse=True)
def private_state_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The state folders of `s3://` stores (`IngestSettings.state_path`: job tables, spools and
    the serving processes' indexes) under the session's temporary folder, never in the home
    folder of whoever runs the tests (every run left a folder there per S3 test store). Set in
    the environment, so the services and conversions the tests start find it too."""
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))


@pytest.fixture(scope="session", autouse=True)
def private_config_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The default de-identification key (`wsi.pseudonyms.default_key_file`) under the session's
    temporary folder, never in the home folder of whoever runs the tests; set in the
    environment, so the services and conversions the tests start use the same key."""
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("xdg-config"))
    os.environ.pop("WSI_DEIDENTIFY_KEY_FILE", None)


@pytest.fixture
def env_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
