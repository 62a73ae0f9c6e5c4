"""How a slide lies on disk: which files make up one slide, and which names never are one.

Scanners write a slide as one file (SVS, NDPI, ...), as a file plus a same-named folder (MIRAX:
`x.mrxs` + `x/` with `Slidedat.ini` and the data files it lists), as an index file listing its
neighbours (Hamamatsu `.vms`/`.vmu`), or as DICOM instances (a folder of one series, or loose
files grouped by SeriesInstanceUID). Identifiers may sit beside a slide as a sidecar JSON. The
watcher, the ingest worker (moving a source), the content id, the staging of `s3://` sources, the
metadata lookup, the DICOM reader and the service's scan of unconverted slides all ask these
questions: this module answers each of them once.

Only names, stats and small index files are read here (and one tag of a DICOM header to group a
series); no slide is opened.
"""

from __future__ import annotations

import configparser
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import TypeVar

from wsi.errors import CorruptSlide, SlideIncomplete, UnsupportedSlide

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# Names

TEMPORARY_SUFFIXES = frozenset(
    {".part", ".partial", ".filepart", ".tmp", ".temp", ".crdownload", ".download", ".swp"}
)
"""Names browsers, WinSCP, curl, editors and copy scripts give a file until it is complete."""

SINGLE_FILE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".svslide", ".qptiff"}
)
"""A file with one of these names is a slide candidate without probing: a broken one still becomes
a job, so that it fails with a readable error instead of vanishing silently."""

MIRAX_SUFFIX = ".mrxs"
"""A MIRAX slide: this file plus a same-named folder holding `Slidedat.ini` and the data files."""

MIRAX_INDEX = "Slidedat.ini"
"""The file in a MIRAX folder that lists the slide's data files."""

VMS_SUFFIXES = frozenset({".vms", ".vmu"})
"""A Hamamatsu slide: an INI file that lists the image files lying beside it."""

COMPANION_SUFFIXES = frozenset({MIRAX_SUFFIX, *VMS_SUFFIXES})
"""Slide files whose same-named folder (the name without its suffix), when present, belongs to
the slide: it is hashed into the content id and staged with an `s3://` source."""

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})

SIDECAR_SUFFIX = ".json"
"""A slide's identifiers: `<slide>.json` (e.g. `case-7.svs.json`), else `<stem>.json`."""

SIDECAR_SUFFIXES = frozenset(
    {SIDECAR_SUFFIX, ".txt", ".xml", ".csv", ".md", ".log", ".ini", ".yaml", ".yml", ".pdf"}
)
"""Files that may sit in a DICOM series folder without having to be DICOM themselves."""

NON_SLIDE_SUFFIXES = SIDECAR_SUFFIXES | frozenset(
    {".html", ".htm", ".dat", ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".opt", ".zip"}
    # Databases and their journals: opening and closing one in this process would drop
    # SQLite's locks on it if it is ours.
    | {".sqlite", ".sqlite3", ".db", ".sqlite-wal", ".sqlite-shm", ".sqlite-journal"}
    | {".db-wal", ".db-shm", ".db-journal"}
)
"""Never probed as slides: sidecars, the parts of multi-file slides (those are claimed by their
slide), databases."""

_INI_LIMIT = 1 << 20
"""Slidedat.ini and .vms files are small; OpenSlide refuses larger ones too."""


def suffix(name: str) -> str:
    """The lower-cased suffix of a file name (`.svs`), the key of every list here."""
    return PurePosixPath(name).suffix.lower()


def is_hidden(name: str) -> bool:
    """Dotfiles (rsync's `.name.XXXXXX`, `.DS_Store`, AppleDouble) and `~$` lock files."""
    return name.startswith((".", "~"))


def is_partial(name: str) -> bool:
    """A name that says "still being written": `*.part`, `*.tmp`, `*.crdownload`, `name~`, ..."""
    return name.endswith("~") or suffix(name) in TEMPORARY_SUFFIXES


def is_temporary(name: str) -> bool:
    """Never a slide or a part of one: hidden or partial names."""
    return is_hidden(name) or is_partial(name)


def is_series_companion(name: str) -> bool:
    """A file that may sit in a DICOM series folder without being DICOM itself: a sidecar
    (.json, .txt, ...). Anything else there (a slide file, a file still being written) means
    the folder is not one series: the watcher waits for it, `wsi convert` refuses it."""
    return suffix(name) in SIDECAR_SUFFIXES


def is_non_slide(name: str) -> bool:
    """A name no slide has as its entry point (sidecars, data files of multi-file slides,
    images, databases): not worth probing with a reader."""
    return suffix(name) in NON_SLIDE_SUFFIXES


