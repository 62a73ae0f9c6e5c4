"""DICOM instances of published slides: lookup by UID, headers read with range reads, caches."""

from __future__ import annotations

import asyncio
import copy
import io
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pydicom
from aiohttp import web
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from server.audit import note_read
from server.catalog import Catalog, ServedSlide, private_images
from server.keys import CATALOG, SETTINGS
from server.render import in_pool
from server.responses import dumps
from wsi.codecs import jpeg2000
from wsi.errors import CorruptSlide, InvalidArgument, SlideNotFound, UnsupportedSlide
from wsi.published.cache import ByteLRU
from wsi.published.slide import AsyncPublishedSlide
from wsi.published.values import JPEG, JPEG2000, JPEGXL, PublishedInstance, StoredImage

T = TypeVar("T")

PREFIX = "/dicomweb"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_XL_RECOMPRESSION = "1.2.840.10008.1.2.4.111"
"""Frames of archived instances as stored: JPEG XL that rebuilds each JPEG exactly."""
JPEG2000_SYNTAXES = (jpeg2000.JPEG2000_LOSSLESS, jpeg2000.JPEG2000)
"""Frames of instances kept as JPEG 2000 (`--keep-jpeg2000`) as stored; JPEG by default."""
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DICOM_JSON = "application/dicom+json"
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
HEADER_READ = 64 * 1024
"""First range read of an instance header; doubled until the header is complete."""
MAX_HEADER = 64 * 1024 * 1024
MAX_FRAMES = 1024
RESCAN_SECONDS = 2.0
"""An unknown UID rescans the store at most this often."""
FOUND_INSTANCES = 4096
"""Instances remembered by the UIDs of their paths (see `find_instance`)."""
HEADER_CACHE_BYTES = 32 * 1024 * 1024
"""Parsed headers kept, counted by the bytes they were parsed from (a few KB each, more with
an ICC profile); as much again for their DICOM JSON."""
UNSERVED = (SlideNotFound, UnsupportedSlide, CorruptSlide)
"""Why a slide of the store is left out of searches: unpublished meanwhile, published without
a Zarr view (DICOM only), or refused by the reader; the store being down still fails."""
UID_PATTERN = re.compile(r"[0-9]+(?:\.[0-9]+)*", re.ASCII)
MULTIPART_BOUNDARY = "wsistore-9da05fdc50be817b68bb162c1c5b21ec"
"""The boundary of the multipart bodies of frames: one constant, so that every process (`wsi
serve --processes N`) sends the same bytes for the same request under its strong ETag (a random
boundary per process did not). Drawn at random once, and public: a part that holds it gets a
body with a boundary derived from the parts (`negotiation.framing`)."""


@dataclass(frozen=True)
class Instance:
    """One DICOM instance of a published slide, as this service shows it."""

    slide: AsyncPublishedSlide
    stored: PublishedInstance

    @property
    def sop_uid(self) -> str:
        return self.stored.sop_instance_uid

    @property
    def study_uid(self) -> str:
        return self.slide.dicom.study_instance_uid if self.slide.dicom else ""

    @property
    def series_uid(self) -> str:
        return self.slide.dicom.series_instance_uid if self.slide.dicom else ""

    @property
    def is_level(self) -> bool:
        """A pyramid level (VOLUME), not a label, overview or thumbnail."""
        return self.stored.level is not None

    @property
    def private(self) -> bool:
        """A label or overview (macro), or a thumbnail that may show the label: may show
        patient data (`private_images`)."""
        return self.stored.associated in private_images(self.slide)

    @property
    def image(self) -> StoredImage:
        """The level or associated image whose tiles are the frames."""
        return self.stored.image

    @property
    def key(self) -> str:
        return self.stored.key

    @property
    def size(self) -> int:
        """Bytes of the stored instance."""
        return self.stored.size

    async def frame_count(self) -> int:
        """Number of Frames: every tile of a TILED_FULL instance, the stored ones of a
        TILED_SPARSE one (blank glass left out; read from the cached shard index)."""
        return len(await self.slide.frame_chunks(self.stored))

    @property
    def archived(self) -> bool:
        """Stored in the archive tier: JPEG XL frames, each rebuilt as its JPEG by default."""
        return self.image.stored_codec == JPEGXL

    @property
    def kept_jpeg2000(self) -> bool:
        """Frames stored as a source's JPEG 2000 codestreams, each transcoded to JPEG by
        default (the transcodes are cached with the tiles)."""
        return self.image.stored_codec == JPEG2000

    async def frame(self, number: int, stored: bool = False) -> bytes:
        """Frame `number` (1-based, row-major over the tile grid, or over the stored tiles of a
        TILED_SPARSE instance) as a JPEG; with `stored`, as stored (JPEG XL for an archived
        instance)."""
        return await self.slide.frame_bytes(self.stored, number, stored)


