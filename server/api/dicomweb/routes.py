"""DICOMweb (PS3.18) over the DICOM view of published slides, under `/dicomweb`.

Every stored level object is a DICOM VL Whole Slide Microscopy instance (JPEG baseline, frames
= the Zarr chunks; TILED_FULL, or TILED_SPARSE when blank-glass tiles were left out: then the
frames are the stored tiles, each placed by the per-frame functional groups of its header), so
this module serves what is stored and decodes only for the rendered resources and for
uncompressed frames:

- QIDO-RS: `/studies`, `/series`, `/instances`, `/studies/{s}/series`, `/studies/{s}/instances`,
  `/studies/{s}/series/{se}/instances`; application/dicom+json. Matching on any attribute of
  the instance headers by keyword or tag: UID lists (`,` or `\\`, repeated keys are a union),
  `*`/`?` wildcards (PatientName case-insensitive with `fuzzymatching=true`), date/time ranges;
  `limit`, `offset`, `includefield` (keywords, tags or `all`; unknown values are ignored).
  Queries above the instance level match relationally (a series matches when one of its
  instances does). Unknown query keys are a 400.
- WADO-RS metadata of a study, series or instance: the stored header as DICOM JSON (pixel data
  and the trailing shard index left out, bulk data such as the ICC profile inline).
- WADO-RS frames `.../frames/1,2,3` as `multipart/related; type="image/jpeg"` with the stored
  JPEG bytes. `type="application/octet-stream"` with `transfer-syntax=*` also gets the stored
  JPEG bytes; without a transfer syntax (or with Explicit VR Little Endian) the frames are
  decoded to interleaved RGB (8 bits, PhotometricInterpretation RGB whatever the header says
  of the JPEG stream) within the render pixel budget; any other transfer syntax is a 406.
- WADO-RS retrieval of a study, series or instance as `multipart/related;
  type="application/dicom"`: the stored objects as they are (JPEG baseline; an explicitly
  requested other transfer syntax is a 406, no transcoding).
- Rendered (`.../rendered`, `.../frames/{n}/rendered`) and thumbnails (study, series, instance,
  frame) as JPEG or PNG, with `viewport=w,h` and `quality`, within the render pixel budget.
- STOW-RS (`POST /studies[/{study}]`): instances sent by a scanner or a PACS, into the first
  watch folder for ingest (`server.api.dicomweb.stow`).

One study and one series per slide (UIDs from the slide's DICOM view). Label and overview
instances show up only when the service allows label images. UIDs in paths and queries are
checked (digits and dots, at most 64 characters) before any lookup.

The handlers live in the `server.dicomweb` package, by concern; this module registers them.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from server.api.dicomweb.instances import DICOM_JSON, DICOMWEB, PREFIX, DicomWebState
from server.api.dicomweb.instances import HEADER_READ as HEADER_READ
from server.api.dicomweb.instances import parse_header as parse_header
from server.api.dicomweb.qido import search
from server.api.dicomweb.rendered import rendered, series_thumbnail
from server.api.dicomweb.series_index import SERIES_INDEX, SeriesIndex, series_records
from server.api.dicomweb.stow import store_instances
from server.api.dicomweb.wado import frame_later, frame_now, frames, metadata, retrieve
from server.catalog import Catalog
from server.front import routes
from server.keys import WARM_UP
from server.openapi import ERROR, path_params

STUDY = f"{PREFIX}/studies/{{study}}"
SERIES = f"{STUDY}/series/{{series}}"
INSTANCE = f"{SERIES}/instances/{{instance}}"
FRAMES = f"{INSTANCE}/frames/{{frames}}"


async def warm_series_index(app: web.Application) -> None:
    await series_records(app)


def register(app: web.Application) -> None:
    # HEADER_READ is read here, at registration, so it can be tuned on this module.
    state = app[DICOMWEB] = DicomWebState(header_read=HEADER_READ)
    app[SERIES_INDEX] = SeriesIndex()

    async def studies(catalog: Catalog) -> dict[str, list[str]]:
        """Study UID -> slide ids, from the series index: a study-scoped path naming a study
        this process has not seen opened every slide of the store (at most every 2 s, for any
        UID a client makes up)."""
        found: dict[str, list[str]] = {}
        for r in await series_records(app):
            found.setdefault(r.study_uid, []).append(r.slide_id)
        return found

    state.study_index = studies
    app[WARM_UP].append(warm_series_index)
    add = routes(app).add_get
    # Frames first: the router tries the routes under `/dicomweb/studies` in this order, and a
    # viewer asks for frames far more often than for anything else (no two routes here match
    # the same path, so the order changes nothing else).
    add(FRAMES, frames, express=frame_now, later=frame_later)
    add(f"{PREFIX}/studies", search("studies"))
    add(f"{PREFIX}/series", search("series"))
    add(f"{PREFIX}/instances", search("instances"))
    add(STUDY, retrieve)
    add(f"{STUDY}/metadata", metadata)
    add(f"{STUDY}/series", search("series"))
    add(f"{STUDY}/instances", search("instances"))
    add(f"{STUDY}/thumbnail", series_thumbnail)
    add(SERIES, retrieve)
    add(f"{SERIES}/metadata", metadata)
    add(f"{SERIES}/instances", search("instances"))
    add(f"{SERIES}/thumbnail", series_thumbnail)
    routes(app).add_post(f"{PREFIX}/studies", store_instances)
    routes(app).add_post(STUDY, store_instances)
    add(INSTANCE, retrieve)
    add(f"{INSTANCE}/metadata", metadata)
    add(f"{INSTANCE}/rendered", rendered)
    add(f"{INSTANCE}/thumbnail", rendered)
    add(f"{FRAMES}/rendered", rendered)
    add(f"{FRAMES}/thumbnail", rendered)


def _op(summary: str, params: tuple[str, ...], ok: str, query: bool = False) -> dict[str, Any]:
    parameters = path_params(*params)
    if query:
        parameters += [
            {"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
            for n in ("limit", "offset", "includefield", "fuzzymatching")
        ]
    return {
        "get": {
            "summary": summary,
            "tags": ["DICOMweb"],
            "parameters": parameters,
            "responses": {
                "200": {"description": ok},
                "400": ERROR,
                "404": ERROR,
                "406": ERROR,
            },
        }
    }


_S, _SE, _I = ("study",), ("study", "series"), ("study", "series", "instance")
OPENAPI = {
    f"{PREFIX}/studies": _op(
        "QIDO-RS: search studies (any attribute keyword or tag as a query key)",
        (),
        DICOM_JSON,
        True,
    ),
    f"{PREFIX}/series": _op("QIDO-RS: search series", (), DICOM_JSON, True),
    f"{PREFIX}/instances": _op("QIDO-RS: search instances", (), DICOM_JSON, True),
    STUDY: _op("WADO-RS: the study's instances", _S, 'multipart/related; type="application/dicom"'),
    f"{STUDY}/metadata": _op("WADO-RS: metadata of the study's instances", _S, DICOM_JSON),
    f"{STUDY}/series": _op("QIDO-RS: search the study's series", _S, DICOM_JSON, True),
    f"{STUDY}/instances": _op("QIDO-RS: search the study's instances", _S, DICOM_JSON, True),
    f"{STUDY}/thumbnail": _op("Thumbnail of the study", _S, "image/jpeg or image/png"),
    SERIES: _op(
        "WADO-RS: the series' instances", _SE, 'multipart/related; type="application/dicom"'
    ),
    f"{SERIES}/metadata": _op("WADO-RS: metadata of the series' instances", _SE, DICOM_JSON),
    f"{SERIES}/instances": _op("QIDO-RS: search the series' instances", _SE, DICOM_JSON, True),
    f"{SERIES}/thumbnail": _op("Thumbnail of the series", _SE, "image/jpeg or image/png"),
    INSTANCE: _op(
        "WADO-RS: the stored instance (Part 10, JPEG baseline)",
        _I,
        'multipart/related; type="application/dicom"',
    ),
    f"{INSTANCE}/metadata": _op("WADO-RS: metadata of one instance", _I, DICOM_JSON),
    f"{INSTANCE}/rendered": _op(
        "Rendered instance (viewport=w,h, quality), within the pixel budget",
        _I,
        "image/jpeg or image/png",
    ),
    f"{INSTANCE}/thumbnail": _op("Thumbnail of one instance", _I, "image/jpeg or image/png"),
    FRAMES: _op(
        "WADO-RS: frames (1-based, comma-separated) as stored JPEG, or decoded RGB",
        (*_I, "frames"),
        'multipart/related; type="image/jpeg" or type="application/octet-stream"',
    ),
    f"{FRAMES}/rendered": _op("Rendered frame", (*_I, "frames"), "image/jpeg or image/png"),
    f"{FRAMES}/thumbnail": _op("Thumbnail of a frame", (*_I, "frames"), "image/jpeg or image/png"),
}


def _stow(params: tuple[str, ...]) -> dict[str, Any]:
    return {
        "summary": "STOW-RS: store whole-slide instances into the first watch folder, for ingest",
        "tags": ["DICOMweb"],
        "parameters": path_params(*params),
        "requestBody": {
            "required": True,
            "content": {'multipart/related; type="application/dicom"': {"schema": {}}},
        },
        "responses": {
            "200": {"description": f"every instance kept ({DICOM_JSON} store response)"},
            "202": {"description": "some instances kept, the others failed"},
            "400": ERROR,
            "404": ERROR,
            "409": {"description": "no instance kept"},
            "415": ERROR,
        },
    }


OPENAPI[f"{PREFIX}/studies"]["post"] = _stow(())
OPENAPI[STUDY]["post"] = _stow(_S)
