"""DICOMweb (PS3.18) over the DICOM view of published slides, under `/dicomweb`.

Every stored level object is a DICOM VL Whole Slide Microscopy instance (TILED_FULL, JPEG
baseline, frames = the Zarr chunks), so this module serves what is stored and decodes only for
the rendered resources and for uncompressed frames:

- QIDO-RS: `/studies`, `/series`, `/instances`, `/studies/{s}/series`, `/studies/{s}/instances`,
  `/studies/{s}/series/{se}/instances`; application/dicom+json. Matching on any attribute of
  the instance headers by keyword or tag: UID lists (`,` or `\\`, repeated keys are a union),
  `*`/`?` wildcards (PatientName case-insensitive with `fuzzymatching=true`), date/time ranges;
  `limit`, `offset`, `includefield` (keywords, tags or `all`; unknown values are ignored).
  Queries above the instance level match relationally (a series matches when one of its
  instances does). Unknown query keys are a 400.
- WADO-RS metadata of a study, series or instance: the stored header as DICOM JSON (pixel data
  and the trailing shard index left out, bulk data such as the ICC profile inline).
- WADO-RS frames `.../frames/1,2,3` as `multipart/related; type="image/jpeg"` with the stored
  JPEG bytes. `type="application/octet-stream"` with `transfer-syntax=*` also gets the stored
  JPEG bytes; without a transfer syntax (or with Explicit VR Little Endian) the frames are
  decoded to interleaved RGB (8 bits, PhotometricInterpretation RGB whatever the header says
  of the JPEG stream) within the render pixel budget; any other transfer syntax is a 406.
- WADO-RS retrieval of a study, series or instance as `multipart/related;
  type="application/dicom"`: the stored objects as they are (JPEG baseline; an explicitly
  requested other transfer syntax is a 406, no transcoding).
- Rendered (`.../rendered`, `.../frames/{n}/rendered`) and thumbnails (study, series, instance,
  frame) as JPEG or PNG, with `viewport=w,h` and `quality`, within the render pixel budget.

One study and one series per slide (UIDs from the slide's DICOM view). Label and overview
instances show up only when the service allows label images. UIDs in paths and queries are
checked (digits and dots, at most 64 characters) before any lookup.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import io
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from aiohttp import web
from PIL import Image
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from wsi.errors import CorruptSlide, InvalidArgument, SlideNotFound

from .app import CATALOG, SETTINGS, dumps, etag_response
from .catalog import Catalog, LevelView, SlideView
from .openapi import ERROR, path_params
from .render import decode_chunk, encode_image, in_pool, region

PREFIX = "/dicomweb"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DICOM_JSON = "application/dicom+json"
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
HEADER_READ = 64 * 1024
"""First range read of an instance header; doubled until the header is complete."""
MAX_HEADER = 64 * 1024 * 1024
MAX_FRAMES = 1024
"""Frames in one WADO-RS frames request."""
MAX_RESULTS = 1000
"""QIDO results in one response without an explicit limit (PS3.18 6.7.1.2.2 Warning)."""
THUMBNAIL = 256
"""Default thumbnail viewport (pixels, both sides)."""
RESCAN_SECONDS = 2.0
"""An unknown UID rescans the store at most this often."""
STREAM_CHUNK = 4 * 1024 * 1024
ASSOCIATED_NAME = {"LABEL": "label", "OVERVIEW": "macro", "THUMBNAIL": "thumbnail"}
PRIVATE_FLAVORS = ("LABEL", "OVERVIEW")
UID_PATTERN = re.compile(r"[0-9]+(?:\.[0-9]+)*", re.ASCII)
NUMBER = re.compile(r"[0-9]{1,9}", re.ASCII)
IGNORED_QUERY_KEYS = {"exp", "sig"}
"""Signed-URL parameters: authentication, not part of a query."""

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
INSTANCE_DEFAULT = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "InstanceAvailability",
    "AvailableTransferSyntaxUID",
    "RetrieveURL",
    "InstanceNumber",
    "ImageType",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "NumberOfFrames",
    "TotalPixelMatrixColumns",
    "TotalPixelMatrixRows",
    "DimensionOrganizationType",
    "PyramidUID",
)
SLIDE_LEVEL = set(STUDY_ALL) | set(SERIES_ALL) | {"SOPClassUID"}
"""Attributes equal in every instance of a slide: matched on one header per slide."""


# --- instances -------------------------------------------------------------------------------


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

    def __init__(self, header_entries: int = 2048) -> None:
        self.header_entries = header_entries
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
        want = min(HEADER_READ, size)
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


# --- content negotiation ---------------------------------------------------------------------


@dataclass(frozen=True)
class MediaRange:
    type: str
    params: dict[str, str]
    q: float


def split_outside_quotes(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def accepted(request: web.Request) -> list[MediaRange]:
    """The Accept header's media ranges, most preferred first (an absent header: */*)."""
    header = request.headers.get("Accept", "").strip()
    if not header:
        return [MediaRange("*/*", {}, 1.0)]
    ranges = []
    for item in split_outside_quotes(header, ","):
        pieces = [p.strip() for p in split_outside_quotes(item, ";")]
        if not pieces[0]:
            continue
        params: dict[str, str] = {}
        for piece in pieces[1:]:
            name, _, value = piece.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 0.0
        if q > 0:
            ranges.append(MediaRange(pieces[0].lower(), params, q))
    return sorted(ranges, key=lambda r: -r.q)


