"""What the conversion pipeline's shortcuts must not change: the tiles handed out, the checks
on them, the bytes stored whatever the thread count, and memory bounded by the slide's width."""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.conftest import make_tiff, sample
from wsi.codecs import jpeg
from wsi.convert import ConvertSettings, convert_slide
from wsi.errors import CorruptSlide
from wsi.pyramid.builder import PyramidSettings
from wsi.sources.tiff_backend import TiffSource
from wsi.store.objects import Store, StoreSettings

_RGB = 2


def _stored_tiles(path: Path) -> tuple[tifffile.TiffPage, list[bytes]]:
    """Level 0's tiles as the file stores them, read by tifffile's offsets (not our reader)."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        raw = path.read_bytes()
        tiles = [
            raw[offset : offset + count]
            for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True)
        ]
        return page, tiles


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "synthetic"])
def test_encoded_tiles_are_the_stored_tiles_completed(name: str, tmp_path: Path) -> None:
    path = make_tiff(tmp_path / "s.tif", 1237, 1029) if name == "synthetic" else sample(name)
    page, stored = _stored_tiles(path)
    rgb = page.photometric == _RGB
    with TiffSource(path) as source:
        level = source.levels[0]
        order = list(enumerate(stored))
        # In order (runs of tiles read at once) and backwards (every tile a new run).
        for index, data in order + order[::-1]:
            row, col = divmod(index, level.cols)
            expected = jpeg.complete_tile(data, page.jpegtables, rgb)
            assert source.read_encoded_tile(0, col, row) == expected


def test_a_tile_declaring_another_size_is_refused_after_checked_ones(tmp_path: Path) -> None:
    """The size check is skipped only for a header already checked: one tile whose frame
    header declares another height is refused, read after its level's good tiles."""
    path = make_tiff(tmp_path / "s.tif", 2048, 512, pyramid=False)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        offset = int(page.dataoffsets[5])
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0", offset)
    data[sof + 5 : sof + 7] = (512).to_bytes(2, "big")  # the frame's height: 256 -> 512
    bad = tmp_path / "bad.tif"
    bad.write_bytes(bytes(data))
    with TiffSource(bad) as source:
        for col in range(5):
            source.read_encoded_tile(0, col, 0)
        with pytest.raises(CorruptSlide, match="declares 256x512"):
            source.read_encoded_tile(0, 5, 0)
        source.read_encoded_tile(0, 6, 0)


def _objects(store: Path) -> dict[str, str]:
    return {
        str(f.relative_to(store)): hashlib.md5(f.read_bytes()).hexdigest()
        for f in sorted(store.rglob("*"))
        if f.is_file()
    }


@pytest.mark.parametrize("keep_source_jpeg", [False, True])
def test_every_object_is_the_same_whatever_the_threads(
    tmp_path: Path, keep_source_jpeg: bool
) -> None:
    """One thread, or more threads than cores: every stored object is the same bytes (the
    tiles of a derived level are filled from their quadrants, never left as they were
    allocated; glass is judged the same)."""
    path = make_tiff(tmp_path / "s.tif", 2600, 1800, pyramid=False, seed=3)
    found = []
    for workers in (1, 3):
        pyramid = PyramidSettings(
            workers=workers,
            optimize_huffman=not keep_source_jpeg,
            keep_background=keep_source_jpeg,
        )
        out = tmp_path / f"out{workers}"
        convert_slide(path, Store(StoreSettings(str(out))), ConvertSettings(pyramid), "s")
        found.append(_objects(out))
    assert len(found[0]) > 5
    assert found[0] == found[1]


def _peak_bytes(path: Path, out: Path) -> int:
    settings = ConvertSettings(PyramidSettings(workers=2), formats=("zarr",))
    tracemalloc.start()
    try:
        convert_slide(path, Store(StoreSettings(str(out))), settings, "s")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def test_memory_grows_with_width_not_height(tmp_path: Path) -> None:
    """Four times the rows, the same width: the same peak memory but for the rows the two more
    levels hold (tracemalloc sees numpy's buffers and every thread). Both slides are taller
    than the pipeline (8 tasks of 2 tile rows in flight, the levels below trailing them): a
    slide of a few tile rows never fills it, and its peak says nothing about a tall one's (a
    4096 x 1024 slide peaked at 6 MB, a 4096 x 6144 one at 20 MB, a 4096 x 24576 one at 25 MB:
    the growth stops once the pipeline is full). Before the fill's census was counted tile by
    tile, its 64 sampled tiles and their blocks took 57 MB, under which any growth hid; the
    absolute bound keeps such a cost from coming back."""
    short = make_tiff(tmp_path / "short.tif", 2048, 6144, pyramid=False)
    tall = make_tiff(tmp_path / "tall.tif", 2048, 24576, pyramid=False)
    low = _peak_bytes(short, tmp_path / "a")
    high = _peak_bytes(tall, tmp_path / "b")
    assert high < 1.25 * low + 2 * 2**20, f"{high / 1e6:.1f} MB vs {low / 1e6:.1f} MB"
    assert high < 24 * 2**20, f"{high / 1e6:.1f} MB"


def test_a_jpeg_of_another_size_is_refused_not_half_written() -> None:
    """TurboJPEG writes a smaller stream into part of the target and leaves the rest as it was
    (uninitialised memory where the builder no longer pre-fills derived tiles): refused."""
    stream = jpeg.encode(np.full((64, 64, 3), 90, np.uint8), 90, True)
    target = np.full((64, 64, 3), 7, np.uint8)
    with pytest.raises(CorruptSlide, match=r"decodes to \(32, 32\), not \(64, 64\)"):
        jpeg.decode_into(stream, target, half=True)
    assert (target == 7).all()
    jpeg.decode_into(stream, target[:32, :32], half=True)
    assert (target[:32, :32] == 90).all() and (target[32:] == 7).all()
