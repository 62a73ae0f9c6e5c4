"""The `wsistore` attributes of a published slide's root group: what the slide is, level by
level (sizes, tiles, downsamples, codecs), its associated images, vendor properties, fill grey
and DICOM view."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any, Literal, TypeAlias, cast

from wsi.errors import CorruptSlide
from wsi.model import SlideProperties
from wsi.published.layout.chunks import CODEC_IDS, FILL_VALUE, CodecId
from wsi.published.layout.documents import load_json, optional_field, required_field
from wsi.published.layout.keys import check_slide_id

ATTRIBUTES = "wsistore"
"""Name of our attributes in the root group's zarr.json."""
FORMAT_VERSION = 1
"""The attributes' `format_version`: a reader refuses any other."""

Flavor: TypeAlias = Literal["VOLUME", "LABEL", "OVERVIEW", "THUMBNAIL"]
VOLUME: Flavor = "VOLUME"
ASSOCIATED_FLAVOR: Mapping[str, Flavor] = MappingProxyType(
    {"label": "LABEL", "macro": "OVERVIEW", "thumbnail": "THUMBNAIL"}
)
"""DICOM image flavor of each associated image we carry."""
_FLAVORS: tuple[Flavor, ...] = ("VOLUME", "LABEL", "OVERVIEW", "THUMBNAIL")


def instance_name(flavor: Flavor, level: int) -> str:
    """Per-slide name of an instance: `level-<k>`, `label`, `overview` or `thumbnail`."""
    return f"level-{level}" if flavor == VOLUME else flavor.lower()


@dataclass(frozen=True)
class LevelEntry:
    """One pyramid level as the attributes describe it (pixels of that level)."""

    path: str
    width: int
    height: int
    tile_width: int
    tile_height: int
    downsample: float
    """Level-0 pixels per pixel of this level."""
    codec: CodecId

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> LevelEntry:
        what = "level attributes"
        width, height, tile_width, tile_height = ints = [
            required_field(doc, n, int, what)
            for n in ("width", "height", "tile_width", "tile_height")
        ]
        if min(ints) <= 0:
            raise CorruptSlide(f"{what}: sizes must be positive")
        downsample = float(required_field(doc, "downsample", (int, float), what))
        if not downsample >= 1.0:
            raise CorruptSlide(f"{what}: downsample {downsample} is below 1")
        codec = doc.get("codec")
        if codec not in CODEC_IDS:
            raise CorruptSlide(f"{what}: unknown chunk codec {codec!r}")
        path = required_field(doc, "path", str, what)
        return cls(path, width, height, tile_width, tile_height, downsample, cast(CodecId, codec))


@dataclass(frozen=True)
class AssociatedEntry:
    """An associated image (label, macro, thumbnail): its array path and size in pixels, and
    whether it may show the slide's label (names, barcodes). Labels and macros do; a thumbnail
    does unless its source says it shows the scanned area only. Absent in attributes written
    before it was recorded: read as True (a reader cannot know, so it assumes the worst)."""

    name: str
    path: str
    width: int
    height: int
    shows_label: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> AssociatedEntry:
        what = "associated image attributes"
        width, height = (
            required_field(doc, "width", int, what),
            required_field(doc, "height", int, what),
        )
        if min(width, height) <= 0:
            raise CorruptSlide(f"{what}: sizes must be positive")
        shows_label = optional_field(doc, "shows_label", bool, what)
        return cls(
            required_field(doc, "name", str, what),
            required_field(doc, "path", str, what),
            width,
            height,
            True if shows_label is None else shows_label,
        )


@dataclass(frozen=True)
class DicomInstanceEntry:
    """One DICOM instance: a stored object that is also a Part 10 file."""

    key: str
    """The object's key relative to the slide (`slide.zarr/<k>/c/0/0/0`)."""
    sop_instance_uid: str
    flavor: Flavor
    level: int | None
    """The pyramid level of a VOLUME instance; None for label, overview and thumbnail."""

    @property
    def associated(self) -> str | None:
        """The associated image this instance holds, if it is not a level."""
        return next((n for n, f in ASSOCIATED_FLAVOR.items() if f == self.flavor), None)

    @property
    def name(self) -> str:
        return instance_name(self.flavor, self.level or 0)

    def to_json(self, slide_id: str | None = None) -> dict[str, Any]:
        """With `slide_id`, the key relative to the store root (the attributes' form)."""
        doc = asdict(self)
        if slide_id:
            doc["key"] = f"{slide_id}/{self.key}"
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], slide_id: str) -> DicomInstanceEntry:
        what = "DICOM instance entry"
        key = required_field(doc, "key", str, what)
        if key.startswith(f"{slide_id}/"):
            key = key[len(slide_id) + 1 :]
        flavor = doc.get("flavor")
        if flavor not in _FLAVORS:
            raise CorruptSlide(f"{what}: unknown flavor {flavor!r}")
        level = doc.get("level")
        if (flavor == VOLUME) != isinstance(level, int) or isinstance(level, bool):
            raise CorruptSlide(f"{what}: level {level!r} does not fit flavor {flavor}")
        return cls(key, required_field(doc, "sop_instance_uid", str, what), flavor, level)