def not_acceptable(what: str) -> web.HTTPNotAcceptable:
    return web.HTTPNotAcceptable(reason=f"{what} only")


def check_json_accept(request: web.Request) -> None:
    ok = ("application/dicom+json", "application/json", "application/*", "*/*")
    if not any(r.type in ok for r in accepted(request)):
        raise not_acceptable(DICOM_JSON)


def frame_mode(request: web.Request, count: int) -> str:
    """From the Accept header: 'jpeg' (stored bytes, image/jpeg parts), 'octet-jpeg' (stored
    bytes, application/octet-stream parts: `transfer-syntax=*`), 'native' (decoded RGB) or
    'single' (one JPEG, not multipart); 406 otherwise."""
    for r in accepted(request):
        inner, syntax = r.type, r.params.get("transfer-syntax")
        if r.type == "multipart/related":
            inner = r.params.get("type", "application/octet-stream").lower()
        elif r.type == "image/jpeg" and count == 1 and syntax in (None, "*", JPEG_BASELINE):
            return "single"
        elif r.type != "*/*":
            continue
        if inner in ("image/jpeg", "image/*", "*/*") and syntax in (None, "*", JPEG_BASELINE):
            return "jpeg"
        if inner in ("application/octet-stream", "*/*") and syntax == EXPLICIT_VR_LE:
            return "native"
        if inner == "application/octet-stream" and syntax in ("*", None):
            return "octet-jpeg" if syntax == "*" else "native"
    raise not_acceptable(
        f'multipart/related; type="image/jpeg" (transfer-syntax={JPEG_BASELINE}) or '
        f'type="application/octet-stream" (transfer-syntax=* or {EXPLICIT_VR_LE})'
    )


def check_dicom_accept(request: web.Request) -> None:
    for r in accepted(request):
        syntax = r.params.get("transfer-syntax")
        if r.type == "*/*" or (
            r.type == "multipart/related"
            and r.params.get("type", "application/dicom").lower() in ("application/dicom", "*/*")
            and syntax in (None, "*", JPEG_BASELINE)
        ):
            return
    raise not_acceptable(
        f'multipart/related; type="application/dicom" (transfer-syntax={JPEG_BASELINE} or *)'
    )


def image_format(request: web.Request) -> str:
    for r in accepted(request):
        if r.type in ("image/jpeg", "image/*", "*/*"):
            return "jpg"
        if r.type == "image/png":
            return "png"
    raise not_acceptable("image/jpeg or image/png")


def multipart(parts: Sequence[bytes], media_type: str, syntax: str) -> tuple[bytes, str]:
    """(body, Content-Type) of a multipart/related message whose parts are all `media_type`
    in transfer syntax `syntax`."""
    boundary = uuid.uuid4().hex
    head = f"--{boundary}\r\nContent-Type: {media_type}; transfer-syntax={syntax}\r\n\r\n"
    body = b"".join(head.encode() + p + b"\r\n" for p in parts) + f"--{boundary}--\r\n".encode()
    return body, (
        f'multipart/related; type="{media_type}"; boundary={boundary}; transfer-syntax={syntax}'
    )


