"""QIDO-RS's index of series: one compact record per published slide with a DICOM view (a
slide is one series), kept between searches.

A study or series search matches attributes equal in every instance of a slide
(`SLIDE_LEVEL`): it needs one header per slide, not the slides themselves. Searching by opening
every slide (the reader keeps a few hundred open) and reading a 64 KB header of each (the header
cache holds ~500) took 12 s for `GET /dicomweb/studies` on a store of 2,000 slides, every time.
A record keeps a slide's slide-level attributes, already in DICOM JSON and as the strings
matching compares (compressed: ~1.6 KB a record in memory), with the manifest version it was
read from; once older than `RECHECK_SECONDS` it costs one manifest read, and the slide is opened
again only when its version changed (the same rule as the slide listing, `server.listing`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

from server.api.dicomweb.instances import (
    DICOMWEB,
    MAX_HEADER,
    UNSERVED,
    DicomWebState,
    Instance,
    parse_header,
    read_header,
    slide_instances,
)
from server.catalog import Catalog
from server.index_file import IndexFile, SavedEntry
from server.keys import CATALOG, INDEX_FILE
from wsi.errors import CorruptSlide
from wsi.published.slide import AsyncPublishedSlide

STUDY_DEFAULT = (
    "SpecificCharacterSet",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "RetrieveURL",
)
STUDY_ALL = (
    *STUDY_DEFAULT,
    "InstitutionName",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
)
SERIES_DEFAULT = (
    "SpecificCharacterSet",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "NumberOfSeriesRelatedInstances",
    "RetrieveURL",
)
SERIES_ALL = (
    *SERIES_DEFAULT,
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "Manufacturer",
    "ManufacturerModelName",
    "DeviceSerialNumber",
    "SoftwareVersions",
    "ContainerIdentifier",
    "ContainerTypeCodeSequence",
    "SpecimenDescriptionSequence",
)
SLIDE_LEVEL = frozenset(STUDY_ALL) | frozenset(SERIES_ALL) | {"SOPClassUID"}
"""Attributes equal in every instance of a slide: matched on one header per slide."""

KIND = "series"
"""Its records' kind in the index file."""
RECHECK_SECONDS = 2.0
"""A record is trusted this long before its slide's manifest version is read again."""
CONCURRENCY = 32
"""Slides checked or opened at once while the index is refreshed."""


def header_values(header: Dataset, keyword: str) -> list[str] | None:
    """An attribute's values as matching compares them: None when absent, [] when empty."""
    if keyword not in header:
        return None
    return element_values(header[keyword])


def element_values(element: DataElement) -> list[str]:
    """An element's values as matching compares them ([] when empty). A sequence is never
    matched on (`query.parse` refuses it): its items count, not their text."""
    value = element.value
    if value is None or value == "":
        return []
    if element.VR == "SQ":
        return [""] * len(value)
    items = list(value) if isinstance(value, MultiValue | list) else [value]
    return [str(v) for v in items]


def _tag(keyword: str) -> BaseTag:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return Tag(tag)


_SLIDE_LEVEL_TAGS = tuple(sorted((_tag(k), k) for k in SLIDE_LEVEL))
"""(tag, keyword) of the slide-level attributes, in tag order."""
_RECORD_TAGS = [tag for tag, _ in _SLIDE_LEVEL_TAGS] + [_tag("SOPInstanceUID")]
"""What a record is read from: its header parsed for these only."""


@dataclass(frozen=True)
class SlideAttributes:
    """A slide's slide-level attributes: DICOM JSON by keyword, and the strings matching
    compares (`header_values`)."""

    json: dict[str, tuple[str, Any]]
    """keyword -> (tag as 8 hex digits, its DICOM JSON), for those present."""
    values: dict[str, list[str]]

    @classmethod
    def of(cls, header: Dataset) -> SlideAttributes:
        present = Dataset()
        values: dict[str, list[str]] = {}
        keywords: dict[str, str] = {}
        for tag, keyword in _SLIDE_LEVEL_TAGS:
            if tag in header:
                element = header[tag]
                present.add(element)
                values[keyword] = element_values(element)
                keywords[f"{tag:08X}"] = keyword
        doc = present.to_json_dict(bulk_data_threshold=MAX_HEADER)
        return cls({keywords[t]: (t, j) for t, j in doc.items()}, values)

    def encode(self) -> bytes:
        """JSON, compressed: a record is kept for every slide of the store (3.6 KB of JSON,
        1.1 KB compressed; 13 us to decompress, for the series a search decodes)."""
        return zlib.compress(json.dumps({"json": self.json, "values": self.values}).encode())

    @classmethod
    def decode(cls, data: bytes) -> SlideAttributes:
        doc = json.loads(zlib.decompress(data))
        return cls({k: (t, j) for k, (t, j) in doc["json"].items()}, doc["values"])


@dataclass(frozen=True)
class SeriesRecord:
    """One slide as study and series searches see it."""

    slide_id: str
    version: str
    study_uid: str
    """Empty for a slide without a DICOM view (kept, so that it is not opened again)."""
    series_uid: str
    shown: tuple[int, int]
    """Its instances a search shows: without labels allowed, and with."""
    attributes: bytes
    """`SlideAttributes.encode()` of a level's header (the smallest's)."""
    checked: float

    def instances(self, allow_label: bool) -> int:
        return self.shown[1] if allow_label else self.shown[0]

    def saved(self) -> SavedEntry:
        """As kept between starts (`server.index_file`)."""
        meta = json.dumps([self.study_uid, self.series_uid, self.shown])
        return SavedEntry(self.slide_id, self.version, meta, self.attributes)

    @classmethod
    def from_saved(cls, saved: SavedEntry) -> SeriesRecord:
        """A record kept between starts, due for a version check at once; ValueError or
        TypeError when `saved` is not one."""
        study_uid, series_uid, (without, with_labels) = json.loads(saved.meta)
        if not (isinstance(study_uid, str) and isinstance(series_uid, str)):
            raise TypeError("a series record holds UIDs")
        if not (type(without) is int and type(with_labels) is int):
            raise TypeError("a series record holds counts")
        if study_uid:  # readable, or refused now rather than in a search
            try:
                SlideAttributes.decode(saved.data)
            except (zlib.error, KeyError, AttributeError) as exc:
                raise ValueError(f"a series record's attributes: {exc}") from exc
        shown = (without, with_labels)
        uids = (study_uid, series_uid)
        return cls(saved.slide_id, saved.version, *uids, shown, saved.data, -math.inf)


