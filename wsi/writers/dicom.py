"""DICOM VL Whole Slide Microscopy headers for the objects the Zarr writer streams.

One stored object per level is both a DICOM Part 10 file and the level's Zarr shard:

    preamble, file meta, data set ... (7FE0,0010) OB undefined length
      item: empty Basic Offset Table
      item: frame 1 (a complete JPEG, padded to even length) ... item: frame n
      sequence delimiter
    (FFFC,FFFC) Data Set Trailing Padding, OB: the Zarr shard index (offsets point at the frames)

The header is written before the first frame, so the object streams front to back like any
shard. UIDs are derived from the slide id, so converting a slide again gives the same UIDs. The
header is described once as data (`instance_elements`: keyword -> value, for every flavour) and
encoded by `wsi.writers.dicom_elements`, byte for byte as pydicom would write it, without pydicom.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import dataclass

from wsi import __version__
from wsi.codecs import jpeg as jpeglib
from wsi.codecs import jpeg2000
from wsi.codecs.colour import dicom_lab
from wsi.errors import CorruptSlide, InvalidArgument
from wsi.metadata import SlideMetadata
from wsi.model import Level
from wsi.published.layout import Flavor, instance_name
from wsi.writers.dicom_elements import ITEM as ITEM
from wsi.writers.dicom_elements import (
    Item,
    Value,
    element,
    encode,
    file_meta,
    keyword_tag,
    sequence,
)
from wsi.writers.dicom_elements import item_header as item_header

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
IMPLEMENTATION_UID = "2.25.229370117045469307931496209404461426517"  # wsistore, fixed
DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
PIXEL_DATA_HEADER = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
EMPTY_BOT = struct.pack("<HHI", 0xFFFE, 0xE000, 0)


def derived_uid(slide_id: str, *parts: str) -> str:
    """A stable UID under the UUID root 2.25 (PS3.5 B.2), from the slide id and a purpose."""
    digest = hashlib.sha256("/".join(("wsistore", slide_id, *parts)).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big') >> 1}"


JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
"""Transfer syntax of instances whose frames are baseline JPEG (PS3.5 A.4.1)."""
JPEG_XL_JPEG_RECOMPRESSION = "1.2.840.10008.1.2.4.111"
"""Transfer syntax of archived instances (PS3.5 A.4.11, 2023): each frame a JPEG XL stream that
rebuilds the baseline JPEG frame it was made from byte for byte."""
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
_META_START = 132  # 128-byte preamble, then b"DICM"
_TRANSFER_SYNTAX_TAG = (0x0002, 0x0010)


def _file_meta_elements(header: bytes) -> tuple[int, list[tuple[tuple[int, int], bytes, bytes]]]:
    """(end of the File Meta Information, its elements as (tag, VR, value)) of a Part 10 file's
    first bytes; group 2 is always explicit VR little endian (PS3.10 7.1)."""
    if header[128:_META_START] != b"DICM":
        raise CorruptSlide("not a DICOM Part 10 object (no DICM prefix)")
    pos = _META_START
    elements: list[tuple[tuple[int, int], bytes, bytes]] = []
    while pos + 8 <= len(header):
        group, element = struct.unpack_from("<HH", header, pos)
        if group != 0x0002:
            return pos, elements
        vr = header[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", header, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", header, pos + 6)
            start = pos + 8
        if start + length > len(header):
            break
        elements.append(((group, element), vr, header[start : start + length]))
        pos = start + length
    raise CorruptSlide("the DICOM header ends inside its File Meta Information")


def transfer_syntax(header: bytes) -> str:
    """The Transfer Syntax UID in a Part 10 file's File Meta Information."""
    _, elements = _file_meta_elements(header)
    for tag, _vr, value in elements:
        if tag == _TRANSFER_SYNTAX_TAG:
            return value.rstrip(b"\0 ").decode("ascii")
    raise CorruptSlide("the DICOM header has no Transfer Syntax UID")


def data_set_offset(header: bytes) -> int:
    """Where the data set of a Part 10 file starts (right after its File Meta Information)."""
    return _file_meta_elements(header)[0]


def with_transfer_syntax(header: bytes, uid: str) -> bytes:
    """`header` (the bytes of a Part 10 file up to its first frame) with another Transfer Syntax
    UID: the File Meta Information is written again with the new UID (padded to even length
    with a NUL, as pydicom writes UIDs) and its group length; the data set is not touched. So
    switching back gives the original bytes, which `wsi restore` relies on."""
    end, elements = _file_meta_elements(header)
    value = _uid_value(uid)
    replaced = [
        (tag, vr, value if tag == _TRANSFER_SYNTAX_TAG else old) for tag, vr, old in elements
    ]
    return _with_file_meta(header, end, replaced)


