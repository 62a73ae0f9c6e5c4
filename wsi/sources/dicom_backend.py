"""DICOM-WSI backend through wsidicom: frames come out exactly as stored (baseline JPEG, and
JPEG 2000 codestreams that decode to RGB); the others are decoded.

A slide is one series; given one instance file, the other instances of the same series in that
folder (other levels, label, overview, thumbnail) are opened with it, as OpenSlide does.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from wsi.codecs import jpeg, jpeg2000
from wsi.codecs.colour import srgb_of_dicom_lab
from wsi.errors import CorruptSlide, EncodedTileUnavailable, SlideIncomplete, UnsupportedSlide
from wsi.model import Level, SlideProperties, TileCodec
from wsi.slidefiles import DICOMDIR_SOP_CLASS, dicom_series_files, header_error, is_dicom_file
from wsi.sources.base import SlideSource

if TYPE_CHECKING:
    import pydicom

# pydicom and wsidicom are imported when a DICOM slide is opened: together they take ~0.5 s,
# which every `wsi` command would otherwise pay.

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
_WSM_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.6"
"""VL Whole Slide Microscopy Image Storage."""
_JPEG_PHOTOMETRICS = {"RGB", "YBR_FULL_422", "YBR_FULL"}
_J2K_SYNTAXES = {jpeg2000.JPEG2000, jpeg2000.JPEG2000_LOSSLESS}
_J2K_PHOTOMETRICS = {"RGB", "YBR_ICT", "YBR_RCT"}
"""JPEG 2000 frames whose codestreams decode to RGB (PS3.5 8.2.4: the ICT or RCT in the
codestream, or none on RGB components): kept as they are with `--keep-jpeg2000`."""
_VENDOR_KEYWORDS = (
    "Manufacturer",
    "ManufacturerModelName",
    "DeviceSerialNumber",
    "SoftwareVersions",
)
"""Header attributes carried into `vendor_properties` (identifiers go to `identifiers`)."""
_IDENTIFIERS = {
    "PatientName": "patient_name",
    "PatientID": "patient_id",
    "PatientBirthDate": "patient_birth_date",
    "PatientSex": "patient_sex",
    "StudyID": "study_id",
    "StudyDate": "study_date",
    "StudyTime": "study_time",
    "AccessionNumber": "accession_number",
    "ReferringPhysicianName": "referring_physician_name",
    "StudyDescription": "study_description",
    "SeriesDescription": "series_description",
    "ContainerIdentifier": "container_id",
    "InstitutionName": "institution_name",
}
"""DICOM keyword -> SlideMetadata field: a converted DICOM slide keeps its patient and study."""


def _pil_to_rgb(image: object) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.convert("RGB")))  # type: ignore[attr-defined]


class DicomSource(SlideSource):
    """VL Whole Slide Microscopy series (TILED_FULL or TILED_SPARSE), any transfer syntax wsidicom
    decodes; JPEG baseline frames are handed out as stored."""

    name = "dicom"

    @classmethod
    def is_available(cls) -> bool:
        return importlib.util.find_spec("wsidicom") is not None

    @classmethod
    def can_open(cls, path: Path) -> bool:
        if path.is_dir():
            return any(is_dicom_file(p) for p in path.iterdir() if p.is_file())
        return is_dicom_file(path)

    def __init__(self, path: Path) -> None:
        from wsidicom import WsiDicom

        self.files = dicom_series_files(path)
        if not self.files:
            raise UnsupportedSlide("no DICOM files found")
        try:
            self._wsi = WsiDicom.open(self.files)
            wsi_levels = list(self._wsi.levels)
        except Exception as exc:  # wsidicom raises plain exceptions for non-conformant series
            raise UnsupportedSlide(f"not a readable DICOM WSI series: {exc}") from exc
        if not wsi_levels:
            raise UnsupportedSlide("DICOM series has no pyramid levels")
        self._check_every_instance_opened()
        base = wsi_levels[0].size.width
        self._wsi_levels = wsi_levels
        self._levels = tuple(
            Level(
                lv.size.width,
                lv.size.height,
                lv.tile_size.width,
                lv.tile_size.height,
                max(1.0, base / lv.size.width),
            )
            for lv in wsi_levels
        )
        self._properties = self._read_properties()

    def _check_every_instance_opened(self) -> None:
        """wsidicom leaves out, without a word, an instance it cannot read (a damaged file,
        frames that do not match the transfer syntax): a series that lost its base level that
        way would be converted as a smaller slide. Every pyramid level (VOLUME) instance of the
        series among the files must be one it opened, and every file's header must read; files
        of other kinds (label, overview, thumbnail, annotations) or series are left to it."""
        import pydicom

        opened = {
            str(ds.uids.instance)
            for pyramid in self._wsi.pyramids
            for level in pyramid
            for ds in level.datasets
        }
        series = str(self._wsi.uids.series_instance)
        unreadable = refused = 0
        for path in self.files:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size=1024)
                meta = getattr(ds, "file_meta", None)
                if meta is not None and meta.get("MediaStorageSOPClassUID") == DICOMDIR_SOP_CLASS:
                    continue
                uids = str(ds.SOPClassUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
            except Exception:  # pydicom raises many kinds on a truncated file
                unreadable += 1
                continue
            image_type = list(ds.get("ImageType") or [])
            volume = len(image_type) < 3 or str(image_type[2]).upper() == "VOLUME"
            if uids[:2] == (_WSM_STORAGE, series) and volume and uids[2] not in opened:
                refused += 1
        if refused:
            raise CorruptSlide(
                f"{refused} pyramid level instance(s) of the series cannot be read (damaged, or "
                "frames that do not match their transfer syntax): the slide would be incomplete"
            )
        if unreadable:
            raise SlideIncomplete(
                f"{unreadable} of the series' {len(self.files)} DICOM files cannot be read (still "
                "arriving, or damaged): the slide would be incomplete"
            )

    def _read_properties(self) -> SlideProperties:
        # Read the header with pydicom rather than wsidicom's metadata model, which refuses some
        # valid-enough files (e.g. issuer types it does not know) that still have good pixels.
        import pydicom

        try:
            ds = pydicom.dcmread(self.files[0], stop_before_pixels=True)
            # pydicom decodes an element when it is read: a damaged one (a VR it does not know,
            # a value it cannot parse) raises here, of any kind, and is the header's damage.
            return self._properties_of(ds)
        except Exception as exc:
            raise CorruptSlide(f"cannot read DICOM header: {header_error(exc)}") from exc

    def _properties_of(self, ds: pydicom.Dataset) -> SlideProperties:
        """The slide's properties from its first file's header `ds`."""
        mpp = self._wsi.mpp
        vendor_props: dict[str, str] = {}
        icc = None
        for keyword in _VENDOR_KEYWORDS:
            value = ds.get(keyword)
            if value not in (None, ""):
                vendor_props[f"dicom.{keyword}"] = str(value)
        with contextlib.suppress(Exception):
            icc = bytes(ds.OpticalPathSequence[0].ICCProfile)
        objective = None
        with contextlib.suppress(Exception):  # Type 3, and a DS a scanner may leave malformed
            objective = float(ds.OpticalPathSequence[0].ObjectiveLensPower) or None
        acquired = str(ds.get("AcquisitionDateTime", "") or "")
        if not acquired and ds.get("ContentDate"):
            acquired = str(ds.ContentDate) + str(ds.get("ContentTime", "000000"))
        digits = "".join(c for c in acquired if c.isdigit())[:14]
        identifiers = {
            field: str(ds.get(keyword))
            for keyword, field in _IDENTIFIERS.items()
            if ds.get(keyword) not in (None, "")
        }
        return SlideProperties(
            vendor="dicom",
            identifiers=identifiers,
            scan_datetime=digits if len(digits) == 14 else None,
            manufacturer=str(ds.get("Manufacturer", "") or "") or None,
            model=str(ds.get("ManufacturerModelName", "") or "") or None,
            serial_number=str(ds.get("DeviceSerialNumber", "") or "") or None,
            mpp_x=float(mpp.width) if mpp and mpp.width > 0 else None,
            mpp_y=float(mpp.height) if mpp and mpp.height > 0 else None,
            objective_power=objective,
            vendor_properties=vendor_props,
            icc_profile=icc,
        )

    @property
    def levels(self) -> tuple[Level, ...]:
        return self._levels

    @property
    def properties(self) -> SlideProperties:
        return self._properties

    def _image_data(self, level: int) -> object:
        self.level(level)
        return self._wsi_levels[level].default_instance.image_data

    def tile_codec(self, level: int) -> TileCodec:
        data = self._image_data(level)
        syntax = str(getattr(data, "transfer_syntax", ""))
        photometric = str(getattr(data, "photometric_interpretation", ""))
        if syntax == JPEG_BASELINE and photometric in _JPEG_PHOTOMETRICS:
            return TileCodec.JPEG
        if syntax in _J2K_SYNTAXES and photometric in _J2K_PHOTOMETRICS:
            return TileCodec.JPEG2000
        return TileCodec.OTHER

    def _absent(self, level: int, col: int, row: int) -> bool:
        """Whether a TILED_SPARSE level has no frame for tile (col, row)."""
        from wsidicom.geometry import Point

        instance = self._wsi_levels[level].default_instance
        tiles = getattr(instance.image_data, "tiles", None)
        if tiles is None:
            return False
        try:
            index = tiles.get_frame_index(
                Point(col, row), instance.default_z, instance.default_path
            )
        except Exception as exc:
            raise CorruptSlide(f"cannot find frame: {exc}") from exc
        return bool(index == -1)

    def _absent_colour(self, level: int) -> tuple[int, int, int]:
        """What an absent tile shows: the level's Recommended Absent Pixel CIELab Value
        (0048,0015), else white (as wsidicom paints absent tiles: it ignores the attribute)."""
        dataset = self._wsi_levels[level].default_instance.dataset
        value = dataset.get("RecommendedAbsentPixelCIELabValue")
        if value is None or len(value) != 3:
            return (255, 255, 255)
        return srgb_of_dicom_lab((int(value[0]), int(value[1]), int(value[2])))

    def read_encoded_tile(self, level: int, col: int, row: int) -> bytes:
        codec = self.tile_codec(level)
        if codec is TileCodec.OTHER:
            raise EncodedTileUnavailable("frames of this level are not baseline JPEG")
        lv = self.level(level)
        lv.check_tile(col, row)
        if self._absent(level, col, row):
            raise EncodedTileUnavailable("no frame for this tile (TILED_SPARSE)")
        try:
            frame = self._wsi.read_encoded_tile(
                self._wsi_levels[level].level, (col, row), crop_to_image_boundary=False
            )
        except Exception as exc:
            raise CorruptSlide(f"cannot read frame: {exc}") from exc
        if codec is TileCodec.JPEG2000:  # a bare codestream (PS3.5 A.4.4)
            jpeg2000.check_size(frame, lv.tile_height, lv.tile_width)
            return frame
        rgb = str(getattr(self._image_data(level), "photometric_interpretation", "")) == "RGB"
        # A stored frame ends at EOI already; make RGB-coded frames explicit about their colours.
        tile = jpeg.complete_tile(frame, None, rgb)
        jpeg.check_size(tile, lv.tile_height, lv.tile_width)  # copied unparsed otherwise
        return tile

    def read_tile(self, level: int, col: int, row: int) -> np.ndarray:
        lv = self.level(level)
        lv.check_tile(col, row)
        if self._absent(level, col, row):
            return np.full((lv.tile_height, lv.tile_width, 3), self._absent_colour(level), np.uint8)
        if self.tile_codec(level) is TileCodec.JPEG2000:
            # Our OpenJPEG binding: every core, and the pixels of the TIFF backend's tiles.
            return jpeg2000.decode(self.read_encoded_tile(level, col, row))
        try:
            image = self._wsi.read_tile(
                self._wsi_levels[level].level, (col, row), crop_to_image_boundary=False
            )
        except Exception as exc:
            raise CorruptSlide(f"cannot decode frame: {exc}") from exc
        return _pil_to_rgb(image)

    def read_tile_half(self, level: int, col: int, row: int) -> np.ndarray | None:
        """A JPEG 2000 frame's 1/2-resolution decode (the wavelet's, for less than half the
        work); None for other frames."""
        if self.tile_codec(level) is not TileCodec.JPEG2000:
            return super().read_tile_half(level, col, row)
        lv = self.level(level)
        lv.check_tile(col, row)
        if self._absent(level, col, row):
            half = (-(-lv.tile_height // 2), -(-lv.tile_width // 2), 3)
            return np.full(half, self._absent_colour(level), np.uint8)
        return jpeg2000.decode_half(self.read_encoded_tile(level, col, row))

    @property
    def associated_names(self) -> tuple[str, ...]:
        names = []
        if self._wsi.labels:
            names.append("label")
        if self._wsi.overviews:
            names.append("macro")
        if self._wsi.pyramid.thumbnails:
            names.append("thumbnail")
        return tuple(names)

    def read_associated(self, name: str) -> np.ndarray:
        try:
            if name == "label" and self._wsi.labels:
                return _pil_to_rgb(self._wsi.read_label())
            if name == "macro" and self._wsi.overviews:
                return _pil_to_rgb(self._wsi.read_overview())
            if name == "thumbnail" and self._wsi.pyramid.thumbnails:
                return _pil_to_rgb(self._wsi.pyramid.thumbnails[0].get_default_full())
        except Exception as exc:
            raise CorruptSlide(f"cannot read associated image {name!r}: {exc}") from exc
        raise UnsupportedSlide(f"no associated image {name!r}")

    def associated_shows_label(self, name: str) -> bool:
        # A THUMBNAIL instance says so itself (Specimen Label In Image, type 1 in the WSI
        # module); one that does not is taken to show it.
        if name != "thumbnail" or not self._wsi.pyramid.thumbnails:
            return True
        try:
            shown = self._wsi.pyramid.thumbnails[0].datasets[0].SpecimenLabelInImage
        except Exception:
            return True
        return str(shown).strip().upper() != "NO"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._wsi.close()
