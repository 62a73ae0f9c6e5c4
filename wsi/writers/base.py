"""The pyramid writer interface: the second extension point.

The builder calls `begin_level`, then `write_tile` for every tile of that level in row-major order
(levels may interleave: level 1 row 0 is ready before level 0 is done), `end_level`,
`write_associated`, and finally `finish`, which returns every object written so the caller can
publish them in a manifest. `abort` releases what is open after a failure.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from wsi.model import Level, SlideProperties
from wsi.published.layout import ChunkFormat, StoredObject


@dataclass(frozen=True)
class SlideInfo:
    """What a writer records about the slide besides its tiles."""

    slide_id: str
    properties: SlideProperties
    source_backend: str


class PyramidWriter(abc.ABC):
    """Receives a pyramid tile by tile and lays it out in the store."""

    @abc.abstractmethod
    def begin_level(self, index: int, level: Level, chunk_format: ChunkFormat) -> None: ...

    @abc.abstractmethod
    def write_tile(self, index: int, data: bytes) -> None:
        """Append the next tile (encoded chunk bytes) of level `index`, row-major."""

    def write_tiles(self, index: int, tiles: list[bytes]) -> None:
        """Append several tiles of level `index` (a backend may write them in one go)."""
        for data in tiles:
            self.write_tile(index, data)

    @abc.abstractmethod
    def end_level(self, index: int) -> None: ...

    @abc.abstractmethod
    def write_associated(self, name: str, pixels: np.ndarray, fmt: ChunkFormat) -> None: ...

    @abc.abstractmethod
    def finish(self, info: SlideInfo) -> list[StoredObject]: ...

    @abc.abstractmethod
    def abort(self) -> None: ...