HEADER_BLOCK = 4096
"""The header of a level object whose frames take `PADDED_FROM` bytes or more is padded to a
multiple of this (`padded_header`): a file system block on most, so that a local store can put
the header in front of frames already written without moving them (`wsi.store.head_last`). The same
on every store, so that an object's bytes do not depend on where it was written."""
PADDED_FROM = 8 * 1024 * 1024
"""From this size of the frames on, the padding (< 4 KiB) is below 0.05% of the object; smaller
objects are not padded (copying their frames behind the header costs a few milliseconds)."""
PADDING_CREATOR_UID = "2.25.9350359900783425216427788193817733399"
"""Private Information Creator UID of the padding `padded_header` adds (wsistore's, fixed)."""
_PRIVATE_CREATOR_TAG = (0x0002, 0x0100)
_PRIVATE_INFORMATION_TAG = (0x0002, 0x0102)


def header_multiple(frames: int) -> int:
    """What the header of a level object whose frames take `frames` bytes is padded to a
    multiple of (1: not padded)."""
    return HEADER_BLOCK if frames >= PADDED_FROM else 1


def padded_header(header: bytes, multiple: int) -> bytes:
    """`header` grown to a multiple of `multiple` bytes (even), by a Private Information
    element of zeros at the end of the File Meta Information (PS3.10 7.1: (0002,0102), with
    its creator in (0002,0100)). The data set is not touched, so readers see the same
    instance (see `HEADER_BLOCK`)."""
    if multiple <= 1 or len(header) % multiple == 0:
        return header
    end, elements = _file_meta_elements(header)
    kept = [e for e in elements if e[0] not in (_PRIVATE_CREATOR_TAG, _PRIVATE_INFORMATION_TAG)]
    creator = _uid_value(PADDING_CREATOR_UID)
    unpadded = len(_with_file_meta(header, end, kept))
    added = 8 + len(creator) + 12  # the creator element, the OB element's header
    zeros = -(unpadded + added) % multiple
    padding = [
        (_PRIVATE_CREATOR_TAG, b"UI", creator),
        (_PRIVATE_INFORMATION_TAG, b"OB", bytes(zeros)),
    ]
    return _with_file_meta(header, end, kept + padding)


def _uid_value(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\0" * (len(value) & 1)


def _with_file_meta(
    header: bytes, end: int, elements: list[tuple[tuple[int, int], bytes, bytes]]
) -> bytes:
    """`header` with its File Meta Information (which ends at `end`) made of `elements` and
    their group length."""
    parts = []
    for tag, vr, data in elements:
        if tag == (0x0002, 0x0000):
            continue
        if vr in _LONG_VRS:
            head = struct.pack("<HH2sHI", *tag, vr, 0, len(data))
        else:
            head = struct.pack("<HH2sH", *tag, vr, len(data))
        parts.append(head + data)
    body = b"".join(parts)
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return header[:_META_START] + group_length + body + header[end:]


def trailer_header(index_length: int) -> bytes:
    """(FFFC,FFFC) OB element header; its value, the shard index, ends the object."""
    return DELIMITER + struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, index_length)


@dataclass(frozen=True)
class DicomSlide:
    """Per-slide values shared by all instances of the slide."""

    slide_id: str
    metadata: SlideMetadata
    manufacturer: str
    model_name: str
    serial_number: str
    software_versions: str
    mpp_mm: tuple[float, float]
    """(row spacing, column spacing) of level 0 in millimetres."""
    base_width: int
    base_height: int
    content_date: str
    content_time: str
    icc_profile: bytes | None

    objective_power: float | None = None
    """The scanner's objective magnification (Objective Lens Power of the optical path), when
    the source says: DICOM viewers show magnification from it, and a slide converted back from
    its export keeps it."""

    variant: str = ""
    """A digest of the conversion's settings that change what the instances hold (pixels,
    frames, transfer syntax, de-identification): converted again with the same settings, a slide
    gets the same UIDs; with others, other series, instance and pyramid UIDs, as DICOM requires
    of different objects."""

    def physical_uid(self, purpose: str) -> str:
        """The UID of what the conversion does not change (the study, the specimen, its frame of
        reference): the slide id's, or under de-identification other ones (PS3.15 Table E.1-1
        replaces every UID, so that the copy does not share them with the identified one)."""
        if self.metadata.deidentified:
            return derived_uid(self.slide_id, "deidentified", purpose)
        return derived_uid(self.slide_id, purpose)

    def object_uid(self, purpose: str, *parts: str) -> str:
        """The UID of an object of this conversion (series, instance, pyramid)."""
        return derived_uid(self.slide_id, self.variant, purpose, *parts)

    @property
    def study_uid(self) -> str:
        return self.physical_uid("study")

    @property
    def series_uid(self) -> str:
        return self.object_uid("series")

    def instance_uid(self, name: str) -> str:
        return self.object_uid("instance", name)


