"""Blank glass costs nothing: tiles within tolerance of the fill grey are not stored (missing Zarr
chunks, TILED_SPARSE DICOM instances), and every reader still gets the same pixels.

The slide is the benchmarks' generator at a small size (textured, tinted glass around tissue, JPEG
quality 80), converted twice: by default, and with `keep_background` (the "before"). Readers are
the real ones: zarr-python, OpenSlide 4 and wsidicom on the exported instances, dciodvfy, the
library's reader and the tile service over HTTP; colour differences are computed here again from
the sRGB and CIELab definitions.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import openslide
import pydicom
import pytest
import requests
import zarr
from PIL import Image
from wsidicom import WsiDicom

import wsi
from server.settings import ServerSettings
from wsi.codecs import jpegtran
from wsi.codecs.colour import dicom_lab
from wsi.export import export_dicom
from wsi.model import Level
from wsi.published import layout
from wsi.pyramid.background import DELTA_E76, Background, Census, choose_fill
from wsi.sources import open_slide

from .conftest import make_tiff
from .helpers import serving
from .test_dicom import SPARSE_COUNT_ERROR, dciodvfy, level_array, read_pixels, wsistore_attrs

WIDTH, HEIGHT, COLS, ROWS = 3072, 2048, 12, 8
"""The generated slide: 256-px tiles, 13 of its 96 level-0 tiles blank glass by the rule."""
DEFAULT = wsi.ConvertSettings()
KEPT = wsi.ConvertSettings(wsi.PyramidSettings(keep_background=True))


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sample_data.generate import generate

    return generate(tmp_path_factory.mktemp("glass") / "glass.tif", WIDTH, HEIGHT, seed=2)


@pytest.fixture(scope="module")
def stores(slide: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The slide converted by default ("sparse") and with blank glass kept ("full")."""
    out: dict[str, Any] = {}
    for name, settings in (("sparse", DEFAULT), ("full", KEPT)):
        root = tmp_path_factory.mktemp(name)
        store = wsi.Store(wsi.StoreSettings(str(root)))
        result = wsi.convert_slide(slide, store, settings)
        export = root.parent / f"{name}-dicom"
        export_dicom(store, result.slide_id, export)
        out[name] = {"root": root, "store": store, "id": result.slide_id, "dicom": export}
    return out


def group(entry: dict[str, Any]) -> zarr.Group:
    return zarr.open_group(str(entry["root"] / entry["id"] / "slide.zarr"), mode="r")


def shard_index(entry: dict[str, Any], level: int, chunks: int) -> np.ndarray:
    data = (entry["root"] / entry["id"] / f"slide.zarr/{level}/c/0/0/0").read_bytes()
    return layout.decode_index(data[-layout.index_nbytes(chunks) :], chunks, "shard")


def levels(entry: dict[str, Any]) -> list[dict[str, Any]]:
    return list(wsistore_attrs(group(entry))["levels"])


