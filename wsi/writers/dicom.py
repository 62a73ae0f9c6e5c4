"""DICOM VL Whole Slide Microscopy headers for the objects the Zarr writer streams.

One stored object per level is both a DICOM Part 10 file and the level's Zarr shard:

    preamble, file meta, data set ... (7FE0,0010) OB undefined length
      item: empty Basic Offset Table
      item: frame 1 (a complete JPEG, padded to even length) ... item: frame n
      sequence delimiter
    (FFFC,FFFC) Data Set Trailing Padding, OB: the Zarr shard index (offsets point at the frames)

The header is written before the first frame, so the object streams front to back like any
shard. UIDs are derived from the slide id, so converting a slide again gives the same UIDs.
"""

from __future__ import annotations

import functools
import hashlib
import io
import struct
from dataclasses import dataclass

import pydicom
from PIL import ImageCms
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, JPEGBaseline8Bit

from wsi import __version__
from wsi.codecs import jpeg as jpeglib
from wsi.codecs import jpeg2000
from wsi.codecs.colour import dicom_lab
from wsi.errors import CorruptSlide, InvalidArgument
from wsi.metadata import SlideMetadata
from wsi.model import Level
from wsi.published.layout import Flavor, instance_name

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
IMPLEMENTATION_UID = "2.25.229370117045469307931496209404461426517"  # wsistore, fixed
ITEM = 0xE000FFFE  # (FFFE,E000) little-endian as one uint32
DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
PIXEL_DATA_HEADER = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
EMPTY_BOT = struct.pack("<HHI", 0xFFFE, 0xE000, 0)