def _code(value: str, scheme: str, meaning: str) -> Item:
    return {"CodeValue": value, "CodingSchemeDesignator": scheme, "CodeMeaning": meaning}


def _patient_study_series(slide: DicomSlide) -> dict[str, Value]:
    """Patient, study, series, equipment, specimen, frame of reference: same in every instance."""
    m = slide.metadata
    container = m.container_id or ("SLIDE" if m.deidentified else slide.slide_id[:16])
    # De-identified: a dummy Study ID (PS3.15 action Z allows one), as an empty one leaves the
    # instance without what a DICOMDIR needs (dciodvfy warns of it).
    placeholder = "ANONYMOUS" if m.deidentified else slide.slide_id[:16]
    data: dict[str, Value] = {
        "SpecificCharacterSet": "ISO_IR 192",
        "SOPClassUID": WSI_SOP_CLASS,
        "Modality": "SM",
        "PatientName": m.patient_name,
        "PatientID": m.patient_id or placeholder,
        "PatientBirthDate": m.patient_birth_date,
        "PatientSex": m.patient_sex,
        "StudyInstanceUID": slide.study_uid,
        "StudyDate": m.study_date or slide.content_date,
        "StudyTime": m.study_time or slide.content_time,
        "StudyID": m.study_id or placeholder,
        "AccessionNumber": m.accession_number,
        "ReferringPhysicianName": m.referring_physician_name,
        "SeriesInstanceUID": slide.series_uid,
        "SeriesNumber": 1,
        "FrameOfReferenceUID": slide.physical_uid("frame-of-reference"),
        "PositionReferenceIndicator": "SLIDE_CORNER",
        "Manufacturer": slide.manufacturer,
        "ManufacturerModelName": slide.model_name,
        "DeviceSerialNumber": slide.serial_number,
        "SoftwareVersions": [slide.software_versions, f"wsistore {__version__}"],
        "ContentDate": slide.content_date,
        "ContentTime": slide.content_time,
        "AcquisitionDateTime": slide.content_date + slide.content_time,
        "ContainerIdentifier": container,
        "IssuerOfTheContainerIdentifierSequence": [],
        "ContainerTypeCodeSequence": [_code("433466003", "SCT", "Microscope slide")],
        "SpecimenDescriptionSequence": [
            {
                "SpecimenIdentifier": m.specimen_id or container,
                "SpecimenUID": slide.physical_uid("specimen"),
                "IssuerOfTheSpecimenIdentifierSequence": [],
                "SpecimenPreparationSequence": [],
            }
        ],
        "AcquisitionContextSequence": [],
        "PatientIdentityRemoved": "YES" if m.deidentified else "NO",
    }
    optional = {
        "StudyDescription": m.study_description,
        "SeriesDescription": m.series_description,
        "InstitutionName": m.institution_name,
    }
    data.update((keyword, value) for keyword, value in optional.items() if value)
    if m.deidentified:
        data["DeidentificationMethod"] = "PS3.15 Basic Application Level Confidentiality Profile"
        data["DeidentificationMethodCodeSequence"] = [
            _code("113100", "DCM", "Basic Application Confidentiality Profile")
        ]
    return data


def _optical_path(slide: DicomSlide) -> Item:
    path: dict[str, Value] = {
        "OpticalPathIdentifier": "1",
        "IlluminationTypeCodeSequence": [_code("111744", "DCM", "Brightfield illumination")],
        "IlluminationColorCodeSequence": [_code("414298005", "SCT", "Full Spectrum")],
        "ICCProfile": slide.icc_profile or srgb_profile(),
    }
    if slide.objective_power:
        path["ObjectiveLensPower"] = _ds(slide.objective_power)
    if not slide.icc_profile:
        path["ColorSpace"] = "SRGB"
    return path