def absent_tiles(entry: dict[str, Any], k: int) -> set[tuple[int, int]]:
    lv = levels(entry)[k]
    cols = -(-lv["width"] // lv["tile_width"])
    rows = -(-lv["height"] // lv["tile_height"])
    stored = set(layout.stored_chunks(shard_index(entry, k, cols * rows)).tolist())
    return {(n % cols, n // cols) for n in range(cols * rows) if n not in stored}


def tile_box(lv: dict[str, Any], col: int, row: int) -> tuple[slice, slice]:
    tw, th = lv["tile_width"], lv["tile_height"]
    return slice(row * th, (row + 1) * th), slice(col * tw, (col + 1) * tw)


# -- the rule -------------------------------------------------------------------------------------
def cie_delta_e(pixels: np.ndarray, fill: int) -> np.ndarray:
    """Delta-E 76 from (fill, fill, fill) straight from IEC 61966-2-1 (sRGB, D65) and CIE 15
    (L*a*b*), in float64: the definition the rule's table must follow exactly."""

    def lab(rgb: np.ndarray) -> np.ndarray:
        v = rgb.astype(np.float64) / 255
        lin = np.where(v > 0.04045, ((v + 0.055) / 1.055) ** 2.4, v / 12.92)
        white = (0.95047, 1.0, 1.08883)
        xyz = [(lin @ np.array(m)) / w for m, w in zip(_M, white, strict=True)]
        delta = 6 / 29
        f = [np.where(t > delta**3, np.cbrt(t), t / (3 * delta**2) + 4 / 29) for t in xyz]
        return np.stack([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])], -1)

    return np.sqrt(((lab(pixels) - lab(np.full((1, 3), fill))) ** 2).sum(-1))


_M = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)


@pytest.mark.parametrize("fill", [0, 12, 128, 244, 255])
def test_the_rule_is_delta_e_76(fill: int) -> None:
    """Exactly the CIE definition, for every colour tried."""
    rule = Background(fill)
    low, high = rule.box
    rng = np.random.default_rng(fill)
    colours = rng.integers(max(0, low - 3), min(255, high + 3) + 1, (20000, 3)).astype(np.uint8)
    ours = np.array([rule.accepts_pixels(c.reshape(1, 1, 3)) for c in colours])
    assert ours.any() and not ours.all()
    assert np.array_equal(ours, cie_delta_e(colours, fill) <= DELTA_E76)
    # The box holds everything accepted; a colour just outside it in one channel is refused.
    assert rule.accepts_pixels(np.full((2, 2, 3), fill, np.uint8))
    if low > 0:
        assert not rule.accepts_pixels(np.array([[[low - 1, fill, fill]]], np.uint8))


def test_rows_of_one_colour_are_judged_by_it() -> None:
    """A row of one colour is settled from its first pixel (a derived tile of glass is the fill):
    the same answers as pixel by pixel, for rows of one colour in and out of tolerance, a
    different pixel at either end of a row, strided views and one-pixel rows."""
    rule = Background(244)
    rng = np.random.default_rng(8)
    for colour in ((244, 244, 244), (242, 245, 243), (230, 244, 244), (244, 244, 200)):
        tile = np.full((64, 64, 3), colour, np.uint8)
        expected = bool(cie_delta_e(np.array([colour]), 244)[0] <= DELTA_E76)
        assert rule.accepts_pixels(tile) is expected
        assert rule.accepts_pixels(tile[:, ::2]) is expected
        assert rule.accepts_pixels(tile[:, :1]) is expected
        for y, x in ((0, 0), (63, 63), (17, 0), (17, 63)):
            for odd in (np.array([244, 244, 244]), rng.integers(0, 256, 3)):
                marked = tile.copy()
                marked[y, x] = odd
                truth = cie_delta_e(marked.reshape(-1, 3), 244) <= DELTA_E76
                assert rule.accepts_pixels(marked) is bool(truth.all())


def test_a_flat_tile_is_settled_from_its_coefficients() -> None:
    rule = Background(244)
    for colour, blank in (((244, 244, 244), True), ((200, 244, 244), False)):
        flat = Image.new("RGB", (256, 256), colour)
        data = io.BytesIO()
        flat.save(data, "JPEG", quality=90)
        assert jpegtran.copy_tile(data.getvalue(), True, (256, 256), rule.rule).all_in_rule is blank


# -- deciding from the coefficients -----------------------------------------------------------
MODES = ("420", "444", "rgb", "gray")
"""YCbCr 4:2:0 and 4:4:4 (Pillow), RGB-coded 4:4:4 (Adobe marker, as Aperio), greyscale."""


def encode_tile(pixels: np.ndarray, mode: str, quality: int = 90) -> bytes:
    if mode == "rgb":
        return bytes(imagecodecs.jpeg8_encode(pixels, level=quality, outcolorspace="RGB"))
    out = io.BytesIO()
    if mode == "gray":
        Image.fromarray(pixels[..., 1]).save(out, "JPEG", quality=quality)
    else:
        image = Image.fromarray(pixels)
        image.save(out, "JPEG", quality=quality, subsampling=2 if mode == "420" else 0)
    return out.getvalue()


def truth(data: bytes, rule: Background, region: tuple[int, int]) -> bool:
    """The rule on the pixels an independent decoder (imagecodecs) makes of the tile."""
    pixels = np.asarray(imagecodecs.jpeg8_decode(data))
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, -1)
    return rule.accepts_pixels(pixels[: region[1], : region[0]])


