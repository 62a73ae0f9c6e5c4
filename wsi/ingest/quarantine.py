"""The quarantine folder as the people who run the service see it: each slide that failed for
good, why, and the way back into a watch folder.

A worker moves a slide that failed for good into `quarantine/<slide name>[-n]/`, its files at
their paths relative to the folder that held it, with `REASON.txt` beside them
(`wsi.ingest.source_files.move_files`). Each such folder is an entry here, named by an opaque
reference (`QuarantinedSlide.ref`: a digest of the folder's device, inode and name, so it says
nothing of the slide's name, which is often its patient's, and cannot be confirmed by guessing
one). The reference is made from the folder's name as bytes: a name that is not UTF-8 (shown
with U+FFFD, `wsi.model.readable`) still has one, and it leads back to the exact file. `release`
puts an entry's files back into a watch folder, all or nothing, where the watcher (or the
caller, at once) makes it a job again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from wsi.errors import SlideNotFound, WsiError
from wsi.ingest.source_files import REASON_FILE
from wsi.model import readable
from wsi.slidefiles import is_hidden
from wsi.store.objects import fsync_dir, make_dirs

MAX_REASON_BYTES = 4096
"""Of `REASON.txt`, read at most this much (a reason is a message, never file content)."""
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[^\s/'\":]+/)+")
_ESCAPED_BYTE = re.compile(r"\\u(dc[89a-f][0-9a-f])")
"""An undecodable byte of a file name as a Python process writes it to stderr (`\\udcfc`: the
lone surrogate of PEP 383, backslash-escaped), as the converter's error lines quote names."""


class QuarantineConflict(WsiError, FileExistsError):
    """An entry cannot go back: a file of the same name is already in the watch folder, or it
    holds no file at all."""


class QuarantineUnavailable(WsiError, OSError):
    """The quarantine folder is there but cannot be listed (a file in its place, a dangling
    link, no permission): telling "nothing in quarantine" would hide every slide it holds."""


@dataclass(frozen=True)
class QuarantinedSlide:
    """One slide in the quarantine folder."""

    ref: str
    """Opaque, stable while the entry stays where it is (`entry_ref`)."""
    folder: Path
    """`quarantine/<slide name>[-n]`: patient data, never shown to a page."""
    reason: str
    """`REASON.txt` (empty without one); directory parts of any path in it removed."""
    quarantined: float
    """When it was quarantined (seconds since the epoch: the reason file's mtime)."""
    files: tuple[Path, ...]
    """The slide's files, relative to `folder` (`REASON.txt` not included)."""
    total_bytes: int

    @property
    def name(self) -> str:
        """The slide's name as it was in the watch folder (the entry point's name): patient
        data under de-identification. Exact (a name that is not UTF-8 keeps its undecodable
        bytes as lone surrogates): what is shown goes through `wsi.model.readable`."""
        tops = sorted({f.parts[0] for f in self.files})
        files = [t for t in tops if (self.folder / t).is_file()]
        return (files or tops or [self.folder.name])[0]


def entry_ref(folder: Path) -> str:
    """The opaque reference of a quarantine entry: 16 hex digits of a digest of its device,
    inode and name (OSError when it is gone). The name as the file system has it (bytes): one
    that is not UTF-8 cannot be encoded as text, and its displayable form (`readable`) is lossy,
    so two names could share it."""
    st = folder.stat()
    digest = hashlib.sha256(f"{st.st_dev}:{st.st_ino}:".encode() + os.fsencode(folder.name))
    return digest.hexdigest()[:16]


def without_directories(text: str) -> str:
    """`text` with the directories of every absolute path removed (`/in/box/a.svs` -> `a.svs`):
    a page is never shown where the service keeps slides."""
    return _ABSOLUTE_PATH.sub("", text)


def without_folders_of(text: str, *paths: str) -> str:
    """`text` with the folder holding each of `paths` removed wherever it appears (`/in/Doe Jane
    1970/a.svs` -> `a.svs`): what the converter's error line says of the slide it was given.
    `without_directories` cannot tell where a folder named with spaces or colons begins, and
    scanners name folders after patients.

    Also displayable (`readable`): the converter writes each undecodable byte of a name that
    is not UTF-8 escaped (`Gr\\udcfcn.svs`), which would reach the job's error and `REASON.txt`
    as it is; each becomes U+FFFD (`Gr\ufffdn.svs`), as the README promises for every name."""
    text = _ESCAPED_BYTE.sub(lambda m: chr(int(m.group(1), 16)), text)
    for path in paths:
        folder = os.path.dirname(path.rstrip("/")) if "://" not in path else ""
        # Also as a stored message quotes a folder whose name is not UTF-8 (`readable`).
        for spelling in {folder, readable(folder)} if folder else ():
            text = text.replace(spelling + "/", "")
    return readable(text)