@functools.cache
def srgb_profile() -> bytes:
    """A standard sRGB ICC profile for sources that carry none (DICOM requires one). lcms
    stamps the creation time into the header; a fixed date keeps conversions reproducible."""
    from PIL import ImageCms  # only for sources without a profile

    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    data[24:36] = struct.pack(">6H", 2000, 1, 1, 0, 0, 0)
    return bytes(data)


def photometric_interpretation(stream: bytes) -> str:
    """What a JPEG stream holds, in DICOM's words: RGB-coded, or YCbCr, which a baseline JPEG
    instance calls YBR_FULL_422 whatever its chroma sampling (PS3.5 Table 8.2.1-1; PS3.3
    C.7.6.3.1.2: "the chrominance sub-sampling in the JPEG bit stream may differ from this
    description"), the one YCbCr value the VL WSI IOD lists (C.8.12.4.1.5), and what scanners'
    own DICOM (Hamamatsu's 4:4:4) and wsidicom write. YBR_FULL, which a 4:4:4 stream was labelled
    before, is not in that list: dciodvfy refused it and OpenSlide would not open the slide."""
    transform = jpeglib.adobe_transform(stream)
    if transform == 0:
        return "RGB"
    ids, _sampling = jpeglib.components(stream)
    if transform is None and ids == b"RGB":
        return "RGB"
    return "YBR_FULL_422"


def frame_encoding(first_frame: bytes) -> tuple[str, str, str]:
    """(transfer syntax, photometric interpretation, lossy compression method) of an instance
    whose frames are like `first_frame`: baseline JPEG, or JPEG 2000 codestreams of RGB
    components kept from the source (PS3.5 8.2.4 gives their photometric interpretation)."""
    if first_frame.startswith(jpeg2000.SOC):
        syntax, photometric = jpeg2000.parse(first_frame).dicom(ycbcr=False)
        return syntax, photometric, "ISO_15444_1"
    return JPEG_BASELINE, photometric_interpretation(first_frame), "ISO_10918_1"


@dataclass(frozen=True)
class InstanceElements:
    """What the header of an instance says, as data (see `wsi.writers.dicom_elements`)."""

    sop_uid: str
    meta: Item
    """The File Meta Information."""
    data: Item
    """The data set before Pixel Data, but for a sparse instance's per-frame groups."""
    per_frame: bytes
    """A sparse instance's Per-Frame Functional Groups Sequence, encoded (`_per_frame_groups`);
    empty for a TILED_FULL one. It sorts after every element of `data`."""

    def header(self) -> bytes:
        """The Part 10 object's bytes up to its first frame item."""
        body = file_meta(self.meta) + encode(self.data) + self.per_frame
        return body + PIXEL_DATA_HEADER + EMPTY_BOT


def instance_header(
    slide: DicomSlide,
    flavor: Flavor,
    level_index: int,
    level: Level,
    first_frames: list[bytes],
    sparse: SparseFrames | None = None,
    shows_label: bool = False,
) -> tuple[str, bytes]:
    """(SOP Instance UID, the object's bytes up to its first frame item). The first frames tell
    the colour space and an approximate compression ratio. With `sparse`, the instance is
    TILED_SPARSE: frames only for the stored tiles (see `SparseFrames`). `shows_label`: a
    thumbnail that may show the label says so (Specimen Label In Image); labels and overviews
    always do."""
    elements = instance_elements(
        slide, flavor, level_index, level, first_frames, sparse, shows_label
    )
    return elements.sop_uid, elements.header()


def instance_elements(
    slide: DicomSlide,
    flavor: Flavor,
    level_index: int,
    level: Level,
    first_frames: list[bytes],
    sparse: SparseFrames | None = None,
    shows_label: bool = False,
) -> InstanceElements:
    """The header of `instance_header`, as data: one description for every flavour, TILED_FULL
    or TILED_SPARSE."""
    if level.tile_count <= 0:
        raise InvalidArgument("an instance needs at least one frame")
    name = instance_name(flavor, level_index)
    sop_uid = slide.instance_uid(name)
    derived = flavor == "VOLUME" and level_index > 0
    image_type = [
        "DERIVED" if derived else "ORIGINAL",
        "PRIMARY",
        flavor,
        "RESAMPLED" if derived else "NONE",
    ]
    data: dict[str, Value] = {
        **_patient_study_series(slide),
        "SOPInstanceUID": sop_uid,
        "ImageType": image_type,
        "InstanceNumber": level_index + 1 if flavor == "VOLUME" else 100 + len(name),
        **_pixel_description(level, first_frames, flavor, shows_label),
        **_geometry(slide, level, image_type, sparse is not None),
    }
    if flavor == "VOLUME":
        data["PyramidUID"] = slide.object_uid("pyramid")
    if flavor == "LABEL":  # Slide Label module: we do not read barcodes or label text
        data["BarcodeValue"] = ""
        data["LabelText"] = ""
    per_frame = b""
    if sparse is not None:
        data.update(_sparse_frames(slide, sparse))
        per_frame = _per_frame_groups(slide, level, sparse.tiles)
    meta: dict[str, Value] = {
        "FileMetaInformationVersion": b"\x00\x01",
        "MediaStorageSOPClassUID": WSI_SOP_CLASS,
        "MediaStorageSOPInstanceUID": sop_uid,
        "TransferSyntaxUID": frame_encoding(first_frames[0])[0],
        "ImplementationClassUID": IMPLEMENTATION_UID,
        "ImplementationVersionName": f"WSISTORE_{__version__}"[:16],
    }
    return InstanceElements(sop_uid, meta, data, per_frame)


