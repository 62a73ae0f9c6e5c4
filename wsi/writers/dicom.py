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
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, JPEGBaseline8Bit

from wsi import __version__
from wsi.codecs import jpeg as jpeglib
from wsi.errors import InvalidArgument
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
    ds.StudyID = m.study_id or ("" if m.deidentified else slide.slide_id[:16])
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


def instance_header(
    slide: DicomSlide,
    flavor: Flavor,
    level_index: int,
    level: Level,
    first_frames: list[bytes],
) -> tuple[str, bytes]:
    """(SOP Instance UID, the object's bytes up to its first frame item). The first frames tell
    the colour space and an approximate compression ratio."""
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
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(WSI_SOP_CLASS)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.ImplementationClassUID = UID(IMPLEMENTATION_UID)
    ds.file_meta.ImplementationVersionName = f"WSISTORE_{__version__}"[:16]
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return sop_uid, buffer.getvalue() + PIXEL_DATA_HEADER + EMPTY_BOT


def _add_pixel_description(
    ds: Dataset, level: Level, first_frames: list[bytes], flavor: Flavor
) -> None:
    """Image Pixel, frames and compression: what a decoder needs to know about the frames."""
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = photometric_interpretation(first_frames[0])
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
    ds.LossyImageCompressionMethod = "ISO_10918_1"
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


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.6e}"
