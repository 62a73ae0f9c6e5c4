"""The stored JSON documents (manifest, zarr.json): the one byte form they are written in, and
the checked reading of their fields, which refuses what is not ours as CorruptSlide."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from wsi.errors import CorruptSlide


def dump_json(doc: Mapping[str, Any]) -> bytes:
    """Every JSON document we store: sorted keys, so the same slide gives the same bytes."""
    return json.dumps(dict(doc), indent=1, sort_keys=True).encode()


def load_json(data: bytes, what: str) -> dict[str, Any]:
    """A stored JSON document (CorruptSlide when it is not a JSON object)."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise CorruptSlide(f"{what} is not valid JSON") from exc
    if not isinstance(doc, dict):
        raise CorruptSlide(f"{what} is not a JSON object")
    return doc


def required_field(
    doc: Mapping[str, Any], name: str, kind: type | tuple[type, ...], what: str
) -> Any:
    """A required field of a stored JSON document, type-checked (CorruptSlide otherwise)."""
    if name not in doc:
        raise CorruptSlide(f"{what}: field {name!r} is missing")
    value = doc[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
        raise CorruptSlide(f"{what}: field {name!r} has the wrong type")
    return value


def optional_field(
    doc: Mapping[str, Any], name: str, kind: type | tuple[type, ...], what: str
) -> Any:
    """An optional field of a stored JSON document: None when absent or null, else type-checked
    as `required_field` checks it."""
    return None if doc.get(name) is None else required_field(doc, name, kind, what)
