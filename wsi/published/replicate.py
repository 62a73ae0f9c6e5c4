"""Copies of published slides in a second store (another bucket, region or site), and repairs of
damaged objects from the other copy.

`sync_slide` copies one slide the way conversion publishes it: objects first, each streamed in
parts (bounded memory: one part in flight, plus the target's multipart buffer on S3), its CRC32C
computed on the way and compared with the source's manifest, then read back from the target and
checked again; the manifest, byte for byte the source's, goes last, so the slide appears in the
target only complete and verified. Objects the target already holds with the right size and CRC
are not copied again, so a copy killed at any point and run again finishes the job (and a run
over an up-to-date slide only compares manifests and sizes). A slide the target holds in another
version is unpublished there first (its readers see neither version for the copy, never a mix),
and what only that version had is deleted at the end.

`repair_slide` reads both copies of a slide that both stores hold in the same version, and
replaces each damaged object (`wsi.published.verify`) by the good copy from the other store,
checked after writing.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from wsi.errors import CorruptSlide, SlideNotFound, WsiError
from wsi.published.layout import MANIFEST, Crc32c, Manifest, ObjectEntry, SlideKeys
from wsi.published.verify import (
    DEFAULT_CHUNK_BYTES,
    Damage,
    Problem,
    ReadRate,
    check_object,
    parse_manifest,
    read_failures,
    read_parts,
)
from wsi.store.objects import Store
from wsi.store.versions import finish_swap, swap_in


class CopyFailed(WsiError):
    """An object could not be copied whole and verified (the source's copy is damaged, the
    slide was republished meanwhile, or the target did not keep what was written)."""


@dataclass(frozen=True)
class SyncResult:
    """What `sync_slide` did for one slide."""

    slide_id: str
    copied: int = 0
    """Objects written to the target (the manifest not counted)."""
    copied_bytes: int = 0
    kept: int = 0
    """Objects the target already held, with the right size (and CRC, unless up to date)."""
    removed: int = 0
    """Objects of the target's older version that the new one lacks, deleted."""
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    def line(self) -> str:
        if self.error:
            return f"{self.slide_id}\tFAILED\t{self.error}"
        if not self.copied and not self.removed:
            return f"{self.slide_id}\tup to date\t{self.kept} objects"
        what = f"copied {self.copied} objects ({self.copied_bytes:,} bytes), kept {self.kept}"
        return f"{self.slide_id}\tcopied\t{what}" + (
            f", removed {self.removed}" if self.removed else ""
        )


@dataclass(frozen=True)
class RepairResult:
    """What `repair_slide` found and did for one slide."""

    slide_id: str
    checked: int = 0
    repaired: tuple[tuple[str, Damage], ...] = ()
    """(the store written to: "A" or "B", the damage the copy replaced)."""
    unrecoverable: tuple[Damage, ...] = ()
    """Objects damaged in both stores."""
    note: str = ""
    """Why the slide was not compared (only in one store, versions differ, ...)."""
    failed: bool = False

    @property
    def ok(self) -> bool:
        return not (self.unrecoverable or self.failed)

    def line(self) -> str:
        if self.failed:
            return f"{self.slide_id}\tFAILED\t{self.note}"
        parts = [f"{d.describe()} in {side}, copied from the other" for side, d in self.repaired]
        parts += [f"{d.describe()} in both stores" for d in self.unrecoverable]
        if self.unrecoverable:
            return f"{self.slide_id}\tUNRECOVERABLE\t" + "; ".join(parts)
        if self.repaired:
            return f"{self.slide_id}\trepaired\t" + "; ".join(parts)
        if self.note:
            return f"{self.slide_id}\tskipped\t{self.note}"
        return f"{self.slide_id}\tok\t{self.checked} objects in both stores"


@dataclass
class _Tally:
    copied: int = 0
    copied_bytes: int = 0
    kept: int = 0
    removed: int = 0
    errors: list[str] = field(default_factory=list)


def _manifest_bytes(store: Store, slide_id: str) -> bytes | None:
    try:
        return store.get(SlideKeys(slide_id).manifest)
    except SlideNotFound:
        return None


