"""What ingest may show and write about a slide when it de-identifies.

A slide's file name is often its patient's name (scanners and labs name files and folders after
the case). With `IngestSettings.deidentify`, everything ingest shows or writes about a job beside
the job table and the slide's own files (the job list of `GET /jobs`, its errors and warnings,
`REASON.txt` in quarantine, the converter's error lines) names the slide by an opaque reference
(`reference`: its content id, which no name can be read back from), and every name its files go
by is replaced by that reference (`redact`). The converter run with `--deidentify` is given the
slide id and writes its errors the same way.

The job table itself keeps the path: workers need it to read, move and quarantine the slide. It
lies in the private state folder (`IngestSettings.make_state`), beside nothing that is served.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from wsi.ingest.queue import Job
from wsi.ingest.staging import is_remote
from wsi.model import readable
from wsi.slidefiles import slide_parts

MIN_NAME = 3
"""Names shorter than this are not replaced: a one- or two-letter name is no patient's, and
replacing it would garble every message."""


def reference(slide_id: str | None, job_id: str | None = None) -> str:
    """The opaque reference a de-identifying ingest names a slide by."""
    if slide_id:
        return f"slide {slide_id}"
    return f"job {job_id}" if job_id else "the slide"


def source_names(source: str, files: Iterable[str] = ()) -> list[str]:
    """Every spelling of a source's names that a message may quote: the path or URL itself, and
    for it and each of its `files` (and, for a local slide, each of its parts: companion folder,
    listed files, sidecar), the full path, the name, the stem and the folder's name, each also
    as `readable` makes it."""
    paths = [source, *files]
    if source and not is_remote(source):
        with contextlib.suppress(OSError):  # gone: its path, name and stem still count
            paths += [str(p) for p in slide_parts(Path(source))]
    names: set[str] = set()
    for path in paths:
        if not path:
            continue
        names.add(path)
        pure = PurePosixPath(path[len("s3://") :] if is_remote(path) else path.rstrip("/"))
        names.update((str(pure), pure.name, pure.stem, pure.parent.name))
    # A name that is not UTF-8 is quoted by stored messages as `readable` makes it.
    names |= {readable(n) for n in names}
    return sorted((n for n in names if len(n) >= MIN_NAME), key=len, reverse=True)


def redact(text: str, names: Iterable[str], ref: str) -> str:
    """`text` with every one of `names` replaced by `ref`, the longest first (a full path goes
    before the file name it ends with)."""
    for name in sorted(set(names), key=len, reverse=True):
        if len(name) >= MIN_NAME:
            text = text.replace(name, ref)
    return text


def job_view(job: Job, deidentify: bool) -> dict[str, Any]:
    """The job as the REST API shows it (`Job.to_dict`); de-identified, its source and files
    are the job's reference and its error and warning are redacted."""
    shown = job.to_dict()
    if not deidentify:
        return shown
    ref = reference(job.slide_id, job.id)
    names = source_names(job.source, [f.path for f in job.files])
    shown["source"] = ref
    shown["files"] = [f"{ref}, file {i + 1}" for i in range(len(job.files))]
    for key in ("error", "warning"):
        if isinstance(shown.get(key), str):
            shown[key] = redact(shown[key], names, ref)
    return shown


__all__ = ["MIN_NAME", "job_view", "redact", "reference", "source_names"]
