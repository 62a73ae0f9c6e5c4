"""Integrity of published slides: every object read again and checked against its manifest.

A slide's manifest lists every object with its size and CRC32C (`wsi.published.layout`), computed
as the objects were written. Reading each object back and comparing finds what happens to stored
bytes afterwards: bit rot (a CRC mismatch), truncation (a short object), a lost object, a
manifest that no longer parses. Objects are streamed in parts of `chunk_bytes` (never a whole
object in memory) at most at `rate` bytes per second, so a check of a large store can run beside
the service without starving it of disk or network.

A slide republished while it is checked (a re-conversion swaps its objects in) would look
damaged; when a check finds damage, the manifest is read again, and a slide whose manifest
changed meanwhile is checked again with the new one rather than reported.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum

from wsi.errors import CorruptSlide, InvalidArgument, SlideNotFound, WsiError
from wsi.published.layout import MANIFEST, Crc32c, Manifest, ObjectEntry, SlideKeys
from wsi.store.objects import Store, store_failures

_MiB = 1024 * 1024
DEFAULT_CHUNK_BYTES = 4 * _MiB


def read_failures() -> tuple[type[BaseException], ...]:
    """What reading an object may raise when the store (not the caller) fails; for `except`
    clauses, evaluated when an exception is on its way (see `store_failures`)."""
    return (WsiError, *store_failures())


_CHECKS_PER_SLIDE = 3
"""A slide whose manifest keeps changing while it is checked is given up after this many tries
(reported as changed, not damaged)."""


class Problem(StrEnum):
    """What is wrong with one object (the words `wsi verify` and `GET /integrity` show)."""

    CRC_MISMATCH = "crc mismatch"
    """Same size, other bytes: bit rot, or an object overwritten behind the manifest's back."""
    TRUNCATED = "truncated"
    TOO_LONG = "too long"
    MISSING = "missing"
    UNREADABLE = "unreadable"
    """The store failed while the object was read (an I/O error, a refused request)."""
    BAD_MANIFEST = "unreadable manifest"
    NOT_PUBLISHED = "not published"


@dataclass(frozen=True)
class Damage:
    """One damaged object of a slide."""

    key: str
    """Relative to the slide (the manifest's form): `slide.zarr/0/c/0/0/0`, `manifest.json`."""
    problem: Problem
    detail: str = ""
    """Sizes or the store's error, for people; never needed to act."""

    def describe(self) -> str:
        return f"{self.key}: {self.problem}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class SlideCheck:
    """The result of checking one slide."""

    slide_id: str
    objects: int
    """Objects the manifest lists (the manifest itself not counted)."""
    bytes_read: int
    damage: tuple[Damage, ...] = ()
    note: str = ""
    """Why a slide without damage was not fully checked (republished throughout)."""
    unknown: bool = False
    """The store holds nothing under this id: no such slide (an id typed wrong), which is not
    damage; a slide that lost its manifest but not its objects is."""

    @property
    def ok(self) -> bool:
        return not self.damage and not self.unknown

    def line(self) -> str:
        """One line for people and scripts: `<id> TAB ok|DAMAGED|UNKNOWN TAB what`."""
        if self.unknown:
            return f"{self.slide_id}\tUNKNOWN\tno such slide in this store"
        if self.damage:
            return f"{self.slide_id}\tDAMAGED\t" + "; ".join(d.describe() for d in self.damage)
        what = f"{self.objects} objects, {self.bytes_read:,} bytes"
        return f"{self.slide_id}\tok\t{what}" + (f" ({self.note})" if self.note else "")


class Stopped(Exception):
    """The check was asked to stop (`stop` set); nothing is wrong with the store."""


class ReadRate:
    """A token bucket over bytes read: `take(n)` returns once `n` more bytes fit the rate.

    Up to one second's worth may be read at once after an idle spell; on average reads stay at
    `bytes_per_second`. `None` means unbounded. The clock and the wait are injectable; the wait
    returns True when the check must stop (an `Event.wait`), which ends it with `Stopped`."""

    def __init__(
        self,
        bytes_per_second: float | None,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], bool] | None = None,
    ) -> None:
        if bytes_per_second is not None and not bytes_per_second > 0:
            raise InvalidArgument(f"read rate must be positive, got {bytes_per_second}")
        self.rate = bytes_per_second
        self._clock = clock
        self._wait = wait or _sleep
        self._allowance = float(bytes_per_second or 0.0)
        self._last = clock()

    def take(self, nbytes: int) -> None:
        if self.rate is None:
            return
        now = self._clock()
        self._allowance = min(self.rate, self._allowance + (now - self._last) * self.rate)
        self._last = now
        self._allowance -= nbytes
        if self._allowance < 0 and self._wait(-self._allowance / self.rate):
            raise Stopped


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return False


def stop_waiter(stop: threading.Event | None) -> Callable[[float], bool] | None:
    """A `ReadRate` wait that ends early (True) once `stop` is set."""
    return stop.wait if stop is not None else None


