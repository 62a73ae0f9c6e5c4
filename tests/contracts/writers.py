"""`WriterContract`: what every `PyramidWriter` must do, tested through the interface only.

A writer's test module subclasses the contract and provides `setup`: a `WriterSetup` that makes a
writer of one slide into a store, says where its Zarr group is, and which chunk codecs its levels
take. The contract writes small pyramids tile by tile (JPEG tiles encoded and decoded here with
imagecodecs, not the library's codec) and reads them back with zarr-python.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import imagecodecs
import numcodecs
import numpy as np
import pytest
import zarr
import zarr.storage

from wsi.errors import InvalidArgument, WsiError
from wsi.model import Level, SlideProperties
from wsi.published.layout import ATTRIBUTES
from wsi.store import Store, StoreSettings
from wsi.writers import BlankTiles, ChunkFormat, PyramidWriter, SlideInfo, StoredObject

SLIDE = "contract-slide"
INFO = SlideInfo(SLIDE, SlideProperties(vendor="synthetic", mpp_x=0.25, mpp_y=0.26), "contract")
PYRAMID = (
    Level(300, 200, 128, 128, 1.0),  # 3 x 2 tiles, edge tiles on both axes
    Level(150, 100, 128, 128, 2.0),  # 2 x 1
    Level(75, 50, 128, 128, 4.0),  # 1 x 1, smaller than a tile
)
JPEG = ChunkFormat("jpeg", 90)
ZSTD = ChunkFormat("zstd")


@dataclass(frozen=True)
class WriterSetup:
    """How to make the writer under test."""

    new: Callable[[Store, str], PyramidWriter]
    """A new writer of slide `slide_id` into `store`."""
    zarr_root: Callable[[str], str]
    """The store key of the Zarr group a writer of `slide_id` writes."""
    chunk_codecs: tuple[str, ...]
    """The chunk codecs the writer's levels take; `begin_level` refuses the others."""


def level_pixels(level: Level, seed: int) -> np.ndarray:
    """Smooth gradients with some noise: JPEG keeps them well and misplaced tiles show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : level.height, 0 : level.width]
    base = np.stack([x * 255 // level.width, y * 255 // level.height, (x + y) % 256], axis=-1)
    noise = rng.integers(-12, 13, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def tile_pixels(pixels: np.ndarray, level: Level, col: int, row: int) -> np.ndarray:
    """Tile (col, row), padded with white to the full tile size (edge tiles are full size)."""
    tw, th = level.tile_width, level.tile_height
    tile = np.full((th, tw, 3), 255, np.uint8)
    part = pixels[row * th : (row + 1) * th, col * tw : (col + 1) * tw]
    tile[: part.shape[0], : part.shape[1]] = part
    return tile


def encode(tile: np.ndarray, fmt: ChunkFormat) -> bytes:
    """A chunk as a caller hands it to `write_tile`: a baseline JPEG, or zstd of the RGB bytes."""
    if fmt.codec == "jpeg":
        return bytes(imagecodecs.jpeg8_encode(tile, level=fmt.quality))
    return bytes(numcodecs.Zstd(level=fmt.zstd_level).encode(np.ascontiguousarray(tile)))


def decode(chunk: bytes, fmt: ChunkFormat, level: Level) -> np.ndarray:
    if fmt.codec == "jpeg":
        return np.asarray(imagecodecs.jpeg8_decode(chunk))
    raw = numcodecs.Zstd().decode(chunk)
    return np.frombuffer(raw, np.uint8).reshape(level.tile_height, level.tile_width, 3)


@dataclass(frozen=True)
class Planned:
    """One level's tiles as encoded chunks, and the pixels a reader must get back from them."""

    level: Level
    fmt: ChunkFormat
    chunks: tuple[bytes, ...]
    """Row-major."""
    expected: np.ndarray
    """(height, width, 3): each chunk decoded independently, cropped to the level."""


def plan(levels: Sequence[Level] = PYRAMID, fmt: ChunkFormat = JPEG) -> list[Planned]:
    planned = []
    for index, lv in enumerate(levels):
        pixels = level_pixels(lv, seed=index)
        chunks = []
        expected = np.empty((lv.rows * lv.tile_height, lv.cols * lv.tile_width, 3), np.uint8)
        for row, col in itertools.product(range(lv.rows), range(lv.cols)):
            chunk = encode(tile_pixels(pixels, lv, col, row), fmt)
            chunks.append(chunk)
            y, x = row * lv.tile_height, col * lv.tile_width
            expected[y : y + lv.tile_height, x : x + lv.tile_width] = decode(chunk, fmt, lv)
        planned.append(Planned(lv, fmt, tuple(chunks), expected[: lv.height, : lv.width]))
    return planned


