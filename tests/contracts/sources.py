"""`SourceContract`: what every `SlideSource` backend must do, tested through the interface only.

A backend's test module subclasses the contract and provides `case`: a `SourceCase` naming a slide
file, the backend class to open it with, and an independent reader of the same file (OpenSlide,
tifffile) that the backend's pixels must equal. Known failures of one case are declared in the
case (`known_failures`) and become strict xfails of just those tests.
"""

from __future__ import annotations

import abc
import io
import itertools
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from wsi.errors import (
    CorruptSlide,
    EncodedTileUnavailable,
    InvalidArgument,
    UnsupportedSlide,
    WsiError,
)
from wsi.model import ASSOCIATED_KINDS, Level, SlideProperties, TileCodec
from wsi.sources import SlideSource

WHITE = 255


class Reference(abc.ABC):
    """An independent reader of the slide's pixels, in level coordinates, white outside."""

    @abc.abstractmethod
    def dimensions(self, level: int) -> tuple[int, int] | None:
        """(width, height) of level `level`, or None when this reader does not see that level."""

    @abc.abstractmethod
    def level_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Pixels of a rectangle inside level `level` as (height, width, 3) uint8 RGB."""

    def close(self) -> None:
        """Release the file."""

    def region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Any rectangle: the part inside the level from `level_region`, white elsewhere."""
        size = self.dimensions(level)
        assert size is not None
        out = np.full((height, width, 3), WHITE, np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, size[0]), min(y + height, size[1])
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self.level_region(
                level, x0, y0, x1 - x0, y1 - y0
            )
        return out


class OpenSlideReference(Reference):
    """OpenSlide's reading, transparent parts composited on white (in float, not as we do)."""

    def __init__(self, path: Path) -> None:
        self._slide = openslide.OpenSlide(str(path))

    def dimensions(self, level: int) -> tuple[int, int] | None:
        dims = self._slide.level_dimensions
        return dims[level] if level < len(dims) else None

    def level_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        ds = self._slide.level_downsamples[level]
        # OpenSlide takes a level-0 origin and paints the level from origin / downsample: a
        # fraction of a pixel (an interpolated image) unless the downsample divides it. From the
        # level's corner the offset is 0 whatever the downsample: read from there and crop.
        ox, oy = (x, y) if ds == int(ds) else (0, 0)
        origin = (int(ox * ds), int(oy * ds))
        rgba = np.asarray(self._slide.read_region(origin, level, (x - ox + width, y - oy + height)))
        alpha = rgba[..., 3:4].astype(np.float64) / 255
        rgb = np.round(rgba[..., :3] * alpha + WHITE * (1 - alpha)).astype(np.uint8)
        return rgb[y - oy :, x - ox :]

    def close(self) -> None:
        self._slide.close()


class TifffileReference(Reference):
    """tifffile's reading of the first series (its pyramid levels): the stored pixels exactly."""

    def __init__(self, path: Path) -> None:
        self._tif = tifffile.TiffFile(path)
        self._levels = self._tif.series[0].levels
        self._cache: dict[int, np.ndarray] = {}

    def dimensions(self, level: int) -> tuple[int, int] | None:
        if level >= len(self._levels):
            return None
        shape = self._levels[level].shape
        return shape[1], shape[0]

    def level_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        if level not in self._cache:
            self._cache[level] = np.asarray(self._levels[level].asarray())
        return self._cache[level][y : y + height, x : x + width, :3]

    def close(self) -> None:
        self._tif.close()


@dataclass(frozen=True)
class SourceCase:
    """One slide file read by one backend."""

    path: Path
    backend: type[SlideSource]
    reference: Callable[[Path], Reference] | None
    """An independent reader of `path`; None only where no other reader reads the file."""
    known_failures: tuple[tuple[str, str], ...] = ()
    """(test name, reason): that test is a strict xfail for this case."""


def corner_tiles(level: Level) -> list[tuple[int, int]]:
    """The first and last column and row of a level's grid (edge tiles are the interesting ones)."""
    cols = sorted({0, level.cols - 1})
    rows = sorted({0, level.rows - 1})
    return list(itertools.product(cols, rows))