def slide_instances(slide: ServedSlide, allow_label: bool) -> list[Instance]:
    """The instances of a slide that this service shows, in stored order: none while it
    converts; labels and overviews only when labels are allowed."""
    if not isinstance(slide, AsyncPublishedSlide) or slide.dicom is None:
        return []
    private = private_images(slide)
    return [
        Instance(slide, inst)
        for inst in slide.dicom.instances
        if (allow_label or inst.associated not in private) and inst.image.codec == JPEG
    ]


def check_uid(value: str, what: str = "UID") -> str:
    if len(value) > 64 or not UID_PATTERN.fullmatch(value):
        raise InvalidArgument(f"{what} must be digits and dots, at most 64 characters")
    return value


def parse_header(head: bytes, tags: list[BaseTag] | None = None) -> Dataset | None:
    """The data set before Pixel Data (only `tags` when given), or None when `head` ends before
    Pixel Data starts."""
    fp = io.BytesIO(head)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=tags)
    except Exception:  # cut inside an element: read more
        return None
    position = fp.tell()
    if head[position : position + 4] != PIXEL_DATA_TAG:
        return None
    return ds


async def read_header(
    catalog: Catalog,
    inst: Instance,
    first_read: int,
    parse: Callable[[bytes], T | None],
) -> tuple[T, int]:
    """`parse` (run in the pool) of the instance's bytes before Pixel Data, read with range reads
    from `first_read` bytes, doubled until `parse` stops answering None, and the bytes read;
    CorruptSlide when no header ends within MAX_HEADER."""
    size = inst.size
    want = min(first_read, size)
    while True:
        head = await inst.slide.read_range(inst.key, 0, want)
        found = await in_pool(catalog, parse, head)
        if found is not None:
            return found, len(head)
        if want >= min(size, MAX_HEADER):
            raise CorruptSlide(f"{inst.key} has no readable DICOM header")
        want = min(2 * want, size, MAX_HEADER)


@dataclass(frozen=True)
class _Header:
    dataset: Dataset
    nbytes: int
    """Bytes it was parsed from: its size in the cache."""


def _dicom_slides(slides: Iterable[ServedSlide | None]) -> list[AsyncPublishedSlide]:
    return [s for s in slides if isinstance(s, AsyncPublishedSlide) and s.dicom is not None]


