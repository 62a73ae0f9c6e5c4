"""What a `wsi` process writes on stderr: its own warnings and errors, the ingest roles' progress,
never what the reader libraries log (their messages quote file names and header values, which may
name a patient). Set up once per process by the command line (`wsi.cli.main`) and by each serving
process (`server.processes`).
"""

from __future__ import annotations

import logging
import warnings

READER_LOGGERS = frozenset({"tifffile", "wsidicom", "pydicom", "PIL", "imagecodecs", "openslide"})
"""Libraries that log about the files they read."""


class _NoReaderChatter(logging.Filter):
    """Drops what reader libraries log (tifffile's tag warnings, wsidicom's "Failed to open file
    <path>", through the root logger): not the user's business, a command's failure is its one
    `wsi: error:` line, and the messages quote file names and header values, which may name a
    patient. Our own loggers and the runtime's (asyncio, aiohttp) go on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != "root" and record.name.split(".")[0] not in READER_LOGGERS


_QUIET = _NoReaderChatter()


STAMPED = logging.Formatter("%(asctime)s wsistore: %(message)s")
"""A line of an unattended process's log: when, and whose (the service's own INFO lines)."""
STAMPED_WARNINGS = logging.Formatter("%(asctime)s wsistore: %(levelname)s: %(message)s")
"""Its warnings and errors, said to be such."""


def quiet_readers(stamped: bool = False) -> None:
    """A process's stderr without the reader libraries' warnings (Python's and their logging),
    everything else as Python's last-resort handler prints it (WARNING and up, the message);
    `stamped`, for a process that runs unattended (the service, `wsi watch`, `wsi worker`),
    with the time and level: its warnings were the only lines of its log without a time."""
    warnings.simplefilter("ignore")
    root = logging.getLogger()
    if any(_QUIET in h.filters for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)
    handler.addFilter(_QUIET)
    if stamped:
        handler.setFormatter(STAMPED_WARNINGS)
    root.addHandler(handler)


class _BelowWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def report_ingest() -> None:
    """The ingest roles' progress on stderr, a timed line each: a job queued, converting,
    published, failed; a watch folder taken or lost: what an unattended service's log must
    show. Jobs and slides are named by their ids, never by a file name, which may name a
    patient. Warnings and errors are `quiet_readers`' (this handler takes only what is below
    them, so nothing is printed twice)."""
    logger = logging.getLogger("wsi.ingest")
    if any(isinstance(f, _BelowWarnings) for h in logger.handlers for f in h.filters):
        return
    handler = logging.StreamHandler()
    handler.addFilter(_BelowWarnings())
    handler.setFormatter(STAMPED)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
