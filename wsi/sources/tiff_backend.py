"""Raw-tile backend for tiled TIFF files (Aperio SVS, generic pyramidal TIFF).

tifffile gives each tile's offset and length, so JPEG tiles are handed out as stored (completed
with the JPEGTables and, for RGB-coded tiles, an Adobe marker), never decoded. Aperio JPEG 2000
tiles are bare codestreams, handed out as they are or decoded (`wsi.codecs.jpeg2000`, also at
1/2 resolution); the 33003 ones (Y, Cb, Cr components) are always decoded. Other compressions
(LZW, deflate, ...) are decoded through tifffile/imagecodecs. OpenSlide supplies the vendor
metadata and associated images so that both backends describe a slide the same way.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import tifffile

from wsi.codecs import jpeg, jpeg2000
from wsi.errors import CorruptSlide, EncodedTileUnavailable, UnsupportedSlide, WsiError
from wsi.model import Level, SlideProperties, TileCodec
from wsi.sources.base import SlideSource
from wsi.sources.openslide_backend import OpenSlideSource, openslide

_TIFF_SUFFIXES = {".svs", ".tif", ".tiff", ".btf", ".tf8", ".bif"}
_VENDORS = {"aperio", "generic-tiff"}
_JPEG = 7
_PHOTOMETRIC_RGB = 2
_PHOTOMETRIC_YCBCR = 6
_SPAN_TILES = 32
"""Most tiles read in one call (a task of the pyramid builder takes 32 tiles across)."""
_SPAN_BYTES = 4 * 1024 * 1024
"""Most bytes read in one call (but for a tile larger than that alone)."""


class _Span(threading.local):
    """Per thread: the stored bytes of a run of consecutive tiles of one page, read at once."""

    def __init__(self) -> None:
        self.page: tifffile.TiffPage | None = None
        self.first = 0
        self.stop = 0
        """The run's tiles: indices first .. stop - 1 in the page."""
        self.low = 0
        """Offset in the file of the run's first byte, `data[0]`."""
        self.data = b""


class _RunBuffer(threading.local):
    """Per thread: where `read_encoded_tiles` reads a run of tiles, reused from call to call (a
    fresh bytes object per run was as many fresh pages for the kernel to fault in and zero),
    grown to the longest run read (at most `_SPAN_BYTES`)."""

    def __init__(self) -> None:
        self.data = bytearray()