class DicomWebState:
    """Per-app caches: parsed instance headers (and their DICOM JSON), study UID -> slides."""

    def __init__(
        self, header_read: int = HEADER_READ, cache_bytes: int = HEADER_CACHE_BYTES
    ) -> None:
        self.header_read = header_read
        """First range read of a header (bytes)."""
        self.headers: ByteLRU[tuple[str, str, str], _Header] = ByteLRU(
            cache_bytes, size=lambda h: h.nbytes
        )
        self.metadata_json: ByteLRU[tuple[str, str, str], bytes] = ByteLRU(cache_bytes)
        """An instance's DICOM JSON, serialised (as WADO-RS metadata sends it)."""
        self._serialising: dict[tuple[str, str, str], asyncio.Future[bytes]] = {}
        """The DICOM JSON being made, by instance: one making for every request meanwhile."""
        self.studies: dict[str, list[str]] = {}
        """Study Instance UID -> slide ids, from the last scan."""
        self.scanned_at = -math.inf
        self.study_index: Callable[[Catalog], Awaitable[dict[str, list[str]]]] | None = None
        """Where `study` finds a study it does not know, when set (QIDO-RS's series index:
        each slide's manifest version read, not the slide opened); else a scan of every
        slide."""
        self._scan_lock = asyncio.Lock()
        self.found: ByteLRU[tuple[str, str, str], Instance] = ByteLRU(
            FOUND_INSTANCES, size=lambda _: 1
        )
        """(study, series, SOP instance UID) of a path -> the instance it named, as long as
        its slide's catalog entry is the same object (the same published version)."""
        self.frame_modes: dict[tuple[str, bool], str] = {}
        """(Accept header, one frame?) -> frame mode (`negotiation.cached_frame_mode`)."""
        self.boundary = MULTIPART_BOUNDARY
        """The boundary of multipart bodies (`negotiation.app_framing`), checked against each
        body's parts."""
        self.framings: dict[tuple[str, str], Any] = {}
        """(part media type, transfer syntax) -> its `negotiation.Framing`."""

    async def scan(self, catalog: Catalog) -> list[AsyncPublishedSlide]:
        """Every published slide with a DICOM view; refreshes the UID indexes."""
        async with self._scan_lock:
            ids = await catalog.slide_ids()
            gate = asyncio.Semaphore(32)

            async def one(slide_id: str) -> ServedSlide | None:
                async with gate:
                    try:
                        return await catalog.slide(slide_id)
                    except UNSERVED:
                        return None

            views = _dicom_slides(await asyncio.gather(*(one(s) for s in ids)))
            studies: dict[str, list[str]] = {}
            for v in views:
                assert v.dicom is not None
                studies.setdefault(v.dicom.study_instance_uid, []).append(v.slide_id)
            self.studies = studies
            self.scanned_at = time.monotonic()
            return views

    async def _lookup(
        self, catalog: Catalog, ids: Iterable[str], study: str
    ) -> list[AsyncPublishedSlide]:
        found = []
        for slide_id in ids:
            try:
                found.append(await catalog.slide(slide_id))
            except UNSERVED:
                continue
        return [s for s in _dicom_slides(found) if s.dicom and s.dicom.study_instance_uid == study]

    async def study(self, catalog: Catalog, study: str) -> list[AsyncPublishedSlide]:
        """The slides (series) of a study; SlideNotFound when none."""
        check_uid(study, "StudyInstanceUID")
        found = await self._lookup(catalog, self.studies.get(study, []), study)
        if not found and time.monotonic() - self.scanned_at > RESCAN_SECONDS:
            if self.study_index is not None:
                self.studies = await self.study_index(catalog)
                self.scanned_at = time.monotonic()
            else:
                await self.scan(catalog)
            found = await self._lookup(catalog, self.studies.get(study, []), study)
        if not found:
            raise SlideNotFound(f"no study {study}")
        return found

    async def one_series(self, catalog: Catalog, study: str, series: str) -> AsyncPublishedSlide:
        check_uid(series, "SeriesInstanceUID")
        for view in await self.study(catalog, study):
            assert view.dicom is not None
            if view.dicom.series_instance_uid == series:
                return view
        raise SlideNotFound(f"no series {series} in study {study}")

    async def header(self, catalog: Catalog, inst: Instance) -> Dataset:
        """The instance's data set up to Pixel Data, read with range reads and cached."""
        cache_key = (inst.slide.slide_id, inst.slide.version, inst.sop_uid)
        cached = self.headers.get(cache_key)
        if cached is not None:
            return cached.dataset
        ds, nbytes = await read_header(catalog, inst, self.header_read, parse_header)
        if str(ds.get("SOPInstanceUID", "")) != inst.sop_uid:
            raise CorruptSlide(f"{inst.key} does not hold instance {inst.sop_uid}")
        self.headers.put(cache_key, _Header(ds, nbytes))
        return ds

    async def metadata(self, catalog: Catalog, inst: Instance) -> bytes:
        """The instance's header as serialised DICOM JSON (bulk data inline), made once for
        every request asking for it meanwhile: the header of a 40,000 x 30,000 slide's base
        level (8,606 frames, each with its functional groups) takes 16-36 s of pydicom, and
        four requests arriving together before it was cached made it four times, side by side
        on the pool (74-134 s for each of them, /healthz slowed to 3 s by their hold on the
        interpreter)."""
        cache_key = (inst.slide.slide_id, inst.slide.version, inst.sop_uid)
        text = self.metadata_json.get(cache_key)
        if text is not None:
            return text
        task = self._serialising.get(cache_key)
        if task is None:
            task = asyncio.ensure_future(self._serialised(catalog, inst, cache_key))
            self._serialising[cache_key] = task
            task.add_done_callback(lambda done: self._serialised_done(cache_key, done))
        return await asyncio.shield(task)

    async def _serialised(
        self, catalog: Catalog, inst: Instance, cache_key: tuple[str, str, str]
    ) -> bytes:
        """`metadata`'s text, made on the pool and cached."""
        ds = detached(await self.header(catalog, inst))

        def serialise() -> bytes:
            doc: dict[str, Any] = ds.to_json_dict(bulk_data_threshold=MAX_HEADER)
            doc.pop("7FE00010", None)
            doc.pop("FFFCFFFC", None)
            return dumps(doc).encode()

        text = await in_pool(catalog, serialise)
        self.metadata_json.put(cache_key, text)
        return text

    def _serialised_done(
        self, cache_key: tuple[str, str, str], task: asyncio.Future[bytes]
    ) -> None:
        self._serialising.pop(cache_key, None)
        if not task.cancelled():
            task.exception()  # retrieved here: a failure whose callers all left is not logged


