"""Leica SCN backend: the main image's JPEG tiles copied where they fall on the level's grid.

A Leica SCN is a BigTIFF whose first ImageDescription is an XML `scn` document: a `collection`
(the whole glass, in nanometres) of `image`s, each with its `view` (size and offset on the
glass, nm) and the TIFF page of each resolution; the image covering the whole glass at offset 0
is the macro, the others are main images (see `sample_data/make_leica.py`). OpenSlide's level k
is the whole collection at the main image's resolution k, with the main image at its offset
(offset in nm / nm per pixel, truncated) and transparent around it.

A level's tiles are the main image's stored JPEG tiles, copied, where that offset is a whole
number of tiles and the image's last tile column and row end at the level's edge or exactly on a
tile boundary (a padded edge tile inside the level would show its padding where OpenSlide shows
glass); cells of the grid outside the image are blank. Other levels are decoded through
OpenSlide, and the reason logged (never the slide's name). A slide with several brightfield main
images (OpenSlide composites them) or images OpenSlide ignores is left to the `openslide`
backend: this one refuses it.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import tifffile

from wsi.errors import UnsupportedSlide, WsiError
from wsi.model import TileCodec
from wsi.sources.tiff_backend import check_page, check_tiles_within_file, page_codec
from wsi.sources.vendor_tiff import VendorTiffSource

log = logging.getLogger(__name__)

_NAMESPACES = (
    "http://www.leica-microsystems.com/scn/2010/03/10",
    "http://www.leica-microsystems.com/scn/2010/10/01",
)
_BRIGHTFIELD = "brightfield"


@dataclass(frozen=True)
class _MainImage:
    """The one brightfield main image: its place on the glass and its resolutions."""

    offset_x_nm: int
    offset_y_nm: int
    width_nm: int
    dimensions: tuple[tuple[int, int, int], ...]
    """(width, height, TIFF page) of each resolution of z-plane 0, largest first."""


def _main_image(description: str) -> _MainImage:
    """The slide's single brightfield main image, or UnsupportedSlide saying why not."""
    try:
        root = ET.fromstring(description)  # noqa: S314 - no external entities are resolved
    except ET.ParseError as exc:
        raise UnsupportedSlide("the Leica XML description cannot be parsed") from exc
    ns = next((n for n in _NAMESPACES if root.tag == f"{{{n}}}scn"), None)
    collection = root.find(f"{{{ns}}}collection") if ns else None
    if ns is None or collection is None:
        raise UnsupportedSlide("not a Leica SCN description")
    q = f"{{{ns}}}"
    size = (collection.get("sizeX"), collection.get("sizeY"))
    mains = []
    for image in collection.findall(f"{q}image"):
        view = image.find(f"{q}view")
        if view is None:
            raise UnsupportedSlide("a Leica image has no view")
        place = tuple(view.get(k) for k in ("offsetX", "offsetY", "sizeX", "sizeY"))
        if place == ("0", "0", *size):
            continue  # the macro
        source = image.findtext(f"{q}scanSettings/{q}illuminationSettings/{q}illuminationSource")
        if source != _BRIGHTFIELD:
            continue  # OpenSlide shows brightfield images only
        dims = [
            (int(d.get("sizeX", "")), int(d.get("sizeY", "")), int(d.get("ifd", "")))
            for d in image.findall(f"{q}pixels/{q}dimension")
            if d.get("z") in (None, "0")
        ]
        mains.append((place, tuple(sorted(dims, key=lambda d: -d[0]))))
    if len(mains) != 1:
        raise UnsupportedSlide(f"{len(mains)} brightfield main images (OpenSlide composites them)")
    (x, y, width, _), resolutions = mains[0]
    return _MainImage(int(x or 0), int(y or 0), int(width or 0), resolutions)


class LeicaSource(VendorTiffSource):
    """Leica SCN slides with one brightfield main image, its JPEG tiles handed out as stored
    where they lie on the level's tile grid."""

    name = "leica"
    vendors: ClassVar[frozenset[str]] = frozenset({"leica"})
    suffixes: ClassVar[frozenset[str]] = frozenset({".scn"})

    def __init__(self, path: Path) -> None:
        self._shift: dict[int, tuple[int, int]] = {}
        self.copied, self.decoded = set(), {}
        try:
            super().__init__(path)
        except WsiError:  # says what is wrong already (not a Leica slide, not readable)
            raise
        except ValueError as exc:
            raise UnsupportedSlide(f"the Leica XML description is inconsistent: {exc}") from exc
        for index, reason in self.decoded.items():
            log.info("Leica level %d is decoded through OpenSlide: %s", index, reason)

    def _match_pages(self) -> list[tifffile.TiffPage]:
        """The main image's page behind each OpenSlide level; records which levels are copied
        (with their offset in tiles) and why the others are not."""
        first = self._tif.pages[0]
        main = _main_image(first.description if isinstance(first, tifffile.TiffPage) else "")
        levels = self._os.levels
        if len(main.dimensions) != len(levels) or main.width_nm <= 0:
            raise UnsupportedSlide("the Leica main image's resolutions are not OpenSlide's levels")
        pages = []
        for k, (lv, (width, height, ifd)) in enumerate(zip(levels, main.dimensions, strict=True)):
            page = self._tif.pages[ifd]
            if not isinstance(page, tifffile.TiffPage) or not page.is_tiled:
                raise UnsupportedSlide("a Leica main image resolution is not a tiled page")
            check_page(page)
            check_tiles_within_file(page)
            if (page.imagewidth, page.imagelength) != (width, height):
                raise UnsupportedSlide("a Leica page's size is not the one its XML gives")
            pages.append(page)
            nm_per_pixel = main.width_nm / width
            x, y = int(main.offset_x_nm / nm_per_pixel), int(main.offset_y_nm / nm_per_pixel)
            tw, th = page.tilewidth, page.tilelength
            if page_codec(page) is not TileCodec.JPEG:
                self.decoded[k] = "its tiles are not JPEG"
            elif x % tw or y % th:
                self.decoded[k] = "the main image's offset is not a whole number of tiles"
            elif (width % tw and x + width < lv.width) or (height % th and y + height < lv.height):
                self.decoded[k] = "the main image ends inside a tile"
            else:
                self._shift[k] = (x // tw, y // th)
                self.copied.add(k)
        return pages

    def _page_tile(self, level: int, col: int, row: int) -> int | None:
        page = self._pages[level]
        dx, dy = self._shift[level]
        across = -(-page.imagewidth // page.tilewidth)
        down = -(-page.imagelength // page.tilelength)
        c, r = col - dx, row - dy
        return r * across + c if 0 <= c < across and 0 <= r < down else None
