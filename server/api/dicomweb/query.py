"""QIDO-RS queries: the query string parsed into filters, and rows matched against them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiohttp import web
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from server.api.dicomweb.instances import Instance, check_uid
from server.api.dicomweb.series_index import IndexedSeries, header_values
from server.url_numbers import url_int
from wsi.errors import InvalidArgument

IGNORED_QUERY_KEYS = {"exp", "sig"}
"""Signed-URL parameters: authentication, not part of a query."""


@dataclass(frozen=True)
class Filter:
    keyword: str
    vr: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Query:
    filters: tuple[Filter, ...]
    includes: frozenset[str]
    include_all: bool
    limit: int | None
    offset: int
    fuzzy: bool


def attribute_keyword(name: str) -> str | None:
    """A DICOM keyword from a keyword or an 8-digit hex tag; None if it is neither."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        keyword = keyword_for_tag(int(name, 16))
        return keyword or None
    return name if tag_for_keyword(name) is not None else None


def parse_query(request: web.Request) -> Query:
    grouped: dict[str, list[str]] = {}
    includes: set[str] = set()
    include_all = False
    limit: int | None = None
    offset = 0
    fuzzy = False
    for name, value in request.query.items():
        if name in IGNORED_QUERY_KEYS:
            continue
        if name == "includefield":
            for item in value.split(","):
                item = item.strip()
                if item == "all":
                    include_all = True
                elif (keyword := attribute_keyword(item)) is not None:
                    includes.add(keyword)
            continue
        if name == "limit":
            limit = url_int(value, "limit")
            if limit == 0:
                raise InvalidArgument("limit must be at least 1")
            continue
        if name == "offset":
            offset = url_int(value, "offset")
            continue
        if name == "fuzzymatching":
            if value not in ("true", "false"):
                raise InvalidArgument("fuzzymatching must be true or false")
            fuzzy = value == "true"
            continue
        keyword = attribute_keyword(name)
        if keyword is None:
            raise InvalidArgument(f"unknown query parameter {name!r}")
        if len(value) > 1024:
            raise InvalidArgument(f"{keyword} value too long")
        grouped.setdefault(keyword, []).append(value)
    filters = []
    for keyword, values in grouped.items():
        vr = dictionary_VR(keyword)
        if vr == "SQ":
            raise InvalidArgument(f"matching on sequence {keyword} is not supported")
        if vr == "UI":
            uids = [u for v in values for u in re.split(r"[,\\]", v) if u]
            for uid in uids:
                check_uid(uid, keyword)
            if not uids:  # universal match
                continue
            filters.append(Filter(keyword, vr, tuple(uids)))
        else:
            if len(values) > 1:
                raise InvalidArgument(f"{keyword} given more than once")
            if values[0] in ("", "*"):
                continue
            if vr in ("DA", "TM", "DT"):
                check_range(values[0], keyword)
            elif len(values[0]) > MAX_PATTERN and ("*" in values[0] or "?" in values[0]):
                raise InvalidArgument(f"{keyword} pattern longer than {MAX_PATTERN} characters")
            filters.append(Filter(keyword, vr, (values[0],)))
    return Query(tuple(filters), frozenset(includes), include_all, limit, offset, fuzzy)


def check_range(value: str, keyword: str) -> None:
    for bound in value.split("-", 1) if "-" in value else [value]:
        if bound and not re.fullmatch(r"[0-9]{2,14}(\.[0-9]{1,6})?", bound):
            raise InvalidArgument(f"{keyword} must be a date/time or a range of them")
    if value == "-":
        raise InvalidArgument(f"{keyword} range needs at least one bound")


MAX_PATTERN = 256
"""Longest wildcard pattern accepted (characters): DICOM values that take wildcards (PN, LO, SH,
CS, ...) are at most 64 characters per component, so longer patterns can only be hostile."""