def derived_uid(slide_id: str, *parts: str) -> str:
    """A stable UID under the UUID root 2.25 (PS3.5 B.2), from the slide id and a purpose."""
    digest = hashlib.sha256("/".join(("wsistore", slide_id, *parts)).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big') >> 1}"


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
the header in front of frames already written without moving them (`wsi.store.parts`). The same
on every store, so that an object's bytes do not depend on where it was written."""
PADDED_FROM = 8 * 1024 * 1024
"""From this size of the frames on, the padding (< 4 KiB) is below 0.05% of the object; smaller
objects are not padded (copying their frames behind the header costs a few milliseconds)."""
PADDING_CREATOR_UID = "2.25.9350359900783425216427788193817733399"
"""Private Information Creator UID of the padding `padded_header` adds (wsistore's, fixed)."""
_PRIVATE_CREATOR_TAG = (0x0002, 0x0100)
_PRIVATE_INFORMATION_TAG = (0x0002, 0x0102)


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


def item_header(length: int) -> bytes:
    return struct.pack("<II", ITEM, length)


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

    @property
    def study_uid(self) -> str:
        return derived_uid(self.slide_id, "study")

    @property
    def series_uid(self) -> str:
        return derived_uid(self.slide_id, "series")

    def instance_uid(self, name: str) -> str:
        return derived_uid(self.slide_id, "instance", name)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    ds = Dataset()
    ds.CodeValue = value
    ds.CodingSchemeDesignator = scheme
    ds.CodeMeaning = meaning
    return ds


def _base_dataset(slide: DicomSlide) -> Dataset:
    """Patient, study, series, equipment, specimen, frame of reference: same in every instance."""
    m = slide.metadata
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = WSI_SOP_CLASS
    ds.Modality = "SM"
    ds.PatientName = m.patient_name
    ds.PatientID = m.patient_id or ("ANONYMOUS" if m.deidentified else slide.slide_id[:16])
    ds.PatientBirthDate = m.patient_birth_date
    ds.PatientSex = m.patient_sex
    ds.StudyInstanceUID = slide.study_uid
    ds.StudyDate = m.study_date or slide.content_date
    ds.StudyTime = m.study_time or slide.content_time
    # De-identified: a dummy (PS3.15 action Z allows one), as an empty Study ID leaves the
    # instance without what a DICOMDIR needs (dciodvfy warns of it).
    ds.StudyID = m.study_id or ("ANONYMOUS" if m.deidentified else slide.slide_id[:16])
    ds.AccessionNumber = m.accession_number
    ds.ReferringPhysicianName = m.referring_physician_name
    if m.study_description:
        ds.StudyDescription = m.study_description
    ds.SeriesInstanceUID = slide.series_uid
    ds.SeriesNumber = 1
    if m.series_description:
        ds.SeriesDescription = m.series_description
    ds.FrameOfReferenceUID = derived_uid(slide.slide_id, "frame-of-reference")
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    ds.Manufacturer = slide.manufacturer
    ds.ManufacturerModelName = slide.model_name
    ds.DeviceSerialNumber = slide.serial_number
    ds.SoftwareVersions = [slide.software_versions, f"wsistore {__version__}"]
    if m.institution_name:
        ds.InstitutionName = m.institution_name
    ds.ContentDate = slide.content_date
    ds.ContentTime = slide.content_time
    ds.AcquisitionDateTime = slide.content_date + slide.content_time
    ds.ContainerIdentifier = m.container_id or ("SLIDE" if m.deidentified else slide.slide_id[:16])
    ds.IssuerOfTheContainerIdentifierSequence = DicomSequence([])
    ds.ContainerTypeCodeSequence = DicomSequence([_code("433466003", "SCT", "Microscope slide")])
    specimen = Dataset()
    specimen.SpecimenIdentifier = m.specimen_id or ds.ContainerIdentifier
    specimen.SpecimenUID = derived_uid(slide.slide_id, "specimen")
    specimen.IssuerOfTheSpecimenIdentifierSequence = DicomSequence([])
    specimen.SpecimenPreparationSequence = DicomSequence([])
    ds.SpecimenDescriptionSequence = DicomSequence([specimen])
    ds.AcquisitionContextSequence = DicomSequence([])
    if m.deidentified:
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "PS3.15 Basic Application Level Confidentiality Profile"
        ds.DeidentificationMethodCodeSequence = DicomSequence(
            [_code("113100", "DCM", "Basic Application Confidentiality Profile")]
        )
    else:
        ds.PatientIdentityRemoved = "NO"
    return ds


def _optical_path(slide: DicomSlide) -> Dataset:
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    path.IlluminationTypeCodeSequence = DicomSequence(
        [_code("111744", "DCM", "Brightfield illumination")]
    )
    path.IlluminationColorCodeSequence = DicomSequence([_code("414298005", "SCT", "Full Spectrum")])
    path.ICCProfile = slide.icc_profile or srgb_profile()
    if not slide.icc_profile:
        path.ColorSpace = "SRGB"
    return path


@functools.cache
def srgb_profile() -> bytes:
    """A standard sRGB ICC profile for sources that carry none (DICOM requires one). lcms
    stamps the creation time into the header; a fixed date keeps conversions reproducible."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    data[24:36] = struct.pack(">6H", 2000, 1, 1, 0, 0, 0)
    return bytes(data)


def photometric_interpretation(stream: bytes) -> str:
    """What a JPEG stream holds, in DICOM's words (PS3.5 8.2.1)."""
    transform = jpeglib.adobe_transform(stream)
    if transform == 0:
        return "RGB"
    ids, sampling = jpeglib.components(stream)
    if transform is None and ids == b"RGB":
        return "RGB"
    return "YBR_FULL" if len(set(sampling)) <= 1 else "YBR_FULL_422"


def frame_encoding(first_frame: bytes) -> tuple[str, str, str]:
    """(transfer syntax, photometric interpretation, lossy compression method) of an instance
    whose frames are like `first_frame`: baseline JPEG, or JPEG 2000 codestreams of RGB
    components kept from the source (PS3.5 8.2.4 gives their photometric interpretation)."""
    if first_frame.startswith(jpeg2000.SOC):
        syntax, photometric = jpeg2000.parse(first_frame).dicom(ycbcr=False)
        return syntax, photometric, "ISO_15444_1"
    return str(JPEGBaseline8Bit), photometric_interpretation(first_frame), "ISO_10918_1"


def instance_header(
    slide: DicomSlide,
    flavor: Flavor,
    level_index: int,
    level: Level,
    first_frames: list[bytes],
    sparse: SparseFrames | None = None,
) -> tuple[str, bytes]:
    """(SOP Instance UID, the object's bytes up to its first frame item). The first frames tell
    the colour space and an approximate compression ratio. With `sparse`, the instance is
    TILED_SPARSE: frames only for the stored tiles (see `SparseFrames`)."""
    if level.tile_count <= 0:
        raise InvalidArgument("an instance needs at least one frame")
    name = instance_name(flavor, level_index)
    ds = _base_dataset(slide)
    sop_uid = slide.instance_uid(name)
    ds.SOPInstanceUID = sop_uid
    derived = flavor == "VOLUME" and level_index > 0
    ds.ImageType = [
        "DERIVED" if derived else "ORIGINAL",
        "PRIMARY",
        flavor,
        "RESAMPLED" if derived else "NONE",
    ]
    ds.InstanceNumber = level_index + 1 if flavor == "VOLUME" else 100 + len(name)
    if flavor == "VOLUME":
        ds.PyramidUID = derived_uid(slide.slide_id, "pyramid")
    if flavor == "LABEL":  # Slide Label module: we do not read barcodes or label text
        ds.BarcodeValue = ""
        ds.LabelText = ""
    _add_pixel_description(ds, level, first_frames, flavor)
    _add_geometry(ds, slide, level)
    per_frame = b"" if sparse is None else _add_sparse_frames(ds, slide, level, sparse)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(WSI_SOP_CLASS)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = UID(frame_encoding(first_frames[0])[0])
    ds.file_meta.ImplementationClassUID = UID(IMPLEMENTATION_UID)
    ds.file_meta.ImplementationVersionName = f"WSISTORE_{__version__}"[:16]
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return sop_uid, buffer.getvalue() + per_frame + PIXEL_DATA_HEADER + EMPTY_BOT


def _add_pixel_description(
    ds: Dataset, level: Level, first_frames: list[bytes], flavor: Flavor
) -> None:
    """Image Pixel, frames and compression: what a decoder needs to know about the frames."""
    ds.SamplesPerPixel = 3
    _, photometric, method = frame_encoding(first_frames[0])
    ds.PhotometricInterpretation = photometric
    ds.PlanarConfiguration = 0
    ds.NumberOfFrames = level.tile_count
    ds.Rows = level.tile_height
    ds.Columns = level.tile_width
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "YES" if flavor in ("LABEL", "OVERVIEW") else "NO"
    ds.SpecimenLabelInImage = "YES" if flavor in ("LABEL", "OVERVIEW") else "NO"
    ds.LossyImageCompression = "01"
    raw = len(first_frames) * level.tile_width * level.tile_height * 3
    ds.LossyImageCompressionRatio = f"{raw / max(1, sum(map(len, first_frames))):.2f}"
    ds.LossyImageCompressionMethod = method
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.VolumetricProperties = "VOLUME"


def _add_geometry(ds: Dataset, slide: DicomSlide, level: Level) -> None:
    """Where the pixels are on the slide: total pixel matrix, spacing, orientation, optics."""
    org = Dataset()
    org.DimensionOrganizationUID = derived_uid(slide.slide_id, "dimension-organization")
    ds.DimensionOrganizationSequence = DicomSequence([org])
    # Pixel spacing of this level: level-0 spacing scaled by the true size ratio.
    row_mm = slide.mpp_mm[0] * slide.base_height / level.height
    col_mm = slide.mpp_mm[1] * slide.base_width / level.width
    ds.ImagedVolumeWidth = slide.mpp_mm[1] * slide.base_width
    ds.ImagedVolumeHeight = slide.mpp_mm[0] * slide.base_height
    ds.ImagedVolumeDepth = 0.001
    ds.TotalPixelMatrixColumns = level.width
    ds.TotalPixelMatrixRows = level.height
    ds.TotalPixelMatrixFocalPlanes = 1
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = 0
    origin.YOffsetInSlideCoordinateSystem = 0
    origin.ZOffsetInSlideCoordinateSystem = 0
    ds.TotalPixelMatrixOriginSequence = DicomSequence([origin])
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    ds.NumberOfOpticalPaths = 1
    ds.OpticalPathSequence = DicomSequence([_optical_path(slide)])
    measures = Dataset()
    measures.PixelSpacing = [_ds(row_mm), _ds(col_mm)]
    measures.SliceThickness = 0.001
    frame_type = Dataset()
    frame_type.FrameType = list(ds.ImageType)
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.WholeSlideMicroscopyImageFrameTypeSequence = DicomSequence([frame_type])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])