def copy_object(
    source: Store,
    target: Store,
    key: str,
    entry: ObjectEntry,
    rate: ReadRate,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    target_key: str | None = None,
) -> int:
    """Stream object `key` from `source` to `target` (at `target_key`, by default the same) and
    check the copy: the bytes read must match `entry` (CopyFailed otherwise, and nothing is
    written: the target's object appears whole or not at all), and the object read back from
    the target too. Returns bytes copied."""
    crc = Crc32c()
    size = 0
    target_key = target_key or key
    try:
        with target.open_write(target_key) as out:
            for part in read_parts(source, key, entry.size, rate, chunk_bytes):
                crc.update(part)
                size += len(part)
                out.write(part)
            if size != entry.size or crc.hex != entry.crc32c:
                raise CopyFailed(
                    f"{key} in the source does not match its manifest (damaged, or republished "
                    "while copied): check the source with `wsi verify`"
                )
    except SlideNotFound as exc:
        raise CopyFailed(f"{key} is missing from the source") from exc
    _read, damage = check_object(target, target_key, key, entry, rate, chunk_bytes)
    if damage is not None:
        raise CopyFailed(f"the copy of {damage.describe()} after writing")
    return size


def _present(
    target: Store, key: str, entry: ObjectEntry, rate: ReadRate, chunk_bytes: int, read: bool
) -> bool:
    """Whether the target holds `key` as `entry` says: the right size, and (`read`) the right
    CRC32C, read back."""
    try:
        if target.size(key) != entry.size:
            return False
    except SlideNotFound:
        return False
    if not read:
        return True
    _bytes, damage = check_object(target, key, key, entry, rate, chunk_bytes)
    return damage is None