def crossing_window(level: Level) -> tuple[int, int, int, int]:
    """A rectangle (x, y, width, height) inside the level that crosses tile edges where it can."""
    x = level.tile_width // 2 if level.cols > 1 else 0
    y = level.tile_height // 2 if level.rows > 1 else 0
    width = min(level.width - x, max(level.tile_width, 16), 700)
    height = min(level.height - y, max(level.tile_height, 16), 700)
    return x, y, width, height


def windows(level: Level) -> list[tuple[int, int, int, int]]:
    """Rectangles to compare: one crossing tile edges, one over the bottom-right corner, one over
    the top-left corner (both partly outside the level)."""
    return [
        crossing_window(level),
        (level.width - 7, level.height - 5, 20, 15),
        (-5, -3, 10, 10),
    ]


def inside(level: Level, col: int, row: int) -> tuple[int, int]:
    """(height, width) of the part of tile (col, row) that lies inside the level."""
    return (
        min(level.tile_height, level.height - row * level.tile_height),
        min(level.tile_width, level.width - col * level.tile_width),
    )


class SourceContract:
    """The `SlideSource` interface's promises; subclass and provide `case`."""

    @pytest.fixture
    def case(self) -> SourceCase:
        raise NotImplementedError("a slide source test module provides `case`")

    @pytest.fixture(autouse=True)
    def _known_failures(self, request: pytest.FixtureRequest, case: SourceCase) -> None:
        reason = dict(case.known_failures).get(request.function.__name__)
        if reason is not None:
            request.applymarker(pytest.mark.xfail(strict=True, reason=reason))

    @pytest.fixture
    def source(self, case: SourceCase) -> Iterator[SlideSource]:
        with case.backend(case.path) as src:
            yield src

    @pytest.fixture
    def reference(self, case: SourceCase) -> Iterator[Reference]:
        if case.reference is None:
            pytest.skip(f"no reader besides {case.backend.name} reads {case.path.name}")
        ref = case.reference(case.path)
        yield ref
        ref.close()

    # -- probing and opening --------------------------------------------------------------------

    def test_backend_is_available_and_claims_its_file(self, case: SourceCase) -> None:
        assert isinstance(case.backend.name, str) and re.fullmatch(r"[a-z0-9-]+", case.backend.name)
        assert case.backend.is_available()
        assert case.backend.can_open(case.path) is True

    def test_probe_never_raises(self, case: SourceCase, tmp_path: Path) -> None:
        junk = tmp_path / f"junk{case.path.suffix}"
        junk.write_bytes(b"\x00not a slide" * 512)
        empty = tmp_path / "empty-folder"
        empty.mkdir()
        for path in (tmp_path / f"missing{case.path.suffix}", junk, empty):
            assert case.backend.can_open(path) is False, path.name

    def test_opening_what_is_not_a_slide_raises_a_library_error(
        self, case: SourceCase, tmp_path: Path
    ) -> None:
        junk = tmp_path / f"junk{case.path.suffix}"
        junk.write_bytes(b"\x00not a slide" * 512)
        truncated = tmp_path / f"truncated{case.path.suffix}"
        truncated.write_bytes(case.path.read_bytes()[:300])
        for path in (junk, truncated):
            with pytest.raises((UnsupportedSlide, CorruptSlide)):
                case.backend(path).close()

    def test_close_is_idempotent(self, case: SourceCase) -> None:
        src = case.backend(case.path)
        src.read_tile(0, 0, 0)
        src.close()
        src.close()
        with case.backend(case.path) as again:
            assert again.levels == src.levels
        again.close()

    # -- geometry -------------------------------------------------------------------------------

    def test_levels_are_consistent(self, source: SlideSource) -> None:
        levels = source.levels
        assert levels and all(isinstance(lv, Level) for lv in levels)
        base = levels[0]
        assert base.downsample == pytest.approx(1.0)
        for upper, lower in itertools.pairwise(levels):
            assert lower.width <= upper.width and lower.height <= upper.height
            assert (lower.width, lower.height) != (upper.width, upper.height)
            assert lower.downsample > upper.downsample
        for lv in levels:
            assert lv.tile_width > 0 and lv.tile_height > 0
            assert lv.downsample >= 1
            # The downsample is the size ratio to level 0, up to rounding of the level's size.
            assert abs(base.width / lv.downsample - lv.width) <= 1, lv
            assert abs(base.height / lv.downsample - lv.height) <= 1, lv
        assert source.level(len(levels) - 1) == levels[-1]

    def test_tiles_have_the_declared_shape(self, source: SlideSource) -> None:
        for index, lv in enumerate(source.levels):
            for col, row in corner_tiles(lv):
                tile = source.read_tile(index, col, row)
                assert isinstance(tile, np.ndarray)
                assert tile.shape == (lv.tile_height, lv.tile_width, 3), (index, col, row)
                assert tile.dtype == np.uint8

    def test_regions_have_the_requested_shape_and_white_outside(self, source: SlideSource) -> None:
        for index, lv in enumerate(source.levels):
            corner = source.read_region(index, lv.width - 7, lv.height - 5, 20, 15)
            assert corner.shape == (15, 20, 3) and corner.dtype == np.uint8
            assert (corner[5:] == WHITE).all() and (corner[:, 7:] == WHITE).all()
            outside = source.read_region(index, -40, -30, 25, 20)
            assert outside.shape == (20, 25, 3) and (outside == WHITE).all()
            one = source.read_region(index, lv.width - 1, lv.height - 1, 1, 1)
            assert one.shape == (1, 1, 3) and one.dtype == np.uint8

    def test_regions_equal_the_tiles(self, source: SlideSource) -> None:
        for index, lv in enumerate(source.levels):
            x, y, width, height = crossing_window(lv)
            region = source.read_region(index, x, y, width, height)
            tw, th = lv.tile_width, lv.tile_height
            for row in range(y // th, -(-(y + height) // th)):
                for col in range(x // tw, -(-(x + width) // tw)):
                    tile = source.read_tile(index, col, row)
                    x0, y0 = max(col * tw, x), max(row * th, y)
                    x1, y1 = min((col + 1) * tw, x + width), min((row + 1) * th, y + height)
                    np.testing.assert_array_equal(
                        region[y0 - y : y1 - y, x0 - x : x1 - x],
                        tile[y0 - row * th : y1 - row * th, x0 - col * tw : x1 - col * tw],
                        err_msg=f"level {index} tile ({col}, {row})",
                    )

    # -- refusals -------------------------------------------------------------------------------

    def test_tiles_outside_the_grid_are_refused(self, source: SlideSource) -> None:
        for index, lv in enumerate(source.levels):
            jpeg = source.tile_codec(index) is TileCodec.JPEG
            for col, row in [(lv.cols, 0), (0, lv.rows), (-1, 0), (0, -1), (lv.cols, lv.rows)]:
                with pytest.raises(InvalidArgument):
                    source.read_tile(index, col, row)
                refused = InvalidArgument if jpeg else (InvalidArgument, EncodedTileUnavailable)
                with pytest.raises(refused):
                    source.read_encoded_tile(index, col, row)

    def test_levels_that_do_not_exist_are_refused(self, source: SlideSource) -> None:
        for index in (len(source.levels), -1):
            calls: list[Callable[[], object]] = [
                lambda: source.level(index),
                lambda: source.read_tile(index, 0, 0),
                lambda: source.read_encoded_tile(index, 0, 0),
                lambda: source.read_region(index, 0, 0, 1, 1),
                lambda: source.tile_codec(index),
            ]
            for call in calls:
                with pytest.raises(InvalidArgument):
                    call()

    def test_empty_regions_are_refused(self, source: SlideSource) -> None:
        for width, height in [(0, 1), (1, 0), (-1, 5), (5, -1)]:
            with pytest.raises(InvalidArgument):
                source.read_region(0, 0, 0, width, height)

    # -- encoded tiles --------------------------------------------------------------------------

    def test_encoded_tiles_decode_to_the_decoded_tiles(self, source: SlideSource) -> None:
        """Where a level is JPEG (or JPEG 2000), its stored stream decodes (by another decoder)
        to exactly the tile `read_tile` gives, at the level's tile size, or, where the file
        stores nothing (sparse), is refused and the tile is white; elsewhere it is refused."""
        for index, lv in enumerate(source.levels):
            if source.tile_codec(index) is TileCodec.JPEG2000:
                for col, row in corner_tiles(lv):
                    data = source.read_encoded_tile(index, col, row)
                    with Image.open(io.BytesIO(data), formats=("JPEG2000",)) as image:
                        pixels = np.asarray(image.convert("RGB"))
                    assert pixels.shape == (lv.tile_height, lv.tile_width, 3)
                    np.testing.assert_array_equal(pixels, source.read_tile(index, col, row))
                continue
            if source.tile_codec(index) is not TileCodec.JPEG:
                with pytest.raises(EncodedTileUnavailable):
                    source.read_encoded_tile(index, 0, 0)
                continue
            for col, row in corner_tiles(lv):
                try:
                    data = source.read_encoded_tile(index, col, row)
                except EncodedTileUnavailable:  # nothing stored there (sparse): blank glass
                    assert (source.read_tile(index, col, row) == WHITE).all()
                    continue
                assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
                pixels = imagecodecs.jpeg8_decode(data)
                assert pixels.shape == (lv.tile_height, lv.tile_width, 3)
                np.testing.assert_array_equal(
                    pixels, source.read_tile(index, col, row), err_msg=f"{index} ({col}, {row})"
                )

    # -- metadata -------------------------------------------------------------------------------

    def test_properties_are_well_formed(self, source: SlideSource) -> None:
        props = source.properties
        assert isinstance(props, SlideProperties)
        for mpp in (props.mpp_x, props.mpp_y):
            assert mpp is None or (isinstance(mpp, float) and 0 < mpp < 1e6)
        assert props.objective_power is None or props.objective_power > 0
        for mapping in (props.vendor_properties, props.identifiers):
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items())
        assert props.icc_profile is None or props.icc_profile[36:40] == b"acsp"
        assert props.scan_datetime is None or re.fullmatch(r"\d{14}", props.scan_datetime)
        for text in (props.vendor, props.manufacturer, props.model, props.serial_number):
            assert text is None or (isinstance(text, str) and text)
        assert source.properties == props  # stable

    def test_associated_images_are_rgb(self, source: SlideSource) -> None:
        names = source.associated_names
        assert len(set(names)) == len(names) and set(names) <= set(ASSOCIATED_KINDS)
        for name in names:
            image = source.read_associated(name)
            assert isinstance(image, np.ndarray) and image.dtype == np.uint8
            assert image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) > 0, name
        for absent in [n for n in ASSOCIATED_KINDS if n not in names] + ["bogus"]:
            with pytest.raises(WsiError):
                source.read_associated(absent)

    # -- concurrency ----------------------------------------------------------------------------

    def test_concurrent_reads_equal_serial_reads(self, source: SlideSource) -> None:
        wanted = [(i, c, r) for i, lv in enumerate(source.levels) for c, r in corner_tiles(lv)]
        wanted = (wanted * (1 + 32 // len(wanted)))[:32]
        serial = [source.read_tile(*t) for t in wanted]
        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(lambda t: source.read_tile(*t), wanted))
        for t, a, b in zip(wanted, serial, parallel, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=str(t))

    # -- against an independent reader ----------------------------------------------------------

    def test_levels_match_the_reference(self, source: SlideSource, reference: Reference) -> None:
        assert reference.dimensions(0) is not None
        for index, lv in enumerate(source.levels):
            size = reference.dimensions(index)
            assert size is None or size == (lv.width, lv.height), index

    def test_pixels_match_the_reference(self, source: SlideSource, reference: Reference) -> None:
        compared = 0
        for index, lv in enumerate(source.levels):
            if reference.dimensions(index) is None:
                continue
            for x, y, width, height in windows(lv):
                np.testing.assert_array_equal(
                    source.read_region(index, x, y, width, height),
                    reference.region(index, x, y, width, height),
                    err_msg=f"level {index} region {(x, y, width, height)}",
                )
            for col, row in corner_tiles(lv):
                h, w = inside(lv, col, row)
                np.testing.assert_array_equal(
                    source.read_tile(index, col, row)[:h, :w],
                    reference.region(index, col * lv.tile_width, row * lv.tile_height, w, h),
                    err_msg=f"level {index} tile ({col}, {row})",
                )
            compared += 1
        assert compared >= 1
