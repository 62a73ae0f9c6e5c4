"""Ventana BIF backend: stored JPEG tiles copied where the scanner's tiles abut exactly.

A BIF is a tiled JPEG TIFF whose pyramid pages are described `level=N mag=M`; level 0's XMP
packet (`EncodeInfo`) lists the areas of interest (AOIs) scanned, each a grid of tiles with a
`TileJointInfo` per pair of neighbours saying how far their camera fields overlap (see
`sample_data/make_bif.py`). OpenSlide shows only the AOIs' tiles, one step apart, the step being
the tile size minus the confidence-weighted mean overlap, each AOI at its own position.

Every level is copied (its page's tiles handed out as they are) only when the tiles abut
exactly: every joint's OverlapX and OverlapY is 0 (checked one by one, never assumed from the
mean) and every AOI sits on the tile grid; then a level's pixels are its page's. A tile of a
lower level spans several level-0 tiles: it is copied when all of them are in AOIs, blank when
none is, and the level is decoded when an AOI ends inside one of its tiles. Otherwise levels are
decoded through OpenSlide, the reason logged (never the slide's name). A BIF without EncodeInfo
(a "Ventana TIFF") is a plain tiled pyramid, copied like any TIFF.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import tifffile

from wsi.errors import UnsupportedSlide
from wsi.model import Level, TileCodec
from wsi.sources.tiff_backend import check_page, check_tiles_within_file, page_codec
from wsi.sources.vendor_tiff import VendorTiffSource

log = logging.getLogger(__name__)

_XMP = 700
_LEVEL_MARK = "level="


@dataclass(frozen=True)
class _Area:
    """One scanned AOI, in level-0 tiles and pixels."""

    start_col: int
    start_row: int
    across: int
    down: int
    x: float
    y: float
    """Position (pixels) of the AOI's top-left corner as OpenSlide computes it."""


@dataclass(frozen=True)
class _Stitching:
    areas: tuple[_Area, ...]
    overlapping: bool
    """Some joint's OverlapX or OverlapY is not 0."""
    unjoined: bool
    """No joint with a confidence across or down: OpenSlide has no step to place tiles by."""


def _number(node: ET.Element, name: str) -> float:
    try:
        return float(node.get(name, ""))
    except ValueError as exc:
        raise UnsupportedSlide(f"BIF EncodeInfo has no usable {name}") from exc


