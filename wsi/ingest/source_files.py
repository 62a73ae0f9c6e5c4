"""A job's source files: recorded when the slide becomes a job, checked before anything touches
them, and moved or deleted together, durably.

A slide in a watch folder is often many files (MIRAX, VMS, a DICOM series), and scanners reuse
names. So a job keeps the list of its slide's files, each with its identity (device, inode, size,
mtime) as it was when the slide was submitted (`submit_slide`), and a worker moves the slide to
`done/`, deletes it or quarantines it only while every file is still the one recorded
(`changed`): a same-named slide that replaced it meanwhile is never deleted unconverted.

Moving and deleting are all or nothing as far as the watch folder shows, because a slide half
gone is scanned again as a slide of its own (the instances of a DICOM series left behind would be
published as a degraded duplicate): a move that fails half-way puts back what it moved, and a
delete first renames every file into one hidden folder (hidden names are never scanned) and only
then removes that. And they are durable before they return (each moved file, its new folder and
both parent folders are fsynced), so a job is marked done only once a power cut can no longer
undo what it says.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import time
import uuid
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from wsi.errors import InvalidArgument, WsiError
from wsi.ingest.queue import Job, JobQueue, SourceFile
from wsi.ingest.scan import SlideCandidate
from wsi.pseudonyms import CONTENT_IDS, PublishedIds
from wsi.slide_id import content_slide_id
from wsi.slidefiles import (
    companion_folder,
    dicom_series_files,
    is_dicom_file,
    is_temporary,
    slide_parts,
)
from wsi.store.objects import DIR_MODE, FILE_MODE, fsync_dir, make_dirs

HIDDEN_DELETE_PREFIX = ".wsi-deleting-"
"""A slide being deleted is first renamed into a folder of this name beside it (a dotfolder: the
scanner never looks into it)."""

REASON_FILE = "REASON.txt"

RECEIVING_PREFIX = ".wsi-stow-"
"""A file being received into a watch folder (`server.api.dicomweb.stow`): hidden, so never a
slide or a part of one, and removed by the watcher's sweep when a receiver killed mid-way left
it (`remove_deletion_leftovers`)."""


class SourceChanged(WsiError, OSError):
    """A slide's files changed while it was being submitted (still being written after all)."""


def record(paths: Iterable[Path]) -> tuple[SourceFile, ...]:
    """The identity every file in `paths` has now; OSError when one cannot be read."""
    return tuple(SourceFile.of(p) for p in paths)


def changed(files: Sequence[SourceFile]) -> str | None:
    """Why `files` are no longer the slide that was recorded (the first file that differs, by
    name), or None when every one is still the same file."""
    for recorded in files:
        name = Path(recorded.path).name
        try:
            now = SourceFile.of(recorded.path)
        except FileNotFoundError:
            return f"{name} is gone"
        except OSError as exc:
            return f"{name} cannot be read ({exc.strerror})"
        if now != recorded:
            return f"{name} was replaced or changed"
    return None


def moved_away(files: Sequence[SourceFile]) -> bool:
    """Whether the recorded slide left the names it had, none of them taken by another file: a
    file is gone and every one still there is the one recorded. A slide renamed or moved in its
    folder (or deleted), not replaced by another of the same name."""
    gone = False
    for recorded in files:
        try:
            now = SourceFile.of(recorded.path)
        except FileNotFoundError:
            gone = True
            continue
        except OSError:
            return False
        if now != recorded:
            return False
    return gone


def grown(source: str, files: Sequence[SourceFile]) -> str | None:
    """Why the DICOM series at `source` now has files its job did not record, or None: a series
    still arriving instance by instance, with a pause longer than the quiet period. Converted
    now, the job would publish every instance there under the content id of those it recorded,
    and move only those, leaving the others to be published again as a slide of their own.
    The files of a series folder (`source` a folder: its own files but hidden and partial
    ones), or of the series a loose instance belongs to; None for any other slide, and when
    the series cannot be read (the conversion then says why)."""
    path = Path(source)
    recorded = {Path(f.path).name for f in files}
    try:
        if path.is_dir():
            now = [p for p in path.iterdir() if p.is_file() and not is_temporary(p.name)]
        elif path.is_file() and is_dicom_file(path):
            now = dicom_series_files(path)
        else:
            return None
    except (OSError, WsiError):
        return None
    added = [p for p in now if p.name not in recorded]
    if not added:
        return None
    return f"{len(added)} file(s) arrived in the slide since it was submitted"


