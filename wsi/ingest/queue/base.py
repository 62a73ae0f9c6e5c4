"""The job queue's values and interface: `Job`, `JobState`, `RetryPolicy`, `JobQueue`, and the
argument checks every backend shares. `wsi.ingest.queue` re-exports them with the SQLite backend.
"""

from __future__ import annotations

import abc
import builtins
import enum
import json
import math
import os
import socket
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Self

from wsi.errors import InvalidArgument, StoreError, WsiError
from wsi.ingest.queue.paths import path_from_stored, stored_path
from wsi.model import readable

Clock = Callable[[], float]
"""Seconds since the Unix epoch; injectable so tests can move time without sleeping."""

SCHEMA_VERSION = 2
"""`PRAGMA user_version` of the jobs database this code writes; a newer file is refused, an older
one is brought up to date when opened (version 2 added each job's source files and warning)."""

_MAX_SOURCE = 4096
_MAX_WORKER = 256
_MAX_ERROR = 2000
_MAX_LIST = 1000
_MAX_FILES = 100_000
"""Files of one slide: a DICOM series of many instances stays far below."""


class JobNotFound(WsiError, LookupError):
    """No job has this id."""


class JobQueueUnavailable(StoreError):
    """The jobs database cannot be read or written: locked past the busy timeout, disk full, not a
    jobs database, or written by a newer version. A StoreError, so the service answers 503."""


class JobState(enum.StrEnum):
    """Where a job is in its life: queued -> running -> done | failed | cancelled.

    A transient failure or a lost worker sends a running job back to queued.
    """

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


_DEDUP_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.DONE)
"""A job in one of these states stands for its slide: submitting the slide again returns it."""

_LIVE_STATES = (JobState.QUEUED, JobState.RUNNING)
"""Of a slide's standing jobs, a live one is returned before the newest ended one."""


LOST_LEASE = "worker lost (lease expired)"
"""The error of a job `JobQueue.recover` took back after its worker's lease ran out."""
LOST_WORKER = "worker lost (its process is gone)"
"""The error of a job `JobQueue.recover` took back from a worker it was told is gone."""


def _standing_states(watched: bool) -> tuple[JobState, ...]:
    """The states in which a slide's job answers a new submission of that slide. A watcher's
    report (`watched`) is answered by any job: a cancelled slide, or a failed one whose source
    was not quarantined, is still in its folder and is reported again after every restart of a
    watcher; only an explicit retry, or a user's own submission, converts it again."""
    return tuple(JobState) if watched else _DEDUP_STATES


