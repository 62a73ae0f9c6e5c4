"""Library errors -> HTTP statuses: the one place where the two meet. The front (`server.front`)
answers with this table; the OpenAPI document declares its statuses on every operation."""

from __future__ import annotations

from wsi.errors import (
    AssociatedImageRefused,
    CorruptSlide,
    EncodedTileUnavailable,
    InvalidArgument,
    SlideIncomplete,
    SlideNotFound,
    StoreError,
    UnsupportedSlide,
    WsiError,
)
from wsi.ingest.queue import JobNotFound

STATUS: list[tuple[type[Exception], int]] = [
    (SlideNotFound, 404),
    (JobNotFound, 404),
    (EncodedTileUnavailable, 404),
    (AssociatedImageRefused, 403),
    (InvalidArgument, 400),
    (UnsupportedSlide, 415),
    (CorruptSlide, 422),
    (StoreError, 503),
    (SlideIncomplete, 503),
    (WsiError, 500),
]
"""First match wins (subclasses before their bases)."""

ERROR_STATUSES: tuple[int, ...] = (400, 401, 403, 404, 415, 422, 503)
"""What any operation may answer besides its own successes: the table's client errors, 401
without credentials when auth is on, and 503 while the store is unreachable. A 500 is a bug."""


def status_of(exc: WsiError) -> int:
    return next(code for kind, code in STATUS if isinstance(exc, kind))
