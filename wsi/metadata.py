"""Who and what a slide belongs to: patient, study and specimen identifiers, and their removal.

Identifiers come from a sidecar JSON next to the slide (`<slide>.json`, e.g. `case-7.svs.json`,
or `<stem>.json`; found by `wsi.slidefiles.sidecar_path`) or from an explicit file
(`wsi convert --metadata FILE`). Without them the DICOM view gets valid placeholder values.
`deidentified()` applies the DICOM PS3.15 Basic Application Level Confidentiality Profile to what
we store: identifiers and dates replaced by dummies, label and macro images dropped, vendor
properties reduced to a list known to carry no identity, and the ICC profile's texts (its
description, copyright, device maker and model names: free text a scanner or a site may fill
with its own names) replaced by a neutral one (`neutral_icc_profile`), its colour data kept.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from wsi.errors import InvalidArgument
from wsi.model import readable
from wsi.slidefiles import sidecar_path

_DATE = re.compile(r"\d{8}")
_TIME = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")

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
            # The value is not quoted: a birth date is an identifier, and the message becomes
            # a job's error, which the service shows.
            if value and not _DATE.fullmatch(value):
                raise InvalidArgument(f"{name} must be YYYYMMDD")
        if self.study_time and not _TIME.fullmatch(self.study_time):
            raise InvalidArgument("study_time must be HHMMSS")
        if self.patient_sex not in ("", "M", "F", "O"):
            raise InvalidArgument("patient_sex must be M, F, O or empty")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str) and ("\\" in value or len(value) > 64):
                raise InvalidArgument(f"{f.name} must be at most 64 characters without '\\'")
            if isinstance(value, str) and readable(value) != value:
                # JSON's "\\udcfc" (a lone surrogate): no DICOM character set can encode it.
                raise InvalidArgument(f"{f.name} is not Unicode text (a lone surrogate)")

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


NAME_PARTS = ("accession_number", "specimen_id", "container_id")
"""The identifiers a slide's display name is made of, in this order."""
NAME_SEPARATOR = " · "
NEUTRAL_NAME_PREFIX = "Slide "


def slide_name(metadata: SlideMetadata, path: Path) -> str:
    """The name people know a slide by: its accession number, specimen id and container id
    (barcode) joined by NAME_SEPARATOR, each left out when it is empty or already part of a longer
    one (a barcode `S24-1234-A1` says all that the accession `S24-1234` does); without any of
    them, the source file's stem (`file_stem`). Never call it on a de-identified slide: its name
    is `neutral_name`."""
    parts = [getattr(metadata, name).strip() for name in NAME_PARTS]
    parts = [p for p in parts if p]
    kept = [
        p
        for i, p in enumerate(parts)
        if not any(p in q and (p != q or j < i) for j, q in enumerate(parts) if j != i)
    ]
    return NAME_SEPARATOR.join(kept) if kept else file_stem(path)


def slide_case(metadata: SlideMetadata) -> str | None:
    """The case a slide belongs to (slides of one case are listed together): its accession
    number, else its study id, else None."""
    return metadata.accession_number.strip() or metadata.study_id.strip() or None


def file_stem(path: Path) -> str:
    """A slide file's name without its suffix (`case-7.svs` -> `case-7`); a folder slide (a
    DICOM series) keeps its whole name; bytes of a name that are not UTF-8 show as U+FFFD
    (`readable`)."""
    return readable(path.name if path.is_dir() else (path.stem or path.name))


def neutral_name(slide_id: str) -> str:
    """The name of a de-identified slide: made from its opaque id only, so that no name it had
    is stored or shown."""
    return NEUTRAL_NAME_PREFIX + slide_id[:8]


def safe_vendor_properties(properties: Mapping[str, str]) -> dict[str, str]:
    """The allow-listed vendor properties a de-identified slide may keep."""
    return {k: v for k, v in properties.items() if k in SAFE_PROPERTY_KEYS}