class SeriesIndex:
    """The records of every published slide, refreshed by `records` (one refresh at a time:
    searches arriving meanwhile wait for it and share its result)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._records: dict[str, SeriesRecord] = {}
        self._loaded = False
        self._lock = asyncio.Lock()

    async def records(
        self, catalog: Catalog, state: DicomWebState, saved: IndexFile | None = None
    ) -> list[SeriesRecord]:
        """Every published slide with a DICOM view, in the store's order; StoreError when the
        store cannot be listed. `saved`: where records are kept between starts (read at the
        first call)."""
        async with self._lock:
            if not self._loaded and saved is not None:
                self._records = await asyncio.to_thread(saved.load, KIND, SeriesRecord.from_saved)
            self._loaded = True
            ids = await catalog.store.slide_ids()
            now = self._clock()
            held = self._records
            stale = [i for i in ids if i in held and now - held[i].checked >= RECHECK_SECONDS]
            versions = await catalog.store.versions(stale) if stale else {}
            gate = asyncio.Semaphore(CONCURRENCY)

            async def one(slide_id: str) -> SeriesRecord | None:
                async with gate:
                    return await self._record(catalog, state, slide_id, now, versions)

            found = await asyncio.gather(*(one(i) for i in ids))
            before = self._records
            self._records = {r.slide_id: r for r in found if r is not None}
            if saved is not None:
                changed = [
                    r.saved()
                    for k, r in self._records.items()
                    if k not in before
                    or r.version != before[k].version
                    or r.attributes is not before[k].attributes
                ]
                gone = [k for k in before if k not in self._records]
                await asyncio.to_thread(saved.save, KIND, changed, gone)
            return [r for r in self._records.values() if r.study_uid]

    async def _record(
        self,
        catalog: Catalog,
        state: DicomWebState,
        slide_id: str,
        now: float,
        versions: dict[str, str | None],
    ) -> SeriesRecord | None:
        held = self._records.get(slide_id)
        if held is not None:
            if now - held.checked < RECHECK_SECONDS:
                return held
            if slide_id not in versions:  # the store failed this read: searched as last seen
                return held
            if versions[slide_id] is None:
                return None
            if versions[slide_id] == held.version:
                return replace(held, checked=now)
        try:
            slide = await catalog.slide(slide_id)
        except UNSERVED:
            return None
        if not isinstance(slide, AsyncPublishedSlide):
            return None
        shown = (len(slide_instances(slide, False)), len(slide_instances(slide, True)))
        levels = [i for i in slide_instances(slide, False) if i.is_level]
        if slide.dicom is None or not levels:
            return SeriesRecord(slide_id, slide.version, "", "", shown, b"", now)
        # Slide-level attributes are the same in every level: the smallest's header is the
        # shortest (a sparse base level lists every frame), and it is not kept in the header
        # cache, which a refresh of thousands of slides would otherwise empty.
        smallest = levels[-1]
        try:
            attributes, _ = await read_header(
                catalog, smallest, state.header_read, functools.partial(_attributes, smallest)
            )
        except UNSERVED:
            return None
        return SeriesRecord(
            slide_id,
            slide.version,
            slide.dicom.study_instance_uid,
            slide.dicom.series_instance_uid,
            shown,
            attributes,
            now,
        )


def _attributes(inst: Instance, head: bytes) -> bytes | None:
    """`SlideAttributes.encode()` of a header (None when `head` ends inside it); CorruptSlide
    when it is not the instance's."""
    header = parse_header(head, _RECORD_TAGS)
    if header is None:
        return None
    if str(header.get("SOPInstanceUID", "")) != inst.sop_uid:
        raise CorruptSlide(f"{inst.key} does not hold instance {inst.sop_uid}")
    return SlideAttributes.of(header).encode()


class IndexedSeries:
    """A series of the index as a search row's attributes: its UIDs from the record, the rest
    decoded on first use (a search without attribute filters decodes only the series it
    returns)."""

    __slots__ = ("_decoded", "record")

    def __init__(self, record: SeriesRecord) -> None:
        self.record = record
        self._decoded: SlideAttributes | None = None

    @property
    def attributes(self) -> SlideAttributes:
        if self._decoded is None:
            self._decoded = SlideAttributes.decode(self.record.attributes)
        return self._decoded

    def values(self, keyword: str) -> list[str] | None:
        if keyword == "StudyInstanceUID":
            return [self.record.study_uid]
        if keyword == "SeriesInstanceUID":
            return [self.record.series_uid]
        return self.attributes.values.get(keyword)


SERIES_INDEX = web.AppKey("dicomweb_series", SeriesIndex)


async def series_records(app: web.Application) -> list[SeriesRecord]:
    """The app's series index (`SeriesIndex.records`), refreshed as needed with the app's
    catalog, DICOMweb state and index file."""
    return await app[SERIES_INDEX].records(app[CATALOG], app[DICOMWEB], app.get(INDEX_FILE))
