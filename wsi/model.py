"""Values shared by sources, the pyramid builder and writers: frozen and validated on creation."""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from wsi.errors import InvalidArgument


class TileCodec(enum.Enum):
    """How a source stores a level's tiles (what `read_encoded_tile` would hand out)."""

    JPEG = "jpeg"
    """Complete baseline JPEG streams: these can be copied to the output byte for byte."""
    JPEG2000 = "jpeg2000"
    """Bare JPEG 2000 codestreams of R, G, B (Aperio 33005): decoded by default, copied as they are
    when the user asks to keep them (`PyramidSettings.keep_jpeg2000`)."""
    OTHER = "other"
    """Anything else (LZW, deflate, raw ...): tiles must be decoded."""


class TileGrid:
    """The tile grid of a level: whatever has these four sizes (pixels of the level) gets the
    same arithmetic, so sources, writers and the reader of published slides agree on it."""

    width: int
    height: int
    tile_width: int
    tile_height: int

    @property
    def grid_name(self) -> str:
        """How errors name this grid."""
        return "the level"

    @property
    def cols(self) -> int:
        """Tiles across."""
        return -(-self.width // self.tile_width)

    @property
    def rows(self) -> int:
        """Tiles down."""
        return -(-self.height // self.tile_height)

    @property
    def tile_count(self) -> int:
        return self.cols * self.rows

    def check_tile(self, col: int, row: int) -> None:
        """Raise InvalidArgument unless (col, row) is a tile of this grid."""
        if not (0 <= col < self.cols and 0 <= row < self.rows):
            raise InvalidArgument(
                f"tile ({col}, {row}) is outside {self.grid_name} ({self.cols}x{self.rows} tiles)"
            )


@dataclass(frozen=True)
class Level(TileGrid):
    """Geometry of one pyramid level, in pixels of that level."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    downsample: float = 1.0
    """Level-0 pixels per pixel of this level (as the source reports it)."""

    def __post_init__(self) -> None:
        if min(self.width, self.height, self.tile_width, self.tile_height) <= 0:
            raise InvalidArgument(f"level sizes must be positive: {self}")
        if self.downsample < 1.0:
            raise InvalidArgument(f"downsample must be >= 1: {self.downsample}")


def pyramid_levels(width: int, height: int, tile_width: int, tile_height: int) -> tuple[Level, ...]:
    """The output pyramid: exact 2x steps (sizes rounded down, like OpenSlide and libvips pyramids)
    until a level fits in one tile."""
    levels = [Level(width, height, tile_width, tile_height, 1.0)]
    while levels[-1].width > tile_width or levels[-1].height > tile_height:
        prev = levels[-1]
        levels.append(
            Level(
                max(1, prev.width // 2),
                max(1, prev.height // 2),
                tile_width,
                tile_height,
                prev.downsample * 2,
            )
        )
    return tuple(levels)


MICRONS_PER_PIXEL_AT_1X = 10.0
"""The usual scanner optics: at objective power M a pixel is about 10 / M micrometres (40x ~
0.25 um/px, 20x ~ 0.5 um/px). Used where only one of the two is known: the viewer's
magnification from MPP, the DICOM pixel spacing from the objective."""


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def readable(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD.

    A file name that is not UTF-8 (a Latin-1 name from an old Windows share, Shift-JIS from a
    scanner's PC) comes to Python with its undecodable bytes as lone surrogates (PEP 383), and
    JSON can carry them too (`"\\udcfc"`); no UTF-8 page, database text column or DICOM
    attribute can hold one. Whatever such text becomes (a slide's name, a job's error, a page)
    goes through this: the name stays recognisable, with the character that cannot be known
    shown as unknown."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def _frozen_mapping(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


@dataclass(frozen=True)
class SlideProperties:
    """What a pathologist or an AI pipeline needs to know about a slide besides its pixels."""

    vendor: str | None = None
    mpp_x: float | None = None
    """Microns per level-0 pixel, horizontally; None when the file does not say."""
    mpp_y: float | None = None
    objective_power: float | None = None
    vendor_properties: Mapping[str, str] = field(default_factory=dict)
    """The source's own metadata, unchanged (may carry patient data: never log it)."""
    icc_profile: bytes | None = None
    scan_datetime: str | None = None
    """When the slide was scanned, as DICOM DT `YYYYMMDDHHMMSS`, if the file says."""
    manufacturer: str | None = None
    model: str | None = None
    serial_number: str | None = None
    """Scanner identification, if the file says (DICOM Enhanced General Equipment)."""
    identifiers: Mapping[str, str] = field(default_factory=dict)
    """Patient/study/specimen identifiers the file itself carries (a DICOM source's header),
    keyed like `SlideMetadata` fields; defaults for the DICOM view. Never log them."""

    def __post_init__(self) -> None:
        for mpp in (self.mpp_x, self.mpp_y):
            if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
                raise InvalidArgument(f"microns per pixel must be positive: {mpp}")
        object.__setattr__(self, "vendor_properties", _frozen_mapping(self.vendor_properties))
        object.__setattr__(self, "identifiers", _frozen_mapping(self.identifiers))


JPEG_CODEC_NAME = "wsistore.jpeg"
"""Zarr v3 name of our JPEG chunk codec (registered through the `zarr.codecs` entry point)."""

ASSOCIATED_KINDS = ("label", "macro", "thumbnail")
"""Associated images we carry over, in the field's words (OpenSlide's names)."""
