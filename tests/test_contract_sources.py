"""The slide source contract on each backend, with the files that exercise it.

Each backend reads slides of its kind and is compared with a reader that shares none of its
code: OpenSlide for TIFF and DICOM slides, tifffile for what the OpenSlide backend reads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sample_data.make_bif import write_bif
from sample_data.make_leica import write_leica
from sample_data.make_mirax import tissue_image, write_mirax
from sample_data.make_ndpi import write_ndpi
from sample_data.make_philips import write_philips
from wsi.sources import (
    DicomSource,
    LeicaSource,
    MiraxSource,
    NdpiSource,
    OpenSlideSource,
    PhilipsSource,
    TiffSource,
    VentanaSource,
)

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
        "wide": write_ndpi(folder / "wide.ndpi", 2560, 1300, levels=2, stripe=2560),
        "narrow": write_ndpi(folder / "narrow.ndpi", 1400, 900, levels=2, stripe=160),
        "whole": write_ndpi(
            folder / "whole.ndpi", 1400, 900, levels=1, stripe=512, subsampling="422"
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


@pytest.fixture(scope="session")
def generated_vendor_slides(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Philips TIFF, MIRAX, Leica SCN and Ventana BIF slides of `sample_data/make_philips.py`,
    `make_mirax.py`, `make_leica.py` and `make_bif.py`, odd sizes, with a blank band down the
    middle whose tiles (camera images) are not stored (Philips, MIRAX)."""
    folder = tmp_path_factory.mktemp("vendors")
    image = tissue_image(1237, 1029, seed=9)
    image[:, 300:800] = 255
    made = {
        "philips": write_philips(folder / "philips.tiff", image, tile=256, levels=3),
        "philips-one-level": write_philips(folder / "one.tiff", image[:300, :400], levels=1),
        "mirax": write_mirax(folder / "mirax.mrxs", image, tile=256, levels=3, omit_blank=True),
        # Copied where the main image's offset is whole tiles: levels 0 and 1 of the first, all
        # of the second (its image, odd-sized below level 0, ends at the glass's edge).
        "leica": write_leica(folder / "leica.scn", image[:1024, :1024], offset=(1024, 512)),
        "leica-odd": write_leica(
            folder / "odd.scn", image[:1028, :1236], offset=(1024, 0), margin=0
        ),
        # BIF: one AOI over the whole image (every level copied); one from the third tile
        # column (levels 0 and 1 copied, level 2 decoded: the AOI starts inside its tile);
        # camera fields overlapping by 4 px (every level decoded).
        "ventana": write_bif(folder / "whole.bif", image),
        "ventana-aoi": write_bif(folder / "aoi.bif", image[:1024, :1236], aoi=(2, 0, 3, 4)),
        "ventana-overlap": write_bif(folder / "overlap.bif", image, overlap=4),
    }
    return made.__getitem__


class TestPhilipsSource(SourceContract):
    @pytest.fixture(params=["philips", "philips-one-level"])
    def case(
        self, request: pytest.FixtureRequest, generated_vendor_slides: Callable[[str], Path]
    ) -> SourceCase:
        path = generated_vendor_slides(request.param)
        return SourceCase(path, PhilipsSource, OpenSlideReference)


class TestMiraxSource(SourceContract):
    @pytest.fixture
    def case(self, generated_vendor_slides: Callable[[str], Path]) -> SourceCase:
        return SourceCase(generated_vendor_slides("mirax"), MiraxSource, OpenSlideReference)


class TestLeicaSource(SourceContract):
    @pytest.fixture(params=["leica", "leica-odd"])
    def case(
        self, request: pytest.FixtureRequest, generated_vendor_slides: Callable[[str], Path]
    ) -> SourceCase:
        path = generated_vendor_slides(request.param)
        return SourceCase(path, LeicaSource, OpenSlideReference)


class TestVentanaSource(SourceContract):
    @pytest.fixture(params=["ventana", "ventana-aoi", "ventana-overlap"])
    def case(
        self, request: pytest.FixtureRequest, generated_vendor_slides: Callable[[str], Path]
    ) -> SourceCase:
        path = generated_vendor_slides(request.param)
        return SourceCase(path, VentanaSource, OpenSlideReference)


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