@dataclass(frozen=True)
class SparseFrames:
    """The frames of a TILED_SPARSE instance: the tiles a level stores (blank ones are absent)."""

    tiles: tuple[int, ...]
    """Row-major tile numbers of the stored tiles, ascending: frame k + 1 is tile tiles[k]."""
    fill: int
    """Grey of the absent tiles (Recommended Absent Pixel CIELab Value)."""


def _add_sparse_frames(ds: Dataset, slide: DicomSlide, level: Level, sparse: SparseFrames) -> bytes:
    """TILED_SPARSE (PS3.3 C.7.6.17.3): one frame per stored tile, each placed by its Plane
    Position (Slide) in the Per-Frame Functional Groups (top-left pixel, 1-based, and its slide
    coordinates in mm under the orientation and origin `_add_geometry` writes) and indexed by
    tile column and row (Multi-frame Dimension), and the colour viewers show where no frame is.
    Returns the encoded Per-Frame Functional Groups Sequence, the data set's last element before
    Pixel Data (see `_per_frame_groups`)."""
    if not sparse.tiles:
        raise InvalidArgument("a sparse instance needs at least one frame")
    ds.NumberOfFrames = len(sparse.tiles)
    ds.DimensionOrganizationType = "TILED_SPARSE"
    ds.RecommendedAbsentPixelCIELabValue = list(dicom_lab((sparse.fill,) * 3))
    organization = ds.DimensionOrganizationSequence[0].DimensionOrganizationUID
    dimensions = []
    for keyword in ("ColumnPositionInTotalImagePixelMatrix", "RowPositionInTotalImagePixelMatrix"):
        dimension = Dataset()
        dimension.DimensionOrganizationUID = organization
        dimension.DimensionIndexPointer = keyword_tag(keyword)
        dimension.FunctionalGroupPointer = keyword_tag("PlanePositionSlideSequence")
        dimensions.append(dimension)
    ds.DimensionIndexSequence = DicomSequence(dimensions)
    # Optical Path Identification is a functional group of every non-TILED_FULL instance.
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    ds.SharedFunctionalGroupsSequence[0].OpticalPathIdentificationSequence = DicomSequence([path])
    if max(ds.keys()) >= _PER_FRAME_TAG:
        raise InvalidArgument("the per-frame functional groups must be the last element")
    return _per_frame_groups(slide, level, sparse.tiles)