def truncated_before_directory(path: Path) -> str | None:
    """Why the TIFF (or BigTIFF) file at `path` cannot be one whole, when its header points its
    first directory past the file's end: a copy still under way, or a file cut short. Every
    backend then said only "no backend can read this slide", and a lab's IT could not tell a
    stalled network copy from a damaged scan. None for any other file (not a TIFF, a header
    cut short, a directory that is there: what follows it is each backend's to judge)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return None
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    if order is None or len(head) < 8:
        return None
    (magic,) = struct.unpack(f"{order}H", head[2:4])
    if magic == 42:
        (first,) = struct.unpack(f"{order}I", head[4:8])
    elif magic == 43 and len(head) == 16:
        (first,) = struct.unpack(f"{order}Q", head[8:16])
    else:
        return None
    if first + 2 <= size:
        return None
    return (
        f"the file ends ({size} bytes) before its first TIFF directory (at byte {first}): a "
        "copy still under way, or a file cut short"
    )


def check_page(page: tifffile.TiffPage) -> None:
    """Refuse a level page whose tiles this backend cannot hand out or decode as RGB, or whose
    tile table does not cover the size it declares (a damaged width or height: the reading
    would index past the table, and another reader would lay the tiles on a wrong grid)."""
    if page.samplesperpixel < 3 or page.bitspersample != 8 or page.planarconfig != 1:
        raise UnsupportedSlide("only 8-bit interleaved RGB tiled TIFF is read raw")
    across = -(-page.imagewidth // page.tilewidth)
    down = -(-page.imagelength // page.tilelength)
    listed = min(len(page.dataoffsets), len(page.databytecounts))
    if listed < across * down:
        raise CorruptSlide(
            f"a {page.imagewidth}x{page.imagelength} TIFF page in {page.tilewidth}x"
            f"{page.tilelength} tiles needs {across * down} tiles; its tile table lists {listed}"
        )


def check_tiles_within_file(page: tifffile.TiffPage) -> None:
    """Refuse a page whose tile table puts a tile past the end of the file, for a page that
    OpenSlide may read (the backends whose levels it decodes, `copied_levels`): it allocates
    what a tile's byte count declares before reading it, and GLib aborts the process when it
    cannot (2^32 - 1 under a 3 GiB address-space limit: SIGABRT, no error line). Backends that
    read tiles themselves give that tile's error when it is read instead (the other tiles of
    the slide stay readable)."""
    across = -(-page.imagewidth // page.tilewidth)
    down = -(-page.imagelength // page.tilelength)
    size = page.parent.filehandle.size
    offsets = np.asarray(page.dataoffsets[: across * down], np.uint64)
    counts = np.asarray(page.databytecounts[: across * down], np.uint64)
    past = np.flatnonzero(
        (counts > 0) & ((offsets > size) | (counts > size - np.minimum(offsets, size)))
    )
    if past.size:
        raise CorruptSlide(
            f"tile {int(past[0])} of a TIFF page runs past the end of the file: "
            f"{int(counts[past[0]])} bytes at {int(offsets[past[0]])} of {size} (a reader "
            "would allocate what it declares: OpenSlide aborts the process when it cannot)"
        )


def page_codec(page: tifffile.TiffPage) -> TileCodec:
    """How a level page's tiles are stored, as far as handing them out goes."""
    if (
        page.compression == _JPEG
        and page.samplesperpixel == 3
        and page.photometric in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR)
    ):
        return TileCodec.JPEG
    if page.compression == jpeg2000.APERIO_RGB and page.samplesperpixel == 3:
        return TileCodec.JPEG2000
    return TileCodec.OTHER


