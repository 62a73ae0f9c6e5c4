"""The contract between an ingest worker and the `wsi convert` process it supervises.

The worker starts `python -P -m wsi.cli convert --source-in-env --out STORE ...`
(`convert_command`, the source in the environment) in a session of its own, and talks to it
through five channels, each defined here once:

* **argv**: the store, the job's slide id, the spool folder and its bounds
  (`add_staging_arguments`), the de-identification policy, and the supervision flags
  `add_supervision_arguments` adds to `wsi convert`. `-P` keeps the folder the service was
  started from off the conversion's `sys.path`: a file there named like a module the converter
  imports (`numpy.py`) is never run.
* **the environment**: the source, in `SOURCE_ENV` (`--source-in-env`): a process's argv is in
  the process list every local user reads (`ps`), and scanners name files after patients; its
  environment only its own user can read.
* **stdin**: with `--exit-with-stdin` the conversion ends (with `ExitCode.TEMPFAIL`) when its
  standard input reaches end-of-file while it still works. The worker holds the only write end,
  so the conversion dies with the worker, even a SIGKILLed one, without sharing its process
  group. Once the progress descriptor has closed the work is over: letting go of stdin then no
  longer changes the exit status.
* **the progress descriptor** (`--progress-fd N`): one `ProgressLine` per change, JSON
  (`{"progress": 12.5}`, percent of the whole command). The worker also reads a line as a sign
  of life: a conversion that goes quiet for the stall timeout is stopped, and one that waits for
  room in the spool repeats its last line now and then.
* **stdout and the exit status**: one `ResultLine` per published slide (`<slide id> TAB <url> TAB
  <rate or "already published">`), then an `ExitCode` that says whether a failure is final
  (the slide), worth retrying (the store, a crash, anything unclassified), or no attempt at all
  (the slide is being converted by another process).

`wsi.cli` (the converter's side) and `wsi.ingest.worker` (the supervisor's side) both import this
module; `tests/test_protocol.py` runs a real conversion against it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

from wsi.errors import InvalidArgument
from wsi.ingest.staging import StagingLimits
from wsi.store.objects import check_slide_id

PROGRESS_FD_FLAG = "--progress-fd"
EXIT_WITH_STDIN_FLAG = "--exit-with-stdin"
SOURCE_IN_ENV_FLAG = "--source-in-env"
SOURCE_ENV = "WSI_CONVERT_SOURCE"
"""The variable a supervised conversion reads its source from (`source_environment`)."""
DEIDENTIFY_FLAG = "--deidentify"
KEEP_LABEL_FLAG = "--keep-label"
KEEP_MACRO_FLAG = "--keep-macro"
_LIMIT_FLAGS = {
    "max_objects": "--max-source-objects",
    "max_bytes": "--max-source-bytes",
    "spool_quota": "--spool-quota-bytes",
}
"""`wsi convert`'s flag for each field of `StagingLimits`."""


class ExitCode(IntEnum):
    """`wsi convert`'s exit status, and what an ingest worker makes of it. A negative status (a
    signal, e.g. a C reader's crash) and any status not listed here count as retryable."""

    OK = 0
    """Every source was converted, or was already published."""
    FAILED = 1
    """A slide cannot be converted as it is (unreadable, unsupported, bad arguments): final; the
    worker fails the job at once and quarantines the source."""
    TEMPFAIL = 75
    """sysexits EX_TEMPFAIL: the store failed, the supervisor went away (`--exit-with-stdin`), or
    the failure could not be classified: the worker retries with backoff."""
    SLIDE_BUSY = 69
    """sysexits EX_UNAVAILABLE: the slide's lock is held by another conversion of it
    (`wsi.errors.SlideBusy`), so this one never started: the worker gives the job back for a
    later attempt without counting this one (the other conversion may run for hours; counting
    would fail and quarantine a good slide while it is being converted)."""
    INTERRUPTED = 130
    """Ctrl-C (SIGINT), as shells report it."""


def is_permanent_failure(code: int) -> bool:
    """Whether a conversion that ended with `code` failed for good (the slide's fault), as opposed
    to succeeding (`ExitCode.OK`) or failing in a way worth another attempt."""
    return code == ExitCode.FAILED