# ICC profiles (ICC.1:2001-04 for v2, ICC.1:2022 for v4): a 128-byte header, a tag count, a table of
# (signature, offset, size), then the tags' data, each starting with its type's signature.
NEUTRAL_ICC_TEXT = "de-identified"
"""What every text of a de-identified slide's ICC profile says."""
_ICC_HEADER = 128
_ICC_TEXT_TYPES = frozenset({b"text", b"desc", b"mluc"})
_ICC_COLOUR_TYPES = frozenset(
    {b"curv", b"para", b"XYZ ", b"sf32", b"uf32", b"mft1", b"mft2", b"mAB ", b"mBA ", b"chrm"}
    | {b"clro", b"meas", b"view", b"sig ", b"ui08", b"ui16", b"ui32", b"ui64", b"s15f"}
)
"""Tag types that hold colour data or codes only: kept as they are. Text types are rewritten;
every other tag (dates, profile sequences, named colours, metadata dictionaries, private tags,
any of which may carry names) is dropped: none of them changes how colours convert."""


def _icc_text(kind: bytes) -> bytes:
    """A text tag of type `kind` saying `NEUTRAL_ICC_TEXT`."""
    text = NEUTRAL_ICC_TEXT.encode("ascii")
    if kind == b"text":
        return b"text\0\0\0\0" + text + b"\0"
    if kind == b"desc":  # v2 textDescriptionType: ASCII, an empty Unicode and ScriptCode part
        ascii_part = struct.pack(">I", len(text) + 1) + text + b"\0"
        return b"desc\0\0\0\0" + ascii_part + struct.pack(">IIHB", 0, 0, 0, 0) + bytes(67)
    utf16 = NEUTRAL_ICC_TEXT.encode("utf-16-be")  # v4 multiLocalizedUnicodeType, one record
    return b"mluc\0\0\0\0" + struct.pack(">II2s2sII", 1, 12, b"en", b"US", len(utf16), 28) + utf16


def neutral_icc_profile(profile: bytes) -> bytes | None:
    """`profile` with every text tag saying `NEUTRAL_ICC_TEXT`, the tags that are not colour
    data dropped, the creation date fixed (2000-01-01) and the profile ID cleared (it is a digest
    of the old bytes); colours convert exactly as before. None when `profile` is not a
    well-formed ICC profile: the slide is then published without one (sRGB)."""
    if len(profile) < _ICC_HEADER + 4 or profile[36:40] != b"acsp":
        return None
    declared = struct.unpack(">I", profile[:4])[0]
    (count,) = struct.unpack(">I", profile[_ICC_HEADER : _ICC_HEADER + 4])
    if declared > len(profile) or count > (declared - _ICC_HEADER - 4) // 12:
        return None
    kept: list[tuple[bytes, bytes]] = []
    for i in range(count):
        entry = _ICC_HEADER + 4 + 12 * i
        signature, offset, size = struct.unpack(">4sII", profile[entry : entry + 12])
        if size < 4 or offset + size > declared:
            return None
        data = profile[offset : offset + size]
        if data[:4] in _ICC_TEXT_TYPES:
            kept.append((signature, _icc_text(data[:4])))
        elif data[:4] in _ICC_COLOUR_TYPES:
            kept.append((signature, data))
    table_end = _ICC_HEADER + 4 + 12 * len(kept)
    table, body, placed = b"", b"", {}
    for signature, data in kept:
        if data not in placed:  # tags that shared their data (rTRC, gTRC, bTRC) still do
            placed[data] = table_end + len(body)
            body += data + bytes(-len(data) % 4)
        table += struct.pack(">4sII", signature, placed[data], len(data))
    header = bytearray(profile[:_ICC_HEADER])
    header[0:4] = struct.pack(">I", table_end + len(body))
    header[24:36] = struct.pack(">6H", 2000, 1, 1, 0, 0, 0)
    header[84:100] = bytes(16)
    return bytes(header) + struct.pack(">I", len(kept)) + table + body


__all__ = [
    "DUMMY_DATE",
    "DUMMY_TIME",
    "NEUTRAL_ICC_TEXT",
    "SlideMetadata",
    "file_stem",
    "metadata_for",
    "neutral_icc_profile",
    "neutral_name",
    "replace",
    "safe_vendor_properties",
    "sidecar_path",
    "slide_case",
    "slide_name",
]
