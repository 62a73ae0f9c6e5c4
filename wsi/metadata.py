"""Who and what a slide belongs to: patient, study and specimen identifiers, and their removal.

Identifiers come from a sidecar JSON next to the slide (`<slide>.json`, e.g. `case-7.svs.json`,
or `<stem>.json`) or from an explicit file (`wsi convert --metadata FILE`). Without them the DICOM
view gets valid placeholder values. `deidentified()` applies the DICOM PS3.15 Basic Application
Level Confidentiality Profile to what we store: identifiers and dates replaced by dummies, label
and macro images dropped, vendor properties reduced to a list known to carry no identity.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from wsi.errors import InvalidArgument

_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")

DUMMY_DATE = "20000101"
DUMMY_TIME = "000000"

# Vendor properties that describe the optics and the image, never the patient, the operator or
# the scan's place and time: the only ones a de-identified slide keeps (an allow-list, because
# vendors put names, barcodes and paths in free-text fields).
SAFE_PROPERTY_KEYS = {
    "aperio.AppMag",
    "aperio.MPP",
    "aperio.OriginalWidth",
    "aperio.OriginalHeight",
    "aperio.Originalheight",
    "hamamatsu.SourceLens",
    "hamamatsu.XResolution",
    "hamamatsu.YResolution",
    "tiff.ResolutionUnit",
    "tiff.XResolution",
    "tiff.YResolution",
}


@dataclass(frozen=True)
class SlideMetadata:
    """Identifiers for the DICOM view (all optional; DICOM attribute in brackets)."""

    patient_name: str = ""
    """Family^Given (PatientName)."""
    patient_id: str = ""
    patient_birth_date: str = ""
    """YYYYMMDD."""
    patient_sex: str = ""
    """M, F, O or empty."""
    study_id: str = ""
    study_date: str = ""
    """YYYYMMDD; default: the scan date when the source has one."""
    study_time: str = ""
    accession_number: str = ""
    referring_physician_name: str = ""
    study_description: str = ""
    series_description: str = ""
    container_id: str = ""
    """The slide's barcode / container identifier (ContainerIdentifier)."""
    specimen_id: str = ""
    institution_name: str = ""
    deidentified: bool = False
    """True after the PS3.15 Basic Profile was applied (PatientIdentityRemoved = YES)."""

    def __post_init__(self) -> None:
        for name in ("patient_birth_date", "study_date"):
            value = getattr(self, name)
            if value and not _DATE.match(value):
                raise InvalidArgument(f"{name} must be YYYYMMDD, got {value!r}")
        if self.study_time and not _TIME.match(self.study_time):
            raise InvalidArgument(f"study_time must be HHMMSS, got {self.study_time!r}")
        if self.patient_sex not in ("", "M", "F", "O"):
            raise InvalidArgument("patient_sex must be M, F, O or empty")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str) and ("\\" in value or len(value) > 64):
                raise InvalidArgument(f"{f.name} must be at most 64 characters without '\\'")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> SlideMetadata:
        known = {f.name for f in fields(cls)} - {"deidentified"}
        unknown = set(data) - known
        if unknown:
            raise InvalidArgument(f"unknown metadata keys: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {k: str(v) for k, v in data.items()}
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> SlideMetadata:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"cannot read metadata file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidArgument(f"metadata file {path} must hold a JSON object")
        return cls.from_mapping(data)

    def deidentify(self) -> SlideMetadata:
        """PS3.15 Basic Profile: every identifying attribute emptied or replaced by a dummy."""
        return SlideMetadata(deidentified=True)

    def to_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "deidentified"}


def sidecar_path(slide: Path) -> Path | None:
    """`<slide>.json` or `<stem>.json` next to the slide, if present."""
    for candidate in (slide.with_name(slide.name + ".json"), slide.with_suffix(".json")):
        if candidate != slide and candidate.is_file():
            return candidate
    return None


def metadata_for(
    slide: Path,
    explicit: str | Path | None = None,
    from_source: Mapping[str, str] | None = None,
) -> SlideMetadata:
    """Metadata from `explicit`, else the sidecar, else what the source file carries (a DICOM
    slide's own patient and study), else empty (placeholders are made later)."""
    if explicit is not None:
        return SlideMetadata.load(explicit)
    sidecar = sidecar_path(slide)
    if sidecar:
        return SlideMetadata.load(sidecar)
    usable = {}
    for key, value in (from_source or {}).items():
        try:  # a value DICOM allowed but we would refuse (e.g. a long name) is left out
            SlideMetadata.from_mapping({key: value})
        except InvalidArgument:
            continue
        usable[key] = value
    return SlideMetadata.from_mapping(usable)


def safe_vendor_properties(properties: Mapping[str, str]) -> dict[str, str]:
    """The allow-listed vendor properties a de-identified slide may keep."""
    return {k: v for k, v in properties.items() if k in SAFE_PROPERTY_KEYS}


__all__ = [
    "DUMMY_DATE",
    "DUMMY_TIME",
    "SlideMetadata",
    "metadata_for",
    "replace",
    "safe_vendor_properties",
    "sidecar_path",
]