def _files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if rel == Path(REASON_FILE) or path.is_dir():
            continue
        yield rel


def _read_reason(folder: Path) -> tuple[str, float]:
    path = folder / REASON_FILE
    try:
        with path.open("rb") as f:
            text = f.read(MAX_REASON_BYTES).decode(errors="replace").strip()
        return text, path.stat().st_mtime
    except OSError:
        return "", folder.stat().st_mtime


def _listed(root: Path) -> list[Path]:
    """What the quarantine folder holds; none when it does not exist yet. QuarantineUnavailable
    when it is there but is no folder or cannot be listed: an empty answer would say that no
    slide waits there, and hide every one that does."""
    try:
        entries = list(root.iterdir()) if stat.S_ISDIR(root.stat().st_mode) else None
    except FileNotFoundError:
        if not os.path.lexists(root):
            return []
        entries = None  # a link to nothing: something is there, and it is no folder
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        raise QuarantineUnavailable(f"the quarantine folder is not readable: {why}") from exc
    if entries is None:
        raise QuarantineUnavailable("the quarantine folder is not readable: it is not a folder")
    return entries


COUNTED_NAMES = 10_000
"""`count_quarantine` reads at most this many names (about 13 ms): a quarantine that grew past
it is counted as the entries among the first ones read."""


def _is_entry(name: str, own_folder: bool) -> bool:
    """Whether a name in the quarantine folder is an entry: a folder of its own (not a link to
    one), not hidden. The one rule `list_quarantine` and `count_quarantine` read by."""
    return own_folder and not is_hidden(name)


