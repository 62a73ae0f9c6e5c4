"""STOW-RS (PS3.18 10.5): whole-slide instances a scanner or a PACS sends, dropped into the first
watch folder as a DICOM series folder, which ingest converts as it converts a scanner's drop.

`POST /dicomweb/studies` (or `/dicomweb/studies/{study}`) with `multipart/related;
type="application/dicom"`: each part is streamed, `CHUNK` bytes at a time, to a hidden file in
the series' folder (never held in memory; hidden names are never a slide, and one in a series
folder tells the watcher the series is still arriving), its header checked (a Part 10 file of a
VL Whole Slide Microscopy Image, of the study the URL names, UIDs well formed) and renamed to
`<watch>/stow-<SeriesInstanceUID>/<SOPInstanceUID>.dcm`: names made of UIDs, never of a
patient's name. An instance sent again with the same bytes is stored already; with other bytes
it fails (Duplicate SOP Instance). The watcher takes the series once it has been quiet, as any
drop; instances sent after its job was made are a job of their own (ingest's rule for a series
that grows).

The answer is the PS3.18 store response (DICOM JSON): ReferencedSOPSequence for the instances
kept, FailedSOPSequence with a PS3.4 reason for the others; 200 when all were kept, 202 when
some failed, 409 when none was kept. No RetrieveURL: an instance is retrievable from the store
only once converted, under the UIDs of the converted slide. Only with a watch folder (404
otherwise, JSON), and like every write it needs a token that may change things.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.helpers import parse_mimetype

from server.api.dicomweb.instances import DICOM_JSON, UID_PATTERN
from server.keys import SETTINGS
from server.responses import dumps
from wsi.errors import InvalidArgument
from wsi.ingest.source_files import RECEIVING_PREFIX
from wsi.store.objects import FILE_MODE, fsync_dir, make_dirs

VL_WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"
"""VL Whole Slide Microscopy Image Storage: the only SOP class stored."""
CHUNK = 256 * 1024
"""Bytes of a part read and written at a time."""
FOLDER_PREFIX = "stow-"
"""A stored series' folder in the watch folder: `stow-<SeriesInstanceUID>`."""
HEADER_LIMIT = 64 * 1024 * 1024
"""Most bytes of an instance read to find its header (pydicom stops before the pixels)."""

# PS3.4 Annex GG / PS3.18 failure reasons.
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122
DUPLICATE_SOP_INSTANCE = 0x0111
DOES_NOT_MATCH = 0xA900
OUT_OF_RESOURCES = 0xA700


@dataclass(frozen=True)
class _Outcome:
    sop_class: str
    sop_instance: str
    failure: int | None = None


class _Refused(Exception):
    """One part not kept, and why (a PS3.4 failure reason)."""

    def __init__(self, reason: int, sop_class: str = "", sop_instance: str = "") -> None:
        super().__init__(reason)
        self.reason, self.sop_class, self.sop_instance = reason, sop_class, sop_instance


def _uid(value: object) -> str:
    text = str(value or "")
    if len(text) > 64 or not UID_PATTERN.fullmatch(text):
        raise _Refused(CANNOT_UNDERSTAND)
    return text


