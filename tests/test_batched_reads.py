"""`read_encoded_tiles`, a row of tiles in one call, against `read_encoded_tile` tile by tile.

The TIFF family (generic TIFF and SVS, Philips, Leica, Ventana) overrides it with one read per run
of adjoining tiles; every other backend keeps the base class's loop. Both must give exactly what
the per-tile read gives: the same bytes, None where it raises EncodedTileUnavailable (tiles not
stored, levels not stored as JPEG or JPEG 2000), and the same error where it fails.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pytest
import tifffile

from sample_data.make_bif import write_bif
from sample_data.make_leica import write_leica
from sample_data.make_mirax import tissue_image
from sample_data.make_philips import write_philips
from wsi.errors import CorruptSlide, EncodedTileUnavailable, InvalidArgument
from wsi.model import TileCodec
from wsi.pyramid.builder import BLOCK_TILES
from wsi.sources import (
    DicomSource,
    LeicaSource,
    PhilipsSource,
    SlideSource,
    TiffSource,
    VentanaSource,
)
from wsi.store.head_last import open_head_last
from wsi.store.objects import Store, StoreSettings
from wsi.writers.dicom import HEADER_BLOCK

from .conftest import make_tiff

Tiles = list[bytes | None]


def one_by_one(source: SlideSource, level: int, cols: range, row: int) -> Tiles:
    """The per-tile reads the batched read must equal."""
    tiles: Tiles = []
    for col in cols:
        try:
            tiles.append(source.read_encoded_tile(level, col, row))
        except EncodedTileUnavailable:
            tiles.append(None)
    return tiles


def spans(cols: int) -> list[range]:
    """The builder's blocks of a row, the whole row, its last tile alone, and the row backwards."""
    blocks = [range(c, min(c + BLOCK_TILES, cols)) for c in range(0, cols, BLOCK_TILES)]
    return [*blocks, range(cols), range(cols - 1, cols), range(cols - 1, -1, -1)]


def compare_every_row(source: SlideSource) -> tuple[int, int]:
    """Assert batched == per-tile (and == the base class's loop) over every row of every level;
    the numbers of tiles read as bytes and as None."""
    stored = absent = 0
    for level, lv in enumerate(source.levels):
        for row in range(lv.rows):
            for cols in spans(lv.cols):
                want = one_by_one(source, level, cols, row)
                assert source.read_encoded_tiles(level, cols, row) == want, (level, row, cols)
                assert SlideSource.read_encoded_tiles(source, level, cols, row) == want
            tiles = one_by_one(source, level, range(lv.cols), row)
            stored += sum(t is not None for t in tiles)
            absent += sum(t is None for t in tiles)
    return stored, absent


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Small slides of each TIFF backend, made once: sparse tiles (Philips' blank band, tiles
    outside Leica's main image and Ventana's area of interest), a level decoded through
    OpenSlide (Ventana), and a page whose last tile ends the file (Philips, written by
    tifffile: each page's tags, then its tiles)."""
    folder = tmp_path_factory.mktemp("batched")
    image = tissue_image(1237, 1029, seed=9)
    image[:, 300:800] = 255
    made = {
        "tiff": make_tiff(folder / "syn.tif", 1237, 1029),
        "lzw": make_tiff(folder / "lzw.tif", 600, 400, compression="lzw", pyramid=False),
        "philips": write_philips(folder / "philips.tiff", image, tile=256, levels=3),
        "leica": write_leica(folder / "leica.scn", image[:1024, :1024], offset=(1024, 512)),
        "ventana-aoi": write_bif(folder / "aoi.bif", image[:1024, :1236], aoi=(2, 0, 3, 4)),
    }
    return made.__getitem__


@pytest.mark.parametrize(
    ("name", "backend", "sparse"),
    [
        ("tiff", TiffSource, False),
        ("philips", PhilipsSource, True),
        ("leica", LeicaSource, True),
        ("ventana-aoi", VentanaSource, True),
    ],
)
def test_generated_slides_read_the_same(
    slides: Callable[[str], Path], name: str, backend: type[TiffSource], sparse: bool
) -> None:
    with backend(slides(name)) as source:
        stored, absent = compare_every_row(source)
    assert stored > 0
    assert (absent > 0) is sparse


def test_a_level_not_stored_as_jpeg_reads_as_none(slides: Callable[[str], Path]) -> None:
    with TiffSource(slides("lzw")) as source:
        assert source.tile_codec(0) is TileCodec.OTHER
        assert compare_every_row(source) == (0, source.levels[0].tile_count)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("CMU-1-Small-Region.svs", id="aperio-rgb-jpeg"),
        pytest.param("openslide-python-fixtures/small.svs", id="tiny-aperio"),
        pytest.param("standin:aperio-jp2k.svs", id="aperio-jp2k"),
    ],
)
def test_aperio_slides_read_the_same(slide_path: Callable[[str], Path], name: str) -> None:
    """RGB-coded JPEG tiles (an Adobe marker added per tile) and JPEG 2000 codestreams."""
    with TiffSource(slide_path(name)) as source:
        stored, absent = compare_every_row(source)
    assert stored > 0 and absent == 0