def detached(header: Dataset) -> Dataset:
    """A cached `header` (`DicomWebState.header`) with an element table of its own: what is
    read from it is converted from the bytes it was parsed from into this copy only, and the
    cached data set stays as parsed, the size it is counted at. pydicom converts an element on
    first access and keeps it: serialising the 1.1 MB header of a 40,000 x 30,000 slide's
    base level converted its 8,606 per-frame items in the cache, 60-90 MB of objects counted
    as 1.1 MB (four such headers took a process from 116 MB to 387 MB, and the cache's 32 MB
    budget admits about 29)."""
    copied = copy.copy(header)  # a shallow copy shares the table: give it its own
    copied._dict = dict(header._dict)
    return copied


DICOMWEB = web.AppKey("dicomweb", DicomWebState)


def state(request: web.Request) -> DicomWebState:
    return request.app[DICOMWEB]


def allow_label(request: web.Request) -> bool:
    return request.app[SETTINGS].allow_label


async def find_instance(request: web.Request) -> Instance:
    """The instance named by the path's study, series and SOP instance UIDs. Each frame request
    names one: found once, then taken from `DicomWebState.found` while its slide's catalog entry
    is unchanged (a re-published slide is a new object, and is looked up again)."""
    info = request.match_info
    known = known_instance(request.app, info)
    if known is not None:
        note_read(request, (known.slide.slide_id,))
        return known
    key = (info["study"], info["series"], info["instance"])
    known = state(request).found.get(key)
    if known is not None:
        slide_id = known.slide.slide_id
        try:
            if await request.app[CATALOG].slide(slide_id) is known.slide:
                note_read(request, (slide_id,))
                return known
        except UNSERVED:  # looked up as a new path says why
            pass
    inst = await _find_instance(request)
    state(request).found.put(key, inst)
    note_read(request, (inst.slide.slide_id,))
    return inst


def known_instance(app: web.Application, info: Mapping[str, str]) -> Instance | None:
    """The instance the path parameters `info` named before, when its slide is open and still
    the catalog's (a busy viewer's, without a coroutine), else None (then `find_instance`)."""
    known = app[DICOMWEB].found.get_if_held((info["study"], info["series"], info["instance"]))
    if known is None or app[CATALOG].opened(known.slide.slide_id) is not known.slide:
        return None
    return known


async def _find_instance(request: web.Request) -> Instance:
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
    note_read(request, (s.slide_id for s in slides))
    return [i for s in slides for i in slide_instances(s, allow_label(request))]


def pinned(inst: Instance) -> dict[str, Any]:
    """`etag_response` caching arguments for an instance's bytes: versioned by its slide's
    manifest, never stored by caches for labels and overviews (patient data)."""
    return {"version": inst.slide.version, "storable": not inst.private}
