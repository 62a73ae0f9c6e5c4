"""The slide listing (`GET /slides`, the viewer's index): one compact entry per slide, kept
between requests and refreshed only where a slide changed.

Describing a slide means opening it (its manifest parsed and checked, its root attributes and
associated arrays read: ~3 ms locally), and the library keeps only a few hundred slides open, so
a store of 2,000 slides took 6 s for every listing. An entry here keeps what a listing shows
(its summary as compressed JSON: ~0.8 KB an entry) with the manifest version it describes; once
older than the store's re-check time it costs one manifest read, and the slide is opened again
only when its version changed. Listings are answered a page at a time (`Page`), so no answer
grows with the store.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from server.catalog import CONVERTING, Catalog, SlideInfo, private_images, summary
from server.index_file import IndexFile, SavedEntry
from wsi.errors import InvalidArgument, WsiError

KIND = "listing"
"""Its entries' kind in the index file."""
CONCURRENCY = 32
"""Slides checked or opened at once while a listing is refreshed."""
MAX_PAGE = 1000
"""Most slides one answer lists (`GET /slides?limit=`, its default)."""


@dataclass(frozen=True)
class Listed:
    """One slide as listings show it."""

    slide_id: str
    name: str
    case: str | None
    status: str
    version: str
    width: int
    height: int
    chunk: tuple[int, int]
    """Level 0's tile (chunk) width and height; (0, 0) when it has no levels (DICOM only)."""
    doc: bytes
    """Its summary (`server.catalog.summary`) as JSON, compressed (an entry is kept for every
    slide of the store: ~870 bytes -> ~400)."""
    card_thumbnail: bool
    """Whether its index card may show its thumbnail image (one that may show the label never
    is), else a DeepZoom tile."""
    checked: float
    """When its version was last compared with the store's (monotonic seconds)."""

    @classmethod
    def of(cls, slide: SlideInfo, allow_label: bool, now: float) -> Listed:
        doc = summary(slide, allow_label)
        thumbnail = "thumbnail" in slide.associated_names
        return cls(
            slide.slide_id,
            slide.name,
            slide.case,
            doc["status"],
            slide.version,
            slide.width,
            slide.height,
            (slide.levels[0].tile_width, slide.levels[0].tile_height) if slide.levels else (0, 0),
            zlib.compress(json.dumps(doc).encode()),
            thumbnail and "thumbnail" not in private_images(slide),
            now,
        )

    def saved(self) -> SavedEntry:
        """As kept between starts (`server.index_file`)."""
        meta = [self.name, self.case, self.status, self.width, self.height, self.chunk]
        return SavedEntry(
            self.slide_id, self.version, json.dumps([*meta, self.card_thumbnail]), self.doc
        )

    @classmethod
    def from_saved(cls, saved: SavedEntry) -> Listed:
        """An entry kept between starts, due for a version check at once; ValueError or
        TypeError when `saved` is not one."""
        name, case, status, width, height, (chunk_w, chunk_h), card = json.loads(saved.meta)
        texts = (name, status) if case is None else (name, case, status)
        numbers = (width, height, chunk_w, chunk_h)
        if not all(isinstance(t, str) for t in texts) or not isinstance(card, bool):
            raise TypeError("a listing entry holds text and a flag")
        if not all(type(n) is int for n in numbers):
            raise TypeError("a listing entry holds whole numbers")
        try:  # readable, or refused now rather than in a listing
            summary = json.loads(zlib.decompress(saved.data))
        except zlib.error as exc:
            raise ValueError(f"a listing entry's summary: {exc}") from exc
        if not isinstance(summary, dict):
            raise TypeError("a listing entry's summary is an object")
        doc = (saved.slide_id, name, case, status, saved.version, width, height)
        return cls(*doc, (chunk_w, chunk_h), saved.data, card, -math.inf)

    def json(self) -> bytes:
        """Its summary as JSON."""
        return zlib.decompress(self.doc)

    def summary(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.json())
        return doc

    def matches(self, text: str | None, case: str | None) -> bool:
        """Whether the slide passes a listing's filters: `text` a case-insensitive substring of
        its name or case, `case` its case exactly."""
        if case is not None and self.case != case:
            return False
        if not text:
            return True
        needle = text.casefold()
        return needle in self.name.casefold() or needle in (self.case or "").casefold()

    @property
    def order(self) -> tuple[bool, tuple[str | int, ...], tuple[str | int, ...], str]:
        """Slides of one case together (cases in order), each case's slides by name; then the
        slides of no known case, by name; names in `natural` order."""
        return self.case is None, natural(self.case or ""), natural(self.name), self.slide_id


@dataclass(frozen=True)
class Page:
    """The slides of one answer: `slides` (from `offset`) out of `total` that match."""

    slides: Sequence[Listed]
    total: int
    offset: int
    cases: list[dict[str, Any]]
    """`[{"case", "slides"}]`: every case among the matching slides and how many it has."""
    of_all: int
    """Slides listed before filtering."""


