"""QIDO-RS: searching studies, series and instances by attribute."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import replace
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
    UNSERVED,
    Instance,
    allow_label,
    check_uid,
    detached,
    slide_instances,
    state,
)
from server.api.dicomweb.negotiation import check_json_accept
from server.api.dicomweb.query import Row, parse_query, row_matches
from server.api.dicomweb.series_index import (
    SERIES_ALL,
    SERIES_DEFAULT,
    SLIDE_LEVEL,
    STUDY_ALL,
    STUDY_DEFAULT,
    IndexedSeries,
    series_records,
)
from server.audit import note_read
from server.keys import CATALOG
from server.render import in_pool
from server.responses import FORWARDED_VARY, dumps, public_origin
from wsi.errors import CorruptSlide, SlideNotFound
from wsi.published.slide import AsyncPublishedSlide

log = logging.getLogger(__name__)

MAX_RESULTS = 1000
"""QIDO results in one response without an explicit limit (PS3.18 6.7.1.2.2 Warning)."""

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


def element(keyword: str, value: Any) -> DataElement:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    return DataElement(tag, dictionary_VR(tag), value)


def base_url(request: web.Request) -> str:
    """DICOMweb's root as the client sees the service (`public_origin`): RetrieveURLs."""
    return f"{public_origin(request)}{PREFIX}"


def record(
    header: Dataset | IndexedSeries,
    keywords: Iterable[str],
    computed: dict[str, Any],
) -> dict[str, Any]:
    out = Dataset()
    kept: dict[str, Any] = {}
    if isinstance(header, Dataset):
        header = detached(header)  # the cached header is not converted (`detached`)
    for keyword in keywords:
        if keyword in computed:
            out.add(element(keyword, computed[keyword]))
        elif isinstance(header, IndexedSeries):
            if keyword in header.attributes.json:
                tag, value = header.attributes.json[keyword]
                kept[tag] = value
        elif keyword in header:
            out.add(header[keyword])
    return dict(sorted({**kept, **out.to_json_dict(bulk_data_threshold=MAX_HEADER)}.items()))


