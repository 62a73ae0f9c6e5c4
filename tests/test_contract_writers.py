"""The pyramid writer contract on `OmeZarrWriter`, Zarr only and with its DICOM view."""

from __future__ import annotations

import pytest

from wsi.metadata import SlideMetadata
from wsi.published.layout import SlideKeys
from wsi.store import Store
from wsi.writers import OmeZarrWriter, PyramidWriter
from wsi.writers.dicom import DicomSlide

from .contracts.writers import PYRAMID, WriterContract, WriterSetup


def zarr_root(slide_id: str) -> str:
    return SlideKeys(slide_id).zarr_root


def dicom_slide(slide_id: str) -> DicomSlide:
    base = PYRAMID[0]
    return DicomSlide(
        slide_id=slide_id,
        metadata=SlideMetadata(),
        manufacturer="Contract",
        model_name="Synthetic",
        serial_number="0",
        software_versions="contract",
        mpp_mm=(0.00026, 0.00025),
        base_width=base.width,
        base_height=base.height,
        content_date="20240102",
        content_time="030405",
        icc_profile=None,
    )


class TestOmeZarrWriter(WriterContract):
    @pytest.fixture
    def setup(self) -> WriterSetup:
        def new(store: Store, slide_id: str) -> PyramidWriter:
            return OmeZarrWriter(store, SlideKeys(slide_id))

        return WriterSetup(new, zarr_root, ("jpeg", "zstd"))


class TestOmeZarrWriterWithDicomView(WriterContract):
    @pytest.fixture
    def setup(self) -> WriterSetup:
        def new(store: Store, slide_id: str) -> PyramidWriter:
            return OmeZarrWriter(store, SlideKeys(slide_id), dicom_slide(slide_id))

        return WriterSetup(new, zarr_root, ("jpeg",))
