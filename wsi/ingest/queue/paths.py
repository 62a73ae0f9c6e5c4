"""How the job table holds a local path as text: the path itself when its name is UTF-8,
else its `file://` URI of the exact bytes (`stored_path`, `path_from_stored`)."""

from __future__ import annotations

import os
import urllib.parse

from wsi.model import readable

_FILE_URI = "file://"


def stored_path(path: str) -> str:
    """A local path as the job table holds it: the path itself when its name is UTF-8, else
    its `file://` URI (RFC 8089, every byte that is not UTF-8 percent-encoded).

    Python gives a name that is not UTF-8 (Latin-1 from an old Windows share, Shift-JIS from a
    scanner's PC) lone surrogates for its undecodable bytes, which no SQLite or PostgreSQL text
    column can hold: without this, such a file's job could not be stored. The URI is
    unambiguous because a job's local path is absolute (it starts with "/") and other sources
    are `s3://` URLs; it names the exact bytes, so `path_from_stored` gives back the path that
    opens the file."""
    if readable(path) == path:
        return path
    return _FILE_URI + urllib.parse.quote(os.fsencode(path), safe="/")


def path_from_stored(text: str) -> str:
    """The path `stored_path` stored as `text`."""
    if not text.startswith(_FILE_URI):
        return text
    return os.fsdecode(urllib.parse.unquote_to_bytes(text[len(_FILE_URI) :]))


__all__ = ["path_from_stored", "stored_path"]
