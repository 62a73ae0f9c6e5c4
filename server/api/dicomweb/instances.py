"""DICOM instances of published slides: lookup by UID, headers read with range reads, caches."""

from __future__ import annotations

import asyncio
import collections
import io
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pydicom
from aiohttp import web
from pydicom.dataset import Dataset

from server.catalog import Catalog, LevelView, SlideView
from server.keys import CATALOG, SETTINGS
from server.render import in_pool
from wsi.errors import CorruptSlide, InvalidArgument, SlideNotFound

PREFIX = "/dicomweb"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DICOM_JSON = "application/dicom+json"
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
HEADER_READ = 64 * 1024
"""First range read of an instance header; doubled until the header is complete."""
MAX_HEADER = 64 * 1024 * 1024
MAX_FRAMES = 1024
RESCAN_SECONDS = 2.0
"""An unknown UID rescans the store at most this often."""
ASSOCIATED_NAME = {"LABEL": "label", "OVERVIEW": "macro", "THUMBNAIL": "thumbnail"}
PRIVATE_FLAVORS = ("LABEL", "OVERVIEW")
UID_PATTERN = re.compile(r"[0-9]+(?:\.[0-9]+)*", re.ASCII)
NUMBER = re.compile(r"[0-9]{1,9}", re.ASCII)


@dataclass(frozen=True)
class Instance:
    """One DICOM instance of a published slide: a stored object."""

    slide: SlideView
    sop_uid: str
    flavor: str
    key: str
    view: LevelView
    tag: int | str
    """The catalog's name of the object's chunks: the level index or the associated name."""

    @property
    def study_uid(self) -> str:
        return str(self.slide.dicom["study_instance_uid"]) if self.slide.dicom else ""

    @property
    def series_uid(self) -> str:
        return str(self.slide.dicom["series_instance_uid"]) if self.slide.dicom else ""

    @property
    def frames(self) -> int:
        return self.view.cols * self.view.rows

    async def frame(self, catalog: Catalog, number: int) -> bytes:
        """Stored bytes of frame `number` (1-based, row-major over the tile grid)."""
        row, col = divmod(number - 1, self.view.cols)
        return await catalog.chunk(self.slide, self.view, col, row, self.tag)


def slide_instances(slide: SlideView, allow_label: bool) -> list[Instance]:
    """The instances of a slide that this service shows, in stored order."""
    if slide.dicom is None or slide.status != "ready":
        return []
    found = []
    for inst in slide.dicom.get("instances", []):
        flavor = inst["flavor"]
        if flavor in PRIVATE_FLAVORS and not allow_label:
            continue
        key = inst["key"]
        if not key.startswith(f"{slide.slide_id}/"):  # manifest form: relative to the slide
            key = f"{slide.slide_id}/{key}"
        view: LevelView | None
        tag: int | str
        if flavor == "VOLUME":
            level = inst.get("level")
            if not isinstance(level, int) or not 0 <= level < len(slide.levels):
                continue
            view, tag = slide.levels[level], level
        else:
            tag = ASSOCIATED_NAME.get(flavor, "")
            view = slide.associated.get(tag)
        if view is None or view.codec != "jpeg":
            continue
        found.append(Instance(slide, str(inst["sop_instance_uid"]), flavor, key, view, tag))
    return found


def check_uid(value: str, what: str = "UID") -> str:
    if len(value) > 64 or not UID_PATTERN.fullmatch(value):
        raise InvalidArgument(f"{what} must be digits and dots, at most 64 characters")
    return value


def parse_header(head: bytes) -> Dataset | None:
    """The data set before Pixel Data, or None when `head` ends before Pixel Data starts."""
    fp = io.BytesIO(head)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
    except Exception:  # cut inside an element: read more
        return None
    position = fp.tell()
    if head[position : position + 4] != PIXEL_DATA_TAG:
        return None
    return ds


