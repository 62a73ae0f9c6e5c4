"""The manifest of a published slide, its commit point: every object with its size and CRC32C,
the conversion settings, where each level's tiles come from, and the archive tier's record of
what it replaced. Its CRC32C is the slide's version."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any

import google_crc32c

from wsi.errors import CorruptSlide
from wsi.model import Level, readable
from wsi.published.layout.attributes import DicomInstanceEntry, SlideAttributes
from wsi.published.layout.documents import dump_json, load_json, optional_field, required_field
from wsi.published.layout.keys import METADATA, ZARR_ROOT, SlideKeys, check_slide_id

MANIFEST_FORMAT = "wsistore-manifest/1"
"""The manifest's `format`: a reader refuses any other."""


@dataclass(frozen=True)
class StoredObject:
    """One object written to the store, as listed in the manifest."""

    key: str
    """Relative to the store root."""
    size: int
    crc32c: str
    """Hex digest (8 characters)."""


@dataclass(frozen=True)
class ObjectEntry:
    """Size (bytes) and CRC32C (hex) of one object of a published slide."""

    size: int
    crc32c: str


def crc32c_hex(data: bytes) -> str:
    return f"{google_crc32c.value(data):08x}"


class Crc32c:
    """The CRC32C of an object read or written in parts, in the manifest's form (`hex`): what
    `crc32c_hex` gives for the whole object, without ever holding it whole."""

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes) -> None:
        self._value = google_crc32c.extend(self._value, data)

    @property
    def hex(self) -> str:
        return f"{self._value:08x}"


MADE_HERE = ("decoded+encoded", "dct-half", "wavelet-half", "mean2x2")
"""How a conversion makes a level's tiles itself: 'decoded+encoded' (the source level's pixels
decoded and encoded again), 'dct-half' (the level above's JPEG tiles decoded at 1/2 scale in
the DCT domain), 'wavelet-half' (the level above's JPEG 2000 codestreams decoded at 1/2
resolution, without their finest wavelet level), 'mean2x2' (2x2 means of the level above's
pixels). Any other method names a copy of a source
level's compressed tiles: 'copied' (as stored), or how a backend cut them out of larger streams
('cut at restart markers', ...)."""


@dataclass(frozen=True)
class LevelOrigin:
    """Where one published level's tiles come from: what a conversion kept of the source."""

    level: int
    """The published level."""
    method: str
    """A copy method, or one of `MADE_HERE`."""
    source_level: int | None = None
    """The source level copied, or decoded for 'decoded+encoded'."""
    from_level: int | None = None
    """The published level this one is derived from ('dct-half', 'mean2x2')."""

    @property
    def copied(self) -> bool:
        return self.method not in MADE_HERE

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> LevelOrigin:
        what = "level origin"
        if not isinstance(doc, Mapping):
            raise CorruptSlide(f"{what} is not an object")
        level, method = (
            required_field(doc, "level", int, what),
            required_field(doc, "method", str, what),
        )
        source = optional_field(doc, "source_level", int, what)
        parent = optional_field(doc, "from_level", int, what)
        if level < 0 or not method or min(source or 0, parent or 0) < 0:
            raise CorruptSlide(f"{what}: level {level} method {method!r} is not well formed")
        return cls(level, method, source, parent)


def manifest_version(data: bytes) -> str:
    """The version of a published slide: the CRC32C of its manifest's bytes. It changes whenever
    the slide is published again with other bytes (the base of strong ETags)."""
    return crc32c_hex(data)


