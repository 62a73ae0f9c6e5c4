"""wsi.codecs.jpegtran.copy_tiles: a row of copied tiles in one call gives, tile for tile,
exactly what `copy_tile` gives for each alone: the stored bytes, the 1/2-scale pixels and the
blank-glass verdict, or the same error, whatever the other tiles of the row hold."""

from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest

from tests.test_onepass import encode_tile, glass, svs_tiles
from wsi.codecs import jpeg, jpegtran
from wsi.errors import CorruptSlide, InvalidArgument
from wsi.pyramid.background import Background

Outcome = tuple[bytes, bool | None, bytes] | tuple[str, str]


def mixed_tiles() -> list[bytes]:
    """Tiles of every kind in one list: sizes, colour spaces, sampling, restart intervals,
    progressive, other quantisation and Huffman tables (qualities, encoders), tissue, glass
    and glass at the rule's fill, and real Aperio tiles."""
    rng = np.random.default_rng(21)
    tiles = []
    for i, mode in enumerate(("420", "444", "422", "rgb", "gray", "restart", "progressive")):
        for h, w in ((256, 256), (46, 70), (240, 240)):
            tissue = rng.integers(60, 230, (h, w, 3)).astype(np.uint8)
            tiles.append(encode_tile(tissue, mode, 60 + 5 * i))
            tiles.append(encode_tile(glass(h + w, size=max(h, w))[:h, :w], mode))
    tiles.append(jpeg.encode(np.full((256, 256, 3), 244, np.uint8), 90, True))
    tiles.extend(svs_tiles()[:6])
    return tiles