def _pixel_description(
    level: Level, first_frames: list[bytes], flavor: Flavor, shows_label: bool
) -> Item:
    """Image Pixel, frames and compression: what a decoder needs to know about the frames."""
    _, photometric, method = frame_encoding(first_frames[0])
    raw = len(first_frames) * level.tile_width * level.tile_height * 3
    in_image = "YES" if flavor in ("LABEL", "OVERVIEW") or shows_label else "NO"
    return {
        "SamplesPerPixel": 3,
        "PhotometricInterpretation": photometric,
        "PlanarConfiguration": 0,
        "NumberOfFrames": level.tile_count,
        "Rows": level.tile_height,
        "Columns": level.tile_width,
        "BitsAllocated": 8,
        "BitsStored": 8,
        "HighBit": 7,
        "PixelRepresentation": 0,
        "BurnedInAnnotation": in_image,
        "SpecimenLabelInImage": in_image,
        "LossyImageCompression": "01",
        "LossyImageCompressionRatio": f"{raw / max(1, sum(map(len, first_frames))):.2f}",
        "LossyImageCompressionMethod": method,
        "DimensionOrganizationType": "TILED_FULL",
        "VolumetricProperties": "VOLUME",
    }


def _geometry(slide: DicomSlide, level: Level, image_type: list[str], sparse: bool) -> Item:
    """Where the pixels are on the slide: total pixel matrix, spacing, orientation, optics, and
    the functional groups all frames share (a sparse instance's also name its optical path)."""
    # Pixel spacing of this level: level-0 spacing scaled by the true size ratio.
    row_mm = slide.mpp_mm[0] * slide.base_height / level.height
    col_mm = slide.mpp_mm[1] * slide.base_width / level.width
    shared: dict[str, Value] = {
        "PixelMeasuresSequence": [
            {"PixelSpacing": [_ds(row_mm), _ds(col_mm)], "SliceThickness": "0.001"}
        ],
        "WholeSlideMicroscopyImageFrameTypeSequence": [{"FrameType": image_type}],
    }
    if sparse:  # Optical Path Identification is a functional group of every non-TILED_FULL one
        shared["OpticalPathIdentificationSequence"] = [{"OpticalPathIdentifier": "1"}]
    return {
        "DimensionOrganizationSequence": [{"DimensionOrganizationUID": _organization_uid(slide)}],
        "ImagedVolumeWidth": slide.mpp_mm[1] * slide.base_width,
        "ImagedVolumeHeight": slide.mpp_mm[0] * slide.base_height,
        "ImagedVolumeDepth": 0.001,
        "TotalPixelMatrixColumns": level.width,
        "TotalPixelMatrixRows": level.height,
        "TotalPixelMatrixFocalPlanes": 1,
        "TotalPixelMatrixOriginSequence": [
            {f"{axis}OffsetInSlideCoordinateSystem": "0.0" for axis in "XYZ"}
        ],
        "ImageOrientationSlide": ["0.0", "-1.0", "0.0", "-1.0", "0.0", "0.0"],
        "FocusMethod": "AUTO",
        "ExtendedDepthOfField": "NO",
        "NumberOfOpticalPaths": 1,
        "OpticalPathSequence": [_optical_path(slide)],
        "SharedFunctionalGroupsSequence": [shared],
    }


def _organization_uid(slide: DicomSlide) -> str:
    return slide.object_uid("dimension-organization")