def _plain_name(name: str) -> bool:
    """A name of a file in the same folder: no separator, not `.` or `..`."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


# ---------------------------------------------------------------------------------------------
# Sidecar metadata


def sidecar_names(name: str) -> tuple[str, ...]:
    """The names a slide called `name` looks for its metadata under, in order: `<name>.json`,
    then `<stem>.json` (never `name` itself)."""
    candidates = (name + SIDECAR_SUFFIX, PurePosixPath(name).stem + SIDECAR_SUFFIX)
    return tuple(c for c in dict.fromkeys(candidates) if c != name)


def sidecar_path(slide: Path) -> Path | None:
    """The metadata sidecar beside the slide (file or folder) at `slide`, if present."""
    for name in sidecar_names(slide.name):
        candidate = slide.with_name(name)
        try:
            if candidate.is_file():
                return candidate
        except OSError:  # a name past the file system's limit (ENAMETOOLONG): no sidecar
            continue
    return None


# ---------------------------------------------------------------------------------------------
# Multi-file formats


def companion_folder(name: str) -> str | None:
    """The companion folder's name for a slide file `name` (`slide.mrxs` -> `slide`), or None
    for formats that keep everything in one file."""
    pure = PurePosixPath(name)
    return pure.stem if pure.suffix.lower() in COMPANION_SUFFIXES else None


def read_ini(path: Path) -> configparser.ConfigParser | None:
    """The INI file at `path`, or None while it cannot be parsed (half-written, or not INI)."""
    try:
        with path.open("rb") as f:
            data = f.read(_INI_LIMIT + 1)
    except OSError:
        return None
    if len(data) > _INI_LIMIT:
        return None
    parser = configparser.ConfigParser(interpolation=None, strict=False, delimiters=("=",))
    try:
        parser.read_string(data.decode("utf-8-sig", errors="replace"))
    except configparser.Error:
        return None
    return parser


def mrxs_required_files(slidedat: Path) -> list[str] | None:
    """The files a MIRAX Slidedat.ini lists (the index file and every data file), relative to its
    folder; None while the ini is not complete enough to say."""
    ini = read_ini(slidedat)
    if ini is None or not ini.has_section("DATAFILE"):
        return None
    section = ini["DATAFILE"]
    try:
        count = int(section.get("file_count", ""))
    except ValueError:
        return None
    names = [section.get(f"file_{i}", "").strip() for i in range(count)]
    if count < 1 or not all(names):
        return None
    index = ini.get("HIERARCHICAL", "indexfile", fallback="").strip()
    return ([index] if index else []) + names


_VMS_GROUPS = ("Virtual Microscope Specimen", "Uncompressed Virtual Microscope Specimen")
_VMS_FILE_KEYS = ("imagefile", "mapfile", "optimisationfile", "macroimage")


def vms_required_files(vms: Path) -> list[str] | None:
    """The files a Hamamatsu .vms/.vmu lists (ImageFile, ImageFile(x,y), MapFile,
    OptimisationFile, MacroImage), relative to its folder; None while it cannot be parsed or lists
    no image file."""
    ini = read_ini(vms)
    group = next((g for g in _VMS_GROUPS if ini is not None and ini.has_section(g)), None)
    if ini is None or group is None:
        return None
    section = ini[group]
    names = {
        key: value.strip()
        for key, value in section.items()
        if key.startswith(_VMS_FILE_KEYS) and value.strip()
    }
    if not any(key.startswith("imagefile") for key in names):
        return None
    return sorted(set(names.values()))


def slide_parts(slide: Path) -> list[Path]:
    """The filesystem entries that make up the slide at `slide`, to be moved or deleted together:
    the file or folder itself, its companion folder (MIRAX), the files a VMS/VMU lists beside it,
    and its metadata sidecar. Only entries that exist, each once, `slide` first."""
    parts = [slide]
    folder = companion_folder(slide.name)
    if folder is not None and slide.with_name(folder).is_dir():
        parts.append(slide.with_name(folder))
    if suffix(slide.name) in VMS_SUFFIXES and slide.is_file():
        # Listed names come from the file's content: only plain names of files beside it count.
        for name in vms_required_files(slide) or ():
            listed = slide.with_name(name) if _plain_name(name) else None
            if listed is not None and listed.is_file() and listed not in parts:
                parts.append(listed)
    sidecar = sidecar_path(slide)
    if sidecar is not None and sidecar not in parts:
        parts.append(sidecar)
    return parts


# ---------------------------------------------------------------------------------------------
# DICOM series

_DICOM_MAGIC_OFFSET = 128
"""A DICOM file starts with a 128-byte preamble, then `DICM` (written first, so a file without
them is not DICOM, or not yet)."""


def is_dicom_file(path: Path) -> bool:
    """Whether `path` is a file with the DICOM preamble and `DICM` marker."""
    try:
        with path.open("rb") as f:
            f.seek(_DICOM_MAGIC_OFFSET)
            return f.read(4) == b"DICM"
    except OSError:
        return False


DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
"""Media Storage Directory Storage: a DICOMDIR, the one DICOM file that belongs to no series."""


def header_error(exc: Exception) -> str:
    """Why pydicom could not read a header, never empty: an element declaring gigabytes in a
    small file is a MemoryError under an address-space limit, and a MemoryError has no
    message (the error line read "cannot read DICOM header: " and nothing after)."""
    if isinstance(exc, MemoryError):
        return "an element declares more bytes than can be read"
    return str(exc) or type(exc).__name__


def series_uid(path: Path) -> str | None:
    """The SeriesInstanceUID of the DICOM file at `path` (None when it has none); CorruptSlide
    when its header cannot be read (truncated, half-written, not DICOM). Warnings pydicom gives
    about a header are the caller's to silence or not."""
    import pydicom  # ~0.3 s to import: only paid when DICOM files are about

    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, defer_size=1024, specific_tags=["SeriesInstanceUID"]
        )
    except Exception as exc:  # pydicom raises many kinds on a truncated or foreign file
        raise CorruptSlide(f"cannot read DICOM header: {header_error(exc)}") from exc
    uid = ds.get("SeriesInstanceUID")
    if uid:
        return str(uid)
    meta = getattr(ds, "file_meta", None)
    sop_class = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    if sop_class is not None and str(sop_class) != DICOMDIR_SOP_CLASS:
        # Every IOD but a DICOMDIR has a series: a file cut short in its header reads this way.
        raise CorruptSlide("cannot read DICOM header: no SeriesInstanceUID (a file cut short?)")
    return None