@dataclass(frozen=True)
class DicomEntry:
    """The DICOM view of a slide: one series of one study."""

    study_instance_uid: str
    series_instance_uid: str
    instances: tuple[DicomInstanceEntry, ...]

    def to_json(self, slide_id: str) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "instances": [i.to_json(slide_id) for i in self.instances],
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], slide_id: str) -> DicomEntry:
        what = "DICOM attributes"
        instances = required_field(doc, "instances", list, what)
        return cls(
            required_field(doc, "study_instance_uid", str, what),
            required_field(doc, "series_instance_uid", str, what),
            tuple(DicomInstanceEntry.from_json(i, slide_id) for i in instances),
        )


@dataclass(frozen=True)
class SlideAttributes:
    """The `wsistore` attributes of the root group: what the slide is, level by level."""

    slide_id: str
    source_backend: str
    levels: tuple[LevelEntry, ...]
    associated_images: tuple[AssociatedEntry, ...] = ()
    vendor: str | None = None
    mpp_x: float | None = None
    """Microns per level-0 pixel."""
    mpp_y: float | None = None
    objective_power: float | None = None
    vendor_properties: Mapping[str, str] = field(default_factory=dict)
    icc_profile: bytes | None = None
    dicom: DicomEntry | None = None
    format_version: int = FORMAT_VERSION
    fill: int = FILL_VALUE
    """Grey level v of the fill colour (v, v, v): what every level's missing tiles hold."""
    background_delta_e76: float | None = None
    """The tolerance within which tiles were found blank and not stored (CIELab Delta-E 76 of
    every pixel from the fill); None when blank tiles were kept (`--keep-background`)."""

    def __post_init__(self) -> None:
        props = MappingProxyType(dict(self.vendor_properties))
        object.__setattr__(self, "vendor_properties", props)

    @property
    def properties(self) -> SlideProperties:
        return SlideProperties(
            vendor=self.vendor,
            mpp_x=self.mpp_x,
            mpp_y=self.mpp_y,
            objective_power=self.objective_power,
            vendor_properties=self.vendor_properties,
            icc_profile=self.icc_profile,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "slide_id": self.slide_id,
            "source_backend": self.source_backend,
            "vendor": self.vendor,
            "mpp_x": self.mpp_x,
            "mpp_y": self.mpp_y,
            "objective_power": self.objective_power,
            "levels": [lv.to_json() for lv in self.levels],
            "associated_images": [a.to_json() for a in self.associated_images],
            "vendor_properties": dict(self.vendor_properties),
            "icc_profile": base64.b64encode(self.icc_profile).decode()
            if self.icc_profile
            else None,
            "dicom": self.dicom.to_json(self.slide_id) if self.dicom else None,
            "fill": self.fill,
            "background_delta_e76": self.background_delta_e76,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SlideAttributes:
        what = f"{ATTRIBUTES} attributes"
        version = required_field(doc, "format_version", int, what)
        if version != FORMAT_VERSION:
            raise CorruptSlide(f"{what}: format_version {version} is not {FORMAT_VERSION}")
        slide_id = check_slide_id(required_field(doc, "slide_id", str, what))
        levels = tuple(LevelEntry.from_json(lv) for lv in required_field(doc, "levels", list, what))
        if not levels:
            raise CorruptSlide(f"{what}: no levels")
        props = required_field(doc, "vendor_properties", dict, what)
        icc = optional_field(doc, "icc_profile", str, what)
        try:
            icc_profile = base64.b64decode(icc, validate=True) if icc else None
        except ValueError as exc:
            raise CorruptSlide(f"{what}: icc_profile is not base64") from exc
        dicom = optional_field(doc, "dicom", dict, what)
        return cls(
            slide_id=slide_id,
            source_backend=str(doc.get("source_backend") or ""),
            levels=levels,
            associated_images=tuple(
                AssociatedEntry.from_json(a)
                for a in required_field(doc, "associated_images", list, what)
            ),
            vendor=optional_field(doc, "vendor", str, what),
            mpp_x=optional_field(doc, "mpp_x", (int, float), what),
            mpp_y=optional_field(doc, "mpp_y", (int, float), what),
            objective_power=optional_field(doc, "objective_power", (int, float), what),
            vendor_properties={str(k): str(v) for k, v in props.items()},
            icc_profile=icc_profile,
            dicom=DicomEntry.from_json(dicom, slide_id) if dicom is not None else None,
            **_background_fields(doc, what),
        )

    @classmethod
    def from_root_metadata(cls, data: bytes, what: str) -> SlideAttributes:
        """Our attributes from the bytes of the root group's zarr.json."""
        group = load_json(data, what).get("attributes")
        attrs = group.get(ATTRIBUTES) if isinstance(group, dict) else None
        if not isinstance(attrs, dict):
            raise CorruptSlide(f"{what} has no {ATTRIBUTES} attributes")
        return cls.from_json(attrs)


def _background_fields(doc: Mapping[str, Any], what: str) -> dict[str, Any]:
    """`fill` and `background_delta_e76` of the attributes (white and None when absent: slides
    published before blank glass was detected)."""
    fill = optional_field(doc, "fill", int, what)
    if fill is not None and not 0 <= fill <= 255:
        raise CorruptSlide(f"{what}: fill {fill} is not 0..255")
    return {
        "fill": FILL_VALUE if fill is None else fill,
        "background_delta_e76": optional_field(doc, "background_delta_e76", (int, float), what),
    }