# --- QIDO-RS ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filter:
    keyword: str
    vr: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Query:
    filters: tuple[Filter, ...]
    includes: frozenset[str]
    include_all: bool
    limit: int | None
    offset: int
    fuzzy: bool


def attribute_keyword(name: str) -> str | None:
    """A DICOM keyword from a keyword or an 8-digit hex tag; None if it is neither."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        keyword = keyword_for_tag(int(name, 16))
        return keyword or None
    return name if tag_for_keyword(name) is not None else None


def number_param(value: str, name: str) -> int:
    if not NUMBER.fullmatch(value):
        raise InvalidArgument(f"{name} must be a non-negative integer")
    return int(value)


def parse_query(request: web.Request) -> Query:
    grouped: dict[str, list[str]] = {}
    includes: set[str] = set()
    include_all = False
    limit: int | None = None
    offset = 0
    fuzzy = False
    for name, value in request.query.items():
        if name in IGNORED_QUERY_KEYS:
            continue
        if name == "includefield":
            for item in value.split(","):
                item = item.strip()
                if item == "all":
                    include_all = True
                elif (keyword := attribute_keyword(item)) is not None:
                    includes.add(keyword)
            continue
        if name == "limit":
            limit = number_param(value, "limit")
            if limit == 0:
                raise InvalidArgument("limit must be at least 1")
            continue
        if name == "offset":
            offset = number_param(value, "offset")
            continue
        if name == "fuzzymatching":
            if value not in ("true", "false"):
                raise InvalidArgument("fuzzymatching must be true or false")
            fuzzy = value == "true"
            continue
        keyword = attribute_keyword(name)
        if keyword is None:
            raise InvalidArgument(f"unknown query parameter {name!r}")
        if len(value) > 1024:
            raise InvalidArgument(f"{keyword} value too long")
        grouped.setdefault(keyword, []).append(value)
    filters = []
    for keyword, values in grouped.items():
        vr = dictionary_VR(keyword)
        if vr == "SQ":
            raise InvalidArgument(f"matching on sequence {keyword} is not supported")
        if vr == "UI":
            uids = [u for v in values for u in re.split(r"[,\\]", v) if u]
            for uid in uids:
                check_uid(uid, keyword)
            if not uids:  # universal match
                continue
            filters.append(Filter(keyword, vr, tuple(uids)))
        else:
            if len(values) > 1:
                raise InvalidArgument(f"{keyword} given more than once")
            if values[0] in ("", "*"):
                continue
            if vr in ("DA", "TM", "DT"):
                check_range(values[0], keyword)
            filters.append(Filter(keyword, vr, (values[0],)))
    return Query(tuple(filters), frozenset(includes), include_all, limit, offset, fuzzy)


def check_range(value: str, keyword: str) -> None:
    for bound in value.split("-", 1) if "-" in value else [value]:
        if bound and not re.fullmatch(r"[0-9]{2,14}(\.[0-9]{1,6})?", bound):
            raise InvalidArgument(f"{keyword} must be a date/time or a range of them")
    if value == "-":
        raise InvalidArgument(f"{keyword} range needs at least one bound")


def wildcard(pattern: str, value: str, fold: bool) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    flags = re.IGNORECASE | re.DOTALL if fold else re.DOTALL
    return re.fullmatch(regex, value, flags) is not None


def in_range(spec: str, value: str) -> bool:
    if "-" not in spec:
        return value == spec or (len(spec) < len(value) and value.startswith(spec))
    low, high = spec.split("-", 1)
    return (not low or value >= low) and (not high or value[: len(high)] <= high)


@dataclass
class Row:
    """One matchable record: a slide (series) or one of its instances, with computed values."""

    slide: SlideView
    instance: Instance | None
    header: Dataset
    computed: dict[str, list[str]]

    def values(self, keyword: str) -> list[str] | None:
        if keyword in self.computed:
            return self.computed[keyword]
        if keyword not in self.header:
            return None
        value = self.header[keyword].value
        if value is None or value == "":
            return []
        items = list(value) if isinstance(value, MultiValue | list) else [value]
        return [str(v) for v in items]


def row_matches(row: Row, query: Query) -> bool:
    for f in query.filters:
        found = row.values(f.keyword)
        if not found:
            return False
        if f.vr == "UI":
            ok = any(v in f.values for v in found)
        elif f.vr in ("DA", "TM", "DT"):
            ok = any(in_range(f.values[0], v) for v in found)
        elif f.vr in ("IS", "US", "UL", "SS", "SL", "UV", "SV"):
            ok = any(v.strip() == f.values[0].strip() for v in found)
        else:
            fold = f.vr == "PN" and query.fuzzy
            ok = any(wildcard(f.values[0], v, fold) for v in found)
        if not ok:
            return False
    return True


def element(keyword: str, value: Any) -> DataElement:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    return DataElement(tag, dictionary_VR(tag), value)


def base_url(request: web.Request) -> str:
    return f"{request.url.origin()}{PREFIX}"


def record(
    rows_header: Dataset,
    keywords: Iterable[str],
    computed: dict[str, Any],
) -> dict[str, Any]:
    out = Dataset()
    for keyword in keywords:
        if keyword in computed:
            out.add(element(keyword, computed[keyword]))
        elif keyword in rows_header:
            out.add(rows_header[keyword])
    return dict(sorted(out.to_json_dict(bulk_data_threshold=MAX_HEADER).items()))


class Search:
    """One QIDO-RS request: rows from the scoped slides, matched, grouped, paged."""

    def __init__(self, request: web.Request, level: str) -> None:
        self.request = request
        self.level = level
        self.catalog = request.app[CATALOG]
        self.state = state(request)
        self.query = parse_query(request)
        self.allow_label = allow_label(request)

    async def slides(self) -> list[SlideView]:
        info = self.request.match_info
        if "series" in info:
            return [await self.state.one_series(self.catalog, info["study"], info["series"])]
        if "study" in info:
            return await self.state.study(self.catalog, info["study"])
        return await self.state.scan(self.catalog)

    def prefilter(self, inst: Instance) -> bool:
        """UID filters answered from the slide's DICOM view, before any header read."""
        known = {
            "StudyInstanceUID": inst.study_uid,
            "SeriesInstanceUID": inst.series_uid,
            "SOPInstanceUID": inst.sop_uid,
        }
        return all(known[f.keyword] in f.values for f in self.query.filters if f.keyword in known)

    async def rows(self, slides: list[SlideView]) -> list[Row]:
        per_instance = self.level == "instances" or any(
            f.keyword not in SLIDE_LEVEL for f in self.query.filters
        )
        gate = asyncio.Semaphore(32)

        async def header(inst: Instance) -> Dataset:
            async with gate:
                return await self.state.header(self.catalog, inst)

        targets: list[tuple[SlideView, Instance | None, Instance]] = []
        for slide in slides:
            instances = [i for i in slide_instances(slide, self.allow_label) if self.prefilter(i)]
            if per_instance:
                targets += [(slide, inst, inst) for inst in instances]
            elif instances:
                targets.append((slide, None, instances[0]))
        headers = await asyncio.gather(*(header(t[2]) for t in targets))
        return [
            Row(slide, inst, ds, self.computed(inst))
            for (slide, inst, _), ds in zip(targets, headers, strict=True)
        ]

    def computed(self, inst: Instance | None) -> dict[str, list[str]]:
        values = {"ModalitiesInStudy": ["SM"]}
        if inst is not None:
            values["InstanceAvailability"] = ["ONLINE"]
            values["AvailableTransferSyntaxUID"] = [JPEG_BASELINE]
        return values

    def includes(self, default: Sequence[str], everything: Sequence[str]) -> list[str]:
        keywords = list(everything if self.query.include_all else default)
        return keywords + sorted(self.query.includes - set(keywords))

    async def run(self) -> web.Response:
        check_json_accept(self.request)
        slides = await self.slides()
        rows = [r for r in await self.rows(slides) if row_matches(r, self.query)]
        if self.level == "studies":
            results = self.studies(rows, slides)
        elif self.level == "series":
            results = self.series(rows)
        else:
            results = [self.instance(r) for r in rows]
        limit = self.query.limit or MAX_RESULTS
        page = results[self.query.offset : self.query.offset + min(limit, MAX_RESULTS)]
        headers = {}
        capped = self.query.limit is None or self.query.limit > MAX_RESULTS
        if capped and self.query.offset + len(page) < len(results):
            headers["Warning"] = (
                '299 wsistore "The number of results exceeded the maximum supported by the '
                'server. Additional results can be requested."'
            )
        return web.Response(
            text=dumps(page), content_type=DICOM_JSON, headers=headers, charset="utf-8"
        )

    def studies(self, rows: list[Row], slides: list[SlideView]) -> list[dict[str, Any]]:
        by_study: dict[str, list[SlideView]] = {}
        for slide in slides:
            if slide.dicom is not None:
                by_study.setdefault(str(slide.dicom["study_instance_uid"]), []).append(slide)
        results, seen = [], set()
        for row in rows:
            uid = str(row.header.StudyInstanceUID)
            if uid in seen:
                continue
            seen.add(uid)
            members = by_study.get(uid, [row.slide])
            count = sum(len(slide_instances(s, self.allow_label)) for s in members)
            computed = {
                "ModalitiesInStudy": ["SM"],
                "NumberOfStudyRelatedSeries": len(members),
                "NumberOfStudyRelatedInstances": count,
                "RetrieveURL": f"{base_url(self.request)}/studies/{uid}",
            }
            results.append(record(row.header, self.includes(STUDY_DEFAULT, STUDY_ALL), computed))
        return results

    def series(self, rows: list[Row]) -> list[dict[str, Any]]:
        scoped = "study" in self.request.match_info
        results, seen = [], set()
        for row in rows:
            uid = str(row.header.SeriesInstanceUID)
            if uid in seen:
                continue
            seen.add(uid)
            study = str(row.header.StudyInstanceUID)
            computed = {
                "NumberOfSeriesRelatedInstances": len(slide_instances(row.slide, self.allow_label)),
                "RetrieveURL": f"{base_url(self.request)}/studies/{study}/series/{uid}",
            }
            keywords = self.includes(SERIES_DEFAULT, SERIES_ALL)
            if not scoped:
                keywords += [k for k in STUDY_DEFAULT if k not in keywords and k not in computed]
            results.append(record(row.header, keywords, computed))
        return results

    def instance(self, row: Row) -> dict[str, Any]:
        assert row.instance is not None
        inst = row.instance
        computed: dict[str, Any] = {
            "InstanceAvailability": "ONLINE",
            "AvailableTransferSyntaxUID": JPEG_BASELINE,
            "RetrieveURL": (
                f"{base_url(self.request)}/studies/{inst.study_uid}/series/{inst.series_uid}"
                f"/instances/{inst.sop_uid}"
            ),
        }
        if self.query.include_all:
            keywords = [keyword_for_tag(e.tag) for e in row.header if e.tag < 0x7FE00010]
            keywords = [k for k in keywords if k] + [k for k in INSTANCE_DEFAULT if k in computed]
        else:
            keywords = list(INSTANCE_DEFAULT)
            info = self.request.match_info
            if "series" not in info:
                keywords += [k for k in SERIES_DEFAULT if k not in keywords]
            if "study" not in info:
                keywords += [k for k in STUDY_DEFAULT if k not in keywords]
            keywords = [k for k in keywords if k in computed or k in row.header]
        keywords += sorted(self.query.includes - set(keywords))
        return record(row.header, keywords, computed)