@dataclass(frozen=True)
class SourceFile:
    """One file of a job's slide as it was when the job was submitted.

    A worker moves or deletes a source only while every one of its files still has the identity
    recorded here: a file replaced by another of the same name (a new inode, or a new size or
    mtime) is left alone, never deleted unconverted.
    """

    path: str
    """Absolute path of the file when submitted."""
    device: int
    """`st_dev` of the file system holding it."""
    inode: int
    """`st_ino`."""
    size: int
    """Bytes."""
    mtime_ns: int
    """Last modified, nanoseconds since the epoch."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str):
            raise InvalidArgument("a source file's path must be a string")
        _check_text("a source file's path", stored_path(self.path), _MAX_SOURCE)
        for name in ("device", "inode", "size", "mtime_ns"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgument(f"a source file's {name} must be an integer")
        if self.size < 0:
            raise InvalidArgument("a source file's size must be >= 0")

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> SourceFile:
        """The identity `path` has now (symbolic links followed: the content is what counts);
        OSError when it cannot be read."""
        st = os.stat(path)
        return cls(os.fspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def to_json(self) -> list[Any]:
        return [stored_path(self.path), self.device, self.inode, self.size, self.mtime_ns]

    @classmethod
    def from_json(cls, value: Any) -> SourceFile:
        if not isinstance(value, list) or len(value) != 5:
            raise InvalidArgument("a source file is [path, device, inode, size, mtime_ns]")
        if not isinstance(value[0], str):
            raise InvalidArgument("a source file's path must be a string")
        return cls(path_from_stored(value[0]), *value[1:])


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    stamp = datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


STORED_COLUMNS = (
    "id, source, slide_id, state, progress, error, attempts, created, updated, started, "
    "finished, next_attempt_at, worker, lease_until, options, files, warning"
)
"""What every queue stores of a job, in the order `Job.from_row` reads it (the state column is
each backend's own)."""


@dataclass(frozen=True)
class Job:
    """One conversion job as last read from the queue (a snapshot: the queue is the truth).

    Times are seconds since the Unix epoch (`to_dict` renders them as UTC ISO 8601).
    """

    id: str
    """Opaque (uuid4 hex)."""
    source: str
    """The slide to convert: a local path or an s3:// URL."""
    slide_id: str | None
    """The published slide's id: given at submit (content id) or known once done."""
    state: JobState
    progress: float
    """0-100 of the current attempt."""
    error: str | None
    """Why the last attempt failed (a message, never file content); None once done."""
    attempts: int
    """How many times a worker has claimed the job."""
    created: float
    updated: float
    started: float | None
    """When the latest attempt was claimed."""
    finished: float | None
    """When the job reached done, failed or cancelled."""
    next_attempt_at: float
    """A queued job is not claimed before this (retry backoff)."""
    worker: str | None
    """Who holds the lease; set only while running."""
    lease_until: float | None
    """The lease ends then unless renewed; set only while running."""
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    """Conversion options (JSON values), read-only."""
    files: tuple[SourceFile, ...] = ()
    """Every file of the slide, with its identity at submit (empty for `s3://` sources and for
    jobs submitted without them): what `after_success` moves or deletes, and only while each is
    still the same file."""
    warning: str | None = None
    """Something the job could not do although it ended as it did: a done job whose source could
    not be moved or deleted, or a failed one whose source could not be quarantined."""

    @classmethod
    def from_row(cls, row: tuple[Any, ...], state: JobState) -> Job:
        """A job from the columns every queue stores, in `STORED_COLUMNS`' order, the state
        (stored in each backend's own way) decoded by the caller; options and files are JSON."""
        (id_, source, slide_id, _, progress, error, attempts, created, updated, started,
         finished, next_attempt_at, worker, lease_until, options, files, warning) = row  # fmt: skip
        return cls(
            id=id_,
            source=path_from_stored(source),
            slide_id=slide_id,
            state=state,
            progress=float(progress),
            error=error,
            attempts=int(attempts),
            created=created,
            updated=updated,
            started=started,
            finished=finished,
            next_attempt_at=next_attempt_at,
            worker=worker,
            lease_until=lease_until,
            options=MappingProxyType(json.loads(options)),
            files=tuple(SourceFile.from_json(f) for f in json.loads(files)),
            warning=warning,
        )

    def to_dict(self) -> dict[str, Any]:
        """The job as the REST API shows it: JSON values only, times as UTC ISO 8601."""
        return {
            "id": self.id,
            "source": stored_path(self.source),
            "slide_id": self.slide_id,
            "state": self.state.value,
            "progress": self.progress,
            "error": self.error,
            "attempts": self.attempts,
            "created": _iso(self.created),
            "updated": _iso(self.updated),
            "started": _iso(self.started),
            "finished": _iso(self.finished),
            "next_attempt_at": _iso(self.next_attempt_at),
            "worker": self.worker,
            "lease_until": _iso(self.lease_until),
            "options": json.loads(json.dumps(dict(self.options))),
            "files": [stored_path(f.path) for f in self.files],
            "warning": self.warning,
        }


def _moved_away(job: Job, files: tuple[SourceFile, ...]) -> bool:
    """Whether a slide's queued `job` is to be moved to this submission's `files`: a file it
    recorded is gone (the slide was renamed or moved in its folder before a worker took it) and
    the new files are there. Kept as it was, its worker would fail it for a missing source and
    the watcher, handed that job for the new name, would never convert the slide."""
    return (
        job.state is JobState.QUEUED
        and bool(job.files)
        and bool(files)
        and any(not os.path.lexists(f.path) for f in job.files)
        and all(os.path.lexists(f.path) for f in files)
    )


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures and lost workers are retried.

    The policy belongs to whoever calls `fail` or `claim`; every process of one deployment should
    use the same one.
    """

    max_attempts: int = 5
    """A job is claimed at most this often; then a transient failure or lost lease fails it."""
    backoff_unit: float = 1.0
    """A transient failure after attempt n waits backoff_unit * 2**n seconds ..."""
    backoff_cap: float = 600.0
    """... but never longer than this."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise InvalidArgument("max_attempts must be an integer >= 1")
        for name in ("backoff_unit", "backoff_cap"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise InvalidArgument(f"{name} must be a finite number >= 0")

    def delay(self, attempts: int) -> float:
        """Seconds to wait before the next attempt, after `attempts` attempts."""
        return float(min(self.backoff_cap, self.backoff_unit * 2.0 ** min(attempts, 62)))


@dataclass(frozen=True)
class Lease:
    """Who holds a named lease in the job table, and until when (see `JobQueue.hold_lease`)."""

    name: str
    holder: str
    """The holder's name: `worker_name()` of the process that took it."""
    until: float
    """Seconds since the epoch, on the holder's clock: the lease is free after this."""


def default_queue_path(data_dir: str | os.PathLike[str]) -> Path:
    """Where the service keeps its jobs: next to the slides it publishes, so it moves with them."""
    return Path(data_dir) / "jobs.sqlite"


def worker_name() -> str:
    """A worker id unique across machines and restarts: host, process id and a random suffix.

    Two workers must never share a name, or one could renew or complete the other's lease.
    """
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


# --- where a job table is -----------------------------------------------------------------------

DATABASE_SCHEMES = ("postgresql://", "postgres://")
"""A job table named by a URL of one of these schemes is a PostgreSQL database
(`PostgresJobQueue`); anything else names a SQLite file (`SQLiteJobQueue`)."""


def is_database_url(target: object) -> bool:
    """Whether `target` names a PostgreSQL job table rather than a SQLite file."""
    return isinstance(target, str) and target.lower().startswith(DATABASE_SCHEMES)


def url_password(target: str) -> str | None:
    """The password written in a database URL's user info (as written, not decoded), if any."""
    head = target.split("://", 1)[-1].split("?", 1)[0]
    userinfo = head.rpartition("@")[0]
    return userinfo.split(":", 1)[1] if ":" in userinfo else None


def redact_url(target: str) -> str:
    """`target` as a log line or an error may show it: a database URL as
    `scheme://user@host:port/database`, without its password nor its query (which may carry
    one); a path unchanged. Everything between the user name and the last `@` goes, so a
    password with a stray `/` or `@` in it goes too."""
    if not is_database_url(target):
        return target
    scheme, rest = target.split("://", 1)
    head = rest.split("?", 1)[0].split("#", 1)[0]
    userinfo, at, hostpart = head.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}{at}{hostpart}"


# --- validation --------------------------------------------------------------------------------


def _check_text(name: str, value: object, limit: int) -> str:
    if not isinstance(value, str) or not value or "\0" in value or len(value) > limit:
        raise InvalidArgument(f"{name} must be a non-empty string of at most {limit} characters")
    if readable(value) != value:
        raise InvalidArgument(f"{name} must be Unicode text (it holds a lone surrogate)")
    return value


def _check_source(source: object) -> str:
    """A job's source, checked, as the job table stores it (`stored_path`)."""
    if not isinstance(source, str):
        raise InvalidArgument("source must be a string")
    return _check_text("source", stored_path(source), _MAX_SOURCE)


def _check_number(name: str, value: object, low: float, high: float = math.inf) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise InvalidArgument(f"{name} must be a number in [{low}, {high}]")
    return float(value)


def _check_options(options: Mapping[str, Any] | None) -> str:
    if options is None:
        return "{}"
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise InvalidArgument("options must be a mapping with string keys")
    try:
        return json.dumps(dict(options), allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"options must be JSON values: {exc}") from None


def _check_files(files: object) -> str:
    if not isinstance(files, tuple | list) or len(files) > _MAX_FILES:
        raise InvalidArgument(f"files must be a sequence of at most {_MAX_FILES} SourceFiles")
    if not all(isinstance(f, SourceFile) for f in files):
        raise InvalidArgument("files must be SourceFiles")
    return json.dumps([f.to_json() for f in files])


_MAX_LEASE_NAME = _MAX_SOURCE + 64
"""A lease on a folder is named after its path (at most `_MAX_SOURCE`) with a short prefix."""


def _check_lease(name: object, holder: object, seconds: object = 1.0) -> tuple[str, str, float]:
    """The arguments of a lease call, checked: names bounded, a duration > 0 seconds."""
    name = _check_text("lease name", name, _MAX_LEASE_NAME)
    holder = _check_text("lease holder", holder, _MAX_WORKER)
    duration = _check_number("lease seconds", seconds, 0, 86400 * 365)
    if duration <= 0:
        raise InvalidArgument("lease seconds must be > 0")
    return name, holder, duration


def _check_job_id(job_id: object) -> str:
    if not isinstance(job_id, str):
        raise InvalidArgument("job id must be a string")
    return job_id


def _check_error(error: object) -> str:
    # Messages only: bounded, so a caller that passes something huge cannot bloat every listing.
    if not isinstance(error, str):
        raise InvalidArgument("error must be a string")
    # A message may quote a file name that is not UTF-8: no database text holds its surrogates.
    error = readable(error.replace("\0", ""))
    return error if len(error) <= _MAX_ERROR else error[: _MAX_ERROR - 3] + "..."


# --- the interface -----------------------------------------------------------------------------


class JobQueue(abc.ABC):
    """What the watcher, the workers and the REST API need from a job queue.

    Every method is one atomic step against shared storage, safe to call from any number of
    processes and machines at once. Worker-side calls (`heartbeat`, `complete`, `fail`) name the
    worker and return False, recording nothing, when it no longer holds the job: the job was
    cancelled, or its lease ran out and another worker took it over.
    """

    @abc.abstractmethod
    def submit(
        self,
        source: str,
        slide_id: str | None = None,
        options: Mapping[str, Any] | None = None,
        files: tuple[SourceFile, ...] = (),
        *,
        watched: bool = False,
    ) -> Job:
        """Queue `source` for conversion; `files` are the slide's files as they are now (see
        `Job.files`).

        Idempotent by slide id: while a job for the same `slide_id` is queued, running or done,
        that job is returned (its options and files unchanged) and nothing new is queued, so the
        same slide dropped twice gives one slide. After a failed or cancelled job, a new job is
        queued, unless the submission is a watcher's report (`watched`): then the slide's latest
        job is returned whatever its state, so a cancel or a failure lasts across restarts of a
        watcher until someone retries the slide (a live job still comes first). A queued job
        whose recorded files are gone while `files` are there (the slide was renamed before a
        worker took it) is moved to `source` and `files` first, so the renamed slide converts.
        """

    @abc.abstractmethod
    def claim(self, worker: str, lease_seconds: float) -> Job | None:
        """Atomically take the oldest runnable job for `worker` for `lease_seconds`, or None.

        Runnable: queued with `next_attempt_at` reached, or running with an expired lease (its
        worker is gone; this is how a crashed worker's job resumes). A lost job that has used all
        its attempts is handed over too, with `attempts` past `retry.max_attempts`
        (`lost_every_attempt` says so): the claimer converts nothing, it fails the job for good
        and quarantines its source as after any last failed attempt, so a slide that kills its
        workers neither loops forever nor comes back from the watch folder.
        """

    retry: RetryPolicy
    """How this queue retries transient failures and lost workers."""

    def lost_every_attempt(self, job: Job) -> str | None:
        """Why a claimed `job` is to be failed without converting: every attempt it had lost
        its worker (a slide that kills the converter, SIGKILL or OOM), or None."""
        if job.attempts > self.retry.max_attempts:
            return f"worker lost (lease expired) on each of {self.retry.max_attempts} attempts"
        return None

    @abc.abstractmethod
    def heartbeat(self, job_id: str, worker: str, progress: float) -> bool:
        """Record progress (0-100) and renew the lease for the claim's lease_seconds.

        False: stop working on it (cancelled, or taken over after the lease ran out).
        """

    @abc.abstractmethod
    def complete(
        self,
        job_id: str,
        worker: str,
        slide_id: str,
        warning: str | None = None,
        *,
        cancelled_attempt: int | None = None,
    ) -> bool:
        """Mark the job done, published as `slide_id`, with a `warning` when something that
        follows a publish went wrong (the source could not be moved, say).

        `cancelled_attempt` (the claim's `attempts`): a job cancelled during that very attempt
        (nobody claimed it since) is marked done too. Its conversion had already published the
        slide when the cancel came: the store has it, so the job must not claim otherwise.

        Raises InvalidArgument if the job was submitted for another slide id.
        """

    @staticmethod
    def _cancelled_during(state: JobState, attempts: int, attempt: int | None) -> bool:
        """Whether a job in `state` after `attempts` claims was cancelled during `attempt`."""
        return attempt is not None and state is JobState.CANCELLED and attempts == attempt

    @abc.abstractmethod
    def fail(self, job_id: str, worker: str, error: str, transient: bool) -> bool:
        """Record a failed attempt; `error` is a message (never file content).

        Transient (network, store unavailable, out of memory): queued again after exponential
        backoff until the attempts are used up, then failed. Permanent (unreadable slide): failed.
        """

    @abc.abstractmethod
    def release(self, job_id: str, worker: str, reason: str, *, after: float = 0.0) -> bool:
        """Give a running job back unfinished, runnable `after` seconds from now (at once by
        default), without counting the attempt.

        For a worker that stops on purpose (the service is shutting down), or whose conversion
        could not start because another process is converting the slide (retried `after` the
        backoff): the slide is not to blame, so the job must not move closer to failing.
        `reason` becomes the job's error until the next attempt.
        """

    @abc.abstractmethod
    def warn(self, job_id: str, warning: str) -> Job:
        """Record `warning` on a job whatever its state and owner (a failed job's source could
        not be quarantined, say); returns the job. A message, never file content."""

    @abc.abstractmethod
    def purge(self, finished_before: float, keep: Collection[str] = ()) -> int:
        """Delete the done, failed and cancelled jobs that finished before this time (seconds
        since the epoch), but those whose ids are in `keep`; returns how many. Queued and
        running jobs are never purged. Keeps the table, and every listing, small in a service
        that runs for years."""

    @abc.abstractmethod
    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job (its worker's next heartbeat returns False).

        A job already done, failed or cancelled is returned unchanged: a cancel that races a
        worker's completion is not an error, the caller sees which one won.
        """

    @abc.abstractmethod
    def get(self, job_id: str) -> Job:
        """The job, or JobNotFound."""

    @abc.abstractmethod
    def list(
        self, state: JobState | str | None = None, limit: int = 100, offset: int = 0
    ) -> builtins.list[Job]:
        """Jobs, newest first, optionally only those in `state`."""

    @abc.abstractmethod
    def counts(self) -> dict[JobState, int]:
        """How many jobs are in each state, every state a key (0 when none): one grouped
        read of the table, no job loaded, so `/metrics` can ask at every scrape."""

    @abc.abstractmethod
    def recover(self, now: float | None = None, gone: Callable[[str], bool] | None = None) -> int:
        """Take back every running job whose lease expired (at `now`, default the clock), and
        with `gone` every one whose worker it says no longer runs (`wsi.ingest.lease.
        dead_local_holder`: a process of this host killed with its jobs, whose leases would
        hold them up to a minute after a restart, longer after the clock stepped back).

        Requeues each for immediate retry, the attempt counted (one out of attempts is then
        claimed to be failed, see `claim`). Called at start; returns how many jobs it took back.
        Live leases of other workers are untouched.
        """

    # Leases on things other than jobs (a watch folder): one holder at a time across every
    # process that shares the table, taken over when the holder stops renewing.

    @abc.abstractmethod
    def hold_lease(
        self, name: str, holder: str, seconds: float, *, replacing: str | None = None
    ) -> bool:
        """Take the lease `name` for `holder` until `seconds` from now (the queue's clock), or
        renew it if `holder` holds it already; True when `holder` holds it after the call.

        A lease another holder renewed in time is left alone (False); one that ran out, or whose
        holder is `replacing` (a caller that knows that holder is dead), is taken over. One
        atomic step: of two processes racing for a free lease exactly one gets it.
        """

    @abc.abstractmethod
    def drop_lease(self, name: str, holder: str) -> bool:
        """Give the lease `name` up at once if `holder` holds it (a clean stop: another process
        takes it at its next try instead of after the lease time); False if it did not."""

    @abc.abstractmethod
    def lease(self, name: str) -> Lease | None:
        """The lease `name` as it is recorded (expired or not), or None."""

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release connections; the queue's data stays."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
