"""Ingest settings: one frozen value for the watcher, the workers and the job table.

`wsi serve` (as `ServerSettings.ingest`), `wsi watch` and `wsi worker` all build it here, from the
same defaults, the same `WSI_*` variables (`IngestSettings.from_env`) and the same flags
(`add_ingest_arguments`, read back by `IngestSettings.from_args`): a service and a stand-alone
worker started in the same environment behave alike. Precedence: defaults, then variables, then
the flags given on the command line.

Where slides are published (the store and its S3 endpoint) is not part of it: the service serves
from the same store, so it is given alongside (`Worker(queue, store, settings)`).

Ingest keeps its state (the job table, the spool of `s3://` downloads, `done/` and `quarantine/`)
in one state folder per store (`state_path`), never in whatever folder a process was started
from: `wsi serve`, `wsi watch` and `wsi worker` given the same store find the same job table.
Each of the four can still be put elsewhere on its own. The folders and the job table are made
private to the service's user and group (`make_state`): they hold patient data.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from wsi.errors import InvalidArgument
from wsi.ingest.staging import (
    MAX_SOURCE_BYTES,
    MAX_SOURCE_OBJECTS,
    SPOOL_QUOTA_BYTES,
    StagingLimits,
    is_remote,
)
from wsi.pseudonyms import PublishedIds, published_ids
from wsi.store.objects import FILE_MODE, make_dirs

# `wsi.ingest.queue.base` is imported by the functions that use it: the queue package imports
# its backends (SQLite), which `wsi convert`, whose parser has the ingest flags, does without.

ENV_PREFIX = "WSI_"
"""Every setting `x_y` is read from the variable `WSI_X_Y`."""

AfterSuccess = Literal["keep", "move", "delete"]

_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):/")
"""The start of a URL (`postgresql+psycopg://`, `mysql://`, `postgresql:/` typed short)."""

SETTLE_QUIET_PERIODS = 4
"""A slide the converter cannot read is quarantined only once its files have been still for this
many quiet periods (`IngestSettings.settle_seconds`)."""


def _cli(help: str, flag: str | None = None) -> dict[str, Any]:
    """Field metadata: the setting's short help and its command-line flag (default
    `--name-with-dashes`)."""
    return {"help": help, "flag": flag}


def _private_if_there(folder: str) -> None:
    """Take every permission of others from `folder` if it exists: a done or quarantine folder
    a deployment made itself (`--done-dir`, `--quarantine-dir`, often 0755) let every local user
    list the slides moved there, whose names are the scanner's, often a patient's. Refused in
    one line when the service may not change it (another user's folder)."""
    try:
        mode = os.stat(folder).st_mode
    except FileNotFoundError:
        return
    if mode & 0o007:
        try:
            os.chmod(folder, stat.S_IMODE(mode) & 0o770)
        except PermissionError as exc:
            raise InvalidArgument(
                f"{folder} can be listed by every user (its file names are patients' often) "
                "and the service may not change that: make it 0750, or give another folder"
            ) from exc


@dataclass(frozen=True)
class IngestSettings:
    """How watch folders become jobs, how conversions run, and what happens to sources."""

    workers: int = field(
        default=1, metadata=_cli("conversions at once, each a subprocess (0: none)")
    )
    """Conversions running at once, each in a `wsi convert` subprocess using every core through
    its own thread pool. 0: this process runs no conversions (a service that only watches and
    serves)."""
    quiet_seconds: float = field(
        default=5.0, metadata=_cli("a drop is complete after this long unchanged")
    )
    """Seconds a dropped slide's size and mtime must stay the same before it becomes a job."""
    poll_seconds: float = field(
        default=2.0, metadata=_cli("folder polling and idle workers' job polling")
    )
    """Seconds between polls of the watch folders (network shares deliver no file events) and
    between an idle worker's looks for jobs submitted by other processes."""
    lease_seconds: float = field(
        default=60.0, metadata=_cli("a silent worker's job goes to another after")
    )
    """Seconds a job stays with a worker that stopped heart-beating (crashed, SIGKILLed) before
    another worker takes it over."""
    after_success: AfterSuccess = field(
        default="keep", metadata=_cli("the source once its slide is published", "--after")
    )
    """keep, move (into `done_dir`) or delete a local source once its slide is published."""
    state_dir: str | None = field(
        default=None,
        metadata=_cli(
            "folder of the job table, spool, done and quarantine (default: STORE.state beside "
            "a local store; ~/.local/state/wsistore/<hash> for an s3:// store)",
            "--state",
        ),
    )
    """The folder ingest keeps its state in (`state_path`); None: derived from the store."""
    done_dir: str | None = field(
        default=None, metadata=_cli("where --after move puts sources (default: STATE/done)")
    )
    """Folder sources are moved into with `after_success="move"`, one subfolder per slide;
    None: `done` in the state folder."""
    quarantine_dir: str | None = field(
        default=None,
        metadata=_cli("where unreadable sources go, with REASON.txt (default: STATE/quarantine)"),
    )
    """Folder a source that failed for good is moved into, with a `REASON.txt` beside it; None:
    `quarantine` in the state folder."""
    stop_timeout: float = field(
        default=30.0, metadata=_cli("on SIGTERM, running conversions get this long")
    )
    """Seconds running conversions get to finish on shutdown; then they are stopped and their
    jobs given back (queued again at once, the attempt not counted)."""
    job_timeout: float = field(
        default=0.0, metadata=_cli("stop a conversion running longer than this (0: none)")
    )
    """Seconds after which a running conversion is stopped (0: no limit). Counts as a transient
    failure: retried, then failed and quarantined."""
    stall_timeout: float = field(
        default=600.0, metadata=_cli("stop a conversion silent this long (0: never)")
    )
    """Seconds without a progress report after which a conversion is stopped (a reader hung on a
    dead share; 0: never). Retried like a timeout."""
    keep_jobs_days: float = field(
        default=30.0, metadata=_cli("delete ended jobs this long after (0: keep)")
    )
    """Days after which done, failed and cancelled jobs are deleted from the job table (0: kept
    for ever)."""
    archive_after_days: float = field(
        default=0.0,
        metadata=_cli("recompress slides published this long ago with lossless JPEG XL (0: never)"),
    )
    """Days after its publication when a slide moves to the archive tier (`wsi archive`: JPEG XL
    lossless recompression of its JPEG tiles, still served as JPEG); checked hourly by the role
    that runs conversions; 0: never."""
    jobs_db: str = field(
        default="",
        metadata=_cli(
            "the job table: a SQLite file, or a postgresql:// URL shared by many machines "
            "(default: STATE/jobs.sqlite)",
            "--jobs",
        ),
    )
    """The job table: a SQLite file on a local disk, or a `postgresql://user:password@host/db`
    URL (`wsi.ingest.queue.open_queue`) that services and workers on many machines share;
    empty: `jobs.sqlite` in the state folder (`jobs_path`)."""
    spool_dir: str = field(
        default="",
        metadata=_cli("download folder for s3:// sources (default: STATE/spool)", "--spool"),
    )
    """Folder `s3://` sources are downloaded into for conversion; empty: `spool` in the state
    folder (`spool_path`)."""
    max_source_objects: int = field(
        default=MAX_SOURCE_OBJECTS, metadata=_cli("objects one s3:// source may have")
    )
    """An `s3://` source with more objects is refused (`wsi.ingest.staging.MAX_SOURCE_OBJECTS`
    says why this default)."""
    max_source_bytes: int = field(
        default=MAX_SOURCE_BYTES, metadata=_cli("bytes one s3:// source may have")
    )
    """An `s3://` source with more bytes is refused (`wsi.ingest.staging.MAX_SOURCE_BYTES`)."""
    spool_quota_bytes: int = field(
        default=SPOOL_QUOTA_BYTES, metadata=_cli("bytes the spool may hold at once")
    )
    """Downloads that would take the spool past this wait for room (copies made ahead of their
    conversion are refused instead); at least `max_source_bytes`."""
    deidentify: bool = field(
        default=False,
        metadata=_cli("convert with --deidentify; job records and REASON.txt name no files"),
    )
    """Every conversion applies the DICOM PS3.15 Basic Profile (`wsi convert --deidentify`), and
    what ingest shows or writes about a job (the job list, errors, `REASON.txt`) names its
    source by an opaque reference instead of its file name, which often is a patient's name."""
    keep_label: bool = field(default=False, metadata=_cli("with --deidentify: keep the label"))
    """With `deidentify`: keep the label image (and a thumbnail that may show it)."""
    keep_macro: bool = field(default=False, metadata=_cli("with --deidentify: keep the macro"))
    """With `deidentify`: keep the macro (overview) image."""
    deidentify_key_file: str | None = field(
        default=None,
        metadata=_cli(
            "with --deidentify: the key file that makes slide ids from their content (default: "
            "~/.config/wsistore/deidentify.key, made if absent; the same on every machine)"
        ),
    )
    """With `deidentify`: the key of the ids slides are published under (`wsi.pseudonyms`);
    None: the default key file, made if absent. Every service and worker converting into one
    store must be given the same file."""
    convert_args: tuple[str, ...] = field(default=(), metadata={"env": False})
    """Extra `wsi convert` flags for every conversion (quality, format, ...); set in code."""

    def __post_init__(self) -> None:
        numbers = {f.name: getattr(self, f.name) for f in fields(self)}
        numbers = {k: v for k, v in numbers.items() if isinstance(v, int | float)}
        if not all(math.isfinite(v) for v in numbers.values()):
            raise InvalidArgument("ingest settings must be finite numbers")
        if self.workers < 0 or self.quiet_seconds < 0:
            raise InvalidArgument("workers and quiet_seconds must be >= 0")
        if self.poll_seconds <= 0 or self.lease_seconds <= 0:
            raise InvalidArgument("poll_seconds and lease_seconds must be positive")
        if min(self.stop_timeout, self.job_timeout, self.stall_timeout, self.keep_jobs_days) < 0:
            raise InvalidArgument("timeouts and keep_jobs_days must be >= 0")
        if self.archive_after_days < 0:
            raise InvalidArgument("archive_after_days must be >= 0")
        if self.after_success not in get_args(AfterSuccess):
            raise InvalidArgument("after_success must be keep, move or delete")
        if self.after_success == "move" and self.done_dir == "":
            raise InvalidArgument("after_success='move' needs a done folder")
        if self.quarantine_dir == "" or self.state_dir == "":
            raise InvalidArgument("quarantine_dir and state_dir must name a folder")
        if not all(isinstance(a, str) for a in self.convert_args):
            raise InvalidArgument("convert_args must be strings")
        self._check_jobs_url()
        self.staging_limits  # noqa: B018 - refuses limits that cannot work together

    def _check_jobs_url(self) -> None:
        """Refuse a job table written as a URL that is not PostgreSQL's. Anything but
        `postgresql://` named a SQLite file: `postgresql+psycopg://wsi:pw@db/wsi` (SQLAlchemy's
        spelling) became a private table in folders named after the URL, the password among
        them and in the start line, and the worker never saw the shared table's jobs. The
        error names the scheme only: the rest may hold a password."""
        from wsi.ingest.queue.base import DATABASE_SCHEMES, is_database_url

        scheme = _URL_SCHEME.match(self.jobs_db)
        if scheme and not is_database_url(self.jobs_db):
            raise InvalidArgument(
                f"job table {scheme[1]}:/...: a database is a "
                f"{' or '.join(DATABASE_SCHEMES)} URL, and a SQLite job table a file path"
            )

    @property
    def staging_limits(self) -> StagingLimits:
        """The bounds of one `s3://` source and of the spool, for `wsi.ingest.staging`."""
        return StagingLimits(self.max_source_objects, self.max_source_bytes, self.spool_quota_bytes)

    @property
    def settle_seconds(self) -> float:
        """How long a slide's files must have been unchanged (newest mtime) before the
        converter's "cannot read this slide" is final: `SETTLE_QUIET_PERIODS` quiet periods.
        A copy that pauses longer than the quiet period makes its half-written file a job; that
        failure is retried with the backoff instead, so the copy that resumes is converted once
        complete, not quarantined while still being written."""
        return SETTLE_QUIET_PERIODS * self.quiet_seconds

    def state_path(self, store: str) -> str:
        """The state folder of ingest publishing into `store`: `state_dir` when given; beside a
        local store, `<store>.state` (it moves and is backed up with the store, yet is never
        served or scanned as part of it); for an `s3://` store, which has no local folder,
        `$XDG_STATE_HOME/wsistore/<hash of the store URL>` (default `~/.local/state`): the
        user's own persistent state, which a restart in another folder finds again, one folder
        per store so that two stores never share a job table."""
        if self.state_dir:
            return self.state_dir
        if is_remote(store):
            base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
            digest = hashlib.sha256(store.rstrip("/").encode()).hexdigest()[:16]
            return os.path.join(base, "wsistore", digest)
        return os.path.abspath(store).rstrip(os.sep) + ".state"

    def jobs_path(self, store: str) -> str:
        """The job table (a file, or a database URL) of a service or worker publishing into
        `store`."""
        return self.jobs_db or os.path.join(self.state_path(store), "jobs.sqlite")

    def spool_path(self, store: str) -> str:
        """The download folder for `s3://` sources, for a process publishing into `store`."""
        return self.spool_dir or os.path.join(self.state_path(store), "spool")

    def done_path(self, store: str) -> str:
        """Where `after_success="move"` puts sources, for a process publishing into `store`."""
        return self.done_dir or os.path.join(self.state_path(store), "done")

    def quarantine_path(self, store: str) -> str:
        """Where sources that failed for good go, for a process publishing into `store`."""
        return self.quarantine_dir or os.path.join(self.state_path(store), "quarantine")

    def for_store(self, store: str) -> IngestSettings:
        """These settings with every folder of ingest publishing into `store` filled in, so that
        whoever holds them (a worker) reads each folder from its field."""
        return replace(
            self,
            state_dir=self.state_path(store),
            jobs_db=self.jobs_path(store),
            spool_dir=self.spool_path(store),
            done_dir=self.done_path(store),
            quarantine_dir=self.quarantine_path(store),
        )

    def make_state(self, store: str) -> None:
        """Check the de-identification key (made when the default one is absent); create the
        state folder, the job table's folder and the spool without any permission for others,
        whatever the umask (`done` and `quarantine` are made so when first used, and
        made so when a deployment made them before: `_private_if_there`); and the job table's
        file too, before SQLite does (SQLite gives its journal and shared-memory files the
        database's permissions). A table made world-readable before is made private. A job
        table in a database has no local file or folder."""
        from wsi.ingest.queue.base import is_database_url

        for folder in (self.state_path(store), self.spool_path(store)):
            make_dirs(folder)
        for folder in (self.done_path(store), self.quarantine_path(store)):
            _private_if_there(folder)
        self.published_ids()  # a key file that cannot be read is refused at start, in one line
        jobs = self.jobs_path(store)
        if is_database_url(jobs):
            return
        make_dirs(os.path.dirname(os.path.abspath(jobs)))
        os.close(os.open(jobs, os.O_WRONLY | os.O_CREAT, FILE_MODE))
        for path in (jobs, jobs + "-wal", jobs + "-shm"):
            try:
                mode = os.stat(path).st_mode
            except FileNotFoundError:
                continue
            if mode & 0o007:
                os.chmod(path, mode & 0o770)

    def published_ids(self) -> PublishedIds:
        """How the slides ingest submits are named: by content id, or de-identifying by the
        keyed pseudonym of it, the key read now (`make_state` checked it at start)."""
        return published_ids(self.deidentify, self.deidentify_key_file)

    def describe_state(self, store: str) -> str:
        """Where ingest keeps its state, for a start-up line: folder names only (none of them
        holds a patient's name), those set apart from the state folder named."""
        from wsi.ingest.queue.base import redact_url

        state = self.state_path(store)
        apart = {
            "job table": (self.jobs_path(store), os.path.join(state, "jobs.sqlite")),
            "spool": (self.spool_path(store), os.path.join(state, "spool")),
            "done": (self.done_path(store), os.path.join(state, "done")),
            "quarantine": (self.quarantine_path(store), os.path.join(state, "quarantine")),
        }
        moved = [f"{name} {redact_url(p)}" for name, (p, default) in apart.items() if p != default]
        return f"ingest state in {state}" + (f" ({'; '.join(moved)})" if moved else "")

    def check_watch_folders(self, watch: Iterable[str], store: str) -> None:
        """Refuse a watch folder that is, or holds, one of ingest's own folders (store, job
        table, spool, done, quarantine).

        Those hold files that look like slides (every stored level is a DICOM instance), and
        slides moved out of a watch folder would land in it again: each would be ingested over
        and over. And a reader probing the job table's files in this process would drop SQLite's
        POSIX locks on them (closing any descriptor of a file releases the process's locks),
        which can corrupt the table's shared memory. Folders in S3 are not checked.
        """
        own = {
            "store": store,
            "state": self.state_path(store),
            "job table": _jobs_folder(self.jobs_path(store)),
            "spool": self.spool_path(store),
            "done": self.done_path(store),
            "quarantine": self.quarantine_path(store),
        }
        for folder in watch:
            w = Path(folder).resolve()
            for name, other in own.items():
                if not other or other.startswith("s3://"):
                    continue
                if Path(other).resolve().is_relative_to(w):  # the watcher scans what lies below
                    raise InvalidArgument(
                        f"watch folder {folder} holds the {name} folder {other}: keep them apart"
                    )

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: object
    ) -> IngestSettings:
        """Defaults, then `WSI_*` variables, then `overrides` (those that are not None)."""
        values = env_values(cls, os.environ if environ is None else environ)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None
    ) -> IngestSettings:
        """The settings of a command whose parser `add_ingest_arguments` set up: the flags given
        on the command line over the environment's `WSI_*` variables over the defaults."""
        given = {f.name: getattr(args, f.name, None) for f in fields(cls) if _flag(f)}
        return cls.from_env(environ, **given)