# ---------------------------------------------------------------------------------------------
# argv


def add_supervision_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `wsi convert` that only a supervisor uses."""
    parser.add_argument(
        PROGRESS_FD_FLAG,
        type=int,
        metavar="FD",
        help="write progress as JSON lines to this open file descriptor (for supervisors)",
    )
    parser.add_argument(
        EXIT_WITH_STDIN_FLAG,
        action="store_true",
        help="stop when standard input closes (a supervisor holding the pipe has died)",
    )
    parser.add_argument(
        SOURCE_IN_ENV_FLAG,
        action="store_true",
        help=f"the one source is ${SOURCE_ENV}, not an argument (kept out of the process list)",
    )


def sources_of(args: argparse.Namespace, environ: Mapping[str, str]) -> list[str]:
    """The sources a `wsi convert` was given: its arguments, or with `--source-in-env` the
    value of `SOURCE_ENV` (InvalidArgument when it is missing, or arguments are given too)."""
    if not args.source_in_env:
        if not args.sources:
            raise InvalidArgument("give at least one slide to convert")
        return list(args.sources)
    source = environ.get(SOURCE_ENV, "")
    if args.sources or not source:
        raise InvalidArgument(f"{SOURCE_IN_ENV_FLAG}: the one source is ${SOURCE_ENV}, alone")
    return [source]


def source_environment(source: str) -> dict[str, str]:
    """What a supervised conversion's environment adds for `source` (see `convert_command`)."""
    return {SOURCE_ENV: source}


def add_staging_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `wsi convert` that bound an `s3://` source and the spool (`StagingLimits`;
    the defaults are its own)."""
    defaults = StagingLimits()
    helps = {
        "max_objects": "an s3:// source with more objects is refused",
        "max_bytes": "an s3:// source with more bytes is refused",
        "spool_quota": "a download waits while the spool would hold more bytes than this",
    }
    for name, flag in _LIMIT_FLAGS.items():
        parser.add_argument(
            flag,
            dest=f"staging_{name}",
            type=int,
            default=getattr(defaults, name),
            metavar="N",
            help=f"{helps[name]} (default {getattr(defaults, name)})",
        )


def staging_limits(args: argparse.Namespace) -> StagingLimits:
    """The limits a parser set up by `add_staging_arguments` was given."""
    return StagingLimits(**{name: getattr(args, f"staging_{name}") for name in _LIMIT_FLAGS})


def convert_command(
    *,
    store: str,
    progress_fd: int,
    slide_id: str | None = None,
    s3_endpoint: str | None = None,
    spool_dir: str | None = None,
    limits: StagingLimits | None = None,
    deidentify: bool = False,
    keep_label: bool = False,
    keep_macro: bool = False,
    extra: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """The argv of a supervised conversion into `store`: progress on `progress_fd` (which the
    child must inherit), no progress bar, ending with its stdin, de-identified when asked;
    `extra` flags (quality, format, ...) come last. The source (a path or `s3://` URL) is not in
    it: the child's environment adds `source_environment(source)`."""
    cmd = [
        python,
        "-P",  # no unsafe sys.path entry: the service's working folder is not searched
        "-m",
        "wsi.cli",
        "convert",
        SOURCE_IN_ENV_FLAG,
        "--out",
        store,
        "--no-progress",
        PROGRESS_FD_FLAG,
        str(progress_fd),
        EXIT_WITH_STDIN_FLAG,
    ]
    if slide_id:
        cmd += ["--slide-id", slide_id]
    if s3_endpoint:
        cmd += ["--s3-endpoint", s3_endpoint]
    if spool_dir:
        cmd += ["--spool", spool_dir]
    if limits is not None:
        for name, flag in _LIMIT_FLAGS.items():
            cmd += [flag, str(getattr(limits, name))]
    if deidentify:
        cmd.append(DEIDENTIFY_FLAG)
        cmd += [KEEP_LABEL_FLAG] if keep_label else []
        cmd += [KEEP_MACRO_FLAG] if keep_macro else []
    return cmd + list(extra)


# ---------------------------------------------------------------------------------------------
# Progress lines


