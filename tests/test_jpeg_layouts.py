"""Legal but rare JPEG layouts, and crafted coefficients, through the copy path
(`wsi.codecs.jpegtran`): each gives what libjpeg gives, or a clear error, never a crash or a
verdict its pixels contradict. Found by a differential fuzz of the C extension against libjpeg;
each test failed before its fix (a crash, a wrong verdict, other pixels, or work past the
limit)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from tests.jpeg_scans import Scan, flat_blocks_jpeg
from wsi.codecs import _jpeglib, jpeg, jpegtran
from wsi.errors import CorruptSlide, InvalidArgument
from wsi.pyramid.background import Background

LEVELS = np.random.default_rng(7).integers(60, 230, (4, 6, 3)).astype(np.uint8)
"""Block levels (YCbCr) of a 48 x 32 tile: every block its own flat colour."""

ONE_SCAN_EACH: list[Scan] = [((0,), 0, 63), ((1,), 0, 63), ((2,), 0, 63)]
PROGRESSIVE_ONE_DC_EACH: list[Scan] = [
    ((0,), 0, 0),
    ((1,), 0, 0),
    ((2,), 0, 0),
    ((0,), 1, 63),
    ((1,), 1, 63),
    ((2,), 1, 63),
]


def half_of(data: bytes) -> np.ndarray:
    return np.zeros((*jpeg.decoded_size(data, half=True), 3), np.uint8)


@pytest.mark.parametrize(
    "scans,progressive",
    [(ONE_SCAN_EACH, False), (PROGRESSIVE_ONE_DC_EACH, True)],
    ids=["baseline-scan-per-component", "progressive-first-scan-one-component"],
)
def test_a_first_scan_without_every_component(scans: list[Scan], progressive: bool) -> None:
    """A component's quantisation table is set when a scan holding it starts: reading the
    others' at the first scan was a NULL dereference (the process died)."""
    data = flat_blocks_jpeg(LEVELS, scans, progressive)
    source = jpeg.decode(data)
    for optimize in (True, False):
        half = half_of(data)
        copied = jpegtran.copy_tile(data, optimize, (48, 32), Background(244).rule, half)
        assert np.array_equal(jpeg.decode(copied.data), source)
        assert np.array_equal(half, jpeg.decode(data, half=True))
        assert copied.all_in_rule is False
    (result,) = jpegtran.copy_tiles([data], True, [(48, 32)], None, [half_of(data)])
    assert not isinstance(result, CorruptSlide)
    transcoded = jpegtran.transcode(data)
    assert np.array_equal(jpeg.decode(transcoded.data), source)


def test_a_progressive_tile_whose_coefficients_were_never_all_sent_is_kept() -> None:
    """libjpeg smooths the blocks of a progressive image some of whose coefficients never came
    (estimating them from the neighbours' DC): a baseline rewrite of the coefficients decoded
    to other pixels (up to 15 levels here), and the verdict, drawn from them, could call glass
    what the decoded pixels are not. Such a tile is kept as it is, its verdict left to the
    pixels; the level below is its smoothed decode, as TurboJPEG's."""
    dc_only = flat_blocks_jpeg(LEVELS, [((0, 1, 2), 0, 0)], progressive=True)
    half = half_of(dc_only)
    copied = jpegtran.copy_tile(dc_only, True, (48, 32), Background(244).rule, half)
    assert copied.data == dc_only and copied.all_in_rule is None
    assert np.array_equal(half, jpeg.decode(dc_only, half=True))
    # Glass to the left, tissue to the right: the region of glass alone is not blank once
    # smoothed (the tissue bleeds into it), which only the pixels can tell.
    levels = np.zeros((8, 8, 3), np.uint8)
    levels[...] = (244, 128, 128)
    levels[:, 5:] = (90, 160, 170)
    edge = flat_blocks_jpeg(levels, [((0, 1, 2), 0, 0)], progressive=True)
    rule = Background(244)
    pixels = jpeg.decode(edge)[:, :40]
    assert not rule.accepts_pixels(np.ascontiguousarray(pixels))
    assert jpegtran.copy_tile(edge, True, (40, 64), rule.rule).all_in_rule is not True
    complete = flat_blocks_jpeg(LEVELS, PROGRESSIVE_ONE_DC_EACH, progressive=True)
    rewritten = jpegtran.copy_tile(complete, True, (48, 32)).data
    assert rewritten != complete  # every coefficient sent: rewritten as baseline, as before
    assert np.array_equal(jpeg.decode(rewritten), jpeg.decode(complete))