def _jobs_folder(jobs: str) -> str:
    """The folder of a SQLite job table; "" for a database URL (no local folder)."""
    from wsi.ingest.queue.base import is_database_url

    return "" if is_database_url(jobs) else os.path.dirname(os.path.abspath(jobs))


def _flag(f: Field[Any]) -> str | None:
    """The command-line flag of a settings field (None: set in code or by variable only)."""
    if not f.metadata.get("help"):
        return None
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


WATCHING = frozenset({"quiet_seconds", "poll_seconds", "lease_seconds", "state_dir", "jobs_db"})
"""The settings `wsi watch` uses (its folders' leases, when a drop is complete, where the job
table is); the others concern conversions, which `wsi worker` or `wsi serve` run."""


def add_ingest_arguments(parser: argparse.ArgumentParser, watching: bool = False) -> None:
    """The ingest flags `wsi serve`, `wsi watch` and `wsi worker` share. Each defaults to None
    (absent), so a flag that is not given leaves the variable or default in force; the help
    names both. `watching` (`wsi watch`): the flags of `WATCHING` only are listed; the others
    are still taken, and `ignored_by_watch` names those given, so that a command line written
    for a worker keeps working."""
    hints = get_type_hints(IngestSettings)
    group = parser.add_argument_group("ingest")
    for f in fields(IngestSettings):
        flag = _flag(f)
        if flag is None:
            continue
        kind = hints[f.name]
        default = "" if f.default in ("", None, MISSING) else f", default {f.default}"
        shown = f"{f.metadata['help']} ({ENV_PREFIX}{f.name.upper()}{default})"
        options: dict[str, Any] = {
            "dest": f.name,
            "default": None,
            "help": argparse.SUPPRESS if watching and f.name not in WATCHING else shown,
        }
        if get_origin(kind) is Literal:
            options["choices"] = list(get_args(kind))
        elif kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = kind if kind in (int, float) else str
            options["metavar"] = _metavar(f.name, kind)
        group.add_argument(flag, **options)