def judged(data: bytes, rule: Background, region: tuple[int, int] = (256, 256)) -> bool | None:
    """What the coefficients tell; checked never to contradict the pixels, and the decode that
    settles the rest (`accepts_jpeg`) to agree with them exactly."""
    verdict = jpegtran.copy_tile(data, True, region, rule.rule).all_in_rule
    right = truth(data, rule, region)
    assert verdict is None or verdict == right
    assert rule.accepts_jpeg(data, Level(*region, 256, 256), 0, 0) == right
    return verdict


def glass(seed: int, fill: int = 244) -> np.ndarray:
    """Textured glass: each channel fill +- 2 (well within the tolerance)."""
    rng = np.random.default_rng(seed)
    return (fill + rng.integers(-2, 3, (256, 256, 3))).astype(np.uint8)


@pytest.mark.parametrize("mode", MODES)
def test_block_means_refuse_tissue_without_a_decode(mode: str) -> None:
    """Uniform tiles across the darkest luma the tolerance allows, glass, glass with one dark
    8x8 block: a block mean below the range refuses the tile, and nothing is refused that the
    pixels accept (every verdict is checked against an independent decoder in `judged`)."""
    rule = Background(244)
    [(lowest, _), *_] = rule.rule.limits.ranges["rgb" if mode == "rgb" else "ycc"]
    assert lowest == (229 if mode == "rgb" else 232)
    verdicts = {}
    for v in range(int(lowest) - 8, int(lowest) + 4):
        verdicts[v] = judged(encode_tile(np.full((256, 256, 3), v, np.uint8), mode), rule)
    assert all(verdicts[v] is False for v in range(int(lowest) - 8, int(lowest) - 2))
    assert judged(encode_tile(np.full((256, 256, 3), 244, np.uint8), mode), rule) is True
    # Textured glass: each block's pixel bounds are within tolerance (RGB-coded tiles' three
    # channels are bounded apart, a wider box: the pixels decide).
    assert judged(encode_tile(glass(1), mode), rule) is (None if mode == "rgb" else True)
    assert truth(encode_tile(glass(1), mode), rule, (256, 256))
    dark = glass(2)
    dark[64:72, 128:136] = 200  # one block of pale tissue: its mean proves the tile is kept
    assert judged(encode_tile(dark, mode), rule) is False
    dot = glass(3)
    dot[100, 100] = 120  # one dark pixel: its block's mean is within range, the decode decides
    assert judged(encode_tile(dot, mode), rule) is None
    assert not truth(encode_tile(dot, mode), rule, (256, 256))


@pytest.mark.parametrize("mode", ["420", "rgb"])
def test_only_blocks_inside_the_level_count(mode: str) -> None:
    """An edge tile: what lies past the level's edge is neither looked at nor held against it."""
    rule = Background(244)
    tile = glass(4)
    tile[200:, 200:] = 90  # past the edge of a 200 x 200 region
    data = encode_tile(tile, mode)
    assert judged(data, rule, (200, 200)) is (None if mode == "rgb" else True)
    assert truth(data, rule, (200, 200))
    assert judged(data, rule, (256, 256)) is False
    assert judged(data, rule, (207, 256)) is False  # the dark block reaching into the region
    assert judged(data, rule, (208, 256)) is False