class Search:
    """One QIDO-RS request: rows from the scoped slides, matched, grouped, paged."""

    def __init__(self, request: web.Request, level: str) -> None:
        self.request = request
        self.level = level
        self.catalog = request.app[CATALOG]
        self.state = state(request)
        self.stored: dict[str, bytes] = {}
        """With `includefield=all`: the DICOM JSON of the page's instances by SOP instance UID
        (WADO-RS metadata's), which their records are made from (`instance`)."""
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

    def prefilter(self, known: dict[str, str]) -> bool:
        """The UID filters answered from what is `known` of an instance or series (its UIDs
        from the slide's DICOM view or the index), before any header is read."""
        return all(known[f.keyword] in f.values for f in self.query.filters if f.keyword in known)

    @property
    def per_instance(self) -> bool:
        """Whether the search needs every instance's own header (an instance search, or a
        filter on an attribute that differs between a slide's instances)."""
        return self.level == "instances" or any(
            f.keyword not in SLIDE_LEVEL for f in self.query.filters
        )

    async def rows(self, slides: list[AsyncPublishedSlide]) -> list[Row]:
        """One row per shown instance of `slides` that the UID filters let through, leaving
        out those whose header cannot be read (an object damaged after publishing): as a slide
        refused by the reader is left out of searches, one damaged object must not make every
        search of the store a 422. Asked for by itself, such an instance is still a 422."""
        gate = asyncio.Semaphore(32)

        async def header(inst: Instance) -> Dataset | None:
            async with gate:
                try:
                    return await self.state.header(self.catalog, inst)
                except CorruptSlide as exc:
                    log.warning("left out of a DICOMweb search: %s", exc)
                    return None

        targets: list[tuple[int, Instance]] = []
        for slide in slides:
            shown = slide_instances(slide, self.allow_label)
            targets += [
                (len(shown), inst)
                for inst in shown
                if self.prefilter(
                    {
                        "StudyInstanceUID": inst.study_uid,
                        "SeriesInstanceUID": inst.series_uid,
                        "SOPInstanceUID": inst.sop_uid,
                    }
                )
            ]
        headers = await asyncio.gather(*(header(inst) for _, inst in targets))
        return [
            Row(inst.slide.slide_id, count, inst, ds, self.computed(inst, ds))
            for (count, inst), ds in zip(targets, headers, strict=True)
            if ds is not None
        ]

    async def instance_rows(self) -> tuple[int, list[Row]]:
        """The matching instance rows of a search not scoped to a study, in store order: how
        many of them the page's `offset` skips (not kept), and those after it, as far as the
        page (one more, to tell whether there are more). Reading every instance's header of the
        store took a minute on 2,000 slides whatever the `limit` (16,000 headers of 64 KB), and
        every header was held until the answer was made, however large the `offset`: slides
        are taken from the series index, those its UIDs and slide-level attributes rule out are
        never opened, and the others are read a few at a time until the page is full. A filter
        on a per-instance attribute that matches few instances still reads them all."""
        offset = self.query.offset
        wanted = min(self.query.limit or MAX_RESULTS, MAX_RESULTS) + 1
        records = await series_records(self.request.app)
        slide_level = replace(
            self.query, filters=tuple(f for f in self.query.filters if f.keyword in SLIDE_LEVEL)
        )
        computed = self.computed(None, None)
        candidates = [
            r.slide_id
            for r in records
            if r.instances(self.allow_label)
            and self.prefilter({"StudyInstanceUID": r.study_uid, "SeriesInstanceUID": r.series_uid})
            and row_matches(Row(r.slide_id, 0, None, IndexedSeries(r), computed), slide_level)
        ]
        skipped, start = 0, 0
        rows: list[Row] = []
        while start < len(candidates) and len(rows) < wanted:
            # Slides read at once: as many as the rows still needed, at 4 instances a slide.
            batch = min(32, max(1, (offset - skipped + wanted - len(rows)) // 4))
            opened = await asyncio.gather(
                *(self._published(i) for i in candidates[start : start + batch])
            )
            start += batch
            found = await self.rows([s for s in opened if s is not None and s.dicom is not None])
            matched = await in_pool(self.catalog, self.matching, found)
            skip = min(offset - skipped, len(matched))
            skipped += skip
            rows += matched[skip:]
        return skipped, rows

    def matching(self, rows: list[Row]) -> list[Row]:
        return [r for r in rows if row_matches(r, self.query)]

    async def _published(self, slide_id: str) -> AsyncPublishedSlide | None:
        """The slide, None when it is unpublished meanwhile or refused (searched without)."""
        try:
            slide = await self.catalog.slide(slide_id)
        except UNSERVED:
            return None
        return slide if isinstance(slide, AsyncPublishedSlide) else None

    async def series_rows(self) -> tuple[list[Row], dict[str, list[int]]]:
        """One row per series (slide) in the path's scope that the UID filters let through,
        from the index (`series_index`), and the instance counts of every study's series."""
        records = await series_records(self.request.app)
        records = [r for r in records if r.instances(self.allow_label)]
        info = self.request.match_info
        if "study" in info:
            records = [r for r in records if r.study_uid == info["study"]]
            if not records:
                raise SlideNotFound(f"no study {info['study']}")
        members: dict[str, list[int]] = {}
        for r in records:
            members.setdefault(r.study_uid, []).append(r.instances(self.allow_label))
        if "series" in info:
            records = [r for r in records if r.series_uid == info["series"]]
            if not records:
                raise SlideNotFound(f"no series {info['series']} in study {info['study']}")
        computed = self.computed(None, None)
        rows = [
            Row(r.slide_id, r.instances(self.allow_label), None, IndexedSeries(r), computed)
            for r in records
            if self.prefilter({"StudyInstanceUID": r.study_uid, "SeriesInstanceUID": r.series_uid})
        ]
        return rows, members

    def computed(self, inst: Instance | None, header: Dataset | None) -> dict[str, list[str]]:
        values = {"ModalitiesInStudy": ["SM"]}
        if inst is not None and header is not None:
            values["InstanceAvailability"] = ["ONLINE"]
            values["AvailableTransferSyntaxUID"] = [available_syntax(inst, header)]
        return values

    def includes(self, default: Sequence[str], everything: Sequence[str]) -> list[str]:
        keywords = list(everything if self.query.include_all else default)
        return keywords + sorted(self.query.includes - set(keywords))

    async def run(self) -> web.Response:
        check_json_accept(self.request)
        members: dict[str, list[int]] = {}
        skipped = 0  # matching rows before the page's offset, not kept
        if self.level == "instances" and "study" not in self.request.match_info:
            skipped, rows = await self.instance_rows()  # matched
        else:
            if self.per_instance:
                slides = await self.slides()
                rows = await self.rows(slides)
                for slide in slides:
                    if slide.dicom is not None:
                        count = len(slide_instances(slide, self.allow_label))
                        members.setdefault(slide.dicom.study_instance_uid, []).append(count)
            else:
                rows, members = await self.series_rows()
            # Matching cost grows with slides x filters: on the pool, never on the event loop.
            rows = await in_pool(self.catalog, self.matching, rows)
        note_read(self.request, (r.slide_id for r in rows))
        if self.level == "instances" and self.query.include_all:
            shown = [r.instance for r in rows[self._first(skipped) :][: self._size] if r.instance]
            docs = await asyncio.gather(*(self.state.metadata(self.catalog, i) for i in shown))
            self.stored = {i.sop_uid: d for i, d in zip(shown, docs, strict=True)}
        # Records are made and encoded on the pool too: see `page`.
        text, more = await in_pool(self.catalog, self.page, rows, members, skipped)
        headers = {"Vary": FORWARDED_VARY}  # the RetrieveURLs
        if more:
            headers["Warning"] = (
                '299 wsistore "The number of results exceeded the maximum supported by the '
                'server. Additional results can be requested."'
            )
        return web.Response(text=text, content_type=DICOM_JSON, headers=headers, charset="utf-8")

    def _first(self, skipped: int) -> int:
        """The index of the page's first result, `skipped` matches having been passed."""
        return self.query.offset - skipped

    @property
    def _size(self) -> int:
        """Results on a page at most."""
        return min(self.query.limit or MAX_RESULTS, MAX_RESULTS)

    def page(
        self, rows: list[Row], members: dict[str, list[int]], skipped: int
    ) -> tuple[str, bool]:
        """The page of results the matching `rows` make (`skipped`: matches before them that
        the page's offset passed), as DICOM JSON, and whether the result cap left some out.

        Results are made for the page only: one costs its record decoded and a DICOM JSON object
        built (~7 ms a study), and a page of 10 of a store's 700 studies made all 700 (5 s each
        search, growing with the store). Blocking: an instance's record with `includefield=all`
        is its whole header, per-frame groups included (3.8 MB of JSON for the 8,606 frames of a
        40,000 x 30,000 slide's base level, 5-6 s of pydicom): made on the event loop, no other
        request was answered meanwhile, and 20 clients asking at once held /healthz and tiles
        for 10 s at a time."""
        if self.level == "studies":
            shown = _first_of_each(rows, "StudyInstanceUID")
        elif self.level == "series":
            shown = _first_of_each(rows, "SeriesInstanceUID")
        else:
            shown = rows  # one result per row: the page the metadata were fetched for
        start = self._first(skipped)
        picked = shown[start : start + self._size]
        if self.level == "studies":
            page = self.studies(picked, members)
        elif self.level == "series":
            page = self.series(picked)
        else:
            page = [self.instance(r) for r in picked]
        capped = self.query.limit is None or self.query.limit > MAX_RESULTS
        return dumps(page), capped and start + len(page) < len(shown)

    def studies(self, rows: list[Row], members: dict[str, list[int]]) -> list[dict[str, Any]]:
        """One result per study of the matching rows; `members`: the instance counts of each
        study's series (all of them, matching or not)."""
        results, seen = [], set()
        for row in rows:
            uid = row.uid("StudyInstanceUID")
            if uid in seen:
                continue
            seen.add(uid)
            counts = members.get(uid, [row.instances])
            computed = {
                "ModalitiesInStudy": ["SM"],
                "NumberOfStudyRelatedSeries": len(counts),
                "NumberOfStudyRelatedInstances": sum(counts),
                "RetrieveURL": f"{self.base}/studies/{uid}",
            }
            results.append(record(row.header, self.includes(STUDY_DEFAULT, STUDY_ALL), computed))
        return results

    def series(self, rows: list[Row]) -> list[dict[str, Any]]:
        scoped = "study" in self.request.match_info
        results, seen = [], set()
        for row in rows:
            uid = row.uid("SeriesInstanceUID")
            if uid in seen:
                continue
            seen.add(uid)
            study = row.uid("StudyInstanceUID")
            computed = {
                "NumberOfSeriesRelatedInstances": row.instances,
                "RetrieveURL": f"{self.base}/studies/{study}/series/{uid}",
            }
            keywords = self.includes(SERIES_DEFAULT, SERIES_ALL)
            if not scoped:
                keywords += [k for k in STUDY_DEFAULT if k not in keywords and k not in computed]
            results.append(record(row.header, keywords, computed))
        return results

    def instance(self, row: Row) -> dict[str, Any]:
        """`row`'s record; with `includefield=all`, from its header's DICOM JSON in `stored`
        (WADO-RS metadata's, made once and cached): made from the cached header each time, the
        per-frame groups of a large level were converted again for every search (29-34 s for
        one search of the 40,000 x 30,000 slide's series under load), or kept converted in the
        cache at 60-90 MB a header counted as 1.1 MB (`instances.detached`)."""
        assert row.instance is not None and isinstance(row.header, Dataset)
        inst = row.instance
        computed: dict[str, Any] = {
            "InstanceAvailability": "ONLINE",
            "AvailableTransferSyntaxUID": available_syntax(inst, row.header),
            "RetrieveURL": (
                f"{self.base}/studies/{inst.study_uid}/series/{inst.series_uid}"
                f"/instances/{inst.sop_uid}"
            ),
        }
        if self.query.include_all and inst.sop_uid in self.stored:
            doc = json.loads(self.stored[inst.sop_uid])
            kept = {t: v for t, v in doc.items() if keyword_for_tag(int(t, 16))}  # no private
            extra = [k for k in INSTANCE_DEFAULT if k in computed]
            extra += sorted(k for k in self.query.includes - set(extra) if k in computed)
            return dict(sorted({**kept, **record(Dataset(), extra, computed)}.items()))
        if self.query.include_all:
            # Its tags (`keys`), not its elements: iterating a data set converts every element
            # it holds, in the cached header (`detached`).
            tags = [t for t in row.header.keys() if t < 0x7FE00010]  # noqa: SIM118
            keywords = [keyword_for_tag(t) for t in tags]
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


def _first_of_each(rows: list[Row], keyword: str) -> list[Row]:
    """The first row of each value of the UID attribute `keyword`, in order: one result per
    study or series."""
    seen: set[str] = set()
    firsts = []
    for row in rows:
        uid = row.uid(keyword)
        if uid not in seen:
            seen.add(uid)
            firsts.append(row)
    return firsts


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