def submit_slide(
    queue: JobQueue,
    candidate: SlideCandidate,
    *,
    watched: bool = False,
    ids: PublishedIds = CONTENT_IDS,
) -> Job:
    """Queue a complete slide the scanner reported, with the identity of each of its files,
    under the id `ids` gives its content id (a de-identifying ingest's keyed pseudonym:
    `IngestSettings.published_ids`).

    The files are looked at before and after the content id is computed, so the id and the
    recorded identities describe the same bytes: SourceChanged when they differ (the next scan
    decides), OSError when a file cannot be read. `watched`: a watcher's report, answered by the
    slide's latest job even if it was cancelled or failed (`JobQueue.submit`).
    """
    before = record(candidate.files)
    slide_id = ids.of(content_slide_id(candidate.path))
    if record(candidate.files) != before:
        raise SourceChanged("the slide changed while its content id was computed")
    return queue.submit(str(candidate.path), slide_id, files=before, watched=watched)


# ---------------------------------------------------------------------------------------------
# Moving and deleting


def fsync_file(path: Path) -> None:
    """Make a regular file's data durable (a file moved in from elsewhere may never have been
    synced); anything else (a symbolic link, a FIFO) has no data of its own to sync."""
    if not stat.S_ISREG(os.lstat(path).st_mode):
        return
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _relative(paths: Sequence[Path], source: Path) -> list[Path]:
    base = source.parent
    if len(set(paths)) != len(paths):
        raise InvalidArgument("a slide lists one of its files twice")
    if not all(p.is_relative_to(base) and p != base for p in paths):
        raise InvalidArgument("a slide's files must lie in the folder holding it")
    return [p.relative_to(base) for p in paths]


NAME_MAX = 255
"""Bytes of a file or folder name (ext4, XFS, btrfs)."""


def _new_folder(dest_dir: Path, name: str) -> Path:
    """A new folder `dest_dir/name`, or `name-1`, `name-2`, ... (never an existing one)."""
    make_dirs(str(dest_dir))
    n = 0
    while True:
        suffix = "" if n == 0 else f"-{n}"
        # A name at the file system's 255-byte limit has no room for the suffix: cut it short,
        # by whole characters (a name that is not UTF-8 has one per undecodable byte).
        stem = name
        while len(os.fsencode(stem)) > NAME_MAX - len(suffix):
            stem = stem[:-1]
        target = dest_dir / f"{stem}{suffix}"
        try:
            target.mkdir(DIR_MODE)  # private, whatever the umask: slides are patient data
        except FileExistsError:
            n += 1
            continue
        return target


def _rename_or_copy(src: Path, dst: Path) -> bool:
    """Rename `src` to `dst`; across file systems copy it (synced) instead and return False:
    the caller removes the original once every file is in place. A copy that fails part-way
    (the other file system full) is removed before the error is raised: the caller only undoes
    what was placed, and a truncated copy left in the done or quarantine folder looked like
    the slide (and kept that file system full)."""
    make_dirs(str(dst.parent))
    try:
        os.rename(src, dst)
        return True
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    try:
        shutil.copy2(src, dst)
        fsync_file(dst)
    except BaseException:
        with contextlib.suppress(OSError):
            dst.unlink()
        raise
    return False


