"""What an integer in a URL is, for every path and query parameter of the service: ASCII digits
only, written canonically (no leading zeros but "0" itself), at most a bounded number of digits.

Python's `int()` and `str.isdigit()` take far more: Unicode digits (fullwidth "１", Arabic-Indic
"١"), leading zeros, thousands of digits (4,300 before `int()` raises ValueError). Each such
spelling of a number is the same resource under another URL: a second entry in every cache
keyed by URL, and a way past a proxy's filter written for the canonical URL. So each number
has exactly one spelling here, and a long one is refused by its length before it is read.
"""

from __future__ import annotations

from wsi.errors import InvalidArgument

MAX_DIGITS = 9
"""Digits of a path or query integer unless its parameter says otherwise: below 10^9, which
every level, tile, frame, page and pixel count is, and which an int32 column holds."""


def url_int_or_none(text: str, digits: int = MAX_DIGITS) -> int | None:
    """`text` as a non-negative integer when it is one in the canonical spelling of at most
    `digits` ASCII digits, else None. For the paths that hand a request on rather than refuse
    it (`url_int` says why)."""
    if (
        0 < len(text) <= digits
        and text.isascii()
        and text.isdigit()  # ASCII, so only 0-9
        and (text[0] != "0" or text == "0")
    ):
        return int(text)
    return None


def url_int(text: str, name: str, digits: int = MAX_DIGITS) -> int:
    """`text`, the URL's parameter `name`, as a non-negative integer; InvalidArgument (a 400
    saying what is wrong) unless it is one in the canonical spelling of at most `digits` ASCII
    digits. The length is checked first: a 10,000-digit parameter costs no more than a short
    one."""
    if len(text) > digits:
        raise InvalidArgument(f"{name} must be an integer of at most {digits} digits")
    number = url_int_or_none(text, digits)
    if number is None:
        raise InvalidArgument(
            f"{name} must be a non-negative integer in ASCII digits without leading zeros, "
            f"got {text!r}"
        )
    return number


__all__ = ["MAX_DIGITS", "url_int", "url_int_or_none"]