def test_the_scan_limit_holds_while_the_level_below_is_decoded() -> None:
    """A repeated last scan is legal and libjpeg reads it without a word: a stream of a few
    hundred KB could hold tens of thousands. With a 1/2-scale target every scan was decoded
    before the limit was checked (an hour for a 64 MiB tile); here a damaged scan after the
    600th shows how far the reading went."""
    grey = np.full((32, 32, 1), 200, np.uint8)
    data = flat_blocks_jpeg(grey, [((0,), 0, 0), ((0,), 1, 63)], progressive=True)
    ac_scan = data[data.rindex(b"\xff\xda") : -2]
    bad_scan = struct.pack(">BBHB", 0xFF, 0xDA, 8, 1) + bytes([9, 0, 1, 63, 0])  # component 9
    crafted = data[:-2] + ac_scan * 600 + bad_scan + b"\x00\xff\xd9"
    for half in (None, np.zeros((128, 128, 3), np.uint8)):
        with pytest.raises(CorruptSlide, match=f"more than {_jpeglib.MAX_SCANS} scans"):
            jpegtran.copy_tile(crafted, True, (256, 256), None, half)


def test_coefficients_past_the_decoders_range_bound_nothing() -> None:
    """Decoders clamp a sample only within a few hundred levels of 0..255 (libjpeg's range
    table wraps beyond, its SIMD IDCT overflows): one damaged quantum (1 -> 16) of a white tile
    decodes to mid grey, while its coefficients said 'white, clamped': the tile was judged
    blank glass. Blocks that far out now bound nothing."""
    out = io.BytesIO()
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(out, "JPEG", quality=100)
    good = out.getvalue()
    at = good.index(b"\xff\xdb") + 5  # table 0's DC quantum
    assert good[at] == 1
    bad = good[:at] + bytes([16]) + good[at + 1 :]
    pixels = jpeg.decode(bad)
    assert int(pixels.max()) < 200  # what decoders show
    bounds = jpegtran.transcode(bad, False)
    assert all(
        lo <= int(pixels.min()) and int(pixels.max()) <= hi
        for lo, hi in zip(bounds.low, bounds.high, strict=True)
    )
    rule = Background(244)
    assert not rule.accepts_pixels(pixels)
    assert jpegtran.copy_tile(bad, True, (16, 16), rule.rule).all_in_rule is not True
    assert jpegtran.copy_tile(good, True, (16, 16), rule.rule).all_in_rule is True


def test_fractional_sampling_is_refused() -> None:
    """Sampling factors that do not divide the largest (luma 3x2, chroma 2x1): libjpeg cannot
    decode them, and the verdict's upsampling reach assumed whole ratios (3/2 taken as 1)."""
    out = io.BytesIO()
    Image.fromarray(np.full((48, 48, 3), 244, np.uint8)).save(out, "JPEG", subsampling=2)
    data = bytearray(out.getvalue())
    sof = data.index(b"\xff\xc0")
    assert data[sof + 11] == 0x22 and data[sof + 14] == 0x11  # Y 2x2, Cb 1x1
    data[sof + 11], data[sof + 14] = 0x32, 0x21
    for half in (None, np.zeros((24, 24, 3), np.uint8)):
        with pytest.raises(CorruptSlide, match="fractional sampling"):
            jpegtran.copy_tile(bytes(data), True, (48, 48), Background(244).rule, half)


def test_a_region_offset_near_the_largest_long_is_refused() -> None:
    """x + width overflowed in the region check, and the decoder copied from far away."""
    data = jpeg.encode(np.full((64, 64, 3), 200, np.uint8), 90)
    for x in (2**63 - 1, 2**63 - 64, 65):
        with pytest.raises(InvalidArgument, match="outside"):
            jpegtran.decode_region(data, x, 0, 1, 1)
    assert jpegtran.decode_region(data, 63, 63, 1, 1).shape == (1, 1, 3)
