"""Our DICOM headers are encoded without pydicom (`wsi.writers.dicom_elements`), byte for byte as
pydicom's `dcmwrite` writes the same values: checked here for every flavour, sparse and full
levels, full and de-identified metadata (a patient name in UTF-8, ISO_IR 192), an ICC profile of
odd length, and for the encoder's padding rules on their own. The keywords' tags and VRs are
checked against pydicom's data dictionary. (dciodvfy checks the converted instances in
tests/test_dicom.py; tests/test_sparse.py reads the per-frame groups back.)"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence

from wsi.metadata import SlideMetadata
from wsi.model import Level
from wsi.published.layout import Flavor
from wsi.writers.dicom import (
    EMPTY_BOT,
    PIXEL_DATA_HEADER,
    DicomSlide,
    InstanceElements,
    SparseFrames,
    data_set_offset,
    instance_elements,
    instance_header,
    transfer_syntax,
)
from wsi.writers.dicom_elements import DICTIONARY, Item, encode, file_meta

FULL = SlideMetadata(
    patient_name="Müller-Lüdenscheidt^Jürgen=ミュラー^ユルゲン",
    patient_id="PÄT-0042",
    patient_birth_date="19700101",
    patient_sex="F",
    study_id="S-1",
    study_date="20240102",
    study_time="120000",
    accession_number="ACC-9",
    referring_physician_name="Dr^Ångström",
    study_description="Biopsie, Färbung HE",
    series_description="serie é",
    container_id="C-17",
    specimen_id="SP-3",
    institution_name="Hôpital Saint-Éloi",
)
ODD_ICC = bytes(range(251)) * 2 + b"\x07"
"""503 bytes: the OB value needs a padding NUL."""


def _jpeg(subsampling: str) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    if subsampling == "rgb":
        return bytes(imagecodecs.jpeg8_encode(pixels, level=90, colorspace="RGB"))
    return bytes(imagecodecs.jpeg8_encode(pixels, level=90, subsampling=subsampling))


def _slide(metadata: SlideMetadata | None, icc: bytes | None) -> DicomSlide:
    return DicomSlide(
        slide_id="0123456789abcdef01234567",
        metadata=SlideMetadata().deidentify() if metadata is None else metadata,
        manufacturer="Scanner Gmbh ä",
        model_name="Model 7",
        serial_number="SN-1",
        software_versions="4.2",
        mpp_mm=(0.000499, 0.0002527),
        base_width=40000,
        base_height=30001,
        content_date="20240102",
        content_time="030405",
        icc_profile=icc,
    )


def _dataset(item: Mapping[str, Any]) -> Dataset:
    """A pydicom data set holding the same values, each set as pydicom takes it."""
    ds = Dataset()
    for keyword, value in item.items():
        tag, vr = DICTIONARY[keyword]
        if vr == "SQ":
            ds.add_new(tag, vr, DicomSequence([_dataset(i) for i in value]))
        else:
            ds.add_new(tag, vr, value)
    return ds


def _pydicom_header(elements: InstanceElements, ours: bytes) -> bytes:
    """What pydicom's dcmwrite makes of the same File Meta Information and data set; a sparse
    instance's per-frame groups are those pydicom reads from our header (their values are
    tests/test_sparse.py's business)."""
    ds = _dataset(elements.data)
    if elements.per_frame:
        read = pydicom.dcmread(io.BytesIO(ours), stop_before_pixels=True)
        ds.PerFrameFunctionalGroupsSequence = read.PerFrameFunctionalGroupsSequence
    ds.file_meta = FileMetaDataset(_dataset(elements.meta))
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue() + PIXEL_DATA_HEADER + EMPTY_BOT


CASES = [
    pytest.param(flavor, index, sparse, meta, icc, frames, id=name)
    for name, flavor, index, sparse, meta, icc, frames in (
        ("volume-0-full-metadata", "VOLUME", 0, False, FULL, ODD_ICC, "420"),
        ("volume-0-sparse-full-metadata", "VOLUME", 0, True, FULL, None, "420"),
        ("volume-3-sparse-deidentified", "VOLUME", 3, True, None, ODD_ICC, "444"),
        ("volume-3-full-deidentified", "VOLUME", 3, False, None, None, "rgb"),
        ("volume-1-empty-metadata", "VOLUME", 1, False, SlideMetadata(), None, "420"),
        ("label-full-metadata", "LABEL", 0, False, FULL, None, "444"),
        ("label-deidentified", "LABEL", 0, False, None, ODD_ICC, "420"),
        ("overview-full-metadata", "OVERVIEW", 0, False, FULL, ODD_ICC, "rgb"),
        ("overview-sparse-deidentified", "OVERVIEW", 0, True, None, None, "420"),
        ("thumbnail-full-metadata", "THUMBNAIL", 0, False, FULL, None, "420"),
        ("thumbnail-sparse-deidentified", "THUMBNAIL", 0, True, None, ODD_ICC, "444"),
    )
]