@pytest.mark.parametrize("mode", MODES)
def test_verdicts_never_contradict_the_pixels(mode: str) -> None:
    """Near the bound: uniform tiles of random colours around the fill's tolerance, with noise
    and a random block of another colour, at several qualities and fills (a dark fluorescence
    fill too, where the light side decides)."""
    rng = np.random.default_rng(len(mode))
    decided = 0
    for fill in (244, 20):
        rule = Background(fill)
        low, high = rule.box
        # The hardest cases for the bound: uniform tiles of the accepted colours (by the CIE
        # definition) of extreme luma and extreme channels, coded almost losslessly.
        axis = np.arange(low, high + 1)
        grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        accepted = grid[cie_delta_e(grid, fill) <= DELTA_E76]
        luma = accepted @ np.array([0.299, 0.587, 0.114])
        extremes = [luma.argmin(), luma.argmax(), *accepted.argmin(0), *accepted.argmax(0)]
        for colour in accepted[extremes]:
            tile = np.broadcast_to(colour.astype(np.uint8), (256, 256, 3)).copy()
            for quality in (95, 100):
                judged(encode_tile(tile, mode, quality), rule)
        for _ in range(24):
            base = rng.integers(max(0, low - 12), min(255, high + 12) + 1, 3)
            noise = rng.integers(-3, 4, (256, 256, 3))
            tile = np.clip(base + noise, 0, 255).astype(np.uint8)
            y, x = rng.integers(0, 31, 2) * 8
            tile[y : y + 8, x : x + 8] = rng.integers(0, 256, 3)
            verdict = judged(encode_tile(tile, mode, int(rng.integers(70, 98))), rule)
            decided += verdict is not None
    assert decided >= 10


def test_fill_is_the_commonest_flat_grey(slide: Path, tmp_path: Path) -> None:
    with open_slide(slide) as source:
        assert choose_fill(source) in (243, 244)  # the glass is (243, 241, 245) +- texture
    dark = np.full((512, 512, 3), 6, np.uint8)
    dark[100:300, 100:300] = (40, 90, 200)  # a fluorescent blob on black
    path = tmp_path / "dark.tif"
    import tifffile

    tifffile.imwrite(path, dark, tile=(256, 256), photometric="rgb")
    with open_slide(path) as source:
        assert choose_fill(source) == 6