@dataclass(frozen=True)
class Manifest:
    """The commit record of a published slide: every object with its size and CRC32C."""

    slide_id: str
    width: int
    """Level-0 size in pixels."""
    height: int
    settings: Mapping[str, Any]
    """The conversion settings that decided the bytes (opaque here; compared on re-conversion)."""
    objects: Mapping[str, ObjectEntry]
    """Keys relative to the slide."""
    dicom: tuple[DicomInstanceEntry, ...] = ()
    stored_bytes: int = 0
    name: str | None = None
    """What people call the slide (`wsi.metadata.slide_name`, or under de-identification
    `neutral_name`); None in manifests written before names existed: shown as the slide id."""
    case: str | None = None
    """The case (accession number or study id) it belongs to, when known; never set on a
    de-identified slide."""
    source_bytes: int | None = None
    """Bytes of the source slide's files (companion files of multi-file slides included), the
    base of storage ratios (`wsi du`); None in manifests written before it was recorded."""
    source_id: str | None = None
    """The id the source's content gives (its content id, or de-identified its keyed
    pseudonym: never a value that links more than the slide's own id), whatever id the slide
    was published under: a different file converted under the same explicit id is converted,
    not found "already published". None in manifests written before it was recorded."""
    archived: Mapping[str, ObjectEntry] = field(default_factory=dict)
    """The archive tier (`wsi.published.archive`): size and CRC32C of each object as it was
    before JPEG XL recompression replaced it, which `wsi restore` must give back exactly. Empty
    (and absent from the JSON) for a slide in its JPEG form."""
    levels: tuple[LevelOrigin, ...] = ()
    """Where each published level's tiles come from (copied from which source level and how, or
    derived from which level and how); empty (and absent from the JSON) in manifests written
    before it was recorded."""
    attributes: SlideAttributes | None = None
    """The root attributes of a slide published without its Zarr view (`--format dicom`),
    which has no root `zarr.json` to hold them: what the readers and the tile service need to
    read its level objects (every one of them is both a DICOM instance and a Zarr shard). None
    (and absent from the JSON) for a slide with its Zarr view, whose `zarr.json` is their one
    copy, and in DICOM-only manifests written before they were kept (`servable` is then
    False)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))
        object.__setattr__(self, "objects", MappingProxyType(dict(self.objects)))
        object.__setattr__(self, "archived", MappingProxyType(dict(self.archived)))

    @classmethod
    def build(
        cls,
        slide_id: str,
        base: Level,
        settings: Mapping[str, Any],
        objects: Iterable[StoredObject],
        dicom: Iterable[DicomInstanceEntry] = (),
        keys: SlideKeys | None = None,
        name: str | None = None,
        case: str | None = None,
        *,
        source_bytes: int | None = None,
        source_id: str | None = None,
        levels: Iterable[LevelOrigin] = (),
        attributes: SlideAttributes | None = None,
    ) -> Manifest:
        """The manifest of `objects`, written under `keys` (the slide's folder by default, or
        the staging folder a new version was built in: the listed keys are the same).
        `attributes` are kept only when the objects hold no root `zarr.json`."""
        keys = keys or SlideKeys(slide_id)
        listed = sorted(objects, key=lambda o: o.key)
        return cls(
            slide_id,
            base.width,
            base.height,
            settings,
            {keys.in_slide(o.key): ObjectEntry(o.size, o.crc32c) for o in listed},
            tuple(dicom),
            sum(o.size for o in listed),
            name,
            case,
            source_bytes=source_bytes,
            source_id=source_id,
            levels=tuple(levels),
            attributes=None if any(o.key == keys.root_metadata for o in listed) else attributes,
        )

    @property
    def display_name(self) -> str:
        """What people call the slide: `name`, or its id when published without one."""
        return self.name or self.slide_id

    @property
    def zarr_view(self) -> bool:
        """Whether the slide was published with its Zarr view (its root `zarr.json`), through
        which the readers (`wsi.published`) and the tile service read it; without one
        (`--format dicom`) only its DICOM instances are published."""
        return f"{ZARR_ROOT}/{METADATA}" in self.objects

    @property
    def servable(self) -> bool:
        """Whether the readers and the tile service can read the slide: through its Zarr
        view, or, published as DICOM only, through the attributes the manifest keeps."""
        return self.zarr_view or self.attributes is not None

    def object(self, key_in_slide: str) -> ObjectEntry:
        """The entry of an object of this slide (CorruptSlide when the manifest lacks it)."""
        entry = self.objects.get(key_in_slide)
        if entry is None:
            raise CorruptSlide(f"the manifest of {self.slide_id} does not list {key_in_slide}")
        return entry

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "slide_id": self.slide_id,
            "zarr": ZARR_ROOT,
            "width": self.width,
            "height": self.height,
            "settings": dict(self.settings),
            "stored_bytes": self.stored_bytes,
            "objects": {k: asdict(o) for k, o in self.objects.items()},
            "dicom": [i.to_json() for i in self.dicom],
            **_naming_json(self.name, self.case),
            **({} if self.source_bytes is None else {"source_bytes": self.source_bytes}),
            **({} if self.source_id is None else {"source_id": self.source_id}),
            **_archived_json(self.archived),
            **({"levels": [o.to_json() for o in self.levels]} if self.levels else {}),
            **({} if self.attributes is None else {"attributes": self.attributes.to_json()}),
        }

    def to_bytes(self) -> bytes:
        doc = self.to_json()
        return dump_json({**doc, CHECKSUM: _checksum(doc)})

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Manifest:
        what = "manifest"
        if doc.get("format") != MANIFEST_FORMAT:
            raise CorruptSlide(f"{what}: format {doc.get('format')!r} is not {MANIFEST_FORMAT}")
        slide_id = check_slide_id(required_field(doc, "slide_id", str, what))
        objects = _object_entries(required_field(doc, "objects", dict, what), what)
        archived = _object_entries(optional_field(doc, "archived", dict, what) or {}, what)
        return cls(
            slide_id,
            required_field(doc, "width", int, what),
            required_field(doc, "height", int, what),
            required_field(doc, "settings", dict, what),
            objects,
            tuple(DicomInstanceEntry.from_json(i, slide_id) for i in doc.get("dicom") or []),
            required_field(doc, "stored_bytes", int, what),
            _readable(optional_field(doc, "name", str, what)),
            _readable(optional_field(doc, "case", str, what)),
            source_bytes=optional_field(doc, "source_bytes", int, what),
            source_id=optional_field(doc, "source_id", str, what),
            archived=archived,
            levels=tuple(
                LevelOrigin.from_json(o) for o in optional_field(doc, "levels", list, what) or []
            ),
            attributes=_attributes(optional_field(doc, "attributes", dict, what), slide_id),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        doc = load_json(data, "manifest")
        recorded = doc.pop(CHECKSUM, None)  # manifests written before it have none
        if recorded is not None and not _checksum_matches(data, doc, recorded):
            raise CorruptSlide("manifest: damaged (its content does not match its checksum)")
        return cls.from_json(doc)


def _attributes(doc: Mapping[str, Any] | None, slide_id: str) -> SlideAttributes | None:
    """A DICOM-only manifest's attributes, which must name its slide."""
    if doc is None:
        return None
    attributes = SlideAttributes.from_json(doc)
    if attributes.slide_id != slide_id:
        raise CorruptSlide(f"manifest: its attributes name slide {attributes.slide_id}")
    return attributes


