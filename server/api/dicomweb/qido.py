"""QIDO-RS: searching studies, series and instances by attribute."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from aiohttp import web
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from server.api.dicomweb.instances import (
    DICOM_JSON,
    JPEG2000_SYNTAXES,
    JPEG_BASELINE,
    MAX_HEADER,
    PREFIX,
    Instance,
    allow_label,
    check_uid,
    slide_instances,
    state,
)
from server.api.dicomweb.negotiation import check_json_accept
from server.api.dicomweb.query import Row, parse_query, row_matches
from server.audit import note_read
from server.keys import CATALOG
from server.render import in_pool
from server.responses import FORWARDED_VARY, dumps, public_origin
from wsi.published.slide import AsyncPublishedSlide

MAX_RESULTS = 1000
"""QIDO results in one response without an explicit limit (PS3.18 6.7.1.2.2 Warning)."""

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


def element(keyword: str, value: Any) -> DataElement:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    return DataElement(tag, dictionary_VR(tag), value)


def base_url(request: web.Request) -> str:
    """DICOMweb's root as the client sees the service (`public_origin`): RetrieveURLs."""
    return f"{public_origin(request)}{PREFIX}"


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
        self.base = base_url(request)  # a bad Host is a 400 before any work

    async def slides(self) -> list[AsyncPublishedSlide]:
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

    async def rows(self, slides: list[AsyncPublishedSlide]) -> list[Row]:
        per_instance = self.level == "instances" or any(
            f.keyword not in SLIDE_LEVEL for f in self.query.filters
        )
        gate = asyncio.Semaphore(32)

        async def header(inst: Instance) -> Dataset:
            async with gate:
                return await self.state.header(self.catalog, inst)

        targets: list[tuple[AsyncPublishedSlide, Instance | None, Instance]] = []
        for slide in slides:
            instances = [i for i in slide_instances(slide, self.allow_label) if self.prefilter(i)]
            if per_instance:
                targets += [(slide, inst, inst) for inst in instances]
            elif instances:
                targets.append((slide, None, instances[0]))
        headers = await asyncio.gather(*(header(t[2]) for t in targets))
        return [
            Row(slide, inst, ds, self.computed(inst, ds))
            for (slide, inst, _), ds in zip(targets, headers, strict=True)
        ]

    def computed(self, inst: Instance | None, header: Dataset) -> dict[str, list[str]]:
        values = {"ModalitiesInStudy": ["SM"]}
        if inst is not None:
            values["InstanceAvailability"] = ["ONLINE"]
            values["AvailableTransferSyntaxUID"] = [available_syntax(inst, header)]
        return values

    def includes(self, default: Sequence[str], everything: Sequence[str]) -> list[str]:
        keywords = list(everything if self.query.include_all else default)
        return keywords + sorted(self.query.includes - set(keywords))

    async def run(self) -> web.Response:
        check_json_accept(self.request)
        slides = await self.slides()
        rows = await self.rows(slides)
        # Matching cost grows with slides x filters: on the pool, never on the event loop.
        rows = await in_pool(self.catalog, lambda: [r for r in rows if row_matches(r, self.query)])
        note_read(self.request, (r.slide.slide_id for r in rows))
        if self.level == "studies":
            results = self.studies(rows, slides)
        elif self.level == "series":
            results = self.series(rows)
        else:
            results = [self.instance(r) for r in rows]
        limit = self.query.limit or MAX_RESULTS
        page = results[self.query.offset : self.query.offset + min(limit, MAX_RESULTS)]
        headers = {"Vary": FORWARDED_VARY}  # the RetrieveURLs
        capped = self.query.limit is None or self.query.limit > MAX_RESULTS
        if capped and self.query.offset + len(page) < len(results):
            headers["Warning"] = (
                '299 wsistore "The number of results exceeded the maximum supported by the '
                'server. Additional results can be requested."'
            )
        return web.Response(
            text=dumps(page), content_type=DICOM_JSON, headers=headers, charset="utf-8"
        )

    def studies(self, rows: list[Row], slides: list[AsyncPublishedSlide]) -> list[dict[str, Any]]:
        by_study: dict[str, list[AsyncPublishedSlide]] = {}
        for slide in slides:
            if slide.dicom is not None:
                by_study.setdefault(slide.dicom.study_instance_uid, []).append(slide)
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
                "RetrieveURL": f"{self.base}/studies/{uid}",
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
                "RetrieveURL": f"{self.base}/studies/{study}/series/{uid}",
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
            "AvailableTransferSyntaxUID": available_syntax(inst, row.header),
            "RetrieveURL": (
                f"{self.base}/studies/{inst.study_uid}/series/{inst.series_uid}"
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


def available_syntax(inst: Instance, header: Dataset) -> str:
    """The transfer syntax an instance is retrieved in: JPEG baseline (archived ones are rebuilt
    in it), or the JPEG 2000 syntax one kept as JPEG 2000 is stored in (never transcoded)."""
    if inst.kept_jpeg2000:
        meta = getattr(header, "file_meta", None)
        return str(getattr(meta, "TransferSyntaxUID", "") or JPEG2000_SYNTAXES[-1])
    return JPEG_BASELINE


def search(level: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        for name, what in (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID")):
            if name in request.match_info:
                check_uid(request.match_info[name], what)
        return await Search(request, level).run()

    return handler