_PER_FRAME_TAG = 0x52009230
"""(5200,9230) Per-Frame Functional Groups Sequence."""


def _per_frame_groups(slide: DicomSlide, level: Level, tiles: tuple[int, ...]) -> bytes:
    """The Per-Frame Functional Groups Sequence of `tiles`, encoded by hand (explicit VR little
    endian, defined lengths, as pydicom writes it; tests/test_sparse.py reads it back). Built as
    pydicom data sets it took 2.6 ms a frame (most of a sparse conversion's cost): ~5 us here.
    Each item: Frame Content (Dimension Index Values: rank of the tile's column and row among
    those stored) and Plane Position (Slide)."""
    row_mm = slide.mpp_mm[0] * slide.base_height / level.height
    col_mm = slide.mpp_mm[1] * slide.base_width / level.width
    rows, cols = (sorted({divmod(t, level.cols)[k] for t in tiles}) for k in (0, 1))
    row_rank = {r: i + 1 for i, r in enumerate(rows)}
    col_rank = {c: i + 1 for i, c in enumerate(cols)}
    items = []
    for tile in tiles:
        row, col = divmod(tile, level.cols)
        x, y = col * level.tile_width, row * level.tile_height
        content = _element(0x0020, 0x9157, b"UL", struct.pack("<II", col_rank[col], row_rank[row]))
        # ImageOrientationSlide (0, -1, 0, -1, 0, 0): columns run along -Y, rows along -X.
        position = b"".join(
            (
                _element(0x0040, 0x072A, b"DS", _ds_bytes(-y * row_mm)),
                _element(0x0040, 0x073A, b"DS", _ds_bytes(-x * col_mm)),
                _element(0x0040, 0x074A, b"DS", _ds_bytes(0)),
                _element(0x0048, 0x021E, b"SL", struct.pack("<i", x + 1)),
                _element(0x0048, 0x021F, b"SL", struct.pack("<i", y + 1)),
            )
        )
        frame = _sequence(0x0020, 0x9111, [content]) + _sequence(0x0048, 0x021A, [position])
        items.append(frame)
    return _sequence(0x5200, 0x9230, items)


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"SQ":
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _sequence(group: int, element: int, items: list[bytes]) -> bytes:
    """A sequence of defined length whose items (of defined length) hold `items`."""
    body = b"".join(item_header(len(item)) + item for item in items)
    return _element(group, element, b"SQ", body)


def _ds_bytes(value: float) -> bytes:
    """A DS value, padded to even length with a space."""
    text = "0" if value == 0 else _ds(value)
    data = text.encode("ascii")
    return data + b" " * (len(data) & 1)


def keyword_tag(keyword: str) -> int:
    """The tag of a DICOM keyword (an AT value)."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise InvalidArgument(f"unknown DICOM keyword {keyword}")
    return tag


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.6e}"
