"""3DHISTECH MIRAX backend: camera images that tile a level exactly are copied as its tiles.

A MIRAX slide is `name.mrxs` plus a folder `name/`: `Slidedat.ini` gives the geometry (camera
images across and down, and per zoom level the image size, overlap and format), `Index.dat`
where each zoom level's JPEG images lie in the data files (see `sample_data/make_mirax.py`).
OpenSlide places the images of a zoom level on a grid whose step is the image size minus the
overlap, shifted by the stage positions of a position map when the slide has one; a scanner's
images usually overlap by some pixels and sit a few pixels off the grid, and are then stitched
(decoded) by OpenSlide.

A zoom level is copied, its images handed out as the level's tiles without decoding, only when
its images abut exactly on the grid, one tile each: the slide has no position map
(VIMSLIDE_POSITION_BUFFER or StitchingIntensityLayer), level 0's images are not concatenated
and no level overlaps, the level's images are JPEG, and OpenSlide agrees (it gives a level a
tile size only when every image lies exactly on the grid of the image size, which we require to
be that level's image size). Otherwise the level is decoded through OpenSlide, and the reason
logged (never the slide's name or path). In a copied level, a grid cell without an image, or
whose level-0 camera positions were never scanned (OpenSlide leaves both empty), is white.
"""

from __future__ import annotations

import configparser
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi.codecs import jpeg
from wsi.errors import CorruptSlide, EncodedTileUnavailable, UnsupportedSlide
from wsi.model import Level, SlideProperties, TileCodec
from wsi.slidefiles import MIRAX_SUFFIX, read_ini
from wsi.sources.copied_levels import CopiedLevels
from wsi.sources.openslide_backend import OpenSlideSource, openslide

log = logging.getLogger(__name__)

_ZOOM_LAYER = "Slide zoom level"
_POSITION_LAYERS = frozenset({"VIMSLIDE_POSITION_BUFFER", "StitchingIntensityLayer"})
_INDEX_VERSION = b"01.02"
_MAX_INDEX = 1 << 30
"""Largest Index.dat read (bytes); a slide of a million images needs 16 MB."""


@dataclass(frozen=True)
class _Image:
    """Where one camera image's JPEG lies."""

    file: int
    offset: int
    length: int


@dataclass(frozen=True)
class _Zoom:
    """One zoom level's section of Slidedat.ini."""

    concat_exponent: int
    overlap_x: float
    overlap_y: float
    image_width: int
    image_height: int
    image_format: str


@dataclass(frozen=True)
class _Layout:
    """What Slidedat.ini says about the slide's geometry."""

    images_x: int
    images_y: int
    divisions: int
    zooms: tuple[_Zoom, ...]
    data_files: tuple[str, ...]
    index_file: str
    slide_id: str
    positioned: bool
    """The slide has a position map: images are placed off the grid."""


def _int(section: configparser.SectionProxy, key: str) -> int:
    try:
        return int(section[key].strip())
    except (KeyError, ValueError) as exc:
        raise UnsupportedSlide(f"Slidedat.ini has no usable {key}") from exc


def _float(section: configparser.SectionProxy, key: str) -> float:
    try:
        return float(section[key].strip())
    except (KeyError, ValueError) as exc:
        raise UnsupportedSlide(f"Slidedat.ini has no usable {key}") from exc


def _layout(slidedat: Path) -> _Layout:
    """Parse Slidedat.ini (UnsupportedSlide when it lacks what OpenSlide also requires)."""
    ini = read_ini(slidedat)
    if ini is None or not all(ini.has_section(s) for s in ("GENERAL", "HIERARCHICAL", "DATAFILE")):
        raise UnsupportedSlide("Slidedat.ini cannot be read")
    general, hier, files = ini["GENERAL"], ini["HIERARCHICAL"], ini["DATAFILE"]
    if hier.get("hier_0_name", "").strip() != _ZOOM_LAYER:
        raise UnsupportedSlide("the first hierarchical layer is not the slide's zoom levels")
    zooms = []
    for k in range(_int(hier, "hier_0_count")):
        name = hier.get(f"hier_0_val_{k}_section", "").strip()
        if not ini.has_section(name):
            raise UnsupportedSlide(f"Slidedat.ini lacks zoom level {k}'s section")
        s = ini[name]
        zooms.append(
            _Zoom(
                _int(s, "image_concat_factor"),
                _float(s, "overlap_x"),
                _float(s, "overlap_y"),
                _int(s, "digitizer_width"),
                _int(s, "digitizer_height"),
                s.get("image_format", "").strip().upper(),
            )
        )
    nonhier = [
        hier.get(f"nonhier_{i}_name", "").strip() for i in range(_int(hier, "nonhier_count"))
    ]
    return _Layout(
        images_x=_int(general, "imagenumber_x"),
        images_y=_int(general, "imagenumber_y"),
        divisions=int(general.get("cameraimagedivisionsperside", "1").strip() or 1),
        zooms=tuple(zooms),
        data_files=tuple(
            files.get(f"file_{i}", "").strip() for i in range(_int(files, "file_count"))
        ),
        index_file=hier.get("indexfile", "").strip(),
        slide_id=general.get("slide_id", "").strip(),
        positioned=bool(_POSITION_LAYERS.intersection(nonhier)),
    )