def test_the_default_loop_on_a_backend_without_an_override(
    slide_path: Callable[[str], Path],
) -> None:
    """DicomSource hands out its JPEG frames one by one: the base class's loop."""
    with DicomSource(slide_path("openslide-python-fixtures/boxes_0.dcm")) as source:
        assert type(source).read_encoded_tiles is SlideSource.read_encoded_tiles
        stored, _ = compare_every_row(source)
        assert stored > 0
        lv = source.levels[0]
        with pytest.raises(InvalidArgument):
            source.read_encoded_tiles(0, range(lv.cols + 1), 0)


def test_a_tile_outside_the_level_is_refused(slides: Callable[[str], Path]) -> None:
    with TiffSource(slides("tiff")) as source:
        lv = source.levels[0]
        for cols, row in (
            (range(lv.cols - 1, lv.cols + 1), 0),
            (range(2), lv.rows),
            (range(-1, 1), 0),
        ):
            with pytest.raises(InvalidArgument):
                source.read_encoded_tiles(0, cols, row)
            with pytest.raises(InvalidArgument):
                SlideSource.read_encoded_tiles(source, 0, cols, row)
        assert source.read_encoded_tiles(0, range(0), 0) == []


def outcome(read: Callable[[], Tiles]) -> Tiles | tuple[type[Exception], str]:
    """What a read returns, or the type and message of the error it raises."""
    try:
        return read()
    except Exception as exc:
        return type(exc), str(exc)