def readable_series_uid(path: Path) -> str | None:
    """`series_uid`, or None while the header cannot be read."""
    try:
        return series_uid(path)
    except CorruptSlide:
        return None


def group_by_series(
    instances: Iterable[T], uid_of: Callable[[T], str | None], name_of: Callable[[T], str]
) -> tuple[list[list[T]], list[T]]:
    """Loose DICOM instances of one folder as slides: one group per SeriesInstanceUID, each
    sorted by name so that its first member is the slide's entry point (`dicom_series_files`
    given it finds the others). Second value: the instances without a UID (`uid_of` gave None),
    in input order."""
    series: dict[str, list[T]] = {}
    unknown: list[T] = []
    for item in instances:
        uid = uid_of(item)
        if uid is None:
            unknown.append(item)
        else:
            series.setdefault(uid, []).append(item)
    return [sorted(g, key=name_of) for g in series.values()], unknown


def dicom_series_files(path: Path) -> list[Path]:
    """The DICOM files of the slide at `path`: every DICOM file directly in a series folder
    (sorted), or the instance `path` first, then the other instances in its folder that share its
    SeriesInstanceUID (the grouping of `group_by_series`). CorruptSlide when `path`'s own header
    cannot be read; SlideIncomplete when another DICOM file's there cannot: it may be an instance
    of this series (its base level, say), and the slide would be converted without it."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not is_hidden(p.name))
        instances = [p for p in files if is_dicom_file(p)]
        known = set(instances)
        foreign = [p for p in files if p not in known and not is_series_companion(p.name)]
        if instances and foreign:
            raise UnsupportedSlide(
                f"this folder holds {len(foreign)} file(s) that are not DICOM beside its "
                "instances: a DICOM series folder holds its instances and sidecars only. "
                "Convert the slide files in it one by one (each file as its own argument)"
            )
        return instances
    uid = series_uid(path)
    files = [path]
    if uid is None:
        return files
    for other in sorted(path.parent.iterdir()):
        dicom = other != path and other.is_file() and is_dicom_file(other)
        if not dicom:
            continue
        try:
            theirs = series_uid(other)
        except CorruptSlide as exc:
            raise SlideIncomplete(
                "a DICOM file beside it cannot be read (still arriving, or damaged), and may "
                f"belong to its series: {exc}"
            ) from exc
        if theirs == uid:
            files.append(other)
    return files


__all__ = [
    "COMPANION_SUFFIXES",
    "DICOMDIR_SOP_CLASS",
    "DICOM_SUFFIXES",
    "MIRAX_INDEX",
    "MIRAX_SUFFIX",
    "NON_SLIDE_SUFFIXES",
    "SIDECAR_SUFFIX",
    "SIDECAR_SUFFIXES",
    "SINGLE_FILE_SUFFIXES",
    "TEMPORARY_SUFFIXES",
    "VMS_SUFFIXES",
    "companion_folder",
    "dicom_series_files",
    "group_by_series",
    "is_dicom_file",
    "is_hidden",
    "is_non_slide",
    "is_partial",
    "is_series_companion",
    "is_temporary",
    "mrxs_required_files",
    "read_ini",
    "readable_series_uid",
    "series_uid",
    "sidecar_names",
    "sidecar_path",
    "slide_parts",
    "suffix",
    "vms_required_files",
]