def _entries(index: bytes, layout: _Layout) -> list[list[tuple[int, _Image]]]:
    """Each zoom level's (level-0 image index, image) entries, read from Index.dat the way
    OpenSlide reads them: a table of one record pointer per zoom level, each record `0, first
    page`, each page `count, next page` and `count` entries of four little-endian int32."""
    head = _INDEX_VERSION + layout.slide_id.encode("ascii", "replace")
    if not index.startswith(head) or len(index) < len(head) + 8:
        raise CorruptSlide("Index.dat does not belong to this Slidedat.ini")
    i32 = struct.Struct("<i")

    def at(pos: int) -> int:
        if not 0 <= pos <= len(index) - 4:
            raise CorruptSlide("Index.dat points outside itself")
        return int(i32.unpack_from(index, pos)[0])

    table = at(len(head))
    levels: list[list[tuple[int, _Image]]] = []
    for k in range(len(layout.zooms)):
        record = at(table + 4 * k)
        if at(record) != 0:
            raise CorruptSlide("Index.dat's zoom level record does not start with 0")
        page, seen = at(record + 4), 0
        entries: list[tuple[int, _Image]] = []
        while True:
            count, following = at(page), at(page + 4)
            if count < 0 or page + 8 + 16 * count > len(index) or seen > len(index):
                raise CorruptSlide("Index.dat's data pages are inconsistent")
            for e in range(count):
                image, offset, length, file = struct.unpack_from("<4i", index, page + 8 + 16 * e)
                if min(image, offset, length, file) < 0 or file >= len(layout.data_files):
                    raise CorruptSlide("Index.dat has an impossible image entry")
                entries.append((image, _Image(file, offset, length)))
            seen += count + 1
            if following == 0:
                break
            page = following
        levels.append(entries)
    return levels