@dataclass(frozen=True)
class SparseFrames:
    """The frames of a TILED_SPARSE instance: the tiles a level stores (blank ones are absent)."""

    tiles: tuple[int, ...]
    """Row-major tile numbers of the stored tiles, ascending: frame k + 1 is tile tiles[k]."""
    fill: int
    """Grey of the absent tiles (Recommended Absent Pixel CIELab Value)."""


def _sparse_frames(slide: DicomSlide, sparse: SparseFrames) -> Item:
    """TILED_SPARSE (PS3.3 C.7.6.17.3): one frame per stored tile, each placed by its Plane
    Position (Slide) in the Per-Frame Functional Groups (top-left pixel, 1-based, and its slide
    coordinates in mm under the orientation and origin `_geometry` writes; see
    `_per_frame_groups`) and indexed by tile column and row (Multi-frame Dimension), and the
    colour viewers show where no frame is. What replaces the TILED_FULL values."""
    if not sparse.tiles:
        raise InvalidArgument("a sparse instance needs at least one frame")
    dimensions: list[Item] = [
        {
            "DimensionOrganizationUID": _organization_uid(slide),
            "DimensionIndexPointer": keyword_tag(keyword),
            "FunctionalGroupPointer": keyword_tag("PlanePositionSlideSequence"),
        }
        for keyword in (
            "ColumnPositionInTotalImagePixelMatrix",
            "RowPositionInTotalImagePixelMatrix",
        )
    ]
    return {
        "NumberOfFrames": len(sparse.tiles),
        "DimensionOrganizationType": "TILED_SPARSE",
        "RecommendedAbsentPixelCIELabValue": list(dicom_lab((sparse.fill,) * 3)),
        "DimensionIndexSequence": dimensions,
    }


def _per_frame_groups(slide: DicomSlide, level: Level, tiles: tuple[int, ...]) -> bytes:
    """The Per-Frame Functional Groups Sequence of `tiles`, the data set's last element before
    Pixel Data, encoded element by element rather than through `encode`, from pieces encoded
    once per column and per row (~2 us a frame, 6 before: sparse levels have up to hundreds of
    thousands, encoded when the level ends, when nothing else runs). Each item: Frame Content
    (Dimension Index Values: rank of the tile's column and row among those stored) and Plane
    Position (Slide)."""
    row_mm = slide.mpp_mm[0] * slide.base_height / level.height
    col_mm = slide.mpp_mm[1] * slide.base_width / level.width
    rows, cols = (sorted({divmod(t, level.cols)[k] for t in tiles}) for k in (0, 1))
    # What depends on the column alone or on the row alone, encoded once: its rank among those
    # stored (Dimension Index Values) and its position in mm (ImageOrientationSlide (0, -1, 0,
    # -1, 0, 0): columns run along -Y, rows along -X) and in pixels.
    col_of = _axis_pieces(cols, level.tile_width, col_mm, 0x0040073A, 0x0048021E)
    row_of = _axis_pieces(rows, level.tile_height, row_mm, 0x0040072A, 0x0048021F)
    z = element(0x0040074A, "DS", _ds_bytes(0))
    # Frame Content Sequence: one item of one UL pair, all but the pair's 8 bytes the same.
    content_head = sequence(0x00209111, [element(0x00209157, "UL", bytes(8))])[:-8]
    items = []
    for tile in tiles:
        row, col = divmod(tile, level.cols)
        col_rank, x_mm, x_px = col_of[col]
        row_rank, y_mm, y_px = row_of[row]
        position = b"".join((y_mm, x_mm, z, x_px, y_px))
        items.append(content_head + col_rank + row_rank + sequence(0x0048021A, [position]))
    return sequence(keyword_tag("PerFrameFunctionalGroupsSequence"), items)


def _axis_pieces(
    stored: list[int], size: int, mm: float, mm_tag: int, pixel_tag: int
) -> dict[int, tuple[bytes, bytes, bytes]]:
    """For each column (or row) of `stored`, tiles of `size` pixels each `mm` long: its rank
    (a Dimension Index Value), and its position element in mm and in pixels."""
    return {
        i: (
            struct.pack("<I", rank),
            element(mm_tag, "DS", _ds_bytes(-i * size * mm)),
            element(pixel_tag, "SL", struct.pack("<i", i * size + 1)),
        )
        for rank, i in enumerate(stored, start=1)
    }


def _ds_bytes(value: float) -> bytes:
    """A DS value, padded to even length with a space."""
    text = "0" if value == 0 else _ds(value)
    data = text.encode("ascii")
    return data + b" " * (len(data) & 1)


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.6e}"
