"""wsi.codecs.jpegtran: lossless Huffman optimisation, pixel bounds from the coefficients, and
cropped decoding, checked against whole-tile decodes by three decoders (our TurboJPEG binding,
Pillow's own libjpeg-turbo, PyTurboJPEG with the fast IDCT and fast upsampling)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
import turbojpeg
from PIL import Image

from tests.conftest import SHARED, sample
from wsi.codecs import _jpeglib, jpeg, jpegtran
from wsi.errors import CorruptSlide, InvalidArgument
from wsi.sources import open_slide

NDPI = ["hamamatsu/test3-DAPI-2-(387).ndpi"]
SHARED_NDPI = pytest.param(
    SHARED / "hamamatsu" / "test3-TRITC 2 (560).ndpi", marks=pytest.mark.shared_slides
)


# -- tiles ----------------------------------------------------------------------------------------
def svs_tiles() -> list[bytes]:
    """Every complete tile of CMU-1-Small-Region (RGB-coded 4:4:4, Adobe marker added)."""
    with open_slide(sample("CMU-1-Small-Region.svs")) as src:
        lv = src.level(0)
        return [src.read_encoded_tile(0, c, r) for r in range(lv.rows) for c in range(lv.cols)]


def ndpi_streams(path: Path) -> list[bytes]:
    """The whole-level JPEG streams of an NDPI file (YCbCr with restart markers), those small
    enough to transcode."""
    out = []
    with tifffile.TiffFile(path) as tif:
        for page in tif.pages:
            assert isinstance(page, tifffile.TiffPage)
            offset = page.tags["StripOffsets"].value[0]
            count = page.tags["StripByteCounts"].value[0]
            tif.filehandle.seek(offset)
            data = tif.filehandle.read(count)
            if data[:2] == b"\xff\xd8" and page.shape[0] * page.shape[1] <= (
                jpegtran.MAX_TRANSCODE_PIXELS
            ):
                out.append(data)
    assert out
    return out


def synthetic(seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """Near-uniform, uniform, smooth, saturated and noisy tiles, odd sizes included."""
    rng = np.random.default_rng(seed)
    for h, w in ((256, 256), (45, 70)):
        colour = rng.integers(0, 256, 3)
        yield f"uniform-{h}", np.broadcast_to(colour, (h, w, 3)).astype(np.uint8)
        for value in (0, 255):
            yield f"uniform-{h}-{value}", np.full((h, w, 3), value, np.uint8)
        near = colour + rng.integers(-2, 3, (h, w, 3))
        yield f"near-uniform-{h}", np.clip(near, 0, 255).astype(np.uint8)
        ramp = np.linspace(0, 255, w)[None, :, None] * np.array([1.0, 0.5, 0.2])
        yield f"gradient-{h}", np.broadcast_to(ramp, (h, w, 3)).astype(np.uint8)
        yy, xx = np.mgrid[:h, :w]
        checker = ((yy // 3 + xx // 5) % 2 * 255).astype(np.uint8)
        yield f"checker-{h}", np.stack([checker, 255 - checker, checker], axis=-1)
        yield f"noise-{h}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def encoded_tiles() -> Iterator[tuple[str, bytes]]:
    """Synthetic tiles through `wsi.codecs.jpeg.encode` at several qualities, both subsamplings,
    and through Pillow at 4:2:2."""
    for name, pixels in synthetic(7):
        for quality in (5, 30, 75, 95, 100):
            for sub in (True, False):
                yield (
                    f"{name}-q{quality}-{'420' if sub else '444rgb'}",
                    jpeg.encode(pixels, quality, sub),
                )
        yield f"{name}-pillow422", pillow_jpeg(pixels, quality=60, subsampling=1)


def pillow_jpeg(pixels: np.ndarray, **options: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, "JPEG", **options)
    return buf.getvalue()


def decoders(data: bytes) -> Iterator[tuple[str, np.ndarray]]:
    """What several accurate decoders make of `data`: libjpeg-turbo's islow IDCT with fancy and
    merged upsampling, our system library and Pillow's own build, at full and reduced scales."""
    yield "turbojpeg", jpeg.decode(data)
    yield "turbojpeg-half", jpeg.decode(data, half=True)
    merged = _pyturbo.decode(data, pixel_format=turbojpeg.TJPF_RGB, flags=_FAST_UPSAMPLE)
    yield "turbojpeg-merged-upsampling", merged
    with Image.open(io.BytesIO(data)) as image:
        yield "pillow", np.asarray(image.convert("RGB"))
    for scale in (4, 8):
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (image.width // scale, image.height // scale))
            yield f"pillow-1/{scale}", np.asarray(image.convert("RGB"))


_pyturbo = turbojpeg.TurboJPEG()
_FAST_UPSAMPLE = turbojpeg.TJFLAG_FASTUPSAMPLE


def segments(stream: bytes) -> list[tuple[int, bytes]]:
    """(marker, payload) of every segment up to SOS, parsed here independently of the module."""
    out, pos = [], 2
    assert stream[:2] == b"\xff\xd8"
    while True:
        assert stream[pos] == 0xFF
        marker = stream[pos + 1]
        length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        out.append((marker, stream[pos + 4 : pos + 2 + length]))
        if marker == 0xDA:
            return out
        pos += 2 + length


def payloads(stream: bytes, marker: int) -> list[bytes]:
    return [p for m, p in segments(stream) if m == marker]


def quant_tables(stream: bytes) -> dict[int, bytes]:
    """Table number -> its 64 values (8- or 16-bit), from every DQT segment."""
    tables = {}
    for payload in payloads(stream, 0xDB):
        pos = 0
        while pos < len(payload):
            size = 128 if payload[pos] >> 4 else 64
            tables[payload[pos] & 15] = payload[pos + 1 : pos + 1 + size]
            pos += 1 + size
    return tables


# -- bounds ---------------------------------------------------------------------------------------
def check_bounds(data: bytes, what: str) -> jpegtran.Transcoded:
    result = jpegtran.transcode(data)
    low, high = np.array(result.low), np.array(result.high)
    assert (low <= high).all(), what
    for name, pixels in decoders(data):
        assert (pixels.reshape(-1, 3) >= low).all(), (
            f"{what}: {name} below {result.low}: {pixels.min(axis=(0, 1))}"
        )
        assert (pixels.reshape(-1, 3) <= high).all(), (
            f"{what}: {name} above {result.high}: {pixels.max(axis=(0, 1))}"
        )
    return result


def test_bounds_hold_for_synthetic_tiles() -> None:
    widths = {}
    for name, data in encoded_tiles():
        result = check_bounds(data, name)
        widths[name] = max(h - lo for lo, h in zip(result.low, result.high, strict=True))
    uniform = {k: v for k, v in widths.items() if k.startswith("uniform")}
    assert len(uniform) == 3 * 2 * 11
    # Up to 3 when Y and Cr both fall on a half level (either integer may come out).
    assert max(uniform.values()) <= 3, uniform
    assert sum(v <= 1 for v in uniform.values()) >= 0.9 * len(uniform), uniform
    assert all(
        v <= 12 for k, v in widths.items() if k.startswith("near-uniform-q") and "q5" not in k
    )
    assert all(v >= 200 for k, v in widths.items() if k.startswith("checker"))


def test_bounds_hold_for_real_tiles() -> None:
    tiles = svs_tiles()
    results = [check_bounds(tile, f"CMU-1 tile {k}") for k, tile in enumerate(tiles)]
    # The background tiles of this slide are near white: the box says so without decoding.
    assert any(min(r.low) >= 200 for r in results)


@pytest.mark.parametrize("path", [sample(n) for n in NDPI] + [SHARED_NDPI])
def test_bounds_hold_for_ndpi_levels(path: Path) -> None:
    for k, stream in enumerate(ndpi_streams(path)):
        check_bounds(stream, f"{path.name} page {k}")


def test_wide_quanta_give_the_bounds_narrow_ones_give() -> None:
    """The walk over the coefficients sums |AC| x quantum (and x each frequency's reach) with
    16-bit multiplies when every quantum of a table fits in 8 bits, in 64-bit arithmetic
    otherwise: both must give the same bounds. Two grey streams of the same pixels whose tables
    differ only in the highest frequency's quantum, 255 and 300 (a 16-bit table), where every
    coefficient is zero (so the decoded pixels are the same), take one way each. The other
    quanta are small (1 to 15), so coefficients reach the hundreds."""
    rng = np.random.default_rng(11)
    narrow = [*(1 + (k % 8) + (k // 8) for k in range(63)), 255]
    wide = [*narrow[:63], 300]
    x = np.arange(64)
    compared = 0
    for _ in range(40):
        u, v = rng.uniform(0.02, 0.6, 2)
        wave = np.add.outer(np.sin(x * v * rng.uniform(0.5, 1.5)), np.cos(x * u))
        pixels = (128 + rng.uniform(20, 60) * wave + rng.normal(0, 6, (64, 64))).clip(0, 255)
        pixels = pixels.astype(np.uint8)
        a, b = (pillow_jpeg(pixels, qtables=[table]) for table in (narrow, wide))
        assert quant_tables(a) != quant_tables(b)
        if not np.array_equal(jpeg.decode(a), jpeg.decode(b)):
            continue  # some highest-frequency coefficient was not zero under 255
        ta, tb = (jpegtran.transcode(s, optimize=False) for s in (a, b))
        assert (ta.low, ta.high, ta.darkest, ta.lightest) == (
            tb.low,
            tb.high,
            tb.darkest,
            tb.lightest,
        )
        compared += 1
    assert compared >= 30


# -- transcode ------------------------------------------------------------------------------------
def check_lossless(data: bytes, out: bytes, rgb: bool) -> None:
    assert np.array_equal(jpeg.decode(out), jpeg.decode(data))
    markers = [m for m, _ in segments(out)]
    assert markers[0] == (0xEE if rgb else 0xE0)
    assert set(markers[1:]) <= {0xDB, 0xC0, 0xC4, 0xDD, 0xDA}, [hex(m) for m in markers]
    assert 0xC0 in markers
    if rgb:
        assert payloads(out, 0xEE)[0][:5] == b"Adobe" and payloads(out, 0xEE)[0][10] == 0
    assert quant_tables(out) == quant_tables(data)
    # Frame header: precision, size, component ids, sampling and table numbers all kept.
    [src_frame] = [p for m, p in segments(data) if m in (0xC0, 0xC1, 0xC2)]
    assert payloads(out, 0xC0) == [src_frame]
    assert payloads(out, 0xDD) == payloads(data, 0xDD)


def test_transcode_is_lossless_and_smaller() -> None:
    before = after = 0
    for tile in svs_tiles():
        result = jpegtran.transcode(tile)
        check_lossless(tile, result.data, rgb=True)
        before, after = before + len(tile), after + len(result.data)
    assert after < 0.95 * before  # 9.6% smaller on this slide
    for name, data in encoded_tiles():
        result = jpegtran.transcode(data)
        check_lossless(data, result.data, rgb="444rgb" in name)
        assert len(result.data) <= len(data)


@pytest.mark.parametrize("path", [sample(n) for n in NDPI] + [SHARED_NDPI])
def test_transcode_keeps_restart_interval(path: Path) -> None:
    streams = ndpi_streams(path)
    assert sum(bool(payloads(s, 0xDD)) for s in streams) >= 3, "NDPI levels have restarts"
    for stream in streams:
        assert payloads(stream, 0xFE), "and a comment, which must go"
        out = jpegtran.transcode(stream).data
        assert out != stream
        check_lossless(stream, out, rgb=False)


def test_transcode_drops_other_markers_and_progression() -> None:
    pixels = next(p for n, p in synthetic(3) if n == "gradient-256")
    exif = Image.Exif()
    exif[0x010E] = "PATIENT NAME"  # ImageDescription
    source = pillow_jpeg(pixels, quality=80, exif=exif, comment=b"PATIENT ID", progressive=True)
    assert b"PATIENT" in source
    out = jpegtran.transcode(source).data
    assert b"PATIENT" not in out
    assert payloads(source, 0xC2) and not payloads(source, 0xC0)
    assert np.array_equal(jpeg.decode(out), jpeg.decode(source))
    assert next(m for m, _ in segments(out)) == 0xE0 and payloads(out, 0xC0)


def test_transcode_returns_input_when_not_smaller_or_not_asked() -> None:
    tile = svs_tiles()[0]
    once = jpegtran.transcode(tile)
    assert once.data != tile
    assert jpegtran.transcode(once.data).data == once.data
    plain = jpegtran.transcode(tile, optimize=False)
    assert plain.data == tile
    assert (plain.low, plain.high) == (once.low, once.high)


def test_grey_tiles() -> None:
    grey = np.full((64, 64), 77, np.uint8)
    grey[20:30] = 200
    data = pillow_jpeg(grey, quality=90)
    result = jpegtran.transcode(data)
    assert result.low[0] == result.low[1] == result.low[2]
    decoded = jpeg.decode(data)
    assert (decoded >= result.low).all() and (decoded <= result.high).all()
    assert np.array_equal(jpegtran.decode_region(data, 3, 17, 40, 9), decoded[17:26, 3:43])


def edge_streams() -> Iterator[tuple[str, bytes]]:
    """Streams whose last MCUs overhang the image (padding blocks in every subsampling), with
    restart intervals of 1 and 3 MCUs and of a row, grey ones, a 4:4:0 one, progressive ones."""
    rng = np.random.default_rng(13)
    for h, w in ((45, 70), (17, 33), (9, 130), (1, 1), (64, 64)):
        pixels = np.clip(rng.normal(128, 60, (h, w, 3)), 0, 255).astype(np.uint8)
        grey = np.ascontiguousarray(pixels[..., 0])
        for sub in (0, 1, 2):
            for blocks in (1, 3):
                yield (
                    f"{h}x{w}-sub{sub}-rst{blocks}",
                    pillow_jpeg(pixels, quality=70, subsampling=sub, restart_marker_blocks=blocks),
                )
            yield (
                f"{h}x{w}-sub{sub}-row",
                pillow_jpeg(pixels, subsampling=sub, restart_marker_rows=1),
            )
        yield f"{h}x{w}-grey-rst3", pillow_jpeg(grey, quality=90, restart_marker_blocks=3)
        yield f"{h}x{w}-grey-progressive", pillow_jpeg(grey, progressive=True)
        yield f"{h}x{w}-440", _pyturbo.encode(pixels, 85, turbojpeg.TJPF_RGB, turbojpeg.TJSAMP_440)
        yield f"{h}x{w}-progressive", pillow_jpeg(pixels, quality=95, progressive=True)


def test_tables_are_libjpegs_optimal_tables(synthetic_jpeg_tiff: Path) -> None:
    """`transcode` builds the optimal Huffman tables itself, from statistics gathered while it
    bounds the pixels, and entropy-codes once; libjpeg's own optimize_coding (a gathering pass,
    then jpeg_gen_optimal_table) must give the same bytes, on every kind of stream we have."""
    streams = [("CMU-1", t) for t in svs_tiles()]
    with open_slide(synthetic_jpeg_tiff) as src:
        for level in range(len(src.levels)):
            lv = src.level(level)
            streams += [
                (f"libvips {level} {c},{r}", src.read_encoded_tile(level, c, r))
                for r in range(lv.rows)
                for c in range(lv.cols)
            ]
    streams += [*encoded_tiles(), *edge_streams()]
    streams += [("NDPI", s) for s in ndpi_streams(sample(NDPI[0]))]
    assert len(streams) > 380
    assert sum(bool(payloads(s, 0xDD)) for _, s in streams) > 40, "restart intervals"
    for name, data in streams:
        ours = _jpeglib.transcode(data, True)
        assert ours[3] is not None and ours == _jpeglib.transcode(data, True, True), name
        assert ours[:3] == _jpeglib.transcode(data, False)[:3], name


def test_tiles_with_tables_of_their_own_one_after_another() -> None:
    """Tiles that each carry optimal tables (our own output, read back) share some of them: here
    the DC tables (the same gradient under each tile) while the AC tables differ (noise of
    growing strength). Each thread keeps the decoding tables it made last; a table found there
    must stay while the tile's other tables are made, or the tile is decoded with a wrong one.
    On a fresh thread, tile after tile, every result is libjpeg's own (its decoder and two-pass
    optimisation)."""
    gradient = np.linspace(60, 200, 256)[None, :, None] * np.ones((256, 1, 3))
    rng = np.random.default_rng(16)
    tiles = [
        jpeg.encode_optimized(
            np.clip(gradient + rng.normal(0, s, (256, 256, 3)), 0, 255).astype(np.uint8), 85
        )
        for s in (2, 4, 6, 8, 10, 12, 14, 16)
    ]

    def one_after_another() -> list[object]:
        out: list[object] = []
        for data in tiles:
            try:
                out.append(_jpeglib.transcode(data, True))
            except CorruptSlide as error:
                out.append(str(error))
        return out

    with ThreadPoolExecutor(1) as fresh:  # a thread whose tables are all still to be made
        ours = fresh.submit(one_after_another).result()
    assert ours == [_jpeglib.transcode(data, True, True) for data in tiles]


# -- decode_region --------------------------------------------------------------------------------
def region_cases(h: int, w: int) -> Iterator[tuple[int, int, int, int]]:
    """Every offset, with widths and heights of 1, a few pixels, an MCU and the rest."""
    for y in range(h):
        for x in range(w):
            for rw in {1, 5, 16, w - x}:
                if x + rw <= w:
                    rh = (1, 7, 17, h - y)[(x + y) % 4]
                    yield x, y, rw, min(rh, h - y)


@pytest.mark.parametrize(
    "kind", ["420", "444rgb", "pillow422", "pillow440", "progressive420", "restart420"]
)
def test_decode_region_equals_whole_decode_exhaustively(kind: str) -> None:
    rng = np.random.default_rng(11)
    h, w = 45, 70
    yy, xx = np.mgrid[:h, :w]
    pixels = np.stack([xx * 3, yy * 5, (xx * yy) % 256], axis=-1).astype(np.uint8)
    pixels = np.clip(pixels + rng.integers(0, 40, pixels.shape), 0, 255).astype(np.uint8)
    data = {
        "420": lambda: jpeg.encode(pixels, 85, True),
        "444rgb": lambda: jpeg.encode(pixels, 85, False),
        "pillow422": lambda: pillow_jpeg(pixels, quality=85, subsampling=1),
        "pillow440": lambda: _pyturbo.encode(pixels, 85, turbojpeg.TJPF_RGB, turbojpeg.TJSAMP_440),
        "progressive420": lambda: pillow_jpeg(pixels, quality=85, progressive=True),
        "restart420": lambda: pillow_jpeg(pixels, quality=85, restart_marker_blocks=3),
    }[kind]()
    whole = jpeg.decode(data)
    count = 0
    for x, y, rw, rh in region_cases(h, w):
        part = jpegtran.decode_region(data, x, y, rw, rh)
        assert np.array_equal(part, whole[y : y + rh, x : x + rw]), (kind, x, y, rw, rh)
        count += 1
    assert count > 3 * h * w


def test_decode_region_on_real_tiles() -> None:
    rng = np.random.default_rng(5)
    tiles = svs_tiles()
    ndpi = ndpi_streams(sample(NDPI[0]))[-1]
    tall = jpeg.encode(np.concatenate([jpeg.decode(t) for t in tiles[:3]]), 80, True)
    for data in [*tiles[::7], ndpi, tall]:
        h, w = jpeg.decoded_size(data)
        whole = jpeg.decode(data)
        for _ in range(40):
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            if rng.random() < 0.3:
                x, y = x // 16 * 16, y // 16 * 16
            rw, rh = int(rng.integers(1, w - x + 1)), int(rng.integers(1, h - y + 1))
            part = jpegtran.decode_region(data, x, y, rw, rh)
            assert np.array_equal(part, whole[y : y + rh, x : x + rw]), (x, y, rw, rh)


def test_decode_region_into_a_strided_target() -> None:
    tile = svs_tiles()[5]
    whole = jpeg.decode(tile)
    batch = np.zeros((2, 100, 120, 3), np.uint8)
    jpegtran.decode_region_into(tile, 30, 40, batch[1, 10:60, 5:105], tile_size=(240, 240))
    assert np.array_equal(batch[1, 10:60, 5:105], whole[40:90, 30:130])
    assert not batch[0].any() and not batch[1, :10].any() and not batch[1, :, :5].any()
    assert not batch[1, 60:].any() and not batch[1, :, 105:].any()
    with pytest.raises(CorruptSlide, match="declares 240x240"):
        jpegtran.decode_region_into(tile, 0, 0, batch[0, :8, :8], tile_size=(256, 256))
    for bad in (batch[0, :8, :8, :2], batch[0, :8, ::2], batch[0, :8, :8].astype(np.uint16)):
        with pytest.raises((InvalidArgument, ValueError)):
            jpegtran.decode_region_into(tile, 0, 0, bad)
    with pytest.raises((InvalidArgument, ValueError, TypeError)):
        jpegtran.decode_region_into(tile, 0, 0, np.zeros((8, 8, 3), np.uint8)[::-1])


def test_threads_give_the_same_pixels() -> None:
    tiles = svs_tiles()
    serial = [jpegtran.decode_region(t, 13, 29, 200, 150) for t in tiles]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda t: jpegtran.decode_region(t, 13, 29, 200, 150), tiles))
        transcoded = list(pool.map(jpegtran.transcode, tiles))
    assert all(np.array_equal(a, b) for a, b in zip(serial, parallel, strict=True))
    assert transcoded == [jpegtran.transcode(t) for t in tiles]


# -- bad input ------------------------------------------------------------------------------------
def test_bad_streams_raise() -> None:
    tile = svs_tiles()[3]
    for bad in (b"", b"\xff\xd8", tile[: len(tile) // 2], b"\xff\xd8" + bytes(range(256)) * 4):
        with pytest.raises(CorruptSlide):
            jpegtran.transcode(bad)
        with pytest.raises(CorruptSlide):
            jpegtran.decode_region(bad, 0, 200, 8, 8)
    # A premature end is only a warning to libjpeg (turbojpeg decodes grey); here it is an error.
    jpeg.decode(tile[: len(tile) // 2])


def test_limits() -> None:
    cmyk = io.BytesIO()
    Image.new("CMYK", (16, 16)).save(cmyk, "JPEG")
    with pytest.raises(CorruptSlide, match="components"):
        jpegtran.transcode(cmyk.getvalue())
    data = bytearray(jpeg.encode(np.zeros((16, 16, 3), np.uint8), 80))
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 9] = (20000).to_bytes(2, "big") + (16).to_bytes(2, "big")
    with pytest.raises(CorruptSlide, match="exceed"):
        jpegtran.transcode(bytes(data))
    with pytest.raises(CorruptSlide, match="exceed"):
        jpegtran.transcode(b"\xff\xd8" + bytes(jpegtran.MAX_INPUT_BYTES))
    good = jpeg.encode(np.zeros((16, 24, 3), np.uint8), 80)
    for region in ((0, 0, 25, 1), (0, 16, 1, 1), (-1, 0, 2, 2), (0, 0, 0, 3)):
        with pytest.raises(InvalidArgument):
            jpegtran.decode_region(good, *region)