class DicomWebState:
    """Per-app caches: parsed instance headers (and their DICOM JSON), study UID -> slides."""

    def __init__(self, header_entries: int = 2048, header_read: int = HEADER_READ) -> None:
        self.header_entries = header_entries
        self.header_read = header_read
        """First range read of a header (bytes)."""
        self._headers: collections.OrderedDict[tuple[str, str, str], Dataset] = (
            collections.OrderedDict()
        )
        self._json: collections.OrderedDict[tuple[str, str, str], dict[str, Any]] = (
            collections.OrderedDict()
        )
        self.studies: dict[str, list[str]] = {}
        """Study Instance UID -> slide ids, from the last scan."""
        self.scanned_at = -math.inf
        self._scan_lock = asyncio.Lock()

    async def scan(self, catalog: Catalog) -> list[SlideView]:
        """Every published slide with a DICOM view; refreshes the UID indexes."""
        async with self._scan_lock:
            ids = await catalog.slide_ids()
            gate = asyncio.Semaphore(32)

            async def one(slide_id: str) -> SlideView | None:
                async with gate:
                    try:
                        return await catalog.slide(slide_id)
                    except SlideNotFound:  # unpublished meanwhile
                        return None

            views = [
                v
                for v in await asyncio.gather(*(one(s) for s in ids))
                if v is not None and v.dicom is not None and v.status == "ready"
            ]
            studies: dict[str, list[str]] = {}
            for v in views:
                assert v.dicom is not None
                studies.setdefault(str(v.dicom["study_instance_uid"]), []).append(v.slide_id)
            self.studies = studies
            self.scanned_at = time.monotonic()
            return views

    async def _lookup(self, catalog: Catalog, ids: Iterable[str], study: str) -> list[SlideView]:
        found = []
        for slide_id in ids:
            try:
                view = await catalog.slide(slide_id)
            except SlideNotFound:
                continue
            if view.dicom is not None and view.dicom.get("study_instance_uid") == study:
                found.append(view)
        return found

    async def study(self, catalog: Catalog, study: str) -> list[SlideView]:
        """The slides (series) of a study; SlideNotFound when none."""
        check_uid(study, "StudyInstanceUID")
        found = await self._lookup(catalog, self.studies.get(study, []), study)
        if not found and time.monotonic() - self.scanned_at > RESCAN_SECONDS:
            await self.scan(catalog)
            found = await self._lookup(catalog, self.studies.get(study, []), study)
        if not found:
            raise SlideNotFound(f"no study {study}")
        return found

    async def one_series(self, catalog: Catalog, study: str, series: str) -> SlideView:
        check_uid(series, "SeriesInstanceUID")
        for view in await self.study(catalog, study):
            assert view.dicom is not None
            if view.dicom.get("series_instance_uid") == series:
                return view
        raise SlideNotFound(f"no series {series} in study {study}")

    async def header(self, catalog: Catalog, inst: Instance) -> Dataset:
        """The instance's data set up to Pixel Data, read with range reads and cached."""
        cache_key = (inst.slide.slide_id, inst.slide.manifest_crc, inst.sop_uid)
        ds = self._headers.get(cache_key)
        if ds is not None:
            self._headers.move_to_end(cache_key)
            return ds
        size = inst.view.size
        want = min(self.header_read, size)
        while True:
            head = await catalog.reader.get_range(inst.key, 0, want)
            ds = await in_pool(catalog, parse_header, head)
            if ds is not None:
                break
            if want >= min(size, MAX_HEADER):
                raise CorruptSlide(f"{inst.key} has no readable DICOM header")
            want = min(2 * want, size, MAX_HEADER)
        if str(ds.get("SOPInstanceUID", "")) != inst.sop_uid:
            raise CorruptSlide(f"{inst.key} does not hold instance {inst.sop_uid}")
        self._headers[cache_key] = ds
        while len(self._headers) > self.header_entries:
            self._headers.popitem(last=False)
        return ds

    async def metadata(self, catalog: Catalog, inst: Instance) -> dict[str, Any]:
        """The instance's header as DICOM JSON (bulk data inline)."""
        cache_key = (inst.slide.slide_id, inst.slide.manifest_crc, inst.sop_uid)
        doc = self._json.get(cache_key)
        if doc is None:
            ds = await self.header(catalog, inst)
            doc = ds.to_json_dict(bulk_data_threshold=MAX_HEADER)
            doc.pop("7FE00010", None)
            doc.pop("FFFCFFFC", None)
            self._json[cache_key] = doc
            while len(self._json) > self.header_entries:
                self._json.popitem(last=False)
        return doc


DICOMWEB = web.AppKey("dicomweb", DicomWebState)


def state(request: web.Request) -> DicomWebState:
    return request.app[DICOMWEB]


def allow_label(request: web.Request) -> bool:
    return request.app[SETTINGS].allow_label


async def find_instance(request: web.Request) -> Instance:
    """The instance named by the path's study, series and SOP instance UIDs."""
    study = request.match_info["study"]
    series = request.match_info["series"]
    sop = check_uid(request.match_info["instance"], "SOPInstanceUID")
    check_uid(study, "StudyInstanceUID")
    check_uid(series, "SeriesInstanceUID")
    slide = await state(request).one_series(request.app[CATALOG], study, series)
    for inst in slide_instances(slide, allow_label(request)):
        if inst.sop_uid == sop:
            return inst
    raise SlideNotFound(f"no instance {sop} in series {series}")


async def scoped_instances(request: web.Request) -> list[Instance]:
    """Instances of the study or series named by the path."""
    study = request.match_info["study"]
    check_uid(study, "StudyInstanceUID")
    catalog = request.app[CATALOG]
    if "series" in request.match_info:
        series = check_uid(request.match_info["series"], "SeriesInstanceUID")
        slides = [await state(request).one_series(catalog, study, series)]
    else:
        slides = await state(request).study(catalog, study)
    return [i for s in slides for i in slide_instances(s, allow_label(request))]


def number_param(value: str, name: str) -> int:
    if not NUMBER.fullmatch(value):
        raise InvalidArgument(f"{name} must be a non-negative integer")
    return int(value)


def pinned(inst: Instance) -> dict[str, Any]:
    """`etag_response` caching arguments for an instance's bytes: versioned by its slide's
    manifest, never stored by caches for labels and overviews (patient data)."""
    return {"version": inst.slide.manifest_crc, "storable": inst.flavor not in PRIVATE_FLAVORS}
