"""Values we check by pattern are checked whole: slide ids (path segments and object keys),
object keys, the DICOM dates and times of a metadata sidecar and `--dask` addresses refuse a
trailing newline (a `$`-anchored `match` took "id\\n" as valid, and a newline in a slide id
broke `wsi list`'s one-line-per-slide output and a result's URL)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from wsi.errors import InvalidArgument
from wsi.metadata import SlideMetadata
from wsi.published.layout import check_slide_id
from wsi.pyramid.cluster import check_address
from wsi.store.objects import check_key

CHECKS: list[tuple[str, Callable[[str], Any], str]] = [
    ("slide id", check_slide_id, "a1b2c3"),
    ("object key", check_key, "a1b2c3/slide.zarr/0/c/0/0/0"),
    ("study date", lambda v: SlideMetadata(study_date=v), "20240131"),
    ("birth date", lambda v: SlideMetadata(patient_birth_date=v), "19700101"),
    ("study time", lambda v: SlideMetadata(study_time=v), "120000"),
    ("dask address", check_address, "local:2"),
]


@pytest.mark.parametrize("what,check,good", CHECKS, ids=[c[0] for c in CHECKS])
def test_a_value_is_checked_whole(what: str, check: Callable[[str], Any], good: str) -> None:
    check(good)
    for bad in (good + "\n", good + "\r\n", "\n" + good, good + "\n" + good):
        with pytest.raises(InvalidArgument):
            check(bad)
