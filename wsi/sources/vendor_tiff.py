"""A tiled-TIFF vendor backend whose levels are copied or, one by one, decoded through OpenSlide.

Some vendors' TIFF pages are not OpenSlide's levels as they are: Leica places its main image on a
larger glass, Ventana shows only the tiles of its areas of interest and shifts them by the
overlaps it measured. Where a level's page tiles land exactly on the level's tile grid, the
vendor's backend (a subclass) copies them; where they do not, that level is read through
OpenSlide, so that every level reads as OpenSlide reads it.
"""

from __future__ import annotations

import numpy as np

from wsi.model import TileCodec
from wsi.sources.base import SlideSource
from wsi.sources.copied_levels import CopiedLevels
from wsi.sources.tiff_backend import TiffSource


class VendorTiffSource(CopiedLevels, TiffSource):
    """A subclass's `_match_pages` fills `copied` (the levels whose page tiles are the level's
    tiles, JPEG) and `decoded` (why each other level is not), and its `_page_tile` maps a copied
    level's tile to its page's (None: blank)."""

    copied: set[int]
    decoded: dict[int, str]
    """Why each level that is not copied is decoded through OpenSlide."""

    def tile_codec(self, level: int) -> TileCodec:
        self.level(level)
        return TileCodec.JPEG if level in self.copied else TileCodec.OTHER

    def read_tile_half(self, level: int, col: int, row: int) -> np.ndarray | None:
        return SlideSource.read_tile_half(self, level, col, row)

    def is_copied(self, level: int) -> bool:
        return level in self.copied

    def read_copied_tile(self, level: int, col: int, row: int) -> np.ndarray:
        return TiffSource.read_tile(self, level, col, row)
