"""Philips TIFF backend: the tiled TIFF backend with Philips' level geometry.

A Philips TIFF (IntelliSite) is a tiled JPEG TIFF plus a DPUfsImport XML description: its levels
are the tiled pages in order (label and macro are stripped pages or base64 JPEGs in the XML, read
through OpenSlide), so the stored JPEG tiles are copied as they are, exactly as for SVS. Two
things differ from a generic TIFF, and are the reason for this module:

* Every page is padded to whole tiles, and OpenSlide (whose reading we match) takes a lower
  level's size as level 0's divided by the downsample the XML's pixel spacings give, so a lower
  level is usually smaller than its page. Pages are therefore matched to OpenSlide's levels by
  order, not by size, and each must hold the level's whole tile grid.
* Tiles outside the scanned area are not stored (TileByteCounts 0): OpenSlide shows them
  transparent, we white; the pyramid builder encodes them as blank (`read_encoded_tile` refuses
  them with EncodedTileUnavailable).

Microns per pixel come from the XML's DICOM_PIXEL_SPACING (millimetres, via OpenSlide's
`openslide.mpp-x/y`).
"""

from __future__ import annotations

from typing import ClassVar

import tifffile

from wsi.errors import UnsupportedSlide
from wsi.sources.tiff_backend import TiffSource, check_page


class PhilipsSource(TiffSource):
    """Philips TIFF slides, their JPEG tiles handed out as stored."""

    name = "philips"
    vendors: ClassVar[frozenset[str]] = frozenset({"philips"})

    def _match_pages(self) -> list[tifffile.TiffPage]:
        """The tiled pages in file order, one per OpenSlide level (OpenSlide reads them so)."""
        tiled = [p for p in self._tif.pages if isinstance(p, tifffile.TiffPage) and p.is_tiled]
        levels = self._os.levels
        if len(tiled) != len(levels):
            raise UnsupportedSlide("Philips TIFF pages do not match OpenSlide's levels")
        for lv, page in zip(levels, tiled, strict=True):
            check_page(page)
            across = -(-page.imagewidth // page.tilewidth)
            down = -(-page.imagelength // page.tilelength)
            if lv.width > across * page.tilewidth or lv.height > down * page.tilelength:
                raise UnsupportedSlide("a Philips TIFF level is larger than its page")
        return tiled
