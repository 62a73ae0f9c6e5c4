"""The access audit log: who read which slide, for the hospital's "who opened this slide?".

With auth on (and `--audit-log FILE` / `WSI_AUDIT_LOG`), every request that names a slide, and
every DICOMweb request (which names slides by their DICOM UIDs, or searches them), is one JSON
line: time (UTC, ISO 8601), principal (a token's *name*, or `signed:<scope>` for a signed URL;
never a secret), the slide id (`slide_id`), or for a DICOMweb request the ids of the slides it
answered with (`slide_id` when one, else `slide_ids`: none or several, e.g. a search), method,
route template (never the query string: a search's may hold a patient's name), status and the
client address. No patient data: slide ids are opaque, a path segment that is no slide id is
recorded as null (it is what the client typed), and file names never appear. Lines are
handed to a writer thread through a bounded queue, so the event loop never waits for the disk;
when the disk cannot keep up, lines are counted as dropped (shown in `/metrics`) rather than
slowing tile responses down.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Iterable
from typing import IO, Any

from aiohttp import web

from wsi.errors import InvalidArgument
from wsi.store.objects import FILE_MODE, check_slide_id

PRINCIPAL = web.RequestKey("principal", str)
"""Who a request was admitted as (set by `server.auth.admission`)."""
SLIDES_READ = web.RequestKey("slides_read", list)
"""Ids of the slides a request answered with, where its path does not name one (DICOMweb)."""


def note_read(request: web.Request, slide_ids: Iterable[str]) -> None:
    """Record that the request answers with these slides' data (see `SLIDES_READ`), when the
    access is audited (nothing else reads it: a frame request pays one look-up, not the
    KeyError that `AUDIT in app` raises and catches when it is not)."""
    if not request.app[AUDITED]:
        return
    read = request.get(SLIDES_READ)
    if read is None:
        read = request[SLIDES_READ] = []
    read.extend(s for s in slide_ids if s not in read)


def _is_slide_id(text: str) -> bool:
    """Whether `text` has the form of a slide id (`check_slide_id`)."""
    try:
        check_slide_id(text)
    except InvalidArgument:
        return False
    return True


QUEUE_LINES = 10_000
"""Lines waiting for the writer at most (a few MB): beyond that they are dropped and counted."""


def open_for_append(path: str) -> int:
    """A descriptor appending to the audit log `path`, made `FILE_MODE` if new.
    InvalidArgument naming the path when it cannot be (a folder that does not exist, a folder
    given for the file, no right to write): the service's start used to end in a traceback of
    each serving process, after the line that said it served."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise InvalidArgument(f"audit log {path}: {exc.strerror or exc}") from exc


class AuditLog:
    """Append-only JSON lines, written by one thread."""

    def __init__(self, path: str) -> None:
        fd = open_for_append(path)
        self._file: IO[str] = os.fdopen(fd, "a", encoding="utf-8")
        self._queue: queue.Queue[str | None] = queue.Queue(QUEUE_LINES)
        self.dropped = 0
        self.written = 0
        self._thread = threading.Thread(target=self._write, name="wsi-audit", daemon=True)
        self._thread.start()

    def record(self, request: web.Request, status: int) -> None:
        """Queue one line for a request that names a slide, by its id or by a DICOM study UID,
        or that `note_read` says answered with slides (no-op otherwise)."""
        slide_id = request.match_info.get("slide_id")
        read = request.get(SLIDES_READ)
        if slide_id is None and read is None and "study" not in request.match_info:
            return
        slides: dict[str, Any]
        if slide_id is not None:
            # Only an id that could name a slide: the path's segment is whatever the client
            # typed (a patient's name searched for in the address bar), refused with a 400.
            slides = {"slide_id": slide_id if _is_slide_id(slide_id) else None}
        elif read is not None and len(read) == 1:
            slides = {"slide_id": read[0]}
        else:
            slides = {"slide_ids": read or []}
        route = request.match_info.route.resource
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "principal": request.get(PRINCIPAL, "anonymous"),
            **slides,
            "method": request.method,
            "route": route.canonical if route is not None else request.path,
            "status": status,
            "remote": request.remote,
        }
        try:
            self._queue.put_nowait(json.dumps(entry, separators=(",", ":")))
        except queue.Full:
            self.dropped += 1

    def _write(self) -> None:
        while True:
            line = self._queue.get()
            if line is None:
                break
            self._file.write(line + "\n")
            self.written += 1
            if self._queue.empty():
                self._file.flush()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        self._queue.put(None)
        self._thread.join(30)


AUDIT = web.AppKey("audit", AuditLog)
"""The access audit log, when auth is on and `audit_log` is set."""
AUDITED = web.AppKey("audited", bool)
"""Whether the app keeps an audit log (set when it is made; `AUDIT` only once it runs)."""