def _place(temporary: Path, watch: Path, study: str | None) -> _Outcome:
    """Check the instance written to `temporary` and move it to its series' folder (blocking).
    `temporary` is gone when this returns or raises."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        try:
            ds = pydicom.dcmread(temporary, stop_before_pixels=True, defer_size=1024)
        except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError) as exc:
            raise _Refused(CANNOT_UNDERSTAND) from exc
        sop_class = str(ds.get("SOPClassUID", ""))
        sop_instance = str(ds.get("SOPInstanceUID", ""))
        try:
            sop_class, sop_instance = _uid(sop_class), _uid(sop_instance)
            series = _uid(ds.get("SeriesInstanceUID"))
            in_study = _uid(ds.get("StudyInstanceUID"))
        except _Refused as refused:
            raise _Refused(CANNOT_UNDERSTAND, sop_class, sop_instance) from refused
        if sop_class != VL_WSI:
            raise _Refused(SOP_CLASS_NOT_SUPPORTED, sop_class, sop_instance)
        if study is not None and in_study != study:
            raise _Refused(DOES_NOT_MATCH, sop_class, sop_instance)
        folder = watch / f"{FOLDER_PREFIX}{series}"
        final = folder / f"{sop_instance}.dcm"
        try:
            make_dirs(str(folder))
            moved = folder / f"{RECEIVING_PREFIX}{secrets.token_hex(8)}"
            os.rename(temporary, moved)  # in the series' folder: the watcher waits for it
            temporary = moved
            try:
                os.link(temporary, final)  # never over an instance already there
            except FileExistsError:
                if not _same_bytes(temporary, final):
                    raise _Refused(DUPLICATE_SOP_INSTANCE, sop_class, sop_instance) from None
            fsync_dir(str(folder))
        except OSError as exc:  # a full disk, a folder we may not write in
            raise _Refused(OUT_OF_RESOURCES, sop_class, sop_instance) from exc
        return _Outcome(sop_class, sop_instance)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        with contextlib.suppress(OSError):
            fsync_dir(str(temporary.parent))


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(CHUNK), fb.read(CHUNK)
            if x != y:
                return False
            if not x:
                return True


async def _receive(part: BodyPartReader, watch: Path, budget: list[int]) -> Path:
    """The part written to a new hidden file in `watch` (fsynced), within `budget[0]` bytes
    left for the request (decreased): _Refused(OUT_OF_RESOURCES) past it."""
    temporary = watch / f"{RECEIVING_PREFIX}{secrets.token_hex(8)}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := await part.read_chunk(CHUNK):
                budget[0] -= len(chunk)
                if budget[0] < 0:
                    raise _Refused(OUT_OF_RESOURCES)
                await asyncio.to_thread(out.write, chunk)
            await asyncio.to_thread(os.fsync, out.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def _store_response(outcomes: list[_Outcome]) -> dict[str, Any]:
    def item(o: _Outcome) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if o.sop_class:
            doc["00081150"] = {"vr": "UI", "Value": [o.sop_class]}
        if o.sop_instance:
            doc["00081155"] = {"vr": "UI", "Value": [o.sop_instance]}
        if o.failure is not None:
            doc["00081197"] = {"vr": "US", "Value": [o.failure]}
        return doc

    kept = [item(o) for o in outcomes if o.failure is None]
    failed = [item(o) for o in outcomes if o.failure is not None]
    doc: dict[str, Any] = {}
    if failed:
        doc["00081198"] = {"vr": "SQ", "Value": failed}
    if kept:
        doc["00081199"] = {"vr": "SQ", "Value": kept}
    return doc


async def store_instances(request: web.Request) -> web.Response:
    """STOW-RS: see the module's docstring."""
    settings = request.app[SETTINGS]
    if not settings.watch:
        raise web.HTTPNotFound(
            reason="STOW-RS stores into the watch folder, for ingest: start with --watch"
        )
    study = request.match_info.get("study")
    if study is not None and (len(study) > 64 or not UID_PATTERN.fullmatch(study)):
        raise InvalidArgument("StudyInstanceUID must be digits and dots, at most 64 characters")
    mime = parse_mimetype(request.headers.get("Content-Type", ""))
    given = (mime.type, mime.subtype, mime.parameters.get("type", "").lower())
    if given != ("multipart", "related", "application/dicom"):
        raise web.HTTPUnsupportedMediaType(
            reason='STOW-RS takes multipart/related; type="application/dicom"'
        )
    watch = Path(settings.watch[0])
    budget = [settings.ingest.max_source_bytes]
    outcomes: list[_Outcome] = []
    reader = MultipartReader(request.headers, request.content)
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise InvalidArgument("STOW-RS parts must not be multipart themselves")
            try:
                try:
                    temporary = await _receive(part, watch, budget)
                except OSError as exc:  # the watch folder full, or not ours to write in
                    raise _Refused(OUT_OF_RESOURCES) from exc
                outcomes.append(await asyncio.to_thread(_place, temporary, watch, study))
            except _Refused as refused:
                outcomes.append(_Outcome(refused.sop_class, refused.sop_instance, refused.reason))
                if refused.reason == OUT_OF_RESOURCES:
                    break
    except ValueError as exc:  # a body that is not the multipart it says it is
        raise InvalidArgument(f"STOW-RS body is not multipart/related: {exc}") from exc
    if not outcomes:
        raise InvalidArgument("STOW-RS request holds no instance")
    kept = sum(o.failure is None for o in outcomes)
    status = 200 if kept == len(outcomes) else 202 if kept else 409
    # No charset parameter: clients compare the media type as a whole (dicomweb-client does).
    body = dumps(_store_response(outcomes)).encode()
    return web.Response(status=status, body=body, content_type=DICOM_JSON)