def search(level: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        for name, what in (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID")):
            if name in request.match_info:
                check_uid(request.match_info[name], what)
        return await Search(request, level).run()

    return handler


# --- WADO-RS ---------------------------------------------------------------------------------


async def metadata(request: web.Request) -> web.Response:
    check_json_accept(request)
    if "instance" in request.match_info:
        instances = [await find_instance(request)]
    else:
        instances = await scoped_instances(request)
    catalog, st = request.app[CATALOG], state(request)
    docs = await asyncio.gather(*(st.metadata(catalog, i) for i in instances))
    tags = ",".join(f"{i.slide.manifest_crc}:{i.sop_uid}" for i in instances)
    etag = hashlib.sha256(tags.encode()).hexdigest()[:32]
    return etag_response(request, dumps(docs).encode(), DICOM_JSON, etag, immutable=False)


def parse_frames(text: str, count: int) -> list[int]:
    numbers = []
    for item in text.split(","):
        if not NUMBER.fullmatch(item.strip()):
            raise InvalidArgument("frames must be comma-separated positive integers")
        n = int(item)
        if not 1 <= n <= count:
            raise InvalidArgument(f"frame {n} is outside 1..{count}")
        numbers.append(n)
    if len(numbers) > MAX_FRAMES:
        raise InvalidArgument(f"at most {MAX_FRAMES} frames per request")
    return numbers


async def frames(request: web.Request) -> web.Response:
    inst = await find_instance(request)
    numbers = parse_frames(request.match_info["frames"], inst.frames)
    mode = frame_mode(request, len(numbers))
    if mode == "native":
        pixels = len(numbers) * inst.view.tile_width * inst.view.tile_height
        budget = request.app[SETTINGS].max_render_pixels
        if pixels > budget:
            raise InvalidArgument(f"{pixels} decoded pixels exceed the {budget} pixel budget")
    catalog = request.app[CATALOG]
    data = await asyncio.gather(*(inst.frame(catalog, n) for n in numbers))
    digest = hashlib.sha256(request.match_info["frames"].encode()).hexdigest()[:16]
    etag = f"{inst.slide.manifest_crc}-{inst.sop_uid}-{digest}-{mode}"
    if mode == "single":
        return etag_response(request, data[0], "image/jpeg", etag)
    if mode == "native":

        def decode() -> list[bytes]:
            return [np.ascontiguousarray(decode_chunk(inst.view, d)).tobytes() for d in data]

        body, content_type = multipart(
            await in_pool(catalog, decode), "application/octet-stream", EXPLICIT_VR_LE
        )
    else:
        media_type = "image/jpeg" if mode == "jpeg" else "application/octet-stream"
        body, content_type = multipart(data, media_type, JPEG_BASELINE)
    response = etag_response(request, body, "application/octet-stream", etag)
    if response.status == 200:
        response.headers["Content-Type"] = content_type
    return response


async def retrieve(request: web.Request) -> web.StreamResponse:
    """Stored objects as they are, one part each, streamed with range reads."""
    check_dicom_accept(request)
    if "instance" in request.match_info:
        instances = [await find_instance(request)]
    else:
        instances = await scoped_instances(request)
    if not instances:
        raise SlideNotFound("no instances to retrieve")
    reader = request.app[CATALOG].reader
    boundary = uuid.uuid4().hex
    head = f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={JPEG_BASELINE}"
    heads = [f"{head}\r\n\r\n".encode() for _ in instances]
    tail = f"--{boundary}--\r\n".encode()
    length = sum(len(h) + i.view.size + 2 for h, i in zip(heads, instances, strict=True))
    first = await reader.get_range(instances[0].key, 0, min(STREAM_CHUNK, instances[0].view.size))
    response = web.StreamResponse(
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Cache-Control": "no-cache",
        }
    )
    response.content_length = length + len(tail)
    await response.prepare(request)
    for i, inst in enumerate(instances):
        await response.write(heads[i])
        start = 0
        while start < inst.view.size:
            end = min(start + STREAM_CHUNK, inst.view.size)
            chunk = first if i == 0 and start == 0 else await reader.get_range(inst.key, start, end)
            await response.write(chunk)
            start = end
        await response.write(b"\r\n")
    await response.write(tail)
    await response.write_eof()
    return response


# --- rendered and thumbnails -----------------------------------------------------------------


def render_params(
    request: web.Request, default_box: int | None
) -> tuple[tuple[int, int] | None, int | None]:
    viewport: tuple[int, int] | None = (default_box, default_box) if default_box else None
    if "viewport" in request.query:
        parts = request.query["viewport"].split(",")
        if len(parts) != 2:
            raise InvalidArgument("viewport must be width,height")
        w, h = (number_param(p.strip(), "viewport") for p in parts)
        if w < 1 or h < 1:
            raise InvalidArgument("viewport must be positive")
        viewport = (w, h)
    quality = None
    if "quality" in request.query:
        quality = number_param(request.query["quality"], "quality")
        if not 1 <= quality <= 100:
            raise InvalidArgument("quality must be 1..100")
    return viewport, quality


def fit(width: int, height: int, viewport: tuple[int, int] | None) -> tuple[int, int]:
    """(width, height) scaled down to fit the viewport, aspect ratio kept."""
    if viewport is None:
        return width, height
    scale = min(1.0, viewport[0] / width, viewport[1] / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


async def render_instance(
    request: web.Request, inst: Instance, frame: int | None, default_box: int | None
) -> web.Response:
    viewport, quality = render_params(request, default_box)
    fmt = image_format(request)
    catalog = request.app[CATALOG]
    budget = request.app[SETTINGS].max_render_pixels
    what = f"{inst.sop_uid}-{frame}-{viewport}-{quality}-{fmt}"
    etag = f"{inst.slide.manifest_crc}-{hashlib.sha256(what.encode()).hexdigest()[:24]}"
    single = frame is not None or inst.flavor != "VOLUME"
    if single:
        view = inst.view
        width, height = (
            (view.tile_width, view.tile_height) if frame is not None else (view.width, view.height)
        )
        out = fit(width, height, viewport)
        if out[0] * out[1] > budget:
            raise InvalidArgument(f"{out[0]}x{out[1]} exceeds the {budget} pixel budget")
        data = await inst.frame(catalog, frame or 1)
        if out == (width, height) and fmt == "jpg" and quality is None:
            return etag_response(request, data, "image/jpeg", etag)

        def draw() -> tuple[bytes, str]:
            pixels = decode_chunk(view, data)[:height, :width]
            if out != (width, height):
                image = Image.fromarray(np.ascontiguousarray(pixels))
                pixels = np.asarray(image.resize(out, Image.Resampling.LANCZOS))
            return encode_image(pixels, fmt, quality or 90)

        body, content_type = await in_pool(catalog, draw)
        return etag_response(request, body, content_type, etag)
    slide = inst.slide
    out = fit(inst.view.width, inst.view.height, viewport)
    if out[0] * out[1] > budget:
        raise InvalidArgument(
            f"{out[0]}x{out[1]} exceeds the {budget} pixel budget: ask for a smaller viewport"
        )
    pixels = await region(catalog, slide, 0, 0, slide.width, slide.height, *out, budget)
    body, content_type = await in_pool(catalog, encode_image, pixels, fmt, quality or 90)
    return etag_response(request, body, content_type, etag)


async def rendered(request: web.Request) -> web.Response:
    inst = await find_instance(request)
    frame = None
    if "frames" in request.match_info:
        numbers = parse_frames(request.match_info["frames"], inst.frames)
        if len(numbers) != 1:
            raise InvalidArgument("rendered frames: one frame at a time")
        frame = numbers[0]
    box = THUMBNAIL if request.path.endswith("/thumbnail") else None
    return await render_instance(request, inst, frame, box)


async def series_thumbnail(request: web.Request) -> web.Response:
    instances = await scoped_instances(request)
    volumes = [i for i in instances if i.flavor == "VOLUME"]
    if not volumes:
        raise SlideNotFound("no image to make a thumbnail of")
    return await render_instance(request, volumes[0], None, THUMBNAIL)


# --- routes ----------------------------------------------------------------------------------


STUDY = f"{PREFIX}/studies/{{study}}"
SERIES = f"{STUDY}/series/{{series}}"
INSTANCE = f"{SERIES}/instances/{{instance}}"
FRAMES = f"{INSTANCE}/frames/{{frames}}"


def register(app: web.Application) -> None:
    app[DICOMWEB] = DicomWebState()
    add = app.router.add_get
    add(f"{PREFIX}/studies", search("studies"))
    add(f"{PREFIX}/series", search("series"))
    add(f"{PREFIX}/instances", search("instances"))
    add(STUDY, retrieve)
    add(f"{STUDY}/metadata", metadata)
    add(f"{STUDY}/series", search("series"))
    add(f"{STUDY}/instances", search("instances"))
    add(f"{STUDY}/thumbnail", series_thumbnail)
    add(SERIES, retrieve)
    add(f"{SERIES}/metadata", metadata)
    add(f"{SERIES}/instances", search("instances"))
    add(f"{SERIES}/thumbnail", series_thumbnail)
    add(INSTANCE, retrieve)
    add(f"{INSTANCE}/metadata", metadata)
    add(f"{INSTANCE}/rendered", rendered)
    add(f"{INSTANCE}/thumbnail", rendered)
    add(FRAMES, frames)
    add(f"{FRAMES}/rendered", rendered)
    add(f"{FRAMES}/thumbnail", rendered)


def _op(summary: str, params: tuple[str, ...], ok: str, query: bool = False) -> dict[str, Any]:
    parameters = path_params(*params)
    if query:
        parameters += [
            {"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
            for n in ("limit", "offset", "includefield", "fuzzymatching")
        ]
    return {
        "get": {
            "summary": summary,
            "tags": ["DICOMweb"],
            "parameters": parameters,
            "responses": {
                "200": {"description": ok},
                "400": ERROR,
                "404": ERROR,
                "406": ERROR,
            },
        }
    }


_S, _SE, _I = ("study",), ("study", "series"), ("study", "series", "instance")
OPENAPI = {
    f"{PREFIX}/studies": _op(
        "QIDO-RS: search studies (any attribute keyword or tag as a query key)",
        (),
        DICOM_JSON,
        True,
    ),
    f"{PREFIX}/series": _op("QIDO-RS: search series", (), DICOM_JSON, True),
    f"{PREFIX}/instances": _op("QIDO-RS: search instances", (), DICOM_JSON, True),
    STUDY: _op("WADO-RS: the study's instances", _S, 'multipart/related; type="application/dicom"'),
    f"{STUDY}/metadata": _op("WADO-RS: metadata of the study's instances", _S, DICOM_JSON),
    f"{STUDY}/series": _op("QIDO-RS: search the study's series", _S, DICOM_JSON, True),
    f"{STUDY}/instances": _op("QIDO-RS: search the study's instances", _S, DICOM_JSON, True),
    f"{STUDY}/thumbnail": _op("Thumbnail of the study", _S, "image/jpeg or image/png"),
    SERIES: _op(
        "WADO-RS: the series' instances", _SE, 'multipart/related; type="application/dicom"'
    ),
    f"{SERIES}/metadata": _op("WADO-RS: metadata of the series' instances", _SE, DICOM_JSON),
    f"{SERIES}/instances": _op("QIDO-RS: search the series' instances", _SE, DICOM_JSON, True),
    f"{SERIES}/thumbnail": _op("Thumbnail of the series", _SE, "image/jpeg or image/png"),
    INSTANCE: _op(
        "WADO-RS: the stored instance (Part 10, JPEG baseline)",
        _I,
        'multipart/related; type="application/dicom"',
    ),
    f"{INSTANCE}/metadata": _op("WADO-RS: metadata of one instance", _I, DICOM_JSON),
    f"{INSTANCE}/rendered": _op(
        "Rendered instance (viewport=w,h, quality), within the pixel budget",
        _I,
        "image/jpeg or image/png",
    ),
    f"{INSTANCE}/thumbnail": _op("Thumbnail of one instance", _I, "image/jpeg or image/png"),
    FRAMES: _op(
        "WADO-RS: frames (1-based, comma-separated) as stored JPEG, or decoded RGB",
        (*_I, "frames"),
        'multipart/related; type="image/jpeg" or type="application/octet-stream"',
    ),
    f"{FRAMES}/rendered": _op("Rendered frame", (*_I, "frames"), "image/jpeg or image/png"),
    f"{FRAMES}/thumbnail": _op("Thumbnail of a frame", (*_I, "frames"), "image/jpeg or image/png"),
}