@pytest.mark.parametrize(("flavor", "index", "sparse", "metadata", "icc", "frames"), CASES)
def test_instance_headers_are_the_bytes_pydicom_writes(
    flavor: Flavor,
    index: int,
    sparse: bool,
    metadata: SlideMetadata | None,
    icc: bytes | None,
    frames: str,
) -> None:
    slide = _slide(metadata, icc)
    level = Level(40000 >> index, 30001 >> index, 256, 256, float(1 << index))
    first = [_jpeg(frames), _jpeg(frames)]
    tiles = SparseFrames((0, 1, 7, level.cols + 3, level.tile_count - 1), 236) if sparse else None
    elements = instance_elements(slide, flavor, index, level, first, tiles)
    sop_uid, ours = instance_header(slide, flavor, index, level, first, tiles)
    assert ours == elements.header() and sop_uid == elements.sop_uid
    assert ours == _pydicom_header(elements, ours)
    ds = pydicom.dcmread(io.BytesIO(ours), stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == transfer_syntax(ours) == "1.2.840.10008.1.2.4.50"
    assert ours[data_set_offset(ours) : data_set_offset(ours) + 4] == b"\x08\x00\x05\x00"
    assert ds.ImageType[2] == flavor
    assert ds.DimensionOrganizationType == ("TILED_SPARSE" if sparse else "TILED_FULL")
    assert ds.NumberOfFrames == (len(tiles.tiles) if tiles else level.tile_count)
    if metadata is FULL:
        assert str(ds.PatientName) == FULL.patient_name
        assert ds.PatientIdentityRemoved == "NO"
    if metadata is None:
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientName == ""
    if icc is not None:
        assert ds.OpticalPathSequence[0].ICCProfile == icc + b"\0"
        assert "ColorSpace" not in ds.OpticalPathSequence[0]


def test_a_jpeg_2000_instance_names_its_transfer_syntax() -> None:
    pixels = np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    codestream = bytes(imagecodecs.jpeg2k_encode(pixels, level=0, codecformat="J2K"))
    slide = _slide(FULL, None)
    level = Level(1000, 800, 256, 256)
    elements = instance_elements(slide, "VOLUME", 0, level, [codestream])
    ours = elements.header()
    assert ours == _pydicom_header(elements, ours)
    ds = pydicom.dcmread(io.BytesIO(ours), stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID.startswith("1.2.840.10008.1.2.4.9")
    assert ds.LossyImageCompressionMethod == "ISO_15444_1"


def test_every_keyword_has_pydicoms_tag_and_vr() -> None:
    for keyword, (tag, vr) in DICTIONARY.items():
        assert tag_for_keyword(keyword) == tag, keyword
        assert dictionary_VR(tag) == vr, keyword


EDGES: dict[str, Any] = {
    "SpecificCharacterSet": "ISO_IR 192",
    "SOPInstanceUID": "1.2.3",  # odd: a NUL pads it
    "PatientName": "Éa^b",  # 4 characters, 5 bytes in UTF-8: a space pads it
    "PatientID": "",  # empty: length 0
    "SoftwareVersions": ["one", "twö", ""],  # several values, one empty
    "InstanceNumber": 12,
    "SeriesNumber": "7",
    "ImageOrientationSlide": ["0.0", "-1.0", "0.0", "-1.0", "0.0", "0.0"],
    "SliceThickness": "0.001",
    "Rows": 65535,
    "RecommendedAbsentPixelCIELabValue": [1, 2, 3],
    "TotalPixelMatrixColumns": 4_000_000_000,
    "ImagedVolumeWidth": 19.96,
    "ICCProfile": b"\x01\x02\x03",
    "LabelText": "long text, odd",
    "BarcodeValue": "x",
    "AcquisitionContextSequence": [],
    "SpecimenDescriptionSequence": [
        {
            "SpecimenIdentifier": "ü",
            "IssuerOfTheSpecimenIdentifierSequence": [],
            "SpecimenPreparationSequence": [{"CodeValue": "1", "CodeMeaning": "odd"}, {}],
        }
    ],
    "DimensionIndexSequence": [{"DimensionIndexPointer": 0x0048021E}],
    "SharedFunctionalGroupsSequence": [
        {"PixelMeasuresSequence": [{"PixelSpacing": ["0.00025", "0.0002527"]}]}
    ],
}
"""One element of each kind our headers use, at the edges of the padding rules."""


def test_the_encoder_pads_joins_and_nests_as_pydicom_does() -> None:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, _dataset(EDGES), implicit_vr=False, little_endian=True)
    assert encode(EDGES) == buffer.getvalue()


def test_the_file_meta_information_has_its_group_length() -> None:
    meta: Item = {
        "FileMetaInformationVersion": b"\x00\x01",
        "MediaStorageSOPClassUID": "1.2.840.10008.5.1.4.1.1.77.1.6",
        "MediaStorageSOPInstanceUID": "2.25.1",
        "TransferSyntaxUID": "1.2.840.10008.1.2.1",
        "ImplementationClassUID": "2.25.2",
        "ImplementationVersionName": "X",
    }
    ds = Dataset()
    ds.file_meta = FileMetaDataset(_dataset(meta))
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    assert file_meta(meta) == buffer.getvalue()
