"""One exception base for the library; each subclass also inherits the matching builtin.

The server maps these classes to HTTP status codes in one table, and the CLI turns them into one
readable line; nothing else in the library needs to know about either.
"""

from __future__ import annotations


class WsiError(Exception):
    """Base of every error the library raises on purpose."""


class SlideNotFound(WsiError, FileNotFoundError):
    """The slide (a source file or a published slide in a store) does not exist."""


class SlideChanged(SlideNotFound):
    """An object of a published slide changed while the slide was read (it was published again
    in another version): the version being read is gone, and the bytes at the offsets its index
    gave would be the new version's. Read the slide again."""


class UnsupportedSlide(WsiError, ValueError):
    """No slide source backend can read this input."""


class CorruptSlide(WsiError, ValueError):
    """The input claims to be a slide but its content cannot be decoded."""


class SlideIncomplete(WsiError):
    """A file of the slide (a DICOM instance of its series) cannot be read yet: it may still be
    arriving, or be damaged. Converting without it would publish part of the slide; worth
    trying again later (ingest retries, then gives up)."""


class InvalidArgument(WsiError, ValueError):
    """A caller gave a value outside what the operation accepts (level, region, id, key, ...)."""


class StoreError(WsiError, OSError):
    """Reading from or writing to the object store failed."""


class SlideBusy(StoreError):
    """Another process holds the slide's conversion lock (`Store.slide_lock`): this conversion
    could not start. Neither the slide's fault nor the store's: try again once the other one
    is done (`wsi convert` exits `ExitCode.SLIDE_BUSY`, which ingest retries without counting
    an attempt, so a slide is never quarantined for being converted elsewhere)."""


class EncodedTileUnavailable(WsiError, LookupError):
    """The source cannot hand out this tile's compressed bytes; decode it instead."""


class AssociatedImageRefused(WsiError, PermissionError):
    """The reader's settings do not allow reading this associated image: labels and macros
    show patient names and barcodes, so each one must be allowed explicitly."""
