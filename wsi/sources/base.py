"""The slide source interface: the one extension point every input format plugs into.

A backend must implement `open` (via `__init__`), `levels`, `properties`, `read_tile` and
`associated_names`/`read_associated`. It may override `tile_codec`/`read_encoded_tile` when the file
lets it hand out compressed tile bytes without decoding (the fast path of the pyramid builder),
`read_encoded_tiles` when it can read a row of them in one go for less than one by one, and
`read_region` when it has a faster way than assembling tiles.
"""

from __future__ import annotations

import abc
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

import numpy as np

from wsi.errors import EncodedTileUnavailable, InvalidArgument
from wsi.model import Level, SlideProperties, TileCodec


def check_region_size(width: int, height: int) -> None:
    """Refuse an empty or negative region (pixels): every backend's `read_region` calls this,
    so a caller gets InvalidArgument rather than whatever the backend's library raises."""
    if width <= 0 or height <= 0:
        raise InvalidArgument(f"region must have a positive size, not {width}x{height}")


class SlideSource(abc.ABC):
    """A readable whole-slide image. Thread-safe for reads unless a backend says otherwise."""

    name: ClassVar[str]
    """Short backend name used by `--backend` and in `wsi info`."""

    @abc.abstractmethod
    def __init__(self, path: Path) -> None:
        """Open the slide; raise UnsupportedSlide or CorruptSlide (never a library's own error)."""

    @classmethod
    def is_available(cls) -> bool:
        """True when the libraries this backend needs are importable."""
        return True

    @classmethod
    @abc.abstractmethod
    def can_open(cls, path: Path) -> bool:
        """Cheap probe: True when this backend expects to read `path` (never raises)."""

    @property
    @abc.abstractmethod
    def levels(self) -> tuple[Level, ...]:
        """Pyramid levels as stored in the source, largest first."""

    @property
    @abc.abstractmethod
    def properties(self) -> SlideProperties: ...

    def tile_codec(self, level: int) -> TileCodec:
        """How level `level` stores its tiles; JPEG (and JPEG2000) means `read_encoded_tile`
        works."""
        self.level(level)
        return TileCodec.OTHER

    def read_encoded_tile(self, level: int, col: int, row: int) -> bytes:
        """The tile's complete compressed stream as stored (edge tiles padded to full tile size).
        Its header declares exactly the level's tile size: backends check that with
        `jpeg.check_size`, because these bytes are copied unparsed and served as they are."""
        self.level(level).check_tile(col, row)
        raise EncodedTileUnavailable(f"{self.name} cannot hand out encoded tiles")

    def read_encoded_tiles(self, level: int, cols: range, row: int) -> list[bytes | None]:
        """`read_encoded_tile` of each tile (col, row) for col in `cols`, in that order; None
        where that raises EncodedTileUnavailable (a sparse tile, or a level that is not stored
        as JPEG or JPEG 2000). Any other error is the one the per-tile read raises first;
        InvalidArgument when a tile lies outside the level.

        The pyramid builder takes a row of a block (at most `BLOCK_TILES` tiles) at a time. This
        loops; a backend whose tiles of a row lie next to each other in the file overrides it
        with one read for the run (per tile, the Python around a read cost as much as the read
        itself when copying a JPEG pyramid)."""
        lv = self.level(level)
        if cols:
            lv.check_tile(cols[0], row)
            lv.check_tile(cols[-1], row)
        tiles: list[bytes | None] = []
        for col in cols:
            try:
                tiles.append(self.read_encoded_tile(level, col, row))
            except EncodedTileUnavailable:
                tiles.append(None)
        return tiles

    def read_tile_half(self, level: int, col: int, row: int) -> np.ndarray | None:
        """The tile decoded at 1/2 resolution, (tile_height / 2, tile_width / 2, 3) uint8 RGB,
        when its codec does that natively for much less than a full decode (JPEG 2000's wavelet
        levels); None otherwise, and the builder takes 2x2 means of `read_tile` instead."""
        self.level(level).check_tile(col, row)
        return None

    def encoded_tile_method(self, level: int) -> str:
        """How `read_encoded_tile` gets level `level`'s tiles without decoding, in words a
        slide's manifest records: 'copied' (stored tiles as they are) unless a backend cuts
        them out of larger streams and says so."""
        self.level(level)
        return "copied"

    @abc.abstractmethod
    def read_tile(self, level: int, col: int, row: int) -> np.ndarray:
        """Decoded tile as (tile_height, tile_width, 3) uint8 RGB; parts outside the image are
        unspecified (edge tiles are always full size)."""

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Pixels of a rectangle in level coordinates: (height, width, 3) uint8 RGB, white
        outside the level."""
        lv = self.level(level)
        check_region_size(width, height)
        out = np.full((height, width, 3), 255, np.uint8)
        tw, th = lv.tile_width, lv.tile_height
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, lv.width), min(y + height, lv.height)
        for row in range(y0 // th, -(-y1 // th)) if y1 > y0 else ():
            for col in range(x0 // tw, -(-x1 // tw)) if x1 > x0 else ():
                tile = self.read_tile(level, col, row)
                tx0, ty0 = col * tw, row * th
                ax0, ay0 = max(tx0, x0), max(ty0, y0)
                ax1, ay1 = min(tx0 + tw, x1), min(ty0 + th, y1)
                out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = tile[
                    ay0 - ty0 : ay1 - ty0, ax0 - tx0 : ax1 - tx0
                ]
        return out

    @property
    @abc.abstractmethod
    def associated_names(self) -> tuple[str, ...]:
        """Associated images present: a subset of 'label', 'macro', 'thumbnail'."""

    @abc.abstractmethod
    def read_associated(self, name: str) -> np.ndarray:
        """An associated image as (h, w, 3) uint8 RGB."""

    def associated_shows_label(self, name: str) -> bool:
        """Whether the associated image `name` may show the slide's label (names, barcodes):
        de-identification drops such images. The label and the macro (the whole glass) do; a
        thumbnail may, since some scanners' thumbnails are of the whole glass. A backend whose
        format says what its thumbnail holds overrides this."""
        return True

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing to close
        """Release file handles."""

    def level(self, index: int) -> Level:
        """Level `index`, or InvalidArgument."""
        if not 0 <= index < len(self.levels):
            raise InvalidArgument(f"level {index} does not exist (0..{len(self.levels) - 1})")
        return self.levels[index]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
