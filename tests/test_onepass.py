"""wsi.codecs.jpegtran.copy_tile: one entropy decode per copied tile gives the optimised stream,
the blank-glass verdict and the 1/2-scale pixels of the level below.

Each result is checked against what it replaces: the stream against `transcode`, the 1/2-scale
pixels against TurboJPEG's DCT-scaled decode (`jpeg.decode(half=True)`), and every verdict the
coefficients give against the pixel rule applied to an independent decoder's pixels
(imagecodecs) and to `within`'s, on tiles made to sit at the tolerance's edge."""

from __future__ import annotations

import collections
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from PIL import Image

from tests.conftest import sample
from tests.test_sparse import truth
from wsi.codecs import _jpeglib, jpeg, jpegtran
from wsi.errors import CorruptSlide, InvalidArgument
from wsi.model import Level
from wsi.pyramid.background import Background, choose_fill
from wsi.sources import open_slide

MODES = ("420", "444", "422", "rgb", "gray", "restart", "progressive")
"""YCbCr 4:2:0, 4:4:4 and 4:2:2, RGB-coded 4:4:4 (Adobe marker, as Aperio), greyscale, 4:2:0
with a restart marker every 4 MCUs (as NDPI), and a progressive stream."""


def encode_tile(pixels: np.ndarray, mode: str, quality: int = 90) -> bytes:
    if mode == "rgb":
        return bytes(imagecodecs.jpeg8_encode(pixels, level=quality, outcolorspace="RGB"))
    out = io.BytesIO()
    if mode == "gray":
        Image.fromarray(np.ascontiguousarray(pixels[..., 1])).save(out, "JPEG", quality=quality)
        return out.getvalue()
    options: dict[str, object] = {"quality": quality, "subsampling": 2}
    if mode in ("444", "422"):
        options["subsampling"] = 0 if mode == "444" else 1
    if mode == "restart":
        options["restart_marker_blocks"] = 4
    if mode == "progressive":
        options["progressive"] = True
    Image.fromarray(pixels).save(out, "JPEG", **options)
    return out.getvalue()


def judged(data: bytes, rule: Background, region: tuple[int, int] | None = None) -> bool | None:
    """copy_tile's verdict, checked never to contradict the pixels (both decoders'), with its
    stream and 1/2-scale pixels checked against the calls it replaces."""
    h, w = jpeg.decoded_size(data)
    region = region or (w, h)
    half = np.zeros((*jpeg.decoded_size(data, half=True), 3), np.uint8)
    copied = jpegtran.copy_tile(data, True, region, rule.rule, half)
    right = truth(data, rule, region)
    assert rule.accepts_jpeg(data, Level(*region, w, h), 0, 0) == right
    assert copied.all_in_rule is None or copied.all_in_rule == right
    assert np.array_equal(half, jpeg.decode(data, half=True))
    if copied.all_in_rule is not True:
        assert copied.data == jpegtran.transcode(data).data
    return copied.all_in_rule


def glass(seed: int, fill: int = 244, spread: int = 2, size: int = 256) -> np.ndarray:
    """Textured glass: each channel fill +- spread."""
    rng = np.random.default_rng(seed)
    return (fill + rng.integers(-spread, spread + 1, (size, size, 3))).clip(0, 255).astype(np.uint8)


def svs_tiles() -> list[bytes]:
    with open_slide(sample("CMU-1-Small-Region.svs")) as src:
        lv = src.level(0)
        return [src.read_encoded_tile(0, c, r) for r in range(lv.rows) for c in range(lv.cols)]