def ignored_by_watch(args: argparse.Namespace) -> list[str]:
    """The flags given to `wsi watch` that it does not use (see `WATCHING`)."""
    return [
        flag
        for f in fields(IngestSettings)
        if (flag := _flag(f)) and f.name not in WATCHING and getattr(args, f.name, None) is not None
    ]


def _metavar(name: str, kind: Any) -> str:
    if kind is int:
        return "BYTES" if name.endswith("_bytes") else "N"
    if kind is float:
        return "DAYS" if name.endswith("_days") else "SECONDS"
    return "FILE_OR_URL" if name == "jobs_db" else "DIR"


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _boolean(name: str, raw: str) -> bool:
    """A boolean variable's value. Anything but the words of `_TRUE` was false: WSI_DEIDENTIFY=y
    or =enabled published every slide identified, by a service its admin had told to
    de-identify. A value that is neither a yes nor a no is refused, naming the variable."""
    word = raw.strip().lower()
    if word not in _TRUE | _FALSE:
        raise InvalidArgument(f"{name} must be 1, true, yes or on, or 0, false, no or off")
    return word in _TRUE


def env_values(cls: type[Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """The fields of the settings dataclass `cls` that `environ` sets, as `WSI_<FIELD>` in upper
    case: comma-separated lists for tuples, 1/true/yes/on or 0/false/no/off for booleans (another
    value is refused), numbers for int and float,
    text otherwise. Nested settings and fields whose metadata says `env: False` are not read."""
    if not is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):
        kind = hints[f.name]
        name = ENV_PREFIX + f.name.upper()
        raw = environ.get(name)
        if raw is None or not f.metadata.get("env", True) or is_dataclass(kind):
            continue
        if get_origin(kind) is tuple:
            values[f.name] = tuple(x.strip() for x in raw.split(",") if x.strip())
        elif kind is bool:
            values[f.name] = _boolean(name, raw)
        elif kind in (int, float):
            try:
                values[f.name] = kind(raw)
            except ValueError as exc:
                raise InvalidArgument(f"{name} must be a number") from exc
        else:
            values[f.name] = raw
    return values


__all__ = [
    "ENV_PREFIX",
    "WATCHING",
    "AfterSuccess",
    "IngestSettings",
    "add_ingest_arguments",
    "env_values",
    "ignored_by_watch",
]