class SlideListing:
    """The entries of every slide the catalog lists, refreshed by `page` (one refresh at a
    time: callers arriving meanwhile wait for it and share its result)."""

    def __init__(
        self,
        catalog: Catalog,
        allow_label: bool,
        recheck_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        saved: IndexFile | None = None,
    ) -> None:
        self.catalog = catalog
        self.allow_label = allow_label
        self.recheck_seconds = recheck_seconds
        self._clock = clock
        self._saved = saved
        """Where entries are kept between starts (`server.index_file`); None: nowhere."""
        self._loaded = saved is None
        self._entries: dict[str, Listed] = {}
        self._ordered: list[Listed] = []
        self._lock = asyncio.Lock()

    async def page(
        self,
        text: str | None = None,
        case: str | None = None,
        offset: int = 0,
        limit: int = MAX_PAGE,
    ) -> Page:
        """The slides matching `text` and `case`, in listing order, at most `limit` (1 to
        MAX_PAGE) from `offset`. StoreError when the store cannot be listed."""
        if not 1 <= limit <= MAX_PAGE or offset < 0:
            raise InvalidArgument(f"limit must be 1-{MAX_PAGE} and offset >= 0")
        listed = await self._refreshed()
        matched = [e for e in listed if e.matches(text, case)]
        counts: dict[str, int] = {}
        for entry in matched:
            if entry.case is not None:
                counts[entry.case] = counts.get(entry.case, 0) + 1
        cases = [{"case": c, "slides": n} for c, n in sorted(counts.items(), key=_casefolded)]
        shown = matched[offset : offset + limit]
        return Page(shown, len(matched), offset, cases, len(listed))

    async def _refreshed(self) -> list[Listed]:
        async with self._lock:
            if not self._loaded and self._saved is not None:
                self._entries = await asyncio.to_thread(self._saved.load, KIND, Listed.from_saved)
                self._ordered = sorted(self._entries.values(), key=lambda e: e.order)
                self._loaded = True
            ids = await self.catalog.slide_ids()
            now = self._clock()
            stale = [i for i in ids if self._stale(i, now)]
            versions = await self.catalog.store.versions(stale) if stale else {}
            gate = asyncio.Semaphore(CONCURRENCY)

            async def one(slide_id: str) -> Listed | None:
                async with gate:
                    return await self._entry(slide_id, now, versions)

            found = await asyncio.gather(*(one(i) for i in ids))
            entries = {e.slide_id: e for e in found if e is not None}
            before = self._entries
            if entries.keys() != before.keys() or any(
                e.doc is not before[k].doc for k, e in entries.items()
            ):
                self._ordered = sorted(entries.values(), key=lambda e: e.order)
                if self._saved is not None:
                    await self._save(before, entries)
            self._entries = entries
            return self._ordered

    async def _save(self, before: dict[str, Listed], entries: dict[str, Listed]) -> None:
        """Entries made since the last refresh (published slides only: a converting slide's
        progress moves) and those gone, kept between starts."""
        assert self._saved is not None
        changed = [
            e.saved()
            for k, e in entries.items()
            if e.status != CONVERTING and (k not in before or e.doc is not before[k].doc)
        ]
        gone = [k for k, e in before.items() if k not in entries or e.status == CONVERTING]
        await asyncio.to_thread(self._saved.save, KIND, changed, gone)

    def _stale(self, slide_id: str, now: float) -> bool:
        """Whether a published slide's entry is due for a version check."""
        held = self._entries.get(slide_id)
        return (
            held is not None
            and held.status != CONVERTING
            and now - held.checked >= self.recheck_seconds
        )

    async def _entry(
        self, slide_id: str, now: float, versions: dict[str, str | None]
    ) -> Listed | None:
        """The slide's entry: the one held while recently checked or while its manifest's
        version (`versions`, read for the stale ones) is unchanged, else made again (None for a
        slide gone meanwhile, or refused)."""
        held = self._entries.get(slide_id)
        if held is not None and held.status != CONVERTING:  # converting: progress moves
            if now - held.checked < self.recheck_seconds:
                return held
            if slide_id not in versions:  # the store failed this read: listed as last seen
                return held
            if versions[slide_id] == held.version:
                return replace(held, checked=now)
        try:
            slide = await self.catalog.listed(slide_id)
        except WsiError:  # unpublished meanwhile, or a dropped slide its reader refuses
            return None
        return Listed.of(slide, self.allow_label, now)


_DIGITS = re.compile(r"([0-9]+)")


def natural(text: str) -> tuple[str | int, ...]:
    """A name's sort key as people read it: its runs of digits as numbers (blocks B0, B40, B120;
    A1, A2, A10, which sorted as text came B0, B120, B40), the rest case folded. Text and
    numbers alternate from a text run (maybe empty), so keys compare run by run."""
    runs = _DIGITS.split(text.casefold())
    return tuple(int(r) if i % 2 else r for i, r in enumerate(runs))


def _casefolded(item: tuple[str, int]) -> tuple[str | int, ...]:
    return natural(item[0])


__all__ = ["MAX_PAGE", "Listed", "Page", "SlideListing"]