def tile_table(path: Path, level: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Offsets and byte counts of the tiles of level `level` (the tiled pages in order), as
    tifffile reads them."""
    with tifffile.TiffFile(path) as tif:
        page = [p for p in tif.pages if isinstance(p, tifffile.TiffPage) and p.is_tiled][level]
        return tuple(page.dataoffsets), tuple(page.databytecounts)


def patched(
    source: Path,
    dest: Path,
    level: int,
    tile: int,
    *,
    offset: int | None = None,
    count: int | None = None,
    to_the_end: bool = False,
    cut: int = 0,
) -> Path:
    """A copy of the TIFF `source` whose tile `tile` of level `level` is given another offset
    and/or byte count; with `to_the_end`, its bytes are appended to the file and it points
    there (it ends the file); then `cut` bytes are cut off the file's end."""
    shutil.copyfile(source, dest)
    with tifffile.TiffFile(source) as tif:
        page = [p for p in tif.pages if isinstance(p, tifffile.TiffPage) and p.is_tiled][level]
        if to_the_end:
            offset = source.stat().st_size
        patches = []
        for name, value in (("TileOffsets", offset), ("TileByteCounts", count)):
            if value is None:
                continue
            tag = page.tags[name]
            width = tag.valuebytecount // tag.count  # LONG or LONG8
            packed = struct.pack(tif.byteorder + {4: "I", 8: "Q"}[width], value)
            patches.append((tag.valueoffset + tile * width, packed))
        with dest.open("r+b") as f:
            if to_the_end:
                f.seek(page.dataoffsets[tile])
                data = f.read(page.databytecounts[tile])
                f.seek(0, 2)
                f.write(data)
            for at, packed in patches:
                f.seek(at)
                f.write(packed)
            f.truncate(f.seek(0, 2) - cut)
    return dest


def middle_stored_tile(path: Path, cols: int, row: int) -> int:
    """A stored tile of level 0's `row` with stored tiles before it in the row."""
    _, counts = tile_table(path, 0)
    stored = [row * cols + c for c in range(cols) if counts[row * cols + c]]
    assert len(stored) >= 3
    return stored[-2]


def test_a_tile_that_ends_the_file(slides: Callable[[str], Path], tmp_path: Path) -> None:
    """tifffile writes the last page's tiles last (the Philips generator's last level ends
    with a tile), and a tile of level 0 moved to the file's end."""
    path = slides("philips")
    with PhilipsSource(path) as source:
        levels = source.levels
    last = len(levels) - 1
    offsets, counts = tile_table(path, last)
    end = max(range(len(offsets)), key=lambda i: offsets[i])
    assert offsets[end] + counts[end] == path.stat().st_size
    lv = levels[0]
    row = lv.rows - 1
    tile = middle_stored_tile(path, lv.cols, row)
    moved = patched(path, tmp_path / "moved.tiff", 0, tile, to_the_end=True)
    for file, level, at in ((path, last, end), (moved, 0, tile)):
        with PhilipsSource(file) as source:
            cols = range(levels[level].cols)
            tiles = source.read_encoded_tiles(level, cols, at // len(cols))
            assert tiles[at % len(cols)] is not None
            assert tiles == one_by_one(source, level, cols, at // len(cols))
    with PhilipsSource(path) as original, PhilipsSource(moved) as source:
        cols = range(lv.cols)
        assert source.read_encoded_tiles(0, cols, row) == one_by_one(original, 0, cols, row)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        pytest.param({"count": 2**31}, "truncated", id="byte-count-past-the-end"),
        pytest.param({"offset": 2**31}, "truncated", id="offset-past-the-end"),
        pytest.param({"offset": 0}, "SOI", id="offset-at-the-file-header"),
        pytest.param({"to_the_end": True, "cut": 100}, "truncated", id="cut-in-the-last-tile"),
    ],
)
def test_a_damaged_tile_gives_the_per_tile_error(
    slides: Callable[[str], Path], tmp_path: Path, damage: dict[str, Any], message: str
) -> None:
    """A damaged tile in the middle of a run of the last row of level 0 (past Philips' blank
    band), or the file cut in that tile moved to its end: the batched read fails with the
    error of the per-tile read of that tile."""
    path = slides("philips")
    with PhilipsSource(path) as source:
        lv = source.levels[0]
    row = lv.rows - 1
    bad = patched(path, tmp_path / "bad.tiff", 0, middle_stored_tile(path, lv.cols, row), **damage)
    cols = range(lv.cols)
    with PhilipsSource(bad) as source:
        per_tile = outcome(lambda: one_by_one(source, 0, cols, row))
        assert isinstance(per_tile, tuple) and per_tile[0] is CorruptSlide
        assert message in per_tile[1]
        assert outcome(lambda: source.read_encoded_tiles(0, cols, row)) == per_tile
        assert outcome(lambda: SlideSource.read_encoded_tiles(source, 0, cols, row)) == per_tile
        assert source.read_encoded_tiles(0, cols, 0) == one_by_one(source, 0, cols, 0)


def test_a_level_object_written_in_parts_is_the_joined_bytes(tmp_path: Path) -> None:
    """The writer's side of a row: its parts (item headers, tiles, pads) go to a local
    head-last object in gathered writes, more than one `writev` takes at once (1,024), over
    several starts of the writeback (every 8 MiB): the object is the parts joined, and its
    CRC32C theirs."""
    rng = np.random.default_rng(5)
    rows = [
        [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in sizes]
        for sizes in rng.integers(1, 12_000, (4, 1100))
    ]
    rows[1] = [b"", *rows[1], b"\0"]
    store = Store(StoreSettings(str(tmp_path / "store")))
    head, tail = b"H" * HEADER_BLOCK, b"tail"
    with open_head_last(store, "s/level") as target:
        for parts in rows:
            target.write_parts(parts)
        stored = target.finish(head, tail)
    whole = head + b"".join(b"".join(parts) for parts in rows) + tail
    assert sum(map(len, rows[0])) * len(rows) > 2 * 8 * 1024 * 1024
    assert Path(store.path("s/level")).read_bytes() == whole
    assert (stored.size, stored.crc32c) == (len(whole), f"{google_crc32c.value(whole):08x}")