def _readable(text: str | None) -> str | None:
    """A name as pages and DICOM attributes can hold it: manifests written before names were
    made `readable` may carry the lone surrogates of a file name that is not UTF-8."""
    return None if text is None else readable(text)


CHECKSUM = "checksum"
"""The manifest's own CRC32C (hex), of its document without this key as `dump_json` writes it:
a bit flipped in a manifest that still parses (a CRC digit, a size) makes the manifest damaged,
not one of the objects it lists, and `wsi sync --repair` copies the good store's."""


def _checksum(doc: Mapping[str, Any]) -> str:
    return crc32c_hex(dump_json(doc))


def _checksum_matches(data: bytes, doc: Mapping[str, Any], recorded: object) -> bool:
    """Whether `recorded` is the checksum of the manifest `data` parsed to `doc` (without it).

    `dump_json` writes the checksum as one line of its own before other keys (it sorts them,
    and "checksum" always has "dicom" or "format" after it), so `data` without that line is the
    document it was computed over, byte for byte: its CRC is the check, 0.1 ms where encoding
    `doc` again takes 1.5 (every slide opened, every listing of a large store). A manifest
    written otherwise (by hand, by another tool) is checked by encoding `doc` as before."""
    if not isinstance(recorded, str):
        return False
    line = b'\n "' + CHECKSUM.encode() + b'": "' + recorded.encode() + b'",'
    if data.count(line) == 1 and crc32c_hex(data.replace(line, b"")) == recorded:
        return True
    return recorded == _checksum(doc)


def _naming_json(name: str | None, case: str | None) -> dict[str, str]:
    """The manifest's optional `name` and `case` keys: absent when unknown, so the manifest of a
    slide without them keeps the bytes it had before names existed."""
    return {k: v for k, v in (("name", name), ("case", case)) if v is not None}


def _object_entries(doc: Mapping[str, Any], what: str) -> dict[str, ObjectEntry]:
    """Key -> (size, CRC32C) entries of a manifest (its objects, or their pre-archive form)."""
    entries = {}
    for key, entry in doc.items():
        if not isinstance(entry, dict):
            raise CorruptSlide(f"{what}: entry of {key} is not an object")
        size, crc = (
            required_field(entry, "size", int, key),
            required_field(entry, "crc32c", str, key),
        )
        entries[key] = ObjectEntry(size, crc)
    return entries


def _archived_json(archived: Mapping[str, ObjectEntry]) -> dict[str, Any]:
    """The manifest's optional `archived` key: absent for a slide in its JPEG form, so restoring
    it gives back the manifest's bytes from before the archive."""
    return {"archived": {k: asdict(o) for k, o in sorted(archived.items())}} if archived else {}