def write_row(writer: PyramidWriter, index: int, chunks: list[bytes | None], batched: bool) -> None:
    if batched:
        writer.write_tiles(index, chunks)
    else:
        for chunk in chunks:
            writer.write_tile(index, chunk)


def rows(p: Planned) -> list[list[bytes | None]]:
    cols = p.level.cols
    return [list(p.chunks[r * cols : (r + 1) * cols]) for r in range(p.level.rows)]


def write_sequentially(
    writer: PyramidWriter, planned: Sequence[Planned], batched: bool = False
) -> None:
    """One level after another, a row at a time (`write_tiles`) or a tile at a time."""
    for index, p in enumerate(planned):
        writer.begin_level(index, p.level, p.fmt)
        for row in rows(p):
            write_row(writer, index, row, batched)
        writer.end_level(index)


def write_interleaved(
    writer: PyramidWriter, planned: Sequence[Planned], batched: bool = False, together: bool = False
) -> None:
    """All levels open at once, a row of one level at a time in turn (as the builder does when
    a row of level k+1 is ready before level k is done), the levels ended smallest first (in
    one `end_levels` call when `together`, as the builder ends them)."""
    for index, p in enumerate(planned):
        writer.begin_level(index, p.level, p.fmt)
    level_rows = [rows(p) for p in planned]
    for row in range(max(len(r) for r in level_rows)):
        for index, chunks in enumerate(level_rows):
            if row < len(chunks):
                write_row(writer, index, chunks[row], batched)
    if together:
        writer.end_levels(list(reversed(range(len(planned)))))
        return
    for index in reversed(range(len(planned))):
        writer.end_level(index)


def stored_bytes(store: Store, objects: Sequence[StoredObject]) -> dict[str, bytes]:
    return {o.key: store.get(o.key) for o in objects}


def open_group(store: Store, key: str) -> zarr.Group:
    """The Zarr group at `key`, read by zarr-python straight from the local store's folder."""
    assert not store.settings.is_s3, "the writer contract reads back from a local store"
    local = zarr.storage.LocalStore(Path(store.full_url(key)), read_only=True)
    return zarr.open_group(store=local, mode="r")


def level_arrays(group: zarr.Group) -> list[np.ndarray]:
    """Every level of the OME-Zarr multiscale, as (height, width, 3)."""
    ome: Any = group.attrs["ome"]
    out = []
    for dataset in ome["multiscales"][0]["datasets"]:
        array = group[dataset["path"]]
        assert isinstance(array, zarr.Array) and array.dtype == np.uint8
        out.append(np.asarray(array[:]).transpose(1, 2, 0))
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


