"""A DICOM data set writer: explicit VR little endian, defined lengths, bytes as pydicom's
`dcmwrite` writes them.

A data set is given as data: a mapping of DICOM keywords to values, a sequence as a list of such
mappings (its items). `encode` writes its elements sorted by tag, each value padded to even
length (UI and OB with a NUL, text with a space), multiple values joined with a backslash, the
numbers of US/UL/SL/FL/FD/AT in binary, OB, UT and SQ in the long form, every sequence and item
with its length. Text is UTF-8: the data sets we write say ISO_IR 192.

Why not pydicom: importing it costs ~0.1 s (it always imports `requests`), which every `wsi
convert` of a TIFF paid for a few hundred bytes of header. tests/test_dicom_encode.py checks
these bytes against pydicom's for the data sets we write and the dictionary against pydicom's.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import TypeAlias, cast

from wsi.errors import InvalidArgument

Value: TypeAlias = (
    "str | int | float | bytes | Sequence[str] | Sequence[int] | Sequence[float] | Sequence[Item]"
)
"""An element's value: text (a DS or IS already formatted, or an int for IS), a number or
numbers for a binary VR, bytes for OB, several values as a list, a sequence as a list of items."""
Item: TypeAlias = Mapping[str, Value]
"""A data set, or an item of a sequence: keyword -> value."""

ITEM = 0xE000FFFE  # (FFFE,E000) little-endian as one uint32
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT"})
_CHARSET_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})
"""Text whose encoding Specific Character Set decides; other strings are ASCII."""
_BINARY = {"US": "H", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}

DICTIONARY: Mapping[str, tuple[int, str]] = {
    "FileMetaInformationVersion": (0x00020001, "OB"),
    "MediaStorageSOPClassUID": (0x00020002, "UI"),
    "MediaStorageSOPInstanceUID": (0x00020003, "UI"),
    "TransferSyntaxUID": (0x00020010, "UI"),
    "ImplementationClassUID": (0x00020012, "UI"),
    "ImplementationVersionName": (0x00020013, "SH"),
    "SpecificCharacterSet": (0x00080005, "CS"),
    "ImageType": (0x00080008, "CS"),
    "SOPClassUID": (0x00080016, "UI"),
    "SOPInstanceUID": (0x00080018, "UI"),
    "PyramidUID": (0x00080019, "UI"),
    "StudyDate": (0x00080020, "DA"),
    "ContentDate": (0x00080023, "DA"),
    "AcquisitionDateTime": (0x0008002A, "DT"),
    "StudyTime": (0x00080030, "TM"),
    "ContentTime": (0x00080033, "TM"),
    "AccessionNumber": (0x00080050, "SH"),
    "Modality": (0x00080060, "CS"),
    "Manufacturer": (0x00080070, "LO"),
    "InstitutionName": (0x00080080, "LO"),
    "ReferringPhysicianName": (0x00080090, "PN"),
    "CodeValue": (0x00080100, "SH"),
    "CodingSchemeDesignator": (0x00080102, "SH"),
    "CodeMeaning": (0x00080104, "LO"),
    "StudyDescription": (0x00081030, "LO"),
    "SeriesDescription": (0x0008103E, "LO"),
    "ManufacturerModelName": (0x00081090, "LO"),
    "FrameType": (0x00089007, "CS"),
    "VolumetricProperties": (0x00089206, "CS"),
    "PatientName": (0x00100010, "PN"),
    "PatientID": (0x00100020, "LO"),
    "PatientBirthDate": (0x00100030, "DA"),
    "PatientSex": (0x00100040, "CS"),
    "PatientIdentityRemoved": (0x00120062, "CS"),
    "DeidentificationMethod": (0x00120063, "LO"),
    "DeidentificationMethodCodeSequence": (0x00120064, "SQ"),
    "SliceThickness": (0x00180050, "DS"),
    "DeviceSerialNumber": (0x00181000, "LO"),
    "SoftwareVersions": (0x00181020, "LO"),
    "StudyInstanceUID": (0x0020000D, "UI"),
    "SeriesInstanceUID": (0x0020000E, "UI"),
    "StudyID": (0x00200010, "SH"),
    "SeriesNumber": (0x00200011, "IS"),
    "InstanceNumber": (0x00200013, "IS"),
    "FrameOfReferenceUID": (0x00200052, "UI"),
    "PositionReferenceIndicator": (0x00201040, "LO"),
    "FrameContentSequence": (0x00209111, "SQ"),
    "DimensionIndexValues": (0x00209157, "UL"),
    "DimensionOrganizationUID": (0x00209164, "UI"),
    "DimensionIndexPointer": (0x00209165, "AT"),
    "FunctionalGroupPointer": (0x00209167, "AT"),
    "DimensionOrganizationSequence": (0x00209221, "SQ"),
    "DimensionIndexSequence": (0x00209222, "SQ"),
    "DimensionOrganizationType": (0x00209311, "CS"),
    "IlluminationTypeCodeSequence": (0x00220016, "SQ"),
    "SamplesPerPixel": (0x00280002, "US"),
    "PhotometricInterpretation": (0x00280004, "CS"),
    "PlanarConfiguration": (0x00280006, "US"),
    "NumberOfFrames": (0x00280008, "IS"),
    "Rows": (0x00280010, "US"),
    "Columns": (0x00280011, "US"),
    "PixelSpacing": (0x00280030, "DS"),
    "BitsAllocated": (0x00280100, "US"),
    "BitsStored": (0x00280101, "US"),
    "HighBit": (0x00280102, "US"),
    "PixelRepresentation": (0x00280103, "US"),
    "BurnedInAnnotation": (0x00280301, "CS"),
    "ICCProfile": (0x00282000, "OB"),
    "ColorSpace": (0x00282002, "CS"),
    "LossyImageCompression": (0x00282110, "CS"),
    "LossyImageCompressionRatio": (0x00282112, "DS"),
    "LossyImageCompressionMethod": (0x00282114, "CS"),
    "PixelMeasuresSequence": (0x00289110, "SQ"),
    "ContainerIdentifier": (0x00400512, "LO"),
    "IssuerOfTheContainerIdentifierSequence": (0x00400513, "SQ"),
    "ContainerTypeCodeSequence": (0x00400518, "SQ"),
    "SpecimenIdentifier": (0x00400551, "LO"),
    "SpecimenUID": (0x00400554, "UI"),
    "AcquisitionContextSequence": (0x00400555, "SQ"),
    "SpecimenDescriptionSequence": (0x00400560, "SQ"),
    "IssuerOfTheSpecimenIdentifierSequence": (0x00400562, "SQ"),
    "SpecimenPreparationSequence": (0x00400610, "SQ"),
    "WholeSlideMicroscopyImageFrameTypeSequence": (0x00400710, "SQ"),
    "XOffsetInSlideCoordinateSystem": (0x0040072A, "DS"),
    "YOffsetInSlideCoordinateSystem": (0x0040073A, "DS"),
    "ZOffsetInSlideCoordinateSystem": (0x0040074A, "DS"),
    "ImagedVolumeWidth": (0x00480001, "FL"),
    "ImagedVolumeHeight": (0x00480002, "FL"),
    "ImagedVolumeDepth": (0x00480003, "FL"),
    "TotalPixelMatrixColumns": (0x00480006, "UL"),
    "TotalPixelMatrixRows": (0x00480007, "UL"),
    "TotalPixelMatrixOriginSequence": (0x00480008, "SQ"),
    "SpecimenLabelInImage": (0x00480010, "CS"),
    "FocusMethod": (0x00480011, "CS"),
    "ExtendedDepthOfField": (0x00480012, "CS"),
    "RecommendedAbsentPixelCIELabValue": (0x00480015, "US"),
    "ImageOrientationSlide": (0x00480102, "DS"),
    "OpticalPathSequence": (0x00480105, "SQ"),
    "OpticalPathIdentifier": (0x00480106, "SH"),
    "ObjectiveLensPower": (0x00480112, "DS"),
    "IlluminationColorCodeSequence": (0x00480108, "SQ"),
    "OpticalPathIdentificationSequence": (0x00480207, "SQ"),
    "PlanePositionSlideSequence": (0x0048021A, "SQ"),
    "ColumnPositionInTotalImagePixelMatrix": (0x0048021E, "SL"),
    "RowPositionInTotalImagePixelMatrix": (0x0048021F, "SL"),
    "NumberOfOpticalPaths": (0x00480302, "UL"),
    "TotalPixelMatrixFocalPlanes": (0x00480303, "UL"),
    "LabelText": (0x22000002, "UT"),
    "BarcodeValue": (0x22000005, "LT"),
    "SharedFunctionalGroupsSequence": (0x52009229, "SQ"),
    "PerFrameFunctionalGroupsSequence": (0x52009230, "SQ"),
}
"""(tag, VR) of the keywords we write (PS3.6), tags as one int (group << 16 | element)."""


def keyword_tag(keyword: str) -> int:
    """The tag of a DICOM keyword (an AT value)."""
    try:
        return DICTIONARY[keyword][0]
    except KeyError:
        raise InvalidArgument(f"unknown DICOM keyword {keyword}") from None


def element(tag: int, vr: str, value: bytes) -> bytes:
    """One element: tag, VR, length (2 bytes, or 2 reserved and 4 for the long VRs), value."""
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def item_header(length: int) -> bytes:
    """(FFFE,E000) with the length of the item (or of a frame) that follows."""
    return struct.pack("<II", ITEM, length)


def sequence(tag: int, items: Sequence[bytes]) -> bytes:
    """A sequence of defined length whose items (of defined length) hold the encoded `items`."""
    return element(tag, "SQ", b"".join(item_header(len(item)) + item for item in items))


def encode(data: Item) -> bytes:
    """The elements of `data`, sorted by tag."""
    try:
        entries = sorted((DICTIONARY[keyword], value) for keyword, value in data.items())
    except KeyError as exc:
        raise InvalidArgument(f"unknown DICOM keyword {exc.args[0]}") from None
    return b"".join(_element(tag, vr, value) for (tag, vr), value in entries)


def file_meta(meta: Item) -> bytes:
    """The Part 10 preamble, b"DICM" and the File Meta Information with its group length."""
    body = encode(meta)
    return bytes(128) + b"DICM" + element(0x00020000, "UL", struct.pack("<I", len(body))) + body


def _element(tag: int, vr: str, value: Value) -> bytes:
    if vr != "SQ":
        return element(tag, vr, _value_bytes(vr, value))
    items = []
    for item in value if isinstance(value, list | tuple) else [value]:
        if not isinstance(item, Mapping):
            raise InvalidArgument(f"the items of a sequence are data sets, not {item!r}")
        items.append(encode(item))
    return sequence(tag, items)


def _value_bytes(vr: str, value: Value) -> bytes:
    if isinstance(value, bytes):
        return value + b"\0" * (len(value) & 1)
    values: Sequence[object] = value if isinstance(value, list | tuple) else [value]
    if vr in _BINARY:
        return struct.pack(f"<{len(values)}{_BINARY[vr]}", *values)
    if vr == "AT":
        tags = cast(Sequence[int], values)
        return b"".join(struct.pack("<HH", t >> 16, t & 0xFFFF) for t in tags)
    text = "\\".join(str(v) for v in values)
    data = text.encode("utf-8" if vr in _CHARSET_VRS else "ascii")
    return data + (b"\0" if vr == "UI" else b" ") * (len(data) & 1)