def wildcard(pattern: str, value: str, fold: bool) -> bool:
    """DICOM wildcard matching (PS3.4 C.2.2.2.4: `*` any run, `?` one character), in at most
    len(pattern) x len(value) steps and no backtracking: the pattern is cut at its stars; the
    first piece must start the value, the last must end it, and each middle piece is taken at its
    leftmost place after the previous one (any later place leaves less room for the rest, so
    leftmost is never wrong). A regex `.*` translation backtracks exponentially on `***...*Z`."""
    if fold:
        pattern, value = pattern.casefold(), value.casefold()
    pieces = pattern.split("*")
    if len(pieces) == 1:
        return len(pattern) == len(value) and _piece_at(pattern, value, 0)
    first, *middle, last = pieces
    end = len(value) - len(last)
    if len(first) > end or not _piece_at(first, value, 0) or not _piece_at(last, value, end):
        return False
    at = len(first)
    for piece in middle:
        if piece:
            found = _find_piece(piece, value, at, end)
            if found < 0:
                return False
            at = found + len(piece)
    return True


def _piece_at(piece: str, value: str, at: int) -> bool:
    """`piece` (literal characters and `?`) matches `value` starting at `at`."""
    if at < 0 or at + len(piece) > len(value):
        return False
    return all(p in ("?", v) for p, v in zip(piece, value[at : at + len(piece)], strict=True))


def _find_piece(piece: str, value: str, start: int, end: int) -> int:
    """Leftmost place of `piece` inside value[start:end], or -1."""
    if "?" not in piece:
        return value.find(piece, start, end)
    for at in range(start, end - len(piece) + 1):
        if _piece_at(piece, value, at):
            return at
    return -1


_NAME_SEPARATORS = re.compile(r"[\^= ]")
"""What separates a person name's parts: components (`^`), groups (`=`), and the spaces inside
a component ("VAN DER BERG")."""


def fuzzy_name(term: str, value: str) -> bool:
    """Fuzzy semantic matching of a person name (`fuzzymatching=true`; PS3.18 leaves its rules to
    the server), case folded. A term with wildcards is matched as a pattern. A bare term is what
    a user typed: one word matches the start of any part of the name ("jane", "Ja" and "DOE" all
    find DOE^JANE), several (`doe^jane`, `Doe^J`) the start of the whole name."""
    if "*" in term or "?" in term:
        return wildcard(term, value, True)
    term, value = term.casefold(), value.casefold()
    if _NAME_SEPARATORS.search(term):
        return value.startswith(term)
    return any(part.startswith(term) for part in _NAME_SEPARATORS.split(value) if part)


def in_range(spec: str, value: str) -> bool:
    if "-" not in spec:
        return value == spec or (len(spec) < len(value) and value.startswith(spec))
    low, high = spec.split("-", 1)
    return (not low or value >= low) and (not high or value[: len(high)] <= high)


@dataclass(frozen=True)
class Row:
    """One matchable record: a slide (series) or one of its instances, with computed values."""

    slide_id: str
    instances: int
    """The instances of its slide that the search shows."""
    instance: Instance | None
    header: Dataset | IndexedSeries
    """The instance's header, or the slide-level attributes of a series from the index."""
    computed: dict[str, list[str]]

    def values(self, keyword: str) -> list[str] | None:
        if keyword in self.computed:
            return self.computed[keyword]
        if isinstance(self.header, IndexedSeries):
            return self.header.values(keyword)
        return header_values(self.header, keyword)

    def uid(self, keyword: str) -> str:
        """A UID attribute's value ("" when absent)."""
        found = self.values(keyword)
        return found[0] if found else ""


def row_matches(row: Row, query: Query) -> bool:
    for f in query.filters:
        found = row.values(f.keyword)
        if not found:
            return False
        if f.vr == "UI":
            ok = any(v in f.values for v in found)
        elif f.vr in ("DA", "TM", "DT"):
            ok = any(in_range(f.values[0], v) for v in found)
        elif f.vr in ("IS", "US", "UL", "SS", "SL", "UV", "SV"):
            ok = any(v.strip() == f.values[0].strip() for v in found)
        elif f.vr == "PN" and query.fuzzy:
            ok = any(fuzzy_name(f.values[0], v) for v in found)
        else:
            ok = any(wildcard(f.values[0], v, False) for v in found)
        if not ok:
            return False
    return True
