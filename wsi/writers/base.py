"""The pyramid writer interface: the second extension point.

The builder calls `begin_level`, then `write_tile` for every tile of that level in row-major order
(levels may interleave: level 1 row 0 is ready before level 0 is done), `end_level` (or
`end_levels` for several),
`write_associated`, and finally `finish`, which returns every object written so the caller can
publish them in a manifest. `abort` releases what is open after a failure.

A tile may be `None`: blank glass that is not stored (see `wsi.pyramid.background`); readers give
the level's fill colour there (`BlankTiles`).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from wsi.errors import InvalidArgument
from wsi.model import Level, SlideProperties
from wsi.published.layout import FILL_VALUE, ChunkFormat, StoredObject


@dataclass(frozen=True)
class SlideInfo:
    """What a writer records about the slide besides its tiles."""

    slide_id: str
    properties: SlideProperties
    source_backend: str


@dataclass(frozen=True)
class BlankTiles:
    """What a level's absent tiles (`None` in `write_tile`) hold, and why they were left out."""

    fill: int = FILL_VALUE
    """Grey level v: absent tiles read as (v, v, v)."""
    delta_e76: float | None = None
    """Tolerance (CIELab Delta-E 76 of every pixel from the fill) within which tiles were left
    out as blank glass; None when blank tiles are stored like any other."""

    def __post_init__(self) -> None:
        if not 0 <= self.fill <= 255:
            raise InvalidArgument(f"fill must be 0..255, got {self.fill}")


ALL_STORED = BlankTiles()
"""No tile left out as blank; absent tiles (sparse sources) are white."""


class PyramidWriter(abc.ABC):
    """Receives a pyramid tile by tile and lays it out in the store."""

    @abc.abstractmethod
    def begin_level(
        self, index: int, level: Level, chunk_format: ChunkFormat, blank: BlankTiles = ALL_STORED
    ) -> None: ...

    @abc.abstractmethod
    def write_tile(self, index: int, data: bytes | None) -> None:
        """Append the next tile (encoded chunk bytes, or None: not stored) of level `index`,
        row-major."""

    def write_tiles(self, index: int, tiles: Sequence[bytes | None]) -> None:
        """Append several tiles of level `index` (a backend may write them in one go)."""
        for data in tiles:
            self.write_tile(index, data)

    @abc.abstractmethod
    def end_level(self, index: int) -> None: ...

    def end_levels(self, indices: Sequence[int]) -> None:
        """`end_level` of each of `indices` (the builder's last step); a backend may end them
        side by side, the objects recorded in the order of `indices` either way."""
        for index in indices:
            self.end_level(index)

    @abc.abstractmethod
    def write_associated(
        self, name: str, pixels: np.ndarray, fmt: ChunkFormat, shows_label: bool = True
    ) -> None:
        """One associated image; `shows_label`: whether it may show the slide's label
        (`SlideSource.associated_shows_label`), recorded so that readers keep it private."""

    @abc.abstractmethod
    def finish(self, info: SlideInfo) -> list[StoredObject]: ...

    @abc.abstractmethod
    def abort(self) -> None: ...
