"""Backends whose levels are each either the file's stored tiles or OpenSlide's decoding.

NDPI, MIRAX, Leica and Ventana slides copy a level's JPEG tiles only where they form that level's
exact tile grid; any other level, and the associated images, are read through OpenSlide, so that
every level reads as OpenSlide reads it. This is that rule, once: a backend says which levels it
copies (`is_copied`) and, if its stored tiles need more than a JPEG decode, how to decode one.
"""

from __future__ import annotations

import abc

import numpy as np

from wsi.codecs import jpeg
from wsi.sources.base import SlideSource, check_region_size
from wsi.sources.openslide_backend import OpenSlideSource


class CopiedLevels(SlideSource):
    """Put before the backend's own base class (`class X(CopiedLevels, TiffSource)`): copied
    levels go to the base's `read_region`, the others to `self._os`."""

    _os: OpenSlideSource
    """The same slide opened by OpenSlide: levels not copied, associated images, properties."""

    @classmethod
    def is_available(cls) -> bool:
        return OpenSlideSource.is_available()  # it reads every level it does not copy

    @abc.abstractmethod
    def is_copied(self, level: int) -> bool:
        """Whether `level`'s tiles are the file's stored tiles (else OpenSlide decodes it)."""

    def read_copied_tile(self, level: int, col: int, row: int) -> np.ndarray:
        """A tile of a copied level, decoded: its stored JPEG."""
        return jpeg.decode(self.read_encoded_tile(level, col, row))

    def read_tile(self, level: int, col: int, row: int) -> np.ndarray:
        lv = self.level(level)
        lv.check_tile(col, row)
        if self.is_copied(level):
            return self.read_copied_tile(level, col, row)
        x, y = col * lv.tile_width, row * lv.tile_height
        return self._os.read_region(level, x, y, lv.tile_width, lv.tile_height)

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        self.level(level)
        check_region_size(width, height)
        if self.is_copied(level):
            return super().read_region(level, x, y, width, height)
        return self._os.read_region(level, x, y, width, height)

    @property
    def associated_names(self) -> tuple[str, ...]:
        return self._os.associated_names

    def read_associated(self, name: str) -> np.ndarray:
        return self._os.read_associated(name)

    def associated_shows_label(self, name: str) -> bool:
        return self._os.associated_shows_label(name)