class WriterContract:
    """The `PyramidWriter` interface's promises; subclass and provide `setup`."""

    @pytest.fixture
    def setup(self) -> WriterSetup:
        raise NotImplementedError("a writer test module provides `setup`")

    @pytest.fixture
    def store(self, tmp_path: Path) -> Store:
        return Store(StoreSettings(str(tmp_path / "store")))

    @pytest.fixture
    def writer(self, setup: WriterSetup, store: Store) -> Iterator[PyramidWriter]:
        yield setup.new(store, SLIDE)

    def left_behind(self, store: Store) -> list[str]:
        return store.list_keys(SLIDE, include_temporary=True)

    # -- what is written reads back ---------------------------------------------------------------

    def test_pyramid_reads_back_in_zarr_python(
        self, setup: WriterSetup, store: Store, writer: PyramidWriter
    ) -> None:
        planned = plan()
        write_sequentially(writer, planned)
        writer.finish(INFO)
        group = open_group(store, setup.zarr_root(SLIDE))
        arrays = level_arrays(group)
        assert len(arrays) == len(planned)
        for index, (array, p) in enumerate(zip(arrays, planned, strict=True)):
            assert array.shape == (p.level.height, p.level.width, 3), index
            np.testing.assert_array_equal(array, p.expected, err_msg=f"level {index}")
        ome: Any = group.attrs["ome"]
        (multiscale,) = ome["multiscales"]
        assert [a["name"] for a in multiscale["axes"]] == ["c", "y", "x"]
        for dataset, p in zip(multiscale["datasets"], planned, strict=True):
            (scale,) = dataset["coordinateTransformations"]
            ds = p.level.downsample
            assert scale["scale"] == pytest.approx([1.0, 0.26 * ds, 0.25 * ds])

    def test_levels_written_interleaved_store_the_same_bytes(
        self, setup: WriterSetup, tmp_path: Path
    ) -> None:
        planned = plan()
        written = []
        for name, write in (("seq", write_sequentially), ("mixed", write_interleaved)):
            store = Store(StoreSettings(str(tmp_path / name)))
            writer = setup.new(store, SLIDE)
            write(writer, planned)
            written.append(stored_bytes(store, writer.finish(INFO)))
            arrays = level_arrays(open_group(store, setup.zarr_root(SLIDE)))
            for index, (array, p) in enumerate(zip(arrays, planned, strict=True)):
                np.testing.assert_array_equal(array, p.expected, err_msg=f"{name} level {index}")
        assert written[0] == written[1]

    def test_levels_ended_together_record_what_levels_ended_one_by_one(
        self, setup: WriterSetup, tmp_path: Path
    ) -> None:
        """`end_levels` (which a writer may run side by side) records the same objects, in the
        same order, with the same bytes, as `end_level` of each level in turn."""
        planned = plan()
        finished, written = [], []
        for together in (False, True):
            store = Store(StoreSettings(str(tmp_path / f"together-{together}")))
            writer = setup.new(store, SLIDE)
            write_interleaved(writer, planned, batched=True, together=together)
            objects = writer.finish(INFO)
            finished.append(objects)
            written.append(stored_bytes(store, objects))
        assert len(finished[0]) > len(planned)
        assert finished[0] == finished[1]
        assert written[0] == written[1]

    def test_write_tiles_stores_what_write_tile_stores(
        self, setup: WriterSetup, tmp_path: Path
    ) -> None:
        """`write_tiles` is several `write_tile`s in one call: how a caller batches its tiles
        must not change the stored bytes (a rerun of a conversion must give the same bytes)."""
        planned = plan()
        written = []
        for batched in (False, True):
            store = Store(StoreSettings(str(tmp_path / f"batched-{batched}")))
            writer = setup.new(store, SLIDE)
            write_interleaved(writer, planned, batched)
            written.append(stored_bytes(store, writer.finish(INFO)))
        assert written[0].keys() == written[1].keys()
        differ = sorted(k for k in written[0] if written[0][k] != written[1][k])
        assert differ == []

    def test_absent_tiles_read_as_the_fill(
        self, setup: WriterSetup, store: Store, writer: PyramidWriter
    ) -> None:
        """`None` tiles (blank glass) are not stored: zarr-python reads the level's fill grey
        there and every other tile as written; a level of nothing but absent tiles reads as
        the fill too (a writer may store one placeholder of the fill where a format needs it)."""
        planned = plan()
        blank = BlankTiles(fill=240, delta_e76=4.2)
        absent = {0: {1, 3}, 1: {0, 1}, 2: set()}
        for index, p in enumerate(planned):
            writer.begin_level(index, p.level, p.fmt, blank)
            chunks = [None if i in absent[index] else c for i, c in enumerate(p.chunks)]
            writer.write_tiles(index, chunks)
            writer.end_level(index)
        writer.finish(INFO)
        group = open_group(store, setup.zarr_root(SLIDE))
        for index, (array, p) in enumerate(zip(level_arrays(group), planned, strict=True)):
            stored = group[str(index)]
            assert isinstance(stored, zarr.Array) and stored.fill_value == 240
            expected = p.expected.copy()
            tw, th = p.level.tile_width, p.level.tile_height
            for i in absent[index]:
                row, col = divmod(i, p.level.cols)
                expected[row * th : (row + 1) * th, col * tw : (col + 1) * tw] = 240
            np.testing.assert_array_equal(array, expected, err_msg=f"level {index}")
        attrs: Any = group.attrs[ATTRIBUTES]
        assert (attrs["fill"], attrs["background_delta_e76"]) == (240, 4.2)

    @pytest.mark.parametrize("fmt", [JPEG, ZSTD], ids=["jpeg", "zstd"])
    def test_each_chunk_codec_reads_back_or_is_refused(
        self, setup: WriterSetup, store: Store, writer: PyramidWriter, fmt: ChunkFormat
    ) -> None:
        planned = plan(PYRAMID[:2], fmt)
        if fmt.codec not in setup.chunk_codecs:
            try:
                with pytest.raises(InvalidArgument):
                    writer.begin_level(0, planned[0].level, fmt)
            finally:
                writer.abort()
            assert self.left_behind(store) == []
            return
        write_sequentially(writer, planned)
        writer.finish(INFO)
        arrays = level_arrays(open_group(store, setup.zarr_root(SLIDE)))
        for index, (array, p) in enumerate(zip(arrays, planned, strict=True)):
            np.testing.assert_array_equal(array, p.expected, err_msg=f"level {index}")

    @pytest.mark.parametrize("fmt", [ChunkFormat("jpeg", 95), ZSTD], ids=["jpeg", "zstd"])
    def test_associated_images_read_back(
        self, setup: WriterSetup, store: Store, writer: PyramidWriter, fmt: ChunkFormat
    ) -> None:
        if fmt.codec not in setup.chunk_codecs:
            with pytest.raises(InvalidArgument):
                writer.write_associated("label", level_pixels(Level(90, 60, 90, 60), 7), fmt)
            return
        write_sequentially(writer, plan(PYRAMID[2:]))
        images = {"label": level_pixels(Level(90, 60, 90, 60), 7)}
        images["thumbnail"] = level_pixels(Level(61, 47, 61, 47), 8)
        for name, pixels in images.items():
            writer.write_associated(name, pixels, fmt)
        objects = writer.finish(INFO)
        group = open_group(store, setup.zarr_root(SLIDE))
        for name, pixels in images.items():
            array = group[f"associated/{name}"]
            assert isinstance(array, zarr.Array)
            read = np.asarray(array[:]).transpose(1, 2, 0)
            assert read.shape == pixels.shape
            if fmt.codec == "zstd":
                np.testing.assert_array_equal(read, pixels)
            else:
                assert psnr(read, pixels) > 35, name
        for name in images:
            assert any(f"/associated/{name}/" in o.key for o in objects), name

    # -- the object list --------------------------------------------------------------------------

    def test_finish_lists_every_object_with_its_size_and_crc32c(
        self, store: Store, writer: PyramidWriter
    ) -> None:
        write_interleaved(writer, plan(), batched=True)
        writer.write_associated("macro", level_pixels(Level(80, 40, 80, 40), 3), JPEG)
        objects = writer.finish(INFO)
        assert all(isinstance(o, StoredObject) for o in objects)
        keys = [o.key for o in objects]
        assert len(keys) == len(set(keys))
        assert sorted(keys) == self.left_behind(store)  # every object, and nothing else
        for o in objects:
            data = store.get(o.key)
            assert o.size == len(data) == store.size(o.key), o.key
            assert o.crc32c == f"{google_crc32c.value(data):08x}", o.key

    # -- refusals ---------------------------------------------------------------------------------

    def test_too_many_tiles_are_refused(self, store: Store, writer: PyramidWriter) -> None:
        (p,) = plan(PYRAMID[1:2])
        writer.begin_level(0, p.level, p.fmt)
        writer.write_tiles(0, list(p.chunks))
        with pytest.raises(WsiError):
            writer.write_tile(0, p.chunks[0])
        with pytest.raises(WsiError):
            writer.write_tiles(0, [p.chunks[0]])
        writer.abort()
        assert self.left_behind(store) == []

    def test_too_few_tiles_are_refused(self, store: Store, writer: PyramidWriter) -> None:
        (p,) = plan(PYRAMID[:1])
        writer.begin_level(0, p.level, p.fmt)
        writer.write_tiles(0, list(p.chunks[:-1]))
        with pytest.raises(WsiError):
            writer.end_level(0)
        writer.abort()
        assert self.left_behind(store) == []

    def test_finish_with_a_level_open_is_refused(self, store: Store, writer: PyramidWriter) -> None:
        planned = plan(PYRAMID[1:])
        writer.begin_level(0, planned[0].level, planned[0].fmt)
        writer.write_tiles(0, list(planned[0].chunks))
        writer.end_level(0)
        writer.begin_level(1, planned[1].level, planned[1].fmt)
        with pytest.raises(WsiError):
            writer.finish(INFO)
        writer.abort()
        assert self.left_behind(store) == []

    def test_a_level_begun_twice_is_refused(self, writer: PyramidWriter) -> None:
        (p,) = plan(PYRAMID[2:])
        writer.begin_level(0, p.level, p.fmt)
        with pytest.raises(InvalidArgument):
            writer.begin_level(0, p.level, p.fmt)
        writer.abort()

    def test_a_level_not_begun_is_refused(self, store: Store, writer: PyramidWriter) -> None:
        (p,) = plan(PYRAMID[2:])
        for call in (
            lambda: writer.write_tile(0, p.chunks[0]),
            lambda: writer.write_tiles(0, list(p.chunks)),
            lambda: writer.end_level(0),
        ):
            with pytest.raises(WsiError):
                call()
        writer.abort()
        assert self.left_behind(store) == []

    # -- abort ------------------------------------------------------------------------------------

    def test_abort_leaves_nothing_half_written(self, store: Store, writer: PyramidWriter) -> None:
        planned = plan()
        for index, p in enumerate(planned):
            writer.begin_level(index, p.level, p.fmt)
        writer.write_tiles(2, list(planned[2].chunks))
        writer.end_level(2)  # one level complete,
        writer.write_tiles(1, list(planned[1].chunks))  # one with every tile but not ended,
        writer.write_tiles(0, list(planned[0].chunks[:4]))  # one half written
        writer.abort()
        assert self.left_behind(store) == []
        writer.abort()  # nothing left to release: not an error
        assert self.left_behind(store) == []

    def test_abort_before_anything_is_harmless(self, store: Store, writer: PyramidWriter) -> None:
        writer.abort()
        assert self.left_behind(store) == []
