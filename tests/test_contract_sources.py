"""The slide source contract on each backend, with the files that exercise it.

Each backend reads slides of its kind and is compared with a reader that shares none of its
code: OpenSlide for TIFF and DICOM slides, tifffile for what the OpenSlide backend reads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sample_data.make_ndpi import write_ndpi
from wsi.sources import DicomSource, NdpiSource, OpenSlideSource, TiffSource

from .conftest import shared
from .contracts.sources import (
    OpenSlideReference,
    SourceCase,
    SourceContract,
    TifffileReference,
)

SYNTHETIC = "synthetic_jpeg_tiff"
"""The session fixture that generates an odd-sized JPEG TIFF pyramid (conftest.py)."""


FRACTIONAL_LEVELS = (
    "OpenSlide places a level at (level-0 origin / downsample); at a non-integer downsample "
    "(levels 2 and 3 of boxes.tiff: 4.016, 8.086) that is a fraction of a pixel and OpenSlide "
    "interpolates, so OpenSlideSource's tiles and regions there are not the stored pixels, and a "
    "tile differs from the same rectangle read as a region (levels 0 and 1 match; conversions "
    "read level 0 only)"
)
KNOWN_OPENSLIDE_FAILURES = {
    "openslide-python-fixtures/boxes.tiff": (
        ("test_regions_equal_the_tiles", FRACTIONAL_LEVELS),
        ("test_pixels_match_the_reference", FRACTIONAL_LEVELS),
    ),
}


def _path(request: pytest.FixtureRequest, name: str, slide_path: Callable[[str], Path]) -> Path:
    return request.getfixturevalue(SYNTHETIC) if name == SYNTHETIC else slide_path(name)


class TestTiffSource(SourceContract):
    @pytest.fixture(
        params=[
            pytest.param("CMU-1-Small-Region.svs", id="aperio-jpeg"),
            pytest.param(SYNTHETIC, id="generated-jpeg-tiff"),
            pytest.param("openslide-python-fixtures/small.svs", id="tiny-aperio"),
            pytest.param("standin:aperio-jp2k.svs", id="aperio-jp2k-standin"),
            shared("tcga-cr-7395-01a-01-ts1.svs"),
        ]
    )
    def case(self, request: pytest.FixtureRequest, slide_path: Callable[[str], Path]) -> SourceCase:
        return SourceCase(_path(request, request.param, slide_path), TiffSource, OpenSlideReference)


@pytest.fixture(scope="session")
def generated_ndpi(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """NDPIs of `sample_data/make_ndpi.py`, by restart interval: 'wide' intervals are cropped
    into tiles, 'narrow' ones joined, 'whole' ones are the tiles (4:2:2 chroma: a tile is
    exactly what OpenSlide decodes at once, so chroma upsampling agrees at its edges)."""
    folder = tmp_path_factory.mktemp("ndpi")
    made = {
        "wide": write_ndpi(folder / "wide.ndpi", 1900, 1300, levels=2, stripe=1920),
        "narrow": write_ndpi(folder / "narrow.ndpi", 1400, 900, levels=2, stripe=160),
        "whole": write_ndpi(
            folder / "whole.ndpi", 1400, 900, levels=2, stripe=512, subsampling="422"
        ),
    }
    return made.__getitem__


class TestNdpiSource(SourceContract):
    @pytest.fixture(
        params=[
            pytest.param("hamamatsu/test3-DAPI-2-(387).ndpi", id="ndpi"),
            pytest.param("generated:wide", id="generated-ndpi-cropped"),
            pytest.param("generated:narrow", id="generated-ndpi-joined"),
            pytest.param("generated:whole", id="generated-ndpi-422"),
        ]
    )
    def case(
        self,
        request: pytest.FixtureRequest,
        slide_path: Callable[[str], Path],
        generated_ndpi: Callable[[str], Path],
    ) -> SourceCase:
        name: str = request.param
        path = generated_ndpi(name[10:]) if name.startswith("generated:") else slide_path(name)
        return SourceCase(path, NdpiSource, OpenSlideReference)


class TestOpenSlideSource(SourceContract):
    @pytest.fixture(
        params=[
            pytest.param("hamamatsu/test3-DAPI-2-(387).ndpi", id="ndpi"),
            pytest.param("openslide-python-fixtures/boxes.tiff", id="generic-tiff"),
        ]
    )
    def case(self, request: pytest.FixtureRequest, slide_path: Callable[[str], Path]) -> SourceCase:
        return SourceCase(
            slide_path(request.param),
            OpenSlideSource,
            TifffileReference,
            KNOWN_OPENSLIDE_FAILURES.get(request.param, ()),
        )


class TestDicomSource(SourceContract):
    @pytest.fixture(
        params=[
            pytest.param("highdicom/sm_image.dcm", id="uncompressed"),
            pytest.param("openslide-python-fixtures/boxes_0.dcm", id="jpeg-with-thumbnail"),
        ]
    )
    def case(self, request: pytest.FixtureRequest, slide_path: Callable[[str], Path]) -> SourceCase:
        return SourceCase(slide_path(request.param), DicomSource, OpenSlideReference)