def _stitching(xml: bytes, tile_w: int, tile_h: int) -> _Stitching:
    """The AOIs and their joints, as OpenSlide reads them from level 0's EncodeInfo."""
    try:
        root = ET.fromstring(xml)  # noqa: S314 - no external entities are resolved
    except ET.ParseError as exc:
        raise UnsupportedSlide("the BIF EncodeInfo cannot be parsed") from exc
    infos = root.findall("SlideStitchInfo/ImageInfo")
    origin_list = root.find("AoiOrigin")
    origins = list(origin_list) if origin_list is not None else []
    if root.tag != "EncodeInfo" or len(infos) != len(origins):
        raise UnsupportedSlide("the BIF EncodeInfo's AOIs are inconsistent")
    raw: list[tuple[int, int, int, int, float, float]] = []
    overlapping, weight = False, {"RIGHT": 0.0, "UP": 0.0}
    for info, origin in zip(infos, origins, strict=True):
        if not _number(info, "AOIScanned"):
            continue
        if (_number(info, "Width"), _number(info, "Height")) != (tile_w, tile_h):
            raise UnsupportedSlide("BIF AOI tiles are not the TIFF's tiles")
        ox, oy = int(_number(origin, "OriginX")), int(_number(origin, "OriginY"))
        if ox % tile_w or oy % tile_h:
            raise UnsupportedSlide("a BIF AOI's origin is not whole tiles")
        across, down = int(_number(info, "NumCols")), int(_number(info, "NumRows"))
        for joint in info.findall("TileJointInfo"):
            overlapping |= bool(_number(joint, "OverlapX") or _number(joint, "OverlapY"))
            direction = joint.get("Direction", "")
            if direction in weight:
                weight[direction] += _number(joint, "Confidence")
        x, y = _number(info, "Pos-X"), _number(info, "Pos-Y")
        raw.append((ox // tile_w, oy // tile_h, across, down, x, y))
    # Pos-Y is the distance from the AOI's bottom to a line below every AOI: flip it, as
    # OpenSlide does, with heights of whole tiles (the step is the tile size when nothing
    # overlaps; otherwise the slide is decoded anyway).
    top = max((y + down * tile_h for _, _, _, down, _, y in raw), default=0.0)
    areas = tuple(
        _Area(c, r, across, down, x, top - y - down * tile_h) for c, r, across, down, x, y in raw
    )
    unjoined = weight["RIGHT"] <= 0 or weight["UP"] <= 0
    return _Stitching(areas, overlapping, unjoined)


class VentanaSource(VendorTiffSource):
    """Ventana BIF slides whose tiles abut exactly, their JPEG tiles handed out as stored."""

    name = "ventana"
    vendors: ClassVar[frozenset[str]] = frozenset({"ventana"})
    suffixes: ClassVar[frozenset[str]] = frozenset({".bif", ".tif", ".tiff"})

    def __init__(self, path: Path) -> None:
        self.copied, self.decoded = set(), {}
        self._present: dict[int, frozenset[tuple[int, int]] | None] = {}
        super().__init__(path)
        for index, reason in sorted(self.decoded.items()):
            log.info("Ventana level %d is decoded through OpenSlide: %s", index, reason)

    def _match_pages(self) -> list[tifffile.TiffPage]:
        """The `level=` pages, largest first (OpenSlide's order); records which levels are
        copied and, for each, which of its tiles hold AOI pixels."""
        pages = sorted(
            (
                p
                for p in self._tif.pages
                if isinstance(p, tifffile.TiffPage)
                and p.is_tiled
                and _LEVEL_MARK in (p.description or "")
            ),
            key=lambda p: -p.imagewidth,
        )
        levels = self._os.levels
        if len(pages) != len(levels):
            raise UnsupportedSlide("BIF level pages do not match OpenSlide's levels")
        for page in pages:
            check_page(page)
            check_tiles_within_file(page)
        tw, th = pages[0].tilewidth, pages[0].tilelength
        xmp = pages[0].tags.get(_XMP)
        stitching = _stitching(bytes(xmp.value), tw, th) if xmp is not None else None
        why_not = None
        if stitching is not None and stitching.overlapping:
            why_not = "its tiles overlap (TileJointInfo)"
        elif stitching is not None and stitching.unjoined:
            why_not = "its tiles have no joints to place them by"
        elif stitching is not None and any(
            (a.x, a.y) != (a.start_col * tw, a.start_row * th) for a in stitching.areas
        ):
            why_not = "an area of interest is off the tile grid"
        for k, (lv, page) in enumerate(zip(levels, pages, strict=True)):
            if why_not:
                self.decoded[k] = why_not
            elif page_codec(page) is not TileCodec.JPEG:
                self.decoded[k] = "its tiles are not JPEG"
            elif (page.tilewidth, page.tilelength) != (tw, th):
                self.decoded[k] = "its tiles are not level 0's size"
            else:
                self._plan_level(k, lv, page, stitching)
        return pages

    def _plan_level(
        self, k: int, lv: Level, page: tifffile.TiffPage, stitching: _Stitching | None
    ) -> None:
        """Copy level k, with the page tiles that show AOI pixels, or say why it is decoded.
        Level-0 tiles outside the level (past its right or bottom edge) do not count."""
        if stitching is None:
            self._present[k] = None
            self.copied.add(k)
            return
        span = round(lv.downsample)
        if span != lv.downsample or span < 1:
            self.decoded[k] = "its downsample is not a whole number"
            return
        cells = {
            (a.start_col + c, a.start_row + r)
            for a in stitching.areas
            for c in range(a.across)
            for r in range(a.down)
        }
        across = -(-page.imagewidth // page.tilewidth)
        down = -(-page.imagelength // page.tilelength)
        present = set()
        tw, th = page.tilewidth / span, page.tilelength / span  # a level-0 tile, at this level
        for col, row in {(c // span, r // span) for c, r in cells}:
            inside = [
                (col * span + i, row * span + j)
                for i in range(span)
                for j in range(span)
                if (col * span + i) * tw < lv.width and (row * span + j) * th < lv.height
            ]
            if not all(cell in cells for cell in inside):
                self.decoded[k] = "an area of interest ends inside one of its tiles"
                return
            if col >= across or row >= down:
                raise UnsupportedSlide("a BIF area of interest lies outside its level's page")
            present.add((col, row))
        self._present[k] = frozenset(present)
        self.copied.add(k)

    def _page_tile(self, level: int, col: int, row: int) -> int | None:
        page = self._pages[level]
        present = self._present[level]
        if present is not None and (col, row) not in present:
            return None
        return row * -(-page.imagewidth // page.tilewidth) + col