def count_quarantine(quarantine_dir: str | os.PathLike[str], most: int = COUNTED_NAMES) -> int:
    """Blocking: how many entries `list_quarantine` would list, from the first `most` names of
    the folder alone: no entry is opened, and on the usual file systems no file's status is
    asked (`DirEntry.is_dir` reads the type the listing gives), where listing each entry's files
    costs as much as the slides there (`/metrics` asks at every scrape). 0 when the folder does
    not exist yet; OSError when it is there but cannot be listed (a file or a dangling link in
    its place, no permission)."""
    count = 0
    try:
        with os.scandir(quarantine_dir) as names:
            for entry in itertools.islice(names, most):
                count += _is_entry(entry.name, entry.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        if os.path.lexists(quarantine_dir):
            raise
        return 0
    return count


def list_quarantine(quarantine_dir: str | os.PathLike[str]) -> list[QuarantinedSlide]:
    """Every entry of the quarantine folder, most recently quarantined first; none when the
    folder does not exist yet (QuarantineUnavailable when it cannot be listed: `_listed`). An
    entry that vanishes while it is read is left out."""
    root = Path(quarantine_dir)
    found = []
    for folder in _listed(root):
        if not _is_entry(folder.name, folder.is_dir() and not folder.is_symlink()):
            continue
        with contextlib.suppress(OSError):
            reason, when = _read_reason(folder)
            files = tuple(_files(folder))
            size = sum((folder / f).lstat().st_size for f in files)
            found.append(
                QuarantinedSlide(
                    entry_ref(folder), folder, without_directories(reason), when, files, size
                )
            )
    return sorted(found, key=lambda e: (-e.quarantined, e.ref))


def find_entry(quarantine_dir: str | os.PathLike[str], ref: str) -> QuarantinedSlide:
    """The entry `ref` names (SlideNotFound when none does)."""
    for entry in list_quarantine(quarantine_dir):
        if entry.ref == ref:
            return entry
    raise SlideNotFound(f"no quarantined slide {ref}")


def _rename_or_copy(src: Path, dst: Path) -> bool:
    """Rename `src` to `dst`; across file systems copy it instead and return False (the caller
    removes the original once every file is in place)."""
    try:
        os.rename(src, dst)
        return True
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    shutil.copy2(src, dst)
    return False


def release(entry: QuarantinedSlide, watch_dir: str | os.PathLike[str]) -> Path:
    """Move the files of `entry` back into `watch_dir`, each at its path relative to the entry,
    and remove the entry (its `REASON.txt` and emptied folders). Returns where the slide's entry
    point now is.

    All or nothing: QuarantineConflict, nothing moved, when one of the names is already taken
    in `watch_dir`; when a move fails half-way, the files moved so far go back and the OSError
    is raised. Within one file system each file is renamed, so a watcher never sees a file
    being written; the watcher still waits its quiet period before taking the slide.
    """
    watch = Path(watch_dir)
    if not entry.files:
        raise QuarantineConflict(f"quarantined slide {entry.ref} holds no file to put back")
    tops = sorted({f.parts[0] for f in entry.files})
    taken = [t for t in tops if os.path.lexists(watch / t)]
    if taken:
        raise QuarantineConflict(
            f"quarantined slide {entry.ref} cannot go back: the watch folder already holds a "
            f"file of the same name"
        )
    moved: list[tuple[Path, Path, bool]] = []
    try:
        for rel in entry.files:
            src, dst = entry.folder / rel, watch / rel
            make_dirs(str(dst.parent))
            moved.append((src, dst, _rename_or_copy(src, dst)))
    except BaseException:
        for src, dst, renamed in reversed(moved):
            with contextlib.suppress(OSError):
                if renamed:
                    os.rename(dst, src)
                else:
                    dst.unlink()
        raise
    for src, _, renamed in moved:
        if not renamed:  # copied across file systems: every copy is in place
            src.unlink()
    fsync_dir(str(watch))
    with contextlib.suppress(FileNotFoundError):
        (entry.folder / REASON_FILE).unlink()
    for folder in sorted(
        (p for p in entry.folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
    ):
        with contextlib.suppress(OSError):
            folder.rmdir()
    with contextlib.suppress(OSError):
        entry.folder.rmdir()
    fsync_dir(str(entry.folder.parent))
    return watch / entry.name


class ResumedCopies:
    """Put back into a watch folder the quarantined slides whose copy went on after they were
    quarantined, once their files are still again.

    A copy that stalls longer than the settle time (a scanner's share reconnecting) leaves a
    half file that the converter cannot read, and it is quarantined. The writer still holds the
    file open, and a rename keeps it the same file: the copy goes on, into the quarantine
    folder, and the slide completes there, where nothing looks at it. A file of an entry written
    to after the entry's `REASON.txt` (both mtimes stamped by the file system that holds them
    now) is such a copy; once the entry's files have kept their sizes and mtimes for
    `quiet_seconds` (timed here, never from the files' clocks), it goes back (`release`) and the
    watcher makes it a job, under the id of its now complete content. An entry nothing wrote to
    since it was quarantined stays, whatever its age."""

    def __init__(
        self,
        quarantine_dir: str | os.PathLike[str],
        quiet_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.quarantine_dir = Path(quarantine_dir)
        self.quiet_seconds = quiet_seconds
        self._clock = clock
        self._seen: dict[str, tuple[tuple[tuple[str, int, int], ...], float]] = {}
        """Entry reference -> (its files written to since it was quarantined, as (path, size,
        mtime_ns); when they were first seen so)."""

    def put_back(self, watch_dir: str | os.PathLike[str]) -> list[str]:
        """One look at the quarantine: the references of the entries put back into `watch_dir`
        now. An entry that cannot go back now (a name taken in the watch folder, a failed move)
        is tried at the next look; a quarantine folder that cannot be listed is looked at
        later (QuarantineUnavailable is not raised)."""
        try:
            entries = list_quarantine(self.quarantine_dir)
        except QuarantineUnavailable:
            return []
        now = self._clock()
        seen: dict[str, tuple[tuple[tuple[str, int, int], ...], float]] = {}
        put: list[str] = []
        for entry in entries:
            written = _written_after_quarantine(entry)
            if written is None:
                continue
            before = self._seen.get(entry.ref)
            since = before[1] if before is not None and before[0] == written else now
            if now - since < self.quiet_seconds:
                seen[entry.ref] = (written, since)
                continue
            try:
                release(entry, watch_dir)
            except (OSError, WsiError):
                seen[entry.ref] = (written, since)
                continue
            put.append(entry.ref)
        self._seen = seen
        return put


def _written_after_quarantine(entry: QuarantinedSlide) -> tuple[tuple[str, int, int], ...] | None:
    """The entry's files as (path, size, mtime_ns) when one of them was written to after its
    `REASON.txt` was, else None (and for an entry without one: nothing says when it came)."""
    try:
        quarantined = (entry.folder / REASON_FILE).stat().st_mtime_ns
        files = []
        for rel in entry.files:
            st = (entry.folder / rel).lstat()
            files.append((str(rel), st.st_size, st.st_mtime_ns))
    except OSError:
        return None
    if not files or max(mtime for _, _, mtime in files) <= quarantined:
        return None
    return tuple(files)


__all__ = [
    "QuarantineConflict",
    "QuarantineUnavailable",
    "QuarantinedSlide",
    "ResumedCopies",
    "count_quarantine",
    "entry_ref",
    "find_entry",
    "list_quarantine",
    "release",
    "without_directories",
    "without_folders_of",
]