class MiraxSource(CopiedLevels):
    """MIRAX slides, with the levels whose camera images tile them exactly copied as stored."""

    name = "mirax"

    @classmethod
    def can_open(cls, path: Path) -> bool:
        if path.suffix.lower() != MIRAX_SUFFIX or not path.is_file():
            return False
        try:
            return openslide.OpenSlide.detect_format(str(path)) == "mirax"
        except Exception:
            return False

    def __init__(self, path: Path) -> None:
        self._os = OpenSlideSource(path)
        self._fds: dict[int, int] = {}
        try:
            folder = path.with_suffix("")
            layout = _layout(folder / "Slidedat.ini")
            self._grids, self.decoded = self._plan(folder, layout)
        except (OSError, ValueError, UnicodeError, struct.error) as exc:
            self.close()
            raise CorruptSlide(f"cannot parse the MIRAX structure: {exc}") from exc
        except BaseException:
            self.close()
            raise
        for index, reason in self.decoded.items():
            log.info("MIRAX level %d is decoded through OpenSlide: %s", index, reason)
        self._levels = tuple(
            Level(lv.width, lv.height, *self._grids[i][0], lv.downsample)
            if i in self._grids
            else lv
            for i, lv in enumerate(self._os.levels)
        )

    def _plan(
        self, folder: Path, layout: _Layout
    ) -> tuple[dict[int, tuple[tuple[int, int], dict[tuple[int, int], _Image]]], dict[int, str]]:
        """Which levels are copied (their image size and images by tile) and why the others are
        decoded."""
        decoded: dict[int, str] = {}
        if len(layout.zooms) != len(self._os.levels):
            return {}, dict.fromkeys(range(len(self._os.levels)), "zoom levels do not match")
        why_not = self._why_not(layout)
        if why_not:
            return {}, dict.fromkeys(range(len(layout.zooms)), why_not)
        index_path = folder / layout.index_file
        if index_path.stat().st_size > _MAX_INDEX:
            raise CorruptSlide("Index.dat is implausibly large")
        entries = _entries(index_path.read_bytes(), layout)
        d = layout.divisions
        active = {(i % layout.images_x // d, i // layout.images_x // d) for i, _ in entries[0]}
        grids: dict[int, tuple[tuple[int, int], dict[tuple[int, int], _Image]]] = {}
        concat = 1
        for k, zoom in enumerate(layout.zooms):
            concat <<= zoom.concat_exponent
            reason = self._level_reason(k, zoom)
            if reason:
                decoded[k] = reason
                continue
            lv = self._os.levels[k]
            cols, rows = -(-lv.width // zoom.image_width), -(-lv.height // zoom.image_height)
            per_tile = max(1, concat // d)
            tiles: dict[tuple[int, int], _Image] = {}
            for number, image in entries[k]:
                x, y = number % layout.images_x, number // layout.images_x
                if x % concat or y % concat or y >= layout.images_y:
                    raise CorruptSlide("Index.dat places an image off its zoom level's grid")
                xp, yp = x // d, y // d
                scanned = k == 0 or any(
                    (a, b) in active
                    for a in range(xp, xp + per_tile)
                    for b in range(yp, yp + per_tile)
                )
                if scanned and x // concat < cols and y // concat < rows:
                    tiles[(x // concat, y // concat)] = image
            grids[k] = ((zoom.image_width, zoom.image_height), tiles)
        for file in {im.file for _, tiles in grids.values() for im in tiles.values()}:
            self._fds[file] = os.open(folder / layout.data_files[file], os.O_RDONLY)
        return grids, decoded

    @staticmethod
    def _why_not(layout: _Layout) -> str | None:
        """Why no level of the slide can be copied, or None."""
        if layout.positioned:
            return "its images are placed by a position map"
        if layout.zooms[0].concat_exponent != 0:
            return "its level-0 images are concatenated"
        if layout.zooms[0].overlap_x or layout.zooms[0].overlap_y:
            return "its camera images overlap"
        return None

    def _level_reason(self, k: int, zoom: _Zoom) -> str | None:
        """Why zoom level k is decoded, or None when its images are its tiles."""
        if zoom.image_format != "JPEG":
            return f"its images are {zoom.image_format or 'of no stated format'}, not JPEG"
        if zoom.overlap_x or zoom.overlap_y:
            return "its images overlap"
        if self._os.tile_size_hint(k) != (zoom.image_width, zoom.image_height):
            return "its images do not lie exactly on a grid of their size"
        return None

    @property
    def levels(self) -> tuple[Level, ...]:
        return self._levels

    @property
    def properties(self) -> SlideProperties:
        return self._os.properties

    def tile_codec(self, level: int) -> TileCodec:
        self.level(level)
        return TileCodec.JPEG if level in self._grids else TileCodec.OTHER

    def read_encoded_tile(self, level: int, col: int, row: int) -> bytes:
        lv = self.level(level)
        lv.check_tile(col, row)
        grid = self._grids.get(level)
        if grid is None:
            raise EncodedTileUnavailable(f"MIRAX level {level} is decoded, not copied")
        image = grid[1].get((col, row))
        if image is None:
            raise EncodedTileUnavailable("no camera image here: blank")
        data = os.pread(self._fds[image.file], image.length, image.offset)
        if len(data) != image.length:
            raise CorruptSlide("a MIRAX data file is truncated")
        jpeg.check_size(data, lv.tile_height, lv.tile_width)
        return data

    def is_copied(self, level: int) -> bool:
        return level in self._grids

    def read_copied_tile(self, level: int, col: int, row: int) -> np.ndarray:
        try:
            return jpeg.decode(self.read_encoded_tile(level, col, row))
        except EncodedTileUnavailable:  # a grid cell with no image: blank, as in OpenSlide
            lv = self.level(level)
            return np.full((lv.tile_height, lv.tile_width, 3), 255, np.uint8)

    def close(self) -> None:
        fds, self._fds = getattr(self, "_fds", {}), {}
        for fd in fds.values():
            os.close(fd)
        self._os.close()