class TiffSource(SlideSource):
    """Tiled TIFF-family slides with direct access to the stored tiles."""

    name = "tiff"
    vendors: ClassVar[frozenset[str]] = frozenset(_VENDORS)
    """OpenSlide vendors this backend claims (a vendor's subclass names its own)."""
    suffixes: ClassVar[frozenset[str]] = frozenset(_TIFF_SUFFIXES)
    """File name suffixes probed (lower case)."""

    @classmethod
    def is_available(cls) -> bool:
        return OpenSlideSource.is_available()

    @classmethod
    def can_open(cls, path: Path) -> bool:
        if path.suffix.lower() not in cls.suffixes or not path.is_file():
            return False
        try:
            return openslide.OpenSlide.detect_format(str(path)) in cls.vendors
        except Exception:
            return False

    def __init__(self, path: Path) -> None:
        self._os = OpenSlideSource(path)
        # Asked for by name (`--backend philips`), the probe has not run: another vendor's file
        # would be read with this one's rules and published under its name.
        vendor = self._os.properties.vendor
        if vendor not in self.vendors:
            self._os.close()
            raise UnsupportedSlide(
                f"not a {self.name} slide: OpenSlide reads it as {vendor or 'no known format'}"
            )
        try:
            self._tif = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, OSError, ValueError) as exc:
            self._os.close()
            raise CorruptSlide(f"cannot parse TIFF structure: {exc}") from exc
        self._fd = os.open(path, os.O_RDONLY)
        self._file_size = os.fstat(self._fd).st_size
        try:
            self._pages = self._match_pages()
        except WsiError:
            self.close()
            raise
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            # tifffile reads a page's tags when its properties are asked for: a damaged entry
            # (a count of 255 where 1 was: a tuple for a tile width) fails there, of any kind.
            self.close()
            raise CorruptSlide(f"cannot parse TIFF structure: {exc}") from exc
        except Exception:
            self.close()
            raise
        self._levels = tuple(
            Level(lv.width, lv.height, p.tilewidth, p.tilelength, lv.downsample)
            for lv, p in zip(self._os.levels, self._pages, strict=True)
        )
        self._span = _Span()
        self._run_buffer = _RunBuffer()
        self._heads: dict[int, bytes] = {}
        """Per level: SOI and its page's JPEGTables, what every YCbCr tile starts with."""
        self._checked: dict[int, bytes] = {}
        """Per level: the header, through SOS, of the last tile whose size was checked."""

    def _match_pages(self) -> list[tifffile.TiffPage]:
        """The TIFF page behind each OpenSlide level, matched on size; all must be tiled."""
        candidates = [p for p in self._tif.pages if isinstance(p, tifffile.TiffPage) and p.is_tiled]
        pages = []
        for lv in self._os.levels:
            match = [
                p for p in candidates if (p.imagewidth, p.imagelength) == (lv.width, lv.height)
            ]
            if not match:
                raise UnsupportedSlide("TIFF levels do not match OpenSlide's reading")
            page = match[0]
            check_page(page)
            pages.append(page)
        return pages

    @property
    def levels(self) -> tuple[Level, ...]:
        return self._levels

    @property
    def properties(self) -> SlideProperties:
        return self._os.properties

    def tile_codec(self, level: int) -> TileCodec:
        self.level(level)
        return page_codec(self._pages[level])

    def _page_tile(self, level: int, col: int, row: int) -> int | None:
        """Index in level `level`'s page of the tile at (col, row) of the level, or None when
        the page stores nothing there (a vendor backend whose levels are larger than their
        pages overrides this)."""
        page = self._pages[level]
        return row * -(-page.imagewidth // page.tilewidth) + col  # the page's grid: may be wider

    def _raw(self, level: int, col: int, row: int) -> tuple[tifffile.TiffPage, int, bytes]:
        lv = self.level(level)
        lv.check_tile(col, row)
        page = self._pages[level]
        index = self._page_tile(level, col, row)
        if index is None:
            return page, -1, b""
        return page, index, self._stored(page, index)

    def _stored(self, page: tifffile.TiffPage, index: int) -> bytes:
        """The bytes of tile `index` of `page`. Writers store a row's tiles next to each other
        (in order, or some in reverse), and the builder asks for them in order, each thread a
        run of them: so a miss reads the run of up to `_SPAN_TILES` tiles that adjoin in the
        file in one call, and the thread's next tiles are cut from it. Each read gives up the
        GIL and waits to take it back from the other threads' Python: read one by one, tiles
        spent as long waiting for the GIL as in the read (profile of a 40,000 x 30,000
        conversion)."""
        span = self._span
        offsets, counts = page.dataoffsets, page.databytecounts
        if span.page is page and span.first <= index < span.stop:
            start = int(offsets[index]) - span.low
            return span.data[start : start + int(counts[index])]
        count = int(counts[index])
        if not count:
            return b""
        low = int(offsets[index])
        high = low + count
        if high > self._file_size:  # before any read: a damaged byte count must size no buffer
            raise CorruptSlide("tile data is truncated")
        stop, step = index + 1, 0
        for j in range(index + 1, min(len(offsets), index + _SPAN_TILES)):
            at, size = int(offsets[j]), int(counts[j])
            if size and at == high and step >= 0 and at + size - low <= _SPAN_BYTES:
                high, step = at + size, 1
            elif size and at + size == low and step <= 0 and high - at <= _SPAN_BYTES:
                low, step = at, -1
            else:
                break
            stop = j + 1
        data = os.pread(self._fd, high - low, low)
        if len(data) == high - low and stop > index + 1:
            span.page, span.first, span.stop, span.low, span.data = page, index, stop, low, data
            start = int(offsets[index]) - low
            return data[start : start + count]
        if len(data) < count or stop > index + 1:  # cut short by the file's end
            data = self._read_alone(int(offsets[index]), count)
        return data[:count]

    def _read_alone(self, offset: int, count: int) -> bytes:
        """The `count` bytes at `offset`, or CorruptSlide when the file ends before them (checked
        first: a damaged byte count must size no buffer)."""
        if offset + count > self._file_size:
            raise CorruptSlide("tile data is truncated")
        data = os.pread(self._fd, count, offset)
        if len(data) < count:
            raise CorruptSlide("tile data is truncated")
        return data

    def read_encoded_tile(self, level: int, col: int, row: int) -> bytes:
        codec = self.tile_codec(level)
        if codec is TileCodec.JPEG2000:
            return self._codestream(level, col, row)
        if codec is not TileCodec.JPEG:
            raise EncodedTileUnavailable("tiles of this level are not JPEG")
        page, _, data = self._raw(level, col, row)
        if not data:
            raise EncodedTileUnavailable("sparse tile: nothing stored")
        tile = self._complete(level, page, data)
        self._check_size(level, tile)
        return tile

    def read_encoded_tiles(self, level: int, cols: range, row: int) -> list[bytes | None]:
        """Tiles that adjoin in the file (`_runs`) are read with one call into this thread's
        reused buffer and each is cut out, completed and checked from there: the same bytes and
        errors as `read_encoded_tile` tile by tile, without its per-tile chain of calls and a
        run's bytes copied once less (per tile, that Python cost as much as the read itself)."""
        lv = self.level(level)
        if cols:
            lv.check_tile(cols[0], row)
            lv.check_tile(cols[-1], row)
        codec = self.tile_codec(level)
        if codec is not TileCodec.JPEG and codec is not TileCodec.JPEG2000:
            return [None] * len(cols)
        page = self._pages[level]
        offsets, counts = page.dataoffsets, page.databytecounts
        indices = [self._page_tile(level, col, row) for col in cols]
        tiles: list[bytes | None] = [None] * len(cols)
        for first, stop, low, high in _runs(indices, offsets, counts):
            if high - low > _SPAN_BYTES:  # one tile larger than a run may be
                view = memoryview(self._read_alone(low, high - low))
            else:
                view = self._read_run(low, high)
            for i in range(first, stop):
                index = indices[i]
                assert index is not None
                start = int(offsets[index]) - low
                end = start + int(counts[index])
                if end > len(view):
                    raise CorruptSlide("tile data is truncated")
                if codec is TileCodec.JPEG2000:
                    tiles[i] = self._checked_codestream(level, bytes(view[start:end]))
                    continue
                tile = self._complete(level, page, view[start:end])
                self._check_size(level, tile)
                tiles[i] = tile
        return tiles

    def _read_run(self, low: int, high: int) -> memoryview:
        """Bytes `low` .. `high` of the file (fewer where it ends first), at most `_SPAN_BYTES`,
        in this thread's buffer: valid until its next call, so nothing cut from it may be
        handed out without a copy."""
        buffer = self._run_buffer
        if len(buffer.data) < high - low:
            buffer.data = bytearray(min(max(high - low, 2 * len(buffer.data)), _SPAN_BYTES))
        view = memoryview(buffer.data)[: high - low]
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], low + done)
            if not got:
                break
            done += got
        return view[:done]

    def _check_size(self, level: int, tile: bytes) -> None:
        """`jpeg.check_size` (these bytes are copied unparsed), once per distinct header: a
        decoder reads a stream's size from its header, which ends with the SOS segment, so a
        tile whose first bytes through SOS equal a checked tile's declares the same size. An
        encoder writes the same header on every tile of a level (the tables are in JPEGTables),
        so this is one memory comparison a tile instead of a header parse (6 us)."""
        known = self._checked.get(level)
        if known is not None and tile.startswith(known):
            return
        lv = self.level(level)
        jpeg.check_size(tile, lv.tile_height, lv.tile_width)
        self._checked[level] = tile[: jpeg.header_length(tile)]

    def _complete(self, level: int, page: tifffile.TiffPage, data: bytes | memoryview) -> bytes:
        """`jpeg.complete_tile` of a YCbCr tile in one join, its head (SOI and the page's
        JPEGTables) made once per level: 1 against 10 us a tile. An RGB-coded tile may need an
        Adobe marker, which depends on its own header: that goes through `complete_tile`."""
        if page.photometric == _PHOTOMETRIC_RGB:
            return jpeg.complete_tile(bytes(data), page.jpegtables, True)
        head = self._heads.get(level)
        if head is None:
            head = jpeg.complete_tile(jpeg.SOI, page.jpegtables, False)
            self._heads[level] = head
        if data[:2] != jpeg.SOI:
            raise CorruptSlide("tile does not start with a JPEG SOI marker")
        return b"".join((head, memoryview(data)[2:]))

    def _codestream(self, level: int, col: int, row: int) -> bytes:
        """A JPEG 2000 tile's codestream, checked to be one of the level's tile size."""
        _, _, data = self._raw(level, col, row)
        if not data:
            raise EncodedTileUnavailable("sparse tile: nothing stored")
        return self._checked_codestream(level, data)

    def _checked_codestream(self, level: int, data: bytes) -> bytes:
        """`data`, once checked to declare level `level`'s tile size."""
        lv = self.level(level)
        jpeg2000.check_size(data, lv.tile_height, lv.tile_width)
        return data

    def _ycbcr(self, level: int) -> bool:
        return bool(self._pages[level].compression == jpeg2000.APERIO_YCBCR)

    def read_tile_half(self, level: int, col: int, row: int) -> np.ndarray | None:
        if self._pages[level].compression not in jpeg2000.TIFF_COMPRESSIONS:
            return super().read_tile_half(level, col, row)
        lv = self.level(level)
        try:
            data = self._codestream(level, col, row)
        except EncodedTileUnavailable:
            return np.full((lv.tile_height // 2, lv.tile_width // 2, 3), 255, np.uint8)
        return jpeg2000.decode_half(data, self._ycbcr(level))

    def read_tile(self, level: int, col: int, row: int) -> np.ndarray:
        lv = self.level(level)
        if self._pages[level].compression in jpeg2000.TIFF_COMPRESSIONS:
            try:
                return jpeg2000.decode(self._codestream(level, col, row), self._ycbcr(level))
            except EncodedTileUnavailable:
                return np.full((lv.tile_height, lv.tile_width, 3), 255, np.uint8)
        if self.tile_codec(level) is TileCodec.JPEG:
            try:
                return jpeg.decode(self.read_encoded_tile(level, col, row))
            except EncodedTileUnavailable:
                return np.full((lv.tile_height, lv.tile_width, 3), 255, np.uint8)
        page, index, data = self._raw(level, col, row)
        if not data:
            return np.full((lv.tile_height, lv.tile_width, 3), 255, np.uint8)
        try:
            segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as exc:  # tifffile/imagecodecs raise many types for bad data
            raise CorruptSlide(f"cannot decode tile: {exc}") from exc
        if segment is None:
            raise CorruptSlide("tile decoded to nothing")
        pixels = np.asarray(segment).reshape(lv.tile_height, lv.tile_width, -1)[..., :3]
        return np.ascontiguousarray(pixels, dtype=np.uint8)

    @property
    def associated_names(self) -> tuple[str, ...]:
        return self._os.associated_names

    def read_associated(self, name: str) -> np.ndarray:
        return self._os.read_associated(name)

    def associated_shows_label(self, name: str) -> bool:
        return self._os.associated_shows_label(name)

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None  # type: ignore[assignment]
        if getattr(self, "_tif", None) is not None:
            self._tif.close()
        self._os.close()


def _runs(
    indices: list[int | None], offsets: Sequence[int], counts: Sequence[int]
) -> Iterator[tuple[int, int, int, int]]:
    """Runs of the tiles `indices` (page tile numbers, None: not stored) that can be read with
    one call: (first, stop, low, high), the tiles `indices[first:stop]` lying, in this order or
    its reverse, next to each other in bytes `low` .. `high` of the file, at most `_SPAN_BYTES`
    but for a tile larger than that alone. Tiles with nothing stored are in no run."""
    i, n = 0, len(indices)
    while i < n:
        index = indices[i]
        if index is None or not counts[index]:
            i += 1
            continue
        low = int(offsets[index])
        high = low + int(counts[index])
        stop, step = i + 1, 0
        while stop < n:
            j = indices[stop]
            if j is None or not counts[j]:
                break
            at, size = int(offsets[j]), int(counts[j])
            if at == high and step >= 0 and at + size - low <= _SPAN_BYTES:
                high, step = at + size, 1
            elif at + size == low and step <= 0 and high - at <= _SPAN_BYTES:
                low, step = at, -1
            else:
                break
            stop += 1
        yield i, stop, low, high
        i = stop
