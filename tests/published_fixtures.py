"""The store of published slides that the reader's tests read (tests/test_published.py,
tests/test_published_store.py). The fixtures are imported by the modules that use them
(`from .published_fixtures import published_store as _store_fixture`), like
`tests/s3server.py`'s `seaweedfs`: their names stay out of every other module, and each importing
module gets its own module-scoped instance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

import wsi
from wsi import ReaderSettings
from wsi.published import layout

from .conftest import BUNDLED, make_tiff

# The fixtures below are imported by the modules that use them (`from .helpers import
# published_store as _store_fixture`), like `tests/s3server.py`'s `seaweedfs`: their names stay
# out of every other module, and each importing module gets its own module-scoped instance.
CMU_SMALL_REGION = BUNDLED / "CMU-1-Small-Region.svs"
ALL_ASSOCIATED = ReaderSettings(allow_associated=frozenset(layout.ASSOCIATED_FLAVOR))
"""A reader allowed every associated image (label, macro, thumbnail)."""


@pytest.fixture(scope="module", name="generated")
def generated_jpeg_tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Odd-sized JPEG pyramid: partial edge tiles in both directions."""
    return make_tiff(tmp_path_factory.mktemp("gen") / "gen.tif", 1237, 1029, seed=7)


@pytest.fixture(scope="module", name="store")
def published_store(generated: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both slides converted into one local store, every source tile stored as it is (so the
    reader is checked against the source's own bytes; tests/test_sparse.py and
    tests/test_huffman.py read slides converted with blank glass left out and tiles optimised)."""
    root = tmp_path_factory.mktemp("published")
    st = wsi.Store(wsi.StoreSettings(str(root)))
    as_stored = wsi.ConvertSettings(
        wsi.PyramidSettings(optimize_huffman=False, keep_background=True)
    )
    cmu = wsi.convert_slide(CMU_SMALL_REGION, st, as_stored).slide_id
    gen = wsi.convert_slide(generated, st, as_stored).slide_id
    return {
        "root": root,
        "store": st,
        "cmu": cmu,
        "gen": gen,
        "sources": {cmu: CMU_SMALL_REGION, gen: generated},
        "settings": as_stored,
    }


def zarr_level(root: Path, slide_id: str, path: str) -> np.ndarray:
    """A level (or associated image) as zarr-python reads it, channels last."""
    group = zarr.open_group(str(root / slide_id / "slide.zarr"), mode="r")
    array = group[path]
    assert isinstance(array, zarr.Array), path
    return np.asarray(array[:]).transpose(1, 2, 0)