def read_parts(
    store: Store,
    key: str,
    size: int,
    rate: ReadRate,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[bytes]:
    """The first `size` bytes of object `key` in parts of at most `chunk_bytes`, at the rate.
    A part shorter than asked for ends the iteration (the object is shorter than `size`)."""
    for start in range(0, size, chunk_bytes):
        end = min(start + chunk_bytes, size)
        rate.take(end - start)
        data = store.get_range(key, start, end)
        yield data
        if len(data) != end - start:
            return


def check_object(
    store: Store,
    key: str,
    key_in_slide: str,
    entry: ObjectEntry,
    rate: ReadRate,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[int, Damage | None]:
    """(bytes read, damage or None) for object `key`, which the manifest lists as `entry`."""
    try:
        size = store.size(key)
    except SlideNotFound:
        return 0, Damage(key_in_slide, Problem.MISSING)
    except read_failures() as exc:
        return 0, Damage(key_in_slide, Problem.UNREADABLE, type(exc).__name__)
    if size != entry.size:
        problem = Problem.TRUNCATED if size < entry.size else Problem.TOO_LONG
        return 0, Damage(key_in_slide, problem, f"{size} of {entry.size} bytes")
    crc = Crc32c()
    read = 0
    try:
        for part in read_parts(store, key, size, rate, chunk_bytes):
            crc.update(part)
            read += len(part)
    except SlideNotFound:
        return read, Damage(key_in_slide, Problem.MISSING)
    except read_failures() as exc:
        return read, Damage(key_in_slide, Problem.UNREADABLE, type(exc).__name__)
    if read != entry.size:
        return read, Damage(key_in_slide, Problem.TRUNCATED, f"{read} of {entry.size} bytes")
    if crc.hex != entry.crc32c:
        return read, Damage(key_in_slide, Problem.CRC_MISMATCH, f"{crc.hex}, not {entry.crc32c}")
    return read, None


def _manifest_bytes(store: Store, slide_id: str) -> bytes | None:
    try:
        return store.get(SlideKeys(slide_id).manifest)
    except SlideNotFound:
        return None


def parse_manifest(data: bytes, slide_id: str) -> Manifest:
    """A slide's manifest, or CorruptSlide when it does not parse or names another slide."""
    manifest = Manifest.from_bytes(data)
    if manifest.slide_id != slide_id:
        raise CorruptSlide(f"it names slide {manifest.slide_id}")
    return manifest


def verify_slide(
    store: Store,
    slide_id: str,
    rate: ReadRate | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> SlideCheck:
    """Check every object of the published slide `slide_id` (Stopped when the rate's wait says
    so). A slide that is not published, or whose manifest does not parse, is reported as
    damage of its manifest; an id under which the store holds nothing at all, as unknown."""
    rate = rate or ReadRate(None)
    keys = SlideKeys(slide_id)
    data = _manifest_bytes(store, slide_id)
    total_read = 0
    for _ in range(_CHECKS_PER_SLIDE):
        if data is None:
            if not store.children(slide_id):
                return SlideCheck(slide_id, 0, total_read, unknown=True)
            return SlideCheck(slide_id, 0, total_read, (Damage(MANIFEST, Problem.NOT_PUBLISHED),))
        total_read += len(data)
        try:
            manifest = parse_manifest(data, slide_id)
        except CorruptSlide as exc:
            bad = Damage(MANIFEST, Problem.BAD_MANIFEST, str(exc))
            return SlideCheck(slide_id, 0, total_read, (bad,))
        found = []
        for key_in_slide, entry in sorted(manifest.objects.items()):
            read, problem = check_object(
                store, keys.in_store(key_in_slide), key_in_slide, entry, rate, chunk_bytes
            )
            total_read += read
            if problem is not None:
                found.append(problem)
        if not found:
            return SlideCheck(slide_id, len(manifest.objects), total_read)
        again = _manifest_bytes(store, slide_id)
        if again == data:
            return SlideCheck(slide_id, len(manifest.objects), total_read, tuple(found))
        if again is None:  # unpublished meanwhile (a re-conversion swapping its version in)
            return SlideCheck(slide_id, 0, total_read, note="unpublished while checked")
        data = again
    return SlideCheck(slide_id, 0, total_read, note="republished while checked")


def verify_store(
    store: Store,
    slide_ids: Iterable[str] = (),
    rate: ReadRate | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[SlideCheck]:
    """Check the given slides, or every published slide of the store, one after the other at
    one shared rate."""
    rate = rate or ReadRate(None)
    for slide_id in list(slide_ids) or store.published_slides():
        yield verify_slide(store, slide_id, rate, chunk_bytes)


__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "Damage",
    "Problem",
    "ReadRate",
    "SlideCheck",
    "Stopped",
    "check_object",
    "read_failures",
    "read_parts",
    "stop_waiter",
    "verify_slide",
    "verify_store",
]