def whole_blocks(image: np.ndarray) -> np.ndarray:
    """(n, 64, 3) int16: the whole 8x8 blocks of an (h, w, 3) image, in numpy."""
    h, w = image.shape[0] // 8 * 8, image.shape[1] // 8 * 8
    blocks = image[:h, :w].reshape(h // 8, 8, w // 8, 8, 3).transpose(0, 2, 1, 3, 4)
    return blocks.reshape(-1, 64, 3).astype(np.int16)


def numpy_census(image: np.ndarray) -> tuple[int, np.ndarray]:
    """The census `choose_fill` takes, by the rule as written in numpy (the reference the C
    count is held to): blocks whose channels each span at most 8 levels and whose channel
    means are each within 6 of their mean, counted by that mean rounded half to even."""
    blocks = whole_blocks(image)
    spread = (blocks.max(1) - blocks.min(1)).max(1)
    means = blocks.mean(1)
    grey = means.mean(1)
    uniform = (spread <= 8) & (np.abs(means - grey[:, None]).max(1) <= 6)
    return len(blocks), np.bincount(np.rint(grey[uniform]).astype(np.int64), minlength=256)


def test_census_in_c_counts_what_the_rule_in_numpy_counts() -> None:
    """Blocks around every edge of the rule (spreads of 8 and 9, channel means 6 and 6.02 from
    the grey, greys at exactly k + 0.5), in strided views and sizes that cut blocks."""
    rng = np.random.default_rng(7)
    for trial in range(40):
        rows, cols = int(rng.integers(1, 12)), int(rng.integers(1, 12))
        base = rng.integers(10, 246, (rows, cols, 1, 1, 1))
        tint = rng.integers(-7, 8, (rows, cols, 1, 1, 3))
        noise = rng.integers(0, int(rng.integers(1, 11)), (rows, cols, 8, 8, 3))
        blocks = np.clip(base + tint + noise, 0, 255).astype(np.uint8)
        image = blocks.transpose(0, 2, 1, 3, 4).reshape(rows * 8, cols * 8, 3)
        padded = np.zeros((rows * 8 + 5, cols * 8 + 11, 3), np.uint8)
        padded[: rows * 8, : cols * 8] = image
        cut = padded[: rows * 8 + int(rng.integers(0, 5)), 2 : cols * 8 + 2 + trial % 9]
        for view in (image, cut, padded):
            census = Census.of(view)
            blocks_seen, counts = numpy_census(view)
            assert census.blocks == blocks_seen
            assert np.array_equal(census.counts, counts)
    for low, rounded in ((100, 100), (101, 102)):  # greys of k + 0.5: to the even neighbour
        halfway = np.full((8, 8, 3), low, np.uint8)
        halfway[:4] += 1
        assert numpy_census(halfway)[1][rounded] == Census.of(halfway).counts[rounded] == 1


def test_fill_from_tiles_read_side_by_side_is_the_fill_of_the_whole_level(tmp_path: Path) -> None:
    """The smallest level is read tile by tile on several threads: the same 8 x 8 blocks as
    the level read in one piece (its tiles are whole blocks), so the same grey."""
    path = make_tiff(tmp_path / "one-level.tif", 1237, 1029, pyramid=False, seed=5)
    with open_slide(path) as source:
        index = len(source.levels) - 1
        lv = source.levels[index]
        assert lv.cols * lv.rows > 1 and lv.width % 8 and lv.height % 8  # edge tiles cut blocks
        whole = source.read_region(index, 0, 0, lv.width, lv.height)
        blocks = whole_blocks(whole)
        grey = np.rint(blocks.mean(1).mean(1)).astype(int)
        flat = (blocks.max(1) - blocks.min(1)).max(1) <= 6
        assert flat.sum() > 100
        assert choose_fill(source, 1) == choose_fill(source, 4) == choose_fill(source)
        assert abs(choose_fill(source, 4) - int(np.median(grey[flat]))) <= 2


# -- the stored slide -----------------------------------------------------------------------------
def test_blank_tiles_are_missing_and_read_as_the_fill(stores: dict[str, Any], slide: Path) -> None:
    sparse, full = stores["sparse"], stores["full"]
    attrs = wsistore_attrs(group(sparse))
    fill = attrs["fill"]
    assert fill in (243, 244) and attrs["background_delta_e76"] == DELTA_E76
    assert wsistore_attrs(group(full))["background_delta_e76"] is None
    total_absent = 0
    with open_slide(slide) as source:
        for k, lv in enumerate(levels(sparse)):
            assert level_array(group(sparse), str(k)).fill_value == fill
            ours = np.moveaxis(read_pixels(level_array(group(sparse), str(k))), 0, -1)
            before = np.moveaxis(read_pixels(level_array(group(full), str(k))), 0, -1)
            absent = absent_tiles(sparse, k)
            total_absent += len(absent)
            for col, row in absent:
                box = tile_box(lv, col, row)
                assert (ours[box] == fill).all()
                assert (cie_delta_e(before[box].reshape(-1, 3), fill) <= DELTA_E76).all()
                if k == 0:  # the source tile, decoded by imagecodecs, is within tolerance too
                    src = imagecodecs.jpeg8_decode(source.read_encoded_tile(0, col, row))
                    h, w = before[box].shape[:2]
                    assert Background(fill).accepts_pixels(np.asarray(src)[:h, :w])
            stored = np.ones(ours.shape[:2], bool)
            for col, row in absent:
                stored[tile_box(lv, col, row)] = False
            assert np.array_equal(ours[stored], before[stored])
    assert total_absent >= 13
    # Blank tiles cost nothing but the ~130 bytes a stored frame's position takes in the
    # header of a TILED_SPARSE instance: on this small, mostly-tissue slide that is most of it.
    n = len(layout.stored_chunks(shard_index(sparse, 0, COLS * ROWS)))
    assert n <= COLS * ROWS - 13
    stored = sparse["store"].read_manifest(sparse["id"])["stored_bytes"]
    assert stored < full["store"].read_manifest(full["id"])["stored_bytes"]


def test_dicom_readers_see_the_same_pixels(stores: dict[str, Any]) -> None:
    """OpenSlide 4 leaves absent frames transparent, wsidicom paints them its blank colour
    (white): every stored pixel equals the full conversion's."""
    sparse, full = stores["sparse"], stores["full"]
    fill = wsistore_attrs(group(sparse))["fill"]
    with (
        openslide.OpenSlide(str(sparse["dicom"] / "level-0.dcm")) as ours,
        openslide.OpenSlide(str(full["dicom"] / "level-0.dcm")) as before,
        WsiDicom.open(sparse["dicom"]) as wsd,
    ):
        assert ours.level_count == before.level_count == len(levels(sparse))
        for k, lv in enumerate(levels(sparse)):
            size = ours.level_dimensions[k]
            a = np.asarray(ours.read_region((0, 0), k, size))
            b = np.asarray(before.read_region((0, 0), k, size))
            stored = np.ones(a.shape[:2], bool)
            for col, row in absent_tiles(sparse, k):
                stored[tile_box(lv, col, row)] = False
            assert (a[..., 3][~stored] == 0).all() and (a[..., 3][stored] == 255).all()
            assert np.array_equal(a[stored], b[stored])
            level = wsd.levels[k]
            w = np.asarray(wsd.read_region((0, 0), level.level, level.size.to_tuple()))
            assert np.array_equal(w[stored], b[stored][:, :3])
            assert (w[~stored] == 255).all()
            ds = pydicom.dcmread(sparse["dicom"] / f"level-{k}.dcm", stop_before_pixels=True)
            if stored.all():
                assert ds.DimensionOrganizationType == "TILED_FULL"
            else:
                assert ds.DimensionOrganizationType == "TILED_SPARSE"
                assert list(ds.RecommendedAbsentPixelCIELabValue) == list(dicom_lab((fill,) * 3))


def without_object_uids(path: Path) -> pydicom.Dataset:
    """The instance at `path` with its series, instance, pyramid and dimension organisation UIDs
    (those of the conversion's objects, which its settings give) blanked, and without its
    trailing Zarr shard index, whose offsets move with the header's length, hence with the
    lengths of those UIDs (the frames it points at are compared as Pixel Data)."""
    ds = pydicom.dcmread(path)
    del ds[0xFFFCFFFC]
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID("")
    for keyword in ("SeriesInstanceUID", "SOPInstanceUID", "PyramidUID"):
        setattr(ds, keyword, "")
    for item in ds.DimensionOrganizationSequence:
        item.DimensionOrganizationUID = ""
    for item in ds.get("DimensionIndexSequence", []):
        item.DimensionOrganizationUID = ""
    return ds


def test_sparse_instances_validate_and_full_ones_are_unchanged(stores: dict[str, Any]) -> None:
    sparse, full = stores["sparse"], stores["full"]
    seen = set()
    for k in range(len(levels(sparse))):
        path = sparse["dicom"] / f"level-{k}.dcm"
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        seen.add(ds.DimensionOrganizationType)
        # TILED_SPARSE: but for dciodvfy's full-grid frame count (see test_dicom)
        assert dciodvfy(path) == ([], [])
        assert dciodvfy(full["dicom"] / f"level-{k}.dcm") == ([], [])
        if ds.DimensionOrganizationType == "TILED_FULL":
            # What a conversion keeping glass writes, but for the UIDs of its series' objects
            # (other settings: other series, instance, pyramid and organisation UIDs).
            assert without_object_uids(path) == without_object_uids(
                full["dicom"] / f"level-{k}.dcm"
            )
            continue
        per_frame = ds.PerFrameFunctionalGroupsSequence
        positions = [
            (
                f.PlanePositionSlideSequence[0].ColumnPositionInTotalImagePixelMatrix,
                f.PlanePositionSlideSequence[0].RowPositionInTotalImagePixelMatrix,
            )
            for f in per_frame
        ]
        lv = levels(sparse)[k]
        cols = -(-lv["width"] // lv["tile_width"])
        rows = -(-lv["height"] // lv["tile_height"])
        chunks = layout.stored_chunks(shard_index(sparse, k, cols * rows))
        assert positions == [
            ((n % cols) * lv["tile_width"] + 1, (n // cols) * lv["tile_height"] + 1) for n in chunks
        ]
        # Dimension Index Values: the rank of the frame's column and row among those stored.
        ranks = [list(f.FrameContentSequence[0].DimensionIndexValues) for f in per_frame]
        col_rank = {c: i + 1 for i, c in enumerate(sorted({int(n) % cols for n in chunks}))}
        row_rank = {r: i + 1 for i, r in enumerate(sorted({int(n) // cols for n in chunks}))}
        assert ranks == [[col_rank[int(n) % cols], row_rank[int(n) // cols]] for n in chunks]
        assert ds.DimensionIndexSequence[0].DimensionIndexPointer == 0x0048021E
        pixel_data = pydicom.dcmread(path).PixelData
        frames = list(pydicom.encaps.generate_frames(pixel_data, number_of_frames=len(chunks)))
        assert len(frames) == ds.NumberOfFrames == len(chunks)
    assert seen == {"TILED_FULL", "TILED_SPARSE"}
    assert SPARSE_COUNT_ERROR.startswith("Error - NumberOfFrames")


def test_a_slide_of_nothing_but_glass(tmp_path: Path) -> None:
    """Every tile blank: each level keeps one frame (a DICOM instance needs one), a tile of the
    fill; zarr-python reads the fill everywhere."""
    import pyvips

    glass = pyvips.Image.black(700, 600, bands=3).linear([1, 1, 1], [240, 240, 240])
    noise = pyvips.Image.gaussnoise(700, 600, sigma=1.5, mean=0, seed=3)
    image = (glass + noise.bandjoin([noise, noise])).cast("uchar")
    path = tmp_path / "glass.tif"
    image.tiffsave(str(path), tile=True, compression="jpeg", Q=85)  # base only: levels ours
    store = wsi.Store(wsi.StoreSettings(str(tmp_path / "store")))
    result = wsi.convert_slide(path, store)
    root = zarr.open_group(result.url, mode="r")
    fill = wsistore_attrs(root)["fill"]
    assert abs(fill - 240) <= 1
    for k in range(len(wsistore_attrs(root)["levels"])):
        assert (read_pixels(level_array(root, str(k))) == fill).all()
        key = f"slide.zarr/{k}/c/0/0/0"
        ds = pydicom.dcmread(tmp_path / "store" / result.slide_id / key)
        assert ds.NumberOfFrames == 1


def test_settings_are_fingerprinted(slide: Path, tmp_path: Path) -> None:
    store = wsi.Store(wsi.StoreSettings(str(tmp_path)))
    first = wsi.convert_slide(slide, store)
    again = wsi.convert_slide(slide, store)
    assert again.skipped
    kept = wsi.convert_slide(slide, store, KEPT)
    assert not kept.skipped
    settings = store.read_manifest(first.slide_id)["settings"]["pyramid"]
    assert settings["keep_background"] is True and settings["optimize_huffman"] is True


# -- the reader and the service -------------------------------------------------------------------
def test_our_sparse_dicom_converts_back_to_the_same_tiles(
    stores: dict[str, Any], tmp_path: Path
) -> None:
    """The exported TILED_SPARSE series, converted again: every tile of every level is the
    same (each frame carries optimal tables of its own, which the copy read one after another
    on a thread: a table cache that dropped one in use made this fail with "bad Huffman
    code")."""
    sparse = stores["sparse"]
    store = wsi.Store(wsi.StoreSettings(str(tmp_path)))
    again = wsi.convert_slide(sparse["dicom"], store, DEFAULT).slide_id
    with (
        wsi.open_published(f"{sparse['root']}/{sparse['id']}") as before,
        wsi.open_published(f"{tmp_path}/{again}") as after,
    ):
        assert len(after.levels) == len(before.levels)
        for k, lv in enumerate(before.levels):
            for row in range(lv.rows):
                for col in range(lv.cols):
                    assert after.tile_bytes(k, col, row) == before.tile_bytes(k, col, row)
        assert absent_tiles({"root": tmp_path, "id": again}, 0) == absent_tiles(sparse, 0)


def test_reader_hands_out_the_background_tile(stores: dict[str, Any]) -> None:
    sparse = stores["sparse"]
    col, row = sorted(absent_tiles(sparse, 0))[0]
    with wsi.open_published(f"{sparse['root']}/{sparse['id']}") as slide:
        fill = slide.levels[0].fill
        data = slide.tile_bytes(0, col, row)
        assert (np.asarray(Image.open(io.BytesIO(data))) == fill).all()
        assert (slide.tile(0, col, row) == fill).all()
        x0 = min(max(col * 256 - 10, 0), WIDTH - 300)
        y0 = min(max(row * 256 - 10, 0), HEIGHT - 300)
        region = slide.region(0, x0, y0, 300, 300)  # across the blank tile's edges
        expected = np.moveaxis(read_pixels(level_array(group(sparse), "0")), 0, -1)
        assert np.array_equal(region, expected[y0 : y0 + 300, x0 : x0 + 300])
        patches = slide.patches(0, np.array([[col * 256, row * 256]]), 64)
        assert (patches == fill).all()
        assert slide.dicom is not None
        instance = next(i for i in slide.dicom.instances if i.level == 0)
        chunks = slide.frame_chunks(instance)
        assert len(chunks) < instance.frames
        assert slide.frame_bytes(instance, 1) == slide.tile_bytes(
            0, int(chunks[0]) % COLS, int(chunks[0]) // COLS
        )


@pytest.fixture(scope="module")
def service(stores: dict[str, Any]) -> Iterator[str]:
    with serving(ServerSettings(store=str(stores["sparse"]["root"]))) as url:
        yield url


def test_service_serves_blank_tiles_and_sparse_frames(service: str, stores: dict[str, Any]) -> None:
    sparse = stores["sparse"]
    sid = sparse["id"]
    fill = wsistore_attrs(group(sparse))["fill"]
    col, row = sorted(absent_tiles(sparse, 0))[0]
    with requests.Session() as http:
        top = max_deepzoom_level(WIDTH, HEIGHT)
        for url in (
            f"{service}/slides/{sid}/tiles/0/{col}/{row}",
            f"{service}/slides/{sid}_files/{top}/{col}_{row}.jpeg",
            f"{service}/iiif/3/{sid}/{col * 256},{row * 256},256,256/256,/0/default.jpg",
        ):
            r = http.get(url)
            assert r.status_code == 200, url
            pixels = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)
            assert np.abs(pixels - fill).max() <= 1, url  # IIIF re-encodes what it crops
        [study] = http.get(f"{service}/dicomweb/studies").json()
        study_uid = study["0020000D"]["Value"][0]
        series_url = f"{service}/dicomweb/studies/{study_uid}/series"
        series_uid = http.get(series_url).json()[0]["0020000E"]["Value"][0]
        instances = http.get(f"{series_url}/{series_uid}/instances").json()
        chunks = layout.stored_chunks(shard_index(sparse, 0, COLS * ROWS))
        level0 = next(i for i in instances if i["00280008"]["Value"][0] == len(chunks))
        sop = level0["00080018"]["Value"][0]
        base = f"{series_url}/{series_uid}/instances/{sop}"
        meta = http.get(f"{base}/metadata").json()[0]
        assert meta["00209311"]["Value"] == ["TILED_SPARSE"]
        per_frame = meta["52009230"]["Value"]
        assert len(per_frame) == len(chunks)
        position = per_frame[1]["0048021A"]["Value"][0]
        n = int(chunks[1])
        assert position["0048021E"]["Value"] == [(n % COLS) * 256 + 1]
        assert position["0048021F"]["Value"] == [(n // COLS) * 256 + 1]
        frame = http.get(f"{base}/frames/2", headers={"Accept": "image/jpeg"})
        tile = http.get(f"{service}/slides/{sid}/tiles/0/{n % COLS}/{n // COLS}")
        assert frame.status_code == 200 and frame.content == tile.content
        beyond = http.get(f"{base}/frames/{len(chunks) + 1}", headers={"Accept": "image/jpeg"})
        assert beyond.status_code == 400 and beyond.json()["status"] == 400
        assert f"1..{len(chunks)}" in beyond.text  # the stored frames, not the tile grid


def max_deepzoom_level(width: int, height: int) -> int:
    return int(np.ceil(np.log2(max(width, height))))


def test_objects_are_deterministic(slide: Path, stores: dict[str, Any], tmp_path: Path) -> None:
    store = wsi.Store(wsi.StoreSettings(str(tmp_path)))
    one = wsi.ConvertSettings(wsi.PyramidSettings(workers=1))
    result = wsi.convert_slide(slide, store, one)
    sparse = stores["sparse"]
    for key in sparse["store"].list_keys(sparse["id"]):
        assert store.get(key) == sparse["store"].get(key), key
    assert result.slide_id == sparse["id"]