def _sync_folders(folders: Iterable[Path]) -> None:
    """fsync each folder that still exists, deepest first."""
    for folder in sorted(set(folders), key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir():
            fsync_dir(str(folder))


def _prune(folder: Path, stop: Path) -> None:
    """Remove `folder` and its parents up to `stop` (excluded) while they are empty."""
    while folder != stop and folder.is_relative_to(stop):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def _formed_folders(paths: Sequence[Path], source: Path) -> list[Path]:
    """The folders the slide's files formed: a folder slide itself, a MIRAX companion folder,
    and every folder below them that holds one of the files; deepest first."""
    roots = [source] if any(source in p.parents for p in paths) else []
    folder = companion_folder(source.name)
    if folder is not None:
        roots.append(source.with_name(folder))
    found: set[Path] = set()
    for p in paths:
        for parent in p.parents:
            if not any(parent == r or parent.is_relative_to(r) for r in roots):
                break
            found.add(parent)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _remove_formed(paths: Sequence[Path], source: Path, keep: Collection[Path]) -> None:
    """Remove the folders the slide formed once they are empty (something else still in one,
    such as a hidden file, keeps it), never one in `keep`; durably."""
    kept = {Path(os.path.abspath(k)) for k in keep}
    removed: list[Path] = []
    for folder in _formed_folders(paths, source):
        if Path(os.path.abspath(folder)) in kept:
            continue
        with contextlib.suppress(OSError):
            folder.rmdir()
            removed.append(folder)
    _sync_folders(f.parent for f in removed)


def _undo_moves(placed: Sequence[tuple[Path, Path, bool]], target: Path) -> None:
    """Put back what a failed move placed: renamed files go back, copies go; then the new folder
    goes if nothing is left in it."""
    for src, dst, renamed in reversed(placed):
        with contextlib.suppress(OSError):
            if renamed:
                os.rename(dst, src)
            else:
                dst.unlink()
    for folder in sorted(
        (p for p in target.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
    ):
        with contextlib.suppress(OSError):
            folder.rmdir()
    _prune(target, target.parent)


def move_files(
    paths: Sequence[Path],
    source: Path,
    dest_dir: Path,
    reason: str | None = None,
    *,
    keep: Collection[Path] = (),
) -> Path:
    """Move the files `paths` of the slide at `source` into a new folder
    `dest_dir/<source name>[-n]`, each at its path relative to the folder holding `source`, with
    a `REASON.txt` when a reason is given; then remove the folders the slide formed that are left
    empty (never one in `keep`). Returns where `source` now is.

    All or nothing: when a file cannot be moved, those moved so far go back and the OSError is
    raised. Durable when it returns: every moved file, the new folders and the folders the files
    left are fsynced.
    """
    rels = _relative(paths, source)
    target = _new_folder(dest_dir, source.name)
    placed: list[tuple[Path, Path, bool]] = []
    try:
        for src, rel in zip(paths, rels, strict=True):
            dst = target / rel
            placed.append((src, dst, _rename_or_copy(src, dst)))
        if reason is not None:
            fd = os.open(target / REASON_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            with os.fdopen(fd, "w") as f:
                f.write(reason.rstrip() + "\n")
                f.flush()
                os.fsync(f.fileno())
        for _, dst, renamed in placed:
            if renamed:
                fsync_file(dst)
        _sync_folders([target, *(dst.parent for _, dst, _ in placed)])
        fsync_dir(str(dest_dir))
        copied = [src for src, _, renamed in placed if not renamed]
        # Across file systems the originals go now, all or none: once hidden, the move holds.
        hidden = _hide(copied, source) if copied else None
    except BaseException:
        _undo_moves(placed, target)
        raise
    _sync_folders([*(p.parent for p in paths), source.parent])
    if hidden is not None:
        shutil.rmtree(hidden, ignore_errors=True)
        fsync_dir(str(source.parent))
    _remove_formed(paths, source, keep)
    return target / source.name


def move_source(
    source: Path,
    dest_dir: Path,
    reason: str | None = None,
    files: Sequence[SourceFile] = (),
) -> Path:
    """Move the slide at `source` into a new folder `dest_dir/<slide name>[-n]` (never
    overwriting anything), with `REASON.txt` beside it when a reason is given: all or nothing,
    durably (`move_files`). Returns the new path.

    With `files` (a job's), exactly those files move, and only while each is still the file
    recorded (SourceChanged otherwise, nothing moved); without, the parts
    `wsi.slidefiles.slide_parts` finds now."""
    if not files:
        return move_files(slide_files(slide_parts(source)), source, dest_dir, reason)
    why = changed(files)
    if why is not None:
        raise SourceChanged(f"left in place: {why} since the job was submitted")
    return move_files([Path(f.path) for f in files], source, dest_dir, reason)


def _hide(paths: Sequence[Path], source: Path) -> Path:
    """Rename every file into one new hidden folder beside `source`; when one cannot be, put
    back those already renamed and raise."""
    rels = _relative(paths, source)
    hidden = source.parent / f"{HIDDEN_DELETE_PREFIX}{uuid.uuid4().hex[:12]}"
    hidden.mkdir()
    done: list[tuple[Path, Path]] = []
    try:
        for src, rel in zip(paths, rels, strict=True):
            dst = hidden / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, dst)
            done.append((src, dst))
    except BaseException:
        for src, dst in reversed(done):
            with contextlib.suppress(OSError):
                os.rename(dst, src)
        _undo_moves([], hidden)
        raise
    return hidden


LEFTOVER_AGE_SECONDS = 600.0
"""How long a hidden folder must have been left alone before `remove_deletion_leftovers` takes
it for a leftover: a deletion or a move running now (in this process or another sharing the
folder) renames files into its folder for a few milliseconds, and one removed under it would
fail half-way, a move then undoing its copy in the done folder."""


def remove_deletion_leftovers(folder: Path, now: float | None = None) -> int:
    """Remove the hidden folders (`HIDDEN_DELETE_PREFIX`) that a deletion or a move across file
    systems killed between `_hide` and the removal left in `folder`, at any depth, once
    unchanged for `LEFTOVER_AGE_SECONDS`; returns how many went. Each holds files that were
    already gone from the slide's point of view (its slide published, or copied whole and
    synced into the done folder) before they were hidden, so nothing is lost: left there, a
    SIGKILL or a power cut at that moment kept a whole slide hidden from the watcher and the
    console for ever (patient data the policy deletes, and its disk space). Symbolic links are
    neither followed nor removed. Files a receiver killed mid-way left (`RECEIVING_PREFIX`) go
    the same way: half an instance, its sender told nothing was stored."""
    with os.scandir(folder):  # an OSError when the folder is away: for the caller to retry
        pass
    cutoff = (time.time() if now is None else now) - LEFTOVER_AGE_SECONDS
    removed = 0
    for directory, dirs, files in os.walk(folder):
        for name in [f for f in files if f.startswith(RECEIVING_PREFIX)]:
            received = Path(directory, name)
            with contextlib.suppress(OSError):
                info = received.lstat()
                if stat.S_ISREG(info.st_mode) and info.st_mtime <= cutoff:
                    received.unlink()
                    removed += 1
        for name in [d for d in dirs if d.startswith(HIDDEN_DELETE_PREFIX)]:
            dirs.remove(name)
            leftover = Path(directory, name)
            try:
                info = leftover.lstat()
            except OSError:
                continue
            if stat.S_ISLNK(info.st_mode) or info.st_mtime > cutoff:
                continue
            shutil.rmtree(leftover, ignore_errors=True)
            if not os.path.lexists(leftover):
                removed += 1
    if removed:
        fsync_dir(str(folder))
    return removed


def delete_files(paths: Sequence[Path], source: Path, *, keep: Collection[Path] = ()) -> None:
    """Delete the files `paths` of the slide at `source`, then the folders it formed that are
    left empty (never one in `keep`).

    All or nothing as the watch folder shows: every file is first renamed into one hidden folder
    beside `source` (put back, and the OSError raised, when one cannot be), then that folder is
    removed. Durable when it returns.
    """
    hidden = _hide(paths, source)
    # The renames are what takes the slide out of the watch folder: durable before the rest.
    _sync_folders([*(p.parent for p in paths), source.parent])
    try:
        shutil.rmtree(hidden)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"taken out of the watch folder, but not all deleted: {exc.strerror} "
            f"(the rest is in {hidden.name})",
        ) from exc
    fsync_dir(str(source.parent))
    _remove_formed(paths, source, keep)


@dataclass(frozen=True)
class SecondCopies:
    """What becomes of another copy of a slide already converted and published (a scanner that
    sent it again, a slide copied back from a backup): moved into the done folder or deleted, as
    the policy (`after_success`: "move" or "delete") did to its first copy. Left alone it lay in
    the watch folder for ever under a name that is often its patient's, and a lab that deletes
    its sources expects none kept. It is the same slide by the content id that made the queue
    convert it once (the same test that skips its conversion)."""

    policy: str
    done_dir: Path
    keep: tuple[Path, ...] = ()
    """Folders never removed when a slide's folder is left empty (the watch folders)."""

    def set_aside(self, files: Sequence[SourceFile], source: Path) -> None:
        """Move or delete `files` of the copy at `source`, only while each is still the file
        recorded (SourceChanged otherwise); all or nothing, durably."""
        why = changed(files)
        if why is not None:
            raise SourceChanged(f"left in place: {why}")
        paths = [Path(f.path) for f in files]
        if self.policy == "move":
            move_files(paths, source, self.done_dir, keep=self.keep)
        else:
            delete_files(paths, source, keep=self.keep)


def second_copy(job: Job, candidate: SlideCandidate) -> tuple[SourceFile, ...] | None:
    """The files of `candidate`, the slide `job` was submitted for, when none of them is a
    file the job recorded: another copy of its slide (else None: the job's own files, which its
    worker moves or deletes, or left in place with a warning when it could not)."""
    files = record(candidate.files)
    ours = {(f.device, f.inode) for f in job.files}
    if not ours or ours & {(f.device, f.inode) for f in files}:
        return None
    return files


def slide_files(parts: Iterable[Path]) -> list[Path]:
    """The files of a slide whose parts (`wsi.slidefiles.slide_parts`) may include folders (a
    MIRAX companion folder, a DICOM series folder): every file below those, in order."""
    files: list[Path] = []
    for part in parts:
        if part.is_dir():
            files += sorted(p for p in part.rglob("*") if p.is_file() or p.is_symlink())
        else:
            files.append(part)
    return list(dict.fromkeys(files))


__all__ = [
    "HIDDEN_DELETE_PREFIX",
    "REASON_FILE",
    "SecondCopies",
    "SourceChanged",
    "changed",
    "delete_files",
    "fsync_file",
    "move_files",
    "move_source",
    "record",
    "remove_deletion_leftovers",
    "second_copy",
    "slide_files",
    "submit_slide",
]