def edge_colours(fill: int) -> np.ndarray:
    """Colours just inside and just outside the tolerance around `fill`: every colour of the
    rule's box whose Delta-E from the fill is within 0.6 of the tolerance, thinned out."""
    rule = Background(fill)
    low, high = rule.box
    axis = np.arange(max(0, low - 2), min(255, high + 2) + 1)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    lab = _lab(grid) - _lab(np.array([[fill] * 3]))
    distance = np.sqrt((lab**2).sum(-1))
    near = grid[np.abs(distance - rule.tolerance) <= 0.6]
    return near[:: max(1, len(near) // 60)]


def _lab(rgb: np.ndarray) -> np.ndarray:
    from wsi.codecs.colour import srgb_to_lab

    return np.asarray(srgb_to_lab(rgb), np.float64)


# -- the stream and the 1/2-scale pixels ---------------------------------------------------------
def tiles() -> Iterator[tuple[str, bytes]]:
    rng = np.random.default_rng(5)
    for mode in MODES:
        for size in ((256, 256), (240, 240), (46, 70)):
            tissue = rng.integers(60, 230, (*size, 3)).astype(np.uint8)
            yield f"{mode}-{size}-tissue", encode_tile(tissue, mode, 80)
            textured = glass(size[0], size=max(size))[: size[0], : size[1]]
            yield f"{mode}-{size}-glass", encode_tile(textured, mode)
    for i, tile in enumerate(svs_tiles()[:12]):
        yield f"svs-{i}", tile


@pytest.mark.parametrize("name,data", list(tiles()))
def test_one_pass_gives_what_the_three_passes_gave(name: str, data: bytes) -> None:
    """The stream is `transcode`'s, the 1/2-scale pixels TurboJPEG's, without optimising the
    stream is the input, and the 1/2-scale pixels land in a strided view untouched around it."""
    rule = Background(244)
    judged(data, rule)
    h, w = jpeg.decoded_size(data, half=True)
    canvas = np.full((h + 4, w + 6, 3), 7, np.uint8)
    view = canvas[2 : 2 + h, 3 : 3 + w]
    plain = jpegtran.copy_tile(data, False, (1, 1), None, view)
    assert plain.data == data and plain.all_in_rule is None
    assert np.array_equal(view, jpeg.decode(data, half=True))
    canvas[2 : 2 + h, 3 : 3 + w] = 7
    assert (canvas == 7).all()
    optimised = jpegtran.copy_tile(data, True, (1, 1))
    assert optimised.data == jpegtran.transcode(data).data


def test_restart_streams_of_an_ndpi_level() -> None:
    """Whole NDPI levels (YCbCr with restart markers every few MCUs) small enough to copy."""
    import tifffile

    path = sample("hamamatsu/test3-DAPI-2-(387).ndpi")
    restarts = 0
    with tifffile.TiffFile(path) as tif:
        for page in tif.pages:
            assert isinstance(page, tifffile.TiffPage)
            if page.shape[0] * page.shape[1] > jpegtran.MAX_TRANSCODE_PIXELS:
                continue
            tif.filehandle.seek(page.tags["StripOffsets"].value[0])
            data = tif.filehandle.read(page.tags["StripByteCounts"].value[0])
            if data[:2] != jpeg.SOI:
                continue
            restarts += b"\xff\xdd\x00\x04" in data[:4096]
            judged(data, Background(20))
    assert restarts >= 3


# -- the verdict ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_verdicts_never_contradict_the_pixels(mode: str) -> None:
    """At the tolerance's edge: uniform tiles of colours just inside and just outside it,
    coded almost losslessly (the bounds are tightest there: a DC-only block is exact to half a
    level), the same with one channel's noise, and noisy glass whose spread reaches the edge;
    a bright fill and a dark (fluorescence) one."""
    rng = np.random.default_rng(len(mode))
    decided: collections.Counter[bool | None] = collections.Counter()
    for fill in (244, 20):
        rule = Background(fill)
        for colour in edge_colours(fill):
            tile = np.broadcast_to(colour.astype(np.uint8), (64, 64, 3)).copy()
            for quality in (90, 100):
                verdict = judged(encode_tile(tile, mode, quality), rule)
                decided[verdict] += 1
            tile[::2, 1::3, int(rng.integers(3))] += np.uint8(1)
            judged(encode_tile(tile.clip(0, 255), mode, 95), rule)
        for spread in range(1, 7):
            for seed in range(3):
                tile = glass(seed, fill, spread, 64)
                verdict = judged(encode_tile(tile, mode, int(rng.integers(75, 99))), rule)
                decided[verdict] += 1
    assert decided[True] >= 10 and decided[False] >= 10, decided


@pytest.mark.parametrize("mode", ["420", "rgb", "gray"])
def test_only_pixels_inside_the_level_count(mode: str) -> None:
    """An edge tile: what lies past the level's edge is never held against it, and a block
    reaching into the level counts."""
    rule = Background(244)
    tile = glass(4)
    tile[:, 200:] = 90
    data = encode_tile(tile, mode)
    assert judged(data, rule, (200, 256)) is (None if mode == "rgb" else True)
    assert truth(data, rule, (200, 256))
    assert judged(data, rule, (256, 256)) is False
    assert judged(data, rule, (201, 256)) is False


def test_glass_is_settled_without_decoding(tmp_path: Path) -> None:
    """On a generated slide, nearly every tile is settled from its coefficients: glass
    accepted, tissue refused (before, all glass went to the full decode)."""
    from sample_data.generate import generate

    path = generate(tmp_path / "glass.tif", 3072, 2048, seed=2)
    with open_slide(path) as src:
        rule = Background(choose_fill(src))
        lv = src.level(0)
        verdicts = []
        for row in range(lv.rows):
            for col in range(lv.cols):
                w = min(lv.tile_width, lv.width - col * lv.tile_width)
                h = min(lv.tile_height, lv.height - row * lv.tile_height)
                verdicts.append(judged(src.read_encoded_tile(0, col, row), rule, (w, h)))
    assert verdicts.count(None) <= len(verdicts) // 20 and verdicts.count(True) >= 10, verdicts


def test_bad_targets_and_streams_are_refused() -> None:
    data = encode_tile(glass(1, size=64), "420")
    with pytest.raises(CorruptSlide, match="1/2"):
        jpegtran.copy_tile(data, True, (64, 64), None, np.zeros((31, 32, 3), np.uint8))
    with pytest.raises(InvalidArgument):
        jpegtran.copy_tile(data, True, (64, 64), None, np.zeros((32, 32, 4), np.uint8))
    with pytest.raises(InvalidArgument):
        jpegtran.copy_tile(data, True, (0, 64))
    with pytest.raises(CorruptSlide):
        jpegtran.copy_tile(data[: len(data) // 2], True, (64, 64), Background(244).rule)


@pytest.mark.parametrize("mode", ["420", "422"])
def test_upsampled_chroma_reaches_across_blocks(mode: str) -> None:
    """Glass whose chroma block ends where strongly tinted tissue begins, the region ending
    with the glass: the upsampler mixes the tissue's chroma into the glass's last pixels, so
    the tile is not blank although every block inside the region is glass on its own."""
    rule = Background(244)
    for tint in ((244, 180, 244), (200, 244, 150), (250, 236, 250)):
        tile = np.full((64, 64, 3), 244, np.uint8)
        tile[:, 16:] = tint
        for quality in (95, 100):
            data = encode_tile(tile, mode, quality)
            for width in (8, 16):
                verdict = judged(data, rule, (width, 64))
                if width == 16:
                    assert verdict is not True
    tile = np.full((64, 64, 3), 244, np.uint8)
    tile[16:] = (244, 180, 244)
    assert judged(encode_tile(tile, "420", 100), rule, (64, 16)) is not True


def test_single_frequencies_reach_their_bound() -> None:
    """Blocks of one DCT basis function each (u, v) at amplitudes across the tolerance of a
    dark fill (wide in levels: greys 8 to 28 around 20), centred where both ends bind: a
    block's extremes are its coefficient times the largest value of its basis function, which
    the bound must reach (a bound of |F|/4 each would pass; one 15% short of the maximum
    accepts a tile whose pixels reach 29)."""
    rule = Background(20)
    x = np.arange(8)
    for u, v in ((1, 0), (0, 1), (1, 1), (2, 3), (4, 0), (7, 7)):
        cu, cv = (np.cos((2 * x + 1) * k * np.pi / 16) for k in (u, v))
        basis = np.outer(cv, cu) / np.abs(np.outer(cv, cu)).max()
        for centre in (17, 18, 19):
            for amplitude in range(6, 16):
                for sign in (1, -1):
                    block = np.rint(centre + sign * amplitude * basis).clip(0, 255)
                    tile = np.repeat(np.tile(block.astype(np.uint8), (4, 4))[..., None], 3, -1)
                    judged(encode_tile(tile, "gray", 100), rule)
                    if centre == 18:
                        judged(encode_tile(tile, "444", 100), rule)


def test_the_one_pass_works_here_and_its_fallback_agrees() -> None:
    """The 1/2-scale pass reads libjpeg's internals: checked against the libjpeg loaded (it
    must work on the system we build for), and the two-pass fallback gives the same tile."""
    assert jpegtran.one_pass_works()
    rule = Background(244)
    for mode in ("420", "rgb"):
        data = encode_tile(glass(9, size=64), mode)
        one, two = (np.zeros((32, 32, 3), np.uint8) for _ in range(2))
        assert jpegtran.copy_tile(data, True, (64, 64), rule.rule, one) == (
            jpegtran.copy_then_decode(data, True, (64, 64), rule.rule, two)
        )
        assert np.array_equal(one, two)


@pytest.mark.parametrize("mode", ["420", "rgb"])
def test_blank_glass_halves_to_the_fill(mode: str) -> None:
    """With `blank_fill`, a tile proven all glass is not decoded: its 1/2-scale target is the
    fill grey; tissue, a tile the coefficients cannot settle and a call without a rule are
    decoded as before. The two-pass fallback does the same."""
    rule = Background(244)
    dot = glass(3)
    dot[100, 100] = 120  # undecided from the coefficients: decoded
    tissue = np.random.default_rng(4).integers(60, 230, (256, 256, 3)).astype(np.uint8)
    tiles = [encode_tile(t, mode) for t in (glass(1), tissue, dot)]
    verdicts = [True if mode == "420" else None, False, None]
    for chosen in (rule.rule, None):
        halves = [np.zeros((128, 128, 3), np.uint8) for _ in tiles]
        results = jpegtran.copy_tiles(tiles, True, [(256, 256)] * 3, chosen, halves, 240)
        for data, result, half, verdict in zip(tiles, results, halves, verdicts, strict=True):
            assert not isinstance(result, CorruptSlide)
            assert result.all_in_rule is (verdict if chosen else None)
            if chosen and verdict:
                assert (half == 240).all()
                two = np.zeros_like(half)
                jpegtran.copy_then_decode(data, True, (256, 256), chosen, two, 240)
                assert np.array_equal(half, two)
            else:
                assert np.array_equal(half, jpeg.decode(data, half=True))
    with pytest.raises(InvalidArgument):
        jpegtran.copy_tiles(tiles, True, [(256, 256)] * 3, rule.rule, None, 256)


def outcome(call: Callable[[], object]) -> object:
    """What a call returns, or the type and message of the CorruptSlide it raises."""
    try:
        return call()
    except CorruptSlide as error:
        return ("CorruptSlide", str(error))


def damaged_streams(cases: int, seed: int) -> Iterator[tuple[int, bytes, int, int]]:
    """(case, stream, width, height): tiles of every sampling mode, tissue and glass, edge and
    whole, damaged six ways in turn: bits flipped, a byte replaced, a stray 0xFF, a stray RST,
    cut short, a few bytes of padding before EOI."""
    rng = np.random.default_rng(seed)
    sources = []
    for mode in ("420", "422", "gray", "rgb", "restart"):
        for h, w in ((46, 70), (64, 64)):
            tissue = rng.integers(60, 230, (h, w, 3)).astype(np.uint8)
            sources.append((encode_tile(tissue, mode), w, h))
            sources.append((encode_tile(glass(h, size=max(h, w))[:h, :w], mode), w, h))
    for case in range(cases):
        data, w, h = sources[case % len(sources)]
        damaged = bytearray(data)
        sos = damaged.find(b"\xff\xda")
        start = sos + 2 + int.from_bytes(damaged[sos + 2 : sos + 4], "big")
        at = int(rng.integers(start, len(damaged) - 3))
        kind = case % 6
        if kind == 0:
            damaged[at] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            damaged[at] = int(rng.integers(256))
        elif kind == 2:
            damaged[at] = 0xFF
        elif kind == 3:
            damaged[at : at + 2] = bytes([0xFF, 0xD0 + int(rng.integers(8))])
        elif kind == 4:
            damaged = damaged[:at]
        else:
            damaged[-2:-2] = bytes([int(rng.choice([0, 0xAA]))]) * int(rng.integers(1, 9))
        yield case, bytes(damaged), w, h


def test_damaged_streams_end_as_libjpeg_ends_them() -> None:
    """copy_tile decodes the first scan itself, counting the symbols and bounding each block as
    it goes (the walk that used to follow libjpeg's decode); it reads the stream as libjpeg-turbo
    does, byte for byte at the same moments. Damaged streams show it: bits flipped, bytes
    replaced, cut short, a stray RST or marker, a few bytes of padding before EOI (all of which
    libjpeg may accept or refuse depending on where its reading stands) give the same result or
    the same error as `copy_then_decode`, where libjpeg decodes. Edge tiles too: the padding
    blocks of their last MCUs are decoded but counted as the output's (zero difference, EOB)."""
    rule = Background(244).rule
    changed = 0
    for case, stream, w, h in damaged_streams(1500, seed=12):
        one, two = (np.zeros(((h + 1) // 2, (w + 1) // 2, 3), np.uint8) for _ in range(2))
        first = outcome(lambda: jpegtran.copy_tile(stream, True, (w, h), rule, one))
        second = outcome(lambda: jpegtran.copy_then_decode(stream, True, (w, h), rule, two))
        assert first == second, (case, first, second)
        if not isinstance(first, tuple):
            assert np.array_equal(one, two), case
        changed += isinstance(first, tuple)
    assert 100 <= changed <= 1400  # both accepted and refused streams were compared


def test_damaged_streams_rewritten_alone_end_as_libjpeg_ends_them() -> None:
    """Without a 1/2-scale target (a level whose next one is copied too) the walk still decodes
    the scan, hooked in by jpeg_read_coefficients' progress call; the same damaged streams give
    the same stream or the same error as libjpeg's own decode and two-pass optimisation
    (`transcode` with libjpeg's tables)."""
    changed = 0
    for case, stream, w, h in damaged_streams(1500, seed=13):
        ours = outcome(lambda: jpegtran.copy_tile(stream, True, (w, h)).data)
        theirs = outcome(
            lambda: jpegtran._kept_stream(stream, _jpeglib.transcode(stream, True, True, w, h)[3])
        )
        assert ours == theirs, case
        changed += isinstance(ours, tuple)
    assert 100 <= changed <= 1400


def with_size(stream: bytes, width: int, height: int) -> bytes:
    """The stream with its frame header declaring another size (same MCU count): the blocks
    past the new edge become padding blocks that hold coefficients, as some encoders write
    them (libjpeg's own padding blocks have none)."""
    at = stream.find(b"\xff\xc0") + 5
    return stream[:at] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + stream[at + 4 :]


@pytest.mark.parametrize("mode", ["420", "422", "restart"])
def test_padding_blocks_with_coefficients(mode: str) -> None:
    """The output's padding blocks are a zero difference and an EOB whatever the source's
    held: the optimised stream is the one libjpeg's two passes make."""
    rng = np.random.default_rng(13)
    source = encode_tile(rng.integers(60, 230, (48, 80, 3)).astype(np.uint8), mode)
    # The MCUs stay 5 x 3 (4:2:0, 16 x 16) or 5 x 6 (4:2:2, 16 x 8, no padding rows).
    sizes = ((70, 48), (66, 48)) if mode == "422" else ((70, 48), (80, 40), (66, 34))
    for width, height in sizes:
        data = with_size(source, width, height)
        one, two = (np.zeros(((height + 1) // 2, (width + 1) // 2, 3), np.uint8) for _ in "12")
        walked = jpegtran.copy_tile(data, True, (width, height), None, one)
        assert walked == jpegtran.copy_then_decode(data, True, (width, height), None, two)
        assert walked.data == jpegtran.transcode(data).data
        assert np.array_equal(one, two)