@dataclass(frozen=True)
class ProgressLine:
    """How far a conversion has come, over all its sources."""

    percent: float
    """0-100."""

    def __post_init__(self) -> None:
        if not (isinstance(self.percent, int | float) and 0.0 <= self.percent <= 100.0):
            raise InvalidArgument(f"progress must be 0-100, not {self.percent!r}")

    def format(self) -> str:
        """The line, with its newline."""
        return json.dumps({"progress": self.percent}) + "\n"

    @classmethod
    def parse(cls, line: str | bytes) -> ProgressLine | None:
        """The progress a line reports; None for anything else (a malformed or partial line, a
        value out of range): the reader skips it rather than fail a conversion over it."""
        try:
            value = json.loads(line)["progress"]
        except (ValueError, TypeError, KeyError, IndexError):
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        value = float(value)
        if not math.isfinite(value) or not 0.0 <= value <= 100.0:
            return None
        return cls(value)


# ---------------------------------------------------------------------------------------------
# Result lines

_ALREADY_PUBLISHED = "already published"
_RATE_UNIT = " MP/s"


@dataclass(frozen=True)
class ResultLine:
    """One slide `wsi convert` published (or found published), as it reports it on stdout."""

    slide_id: str
    url: str
    """Where the slide is published (`wsi.convert.published_location`: its Zarr group below
    `<store>/<slide id>/`, or that folder for a slide published as DICOM only)."""
    megapixels_per_second: float | None
    """Conversion speed (megapixels of level 0 per second, one decimal on the line); None when
    the slide was already published and nothing was converted."""

    def __post_init__(self) -> None:
        check_slide_id(self.slide_id)
        if not self.url or any(c in self.url for c in "\r\n"):
            raise InvalidArgument("a result's url must be one line")
        rate = self.megapixels_per_second
        if rate is not None and not (math.isfinite(rate) and rate >= 0):
            raise InvalidArgument(f"megapixels_per_second must be >= 0, not {rate!r}")

    @property
    def skipped(self) -> bool:
        """Already published: nothing was converted."""
        return self.megapixels_per_second is None

    def format(self) -> str:
        """The line, without its newline."""
        rate = self.megapixels_per_second
        detail = _ALREADY_PUBLISHED if rate is None else f"{rate:.1f}{_RATE_UNIT}"
        return f"{self.slide_id}\t{self.url}\t{detail}"

    @classmethod
    def parse(cls, line: str) -> ResultLine:
        """The result a line reports; InvalidArgument when it is not a result line."""
        slide_id, _, rest = line.rstrip("\r\n").partition("\t")
        url, _, detail = rest.rpartition("\t")  # a path may hold a tab; the id and detail not
        if not url:
            raise InvalidArgument("a result line has three tab-separated fields")
        if detail == _ALREADY_PUBLISHED:
            return cls(slide_id, url, None)
        if not detail.endswith(_RATE_UNIT):
            raise InvalidArgument(f"unknown result detail {detail[:40]!r}")
        try:
            rate = float(detail[: -len(_RATE_UNIT)])
        except ValueError as exc:
            raise InvalidArgument(f"unknown result detail {detail[:40]!r}") from exc
        return cls(slide_id, url, rate)


def parse_results(stdout: str) -> list[ResultLine]:
    """Every result line in a conversion's standard output, in order; other lines (a library that
    printed something, a line cut by the worker's bounded tail) are skipped."""
    results = []
    for line in stdout.splitlines():
        try:
            results.append(ResultLine.parse(line))
        except InvalidArgument:
            continue
    return results


__all__ = [
    "DEIDENTIFY_FLAG",
    "EXIT_WITH_STDIN_FLAG",
    "KEEP_LABEL_FLAG",
    "KEEP_MACRO_FLAG",
    "PROGRESS_FD_FLAG",
    "SOURCE_ENV",
    "SOURCE_IN_ENV_FLAG",
    "ExitCode",
    "ProgressLine",
    "ResultLine",
    "add_staging_arguments",
    "add_supervision_arguments",
    "convert_command",
    "is_permanent_failure",
    "parse_results",
    "source_environment",
    "sources_of",
    "staging_limits",
]