def sync_slide(
    source: Store,
    target: Store,
    slide_id: str,
    rate: ReadRate | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> SyncResult:
    """Make the published slide `slide_id` of `source` published, identical and verified, in
    `target` (see the module's docstring). Errors of this slide are in the result."""
    rate = rate or ReadRate(None)
    keys = SlideKeys(slide_id)
    data = _manifest_bytes(source, slide_id)
    if data is None:
        return SyncResult(slide_id, error="not published in the source")
    try:
        manifest = parse_manifest(data, slide_id)
    except CorruptSlide as exc:
        return SyncResult(slide_id, error=f"the source's manifest is unreadable ({exc})")
    tally = _Tally()
    try:
        with target.slide_lock(slide_id):
            finish_swap(target, slide_id)  # of a copy killed while it swapped its version in
            target.remove_temporaries(slide_id)  # of a killed copy
            current = _manifest_bytes(target, slide_id)
            up_to_date = current == data
            # A new version of a slide the target publishes is copied (and checked) beside
            # it, then swapped in: a damaged source object, or a copy cut short, leaves the
            # target's version published as it was. A slide the target does not publish is
            # copied in place (a killed copy resumes where it stopped); the same version: a
            # missing or damaged object of it is copied into place.
            replacing = current is not None and not up_to_date
            staged = keys.staging(uuid.uuid4().hex[:12]) if replacing else keys
            changed = []
            try:
                for key_in_slide, entry in sorted(manifest.objects.items()):
                    key = keys.in_store(key_in_slide)
                    if _present(target, key, entry, rate, chunk_bytes, read=not up_to_date):
                        tally.kept += 1
                        continue
                    where = staged.in_store(key_in_slide)
                    copied = copy_object(source, target, key, entry, rate, chunk_bytes, where)
                    tally.copied_bytes += copied
                    tally.copied += 1
                    changed.append(key_in_slide)
            except BaseException:
                if replacing:
                    with contextlib.suppress(Exception):
                        target.delete_prefix(staged.root)
                raise
            if replacing:
                swap_in(target, staged, data, changed)
                tally.removed = _remove_stale(target, slide_id, manifest)
            elif not up_to_date:
                tally.removed = _remove_stale(target, slide_id, manifest)
                target.put(keys.manifest, data)
    except read_failures() as exc:
        return SyncResult(slide_id, tally.copied, tally.copied_bytes, tally.kept, error=str(exc))
    return SyncResult(slide_id, tally.copied, tally.copied_bytes, tally.kept, tally.removed)


def _remove_stale(target: Store, slide_id: str, manifest: Manifest) -> int:
    """Delete what the slide's folder in the target holds besides the objects `manifest` lists:
    the objects of a previous version, whether or not a killed copy got to unpublish it, and
    the folders that leaves empty (`Store.delete_objects`)."""
    keys = SlideKeys(slide_id)
    wanted = {keys.in_store(k) for k in manifest.objects} | {keys.manifest}
    stale = [k for k in target.list_keys(slide_id) if k not in wanted]
    target.delete_objects(slide_id, stale)
    return len(stale)


def sync_store(
    source: Store,
    target: Store,
    slide_ids: Iterable[str] = (),
    rate: ReadRate | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[SyncResult]:
    """`sync_slide` for the given slides, or every slide published in `source`. Slides only the
    target holds are left alone: a copy is never a reason to delete."""
    rate = rate or ReadRate(None)
    for slide_id in list(slide_ids) or source.published_slides():
        yield sync_slide(source, target, slide_id, rate, chunk_bytes)


def repair_slide(
    a: Store,
    b: Store,
    slide_id: str,
    rate: ReadRate | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> RepairResult:
    """Check both copies of `slide_id` and replace each damaged object by the other store's
    good one. A manifest unreadable in one store is repaired by a sync from the other."""
    rate = rate or ReadRate(None)
    data_a, data_b = _manifest_bytes(a, slide_id), _manifest_bytes(b, slide_id)
    if data_a is None or data_b is None:
        where = "neither store" if data_a == data_b else ("A" if data_b is None else "B")
        note = "published in neither store" if where == "neither store" else f"only in {where}"
        return RepairResult(slide_id, note=note)
    manifest_a, manifest_b = _readable(data_a, slide_id), _readable(data_b, slide_id)
    if manifest_a is None or manifest_b is None:
        return _repair_manifest(a, b, slide_id, manifest_a, manifest_b, rate, chunk_bytes)
    if data_a != data_b:
        return RepairResult(slide_id, note="the stores hold different versions: run wsi sync")
    keys = SlideKeys(slide_id)
    repaired: list[tuple[str, Damage]] = []
    lost: list[Damage] = []
    try:
        for key_in_slide, entry in sorted(manifest_a.objects.items()):
            key = keys.in_store(key_in_slide)
            _ra, damage_a = check_object(a, key, key_in_slide, entry, rate, chunk_bytes)
            _rb, damage_b = check_object(b, key, key_in_slide, entry, rate, chunk_bytes)
            if damage_a and damage_b:
                lost.append(damage_a)
            elif damage_a:
                copy_object(b, a, key, entry, rate, chunk_bytes)
                repaired.append(("A", damage_a))
            elif damage_b:
                copy_object(a, b, key, entry, rate, chunk_bytes)
                repaired.append(("B", damage_b))
    except read_failures() as exc:
        return RepairResult(slide_id, note=str(exc), failed=True)
    return RepairResult(slide_id, len(manifest_a.objects), tuple(repaired), tuple(lost))


def _readable(data: bytes, slide_id: str) -> Manifest | None:
    try:
        return parse_manifest(data, slide_id)
    except CorruptSlide:
        return None


def _repair_manifest(
    a: Store,
    b: Store,
    slide_id: str,
    manifest_a: Manifest | None,
    manifest_b: Manifest | None,
    rate: ReadRate,
    chunk_bytes: int,
) -> RepairResult:
    """One store's manifest does not parse: copy the slide from the store whose manifest does
    (its good objects are kept, the rest copied, the manifest written last)."""
    if manifest_a is None and manifest_b is None:
        return RepairResult(slide_id, note="the manifest is unreadable in both stores", failed=True)
    good, bad, side = (a, b, "B") if manifest_a is not None else (b, a, "A")
    result = sync_slide(good, bad, slide_id, rate, chunk_bytes)
    if not result.ok:
        return RepairResult(slide_id, note=result.error, failed=True)
    damage = Damage(MANIFEST, Problem.BAD_MANIFEST)
    objects = result.copied + result.kept
    return RepairResult(slide_id, objects, ((side, damage),))


def repair_store(
    a: Store,
    b: Store,
    slide_ids: Iterable[str] = (),
    rate: ReadRate | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[RepairResult]:
    """`repair_slide` for the given slides, or every slide published in either store."""
    rate = rate or ReadRate(None)
    ids = list(slide_ids) or sorted(set(a.published_slides()) | set(b.published_slides()))
    for slide_id in ids:
        yield repair_slide(a, b, slide_id, rate, chunk_bytes)


__all__ = [
    "CopyFailed",
    "RepairResult",
    "SyncResult",
    "copy_object",
    "repair_slide",
    "repair_store",
    "sync_slide",
    "sync_store",
]