def region_of(data: bytes, i: int) -> tuple[int, int]:
    """The whole tile, or (every third tile) a part of it, as at a level's edge."""
    h, w = jpeg.decoded_size(data)
    return (w, h) if i % 3 else (max(1, w - 17), max(1, h // 2))


def half_of(data: bytes) -> np.ndarray:
    return np.zeros((*jpeg.decoded_size(data, half=True), 3), np.uint8)


def alone(data: bytes, region: tuple[int, int], rule: Background | None, half: bool) -> Outcome:
    """What `copy_tile` gives for the tile alone: (stored bytes, verdict, 1/2-scale pixels),
    or (error type, message)."""
    target = half_of(data) if half else None
    try:
        copied = jpegtran.copy_tile(data, True, region, rule.rule if rule else None, target)
    except CorruptSlide as error:
        return ("CorruptSlide", str(error))
    return copied.data, copied.all_in_rule, target.tobytes() if target is not None else b""


def batched(
    tiles: list[bytes], regions: list[tuple[int, int]], rule: Background | None, halves: list[bool]
) -> list[Outcome]:
    targets = [half_of(data) if half else None for data, half in zip(tiles, halves, strict=True)]
    results = jpegtran.copy_tiles(tiles, True, regions, rule.rule if rule else None, targets)
    out: list[Outcome] = []
    for result, target in zip(results, targets, strict=True):
        if isinstance(result, CorruptSlide):
            out.append(("CorruptSlide", str(result)))
        else:
            pixels = target.tobytes() if target is not None else b""
            out.append((result.data, result.all_in_rule, pixels))
    return out


@pytest.mark.parametrize("rule", [Background(244), None])
def test_a_mixed_row_gives_what_each_tile_gives_alone(rule: Background | None) -> None:
    tiles = mixed_tiles()
    regions = [region_of(data, i) for i, data in enumerate(tiles)]
    halves = [i % 4 != 1 for i in range(len(tiles))]  # some tiles without a target
    expected = [alone(d, r, rule, h) for d, r, h in zip(tiles, regions, halves, strict=True)]
    assert batched(tiles, regions, rule, halves) == expected
    verdicts = {outcome[1] for outcome in expected}
    assert rule is None or {True, False} <= verdicts  # glass and tissue were both judged
    # The same tiles in another order: nothing of one tile leaks into the next.
    order = np.random.default_rng(3).permutation(len(tiles))
    shuffled = batched(
        [tiles[i] for i in order], [regions[i] for i in order], rule, [halves[i] for i in order]
    )
    assert shuffled == [expected[i] for i in order]


def damaged(data: bytes, kind: int) -> bytes:
    """The stream cut short, with a stray marker in its scan, without its quantisation tables
    or without its Huffman tables (tables an earlier tile of the row defined)."""
    if kind == 0:
        return data[: len(data) // 2]
    if kind == 1:
        at = data.find(b"\xff\xda") + 40
        return data[:at] + b"\xff\xc4" + data[at + 2 :]
    out = bytearray(data)
    marker = b"\xff\xdb" if kind == 2 else b"\xff\xc4"
    while (at := out.find(marker)) >= 0:
        del out[at : at + 2 + int.from_bytes(out[at + 2 : at + 4], "big")]
    return bytes(out)


def test_a_damaged_tile_fails_alone_and_the_others_are_kept() -> None:
    """Each damaged tile in the middle of a row gives the error it gives alone; the tiles
    before and after it give what they give alone. A tile without Huffman tables is decoded
    alone with libjpeg's standard ones (as motion JPEG frames omit them), not with those of
    the tile before it."""
    rule = Background(244)
    rng = np.random.default_rng(8)
    good = [encode_tile(rng.integers(60, 230, (64, 64, 3)).astype(np.uint8), "420") for _ in "ab"]
    good.append(encode_tile(glass(64, size=64), "420"))
    bad = [damaged(good[0], kind) for kind in range(4)]
    optimised = jpegtran.transcode(good[0]).data  # Huffman tables other than the standard
    tiles = [good[0], bad[0], good[1], bad[1], good[2], bad[2], optimised, bad[3], good[1]]
    regions = [(64, 64)] * len(tiles)
    expected = [alone(data, (64, 64), rule, True) for data in tiles]
    refused = [i for i, outcome in enumerate(expected) if outcome[0] == "CorruptSlide"]
    assert refused == [1, 3, 5]
    assert batched(tiles, regions, rule, [True] * len(tiles)) == expected


def test_a_stream_over_the_limit_is_refused_in_its_place() -> None:
    data = encode_tile(glass(1, size=32), "420")
    huge = bytes(jpegtran.MAX_INPUT_BYTES + 1)
    with pytest.raises(CorruptSlide) as error:
        jpegtran.copy_tile(huge, True, (32, 32))
    results = jpegtran.copy_tiles([data, huge, data], True, [(32, 32)] * 3)
    assert isinstance(results[1], CorruptSlide) and str(results[1]) == str(error.value)
    assert results[0] == results[2] == jpegtran.copy_tile(data, True, (32, 32))


def test_without_optimising_nor_a_rule() -> None:
    tiles = mixed_tiles()[:12]
    targets = [half_of(data) for data in tiles]
    regions = [region_of(data, 1) for data in tiles]
    results = jpegtran.copy_tiles(tiles, False, regions, None, targets)
    for data, region, result, target in zip(tiles, regions, results, targets, strict=True):
        one = half_of(data)
        assert result == jpegtran.copy_tile(data, False, region, None, one)
        assert isinstance(result, jpegtran.CopiedTile) and result.data == data
        assert np.array_equal(target, one)
    assert jpegtran.copy_tiles([], True, [], Background(244).rule, []) == []


def test_rows_copied_on_two_threads_at_once() -> None:
    """Each thread keeps its own Huffman decoding tables: rows of tiles with different tables,
    copied on two threads at once, give what they give on one."""
    tiles = mixed_tiles()
    regions = [region_of(data, i) for i, data in enumerate(tiles)]
    rule = Background(244)
    halves = [True] * len(tiles)
    expected = batched(tiles, regions, rule, halves)
    rows = [(tiles[i::4], regions[i::4]) for i in range(4)] * 3
    with cf.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(batched, t, r, rule, halves[: len(t)]) for t, r in rows]
        for (i, _), future in zip(enumerate(rows), futures, strict=True):
            assert future.result() == expected[i % 4 :: 4]


def test_bad_arguments_are_refused() -> None:
    data = encode_tile(glass(2, size=64), "420")
    with pytest.raises(InvalidArgument):
        jpegtran.copy_tiles([data, data], True, [(64, 64)])
    with pytest.raises(InvalidArgument):
        jpegtran.copy_tiles([data], True, [(64, 64)], None, [None, None])
    with pytest.raises(InvalidArgument):
        jpegtran.copy_tiles([data], True, [(0, 64)])
    with pytest.raises(InvalidArgument):
        jpegtran.copy_tiles([data], True, [(64, 64)], None, [np.zeros((32, 32, 4), np.uint8)])
    with pytest.raises(InvalidArgument):
        jpegtran.copy_tiles([data], True, [(64, 64)], None, [np.zeros((32, 32, 3), np.int16)])
    with pytest.raises(CorruptSlide):  # one tile's own error, the same as alone
        jpegtran.copy_tile(data, True, (64, 64), None, np.zeros((31, 32, 3), np.uint8))
    result = jpegtran.copy_tiles([data], True, [(64, 64)], None, [np.zeros((31, 32, 3), np.uint8)])
    assert isinstance(result[0], CorruptSlide) and "at 1/2, not to the 32x31" in str(result[0])
