"""JPEG 2000 (Aperio 33003/33005) sources: decoded tiles against OpenSlide, level 1 from the
1/2-resolution decode, `--keep-jpeg2000` read back by zarr-python, wsidicom and dciodvfy, and
served as JPEG to viewers. Slides are generated small by `sample_data/make_j2k.py`."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import io
import json
from pathlib import Path
from typing import cast

import imagecodecs
import numpy as np
import pydicom
import pytest
import tifffile
import wsidicom
import zarr
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

import wsi.codecs.zarr_j2k  # noqa: F401 - registers the wsistore.jpeg2000 codec with zarr
from sample_data.make_j2k import write_svs
from server.app import create_app
from server.settings import ServerSettings
from wsi import (
    ConvertSettings,
    PyramidSettings,
    Store,
    StoreSettings,
    TileCodec,
    convert_slide,
    open_published,
)
from wsi.codecs import jpeg, jpeg2000
from wsi.errors import CorruptSlide, InvalidArgument
from wsi.export import export_dicom
from wsi.pyramid.background import DEFAULT_FILL, choose_fill
from wsi.sources import open_slide

from .conftest import area_reference, openslide_level0, psnr
from .test_dicom import dciodvfy

WIDTH, HEIGHT = 1100, 900
"""Edge tiles on both sides, 5 x 4 tiles of 256 px."""


@pytest.fixture(scope="module")
def j2k_svs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_svs(tmp_path_factory.mktemp("j2k") / "rgb.svs", WIDTH, HEIGHT, seed=3)


@pytest.fixture(scope="module")
def ycbcr_svs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("j2k") / "ycbcr.svs"
    return write_svs(path, WIDTH, HEIGHT, seed=4, ycbcr=True)


def _tiles(path: Path) -> list[np.ndarray]:
    """Every base tile, row-major, through our source."""
    with open_slide(path) as src:
        lv = src.levels[0]
        return [src.read_tile(0, c, r) for r in range(lv.rows) for c in range(lv.cols)]


def _assemble(tiles: list[np.ndarray], cols: int, width: int, height: int) -> np.ndarray:
    rows = [np.concatenate(tiles[i : i + cols], axis=1) for i in range(0, len(tiles), cols)]
    return np.concatenate(rows)[:height, :width]


@pytest.mark.parametrize("fixture", ["j2k_svs", "ycbcr_svs"])
def test_decoded_tiles_equal_openslide_and_tifffile(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    path = request.getfixturevalue(fixture)
    with open_slide(path) as src:
        assert src.name == "tiff"
        rgb = fixture == "j2k_svs"
        assert src.tile_codec(0) is (TileCodec.JPEG2000 if rgb else TileCodec.OTHER)
        cols = src.levels[0].cols
    ours = _assemble(_tiles(path), cols, WIDTH, HEIGHT)
    assert np.array_equal(ours, openslide_level0(path))  # before any JPEG encode of ours
    if rgb:  # tifffile hands 33003 components out unconverted, so only 33005 compares
        with tifffile.TiffFile(path) as tif:
            assert np.array_equal(ours, tif.pages[0].asarray())


def test_codestream_header_and_bad_streams(j2k_svs: Path) -> None:
    with open_slide(j2k_svs) as src:
        stream = src.read_encoded_tile(0, 1, 1)
    info = jpeg2000.parse(stream)
    assert (info.width, info.height, info.components) == (256, 256, 3)
    assert info.colour_transform and not info.reversible
    assert info.dicom(ycbcr=False) == (jpeg2000.JPEG2000, "YBR_ICT")
    with pytest.raises(CorruptSlide):
        jpeg2000.check_size(stream, 128, 256)
    for bad in (b"", b"\xff\xd8\xff\xe0 not j2k", stream[:30]):
        with pytest.raises(CorruptSlide):
            jpeg2000.parse(bad)
    with pytest.raises(CorruptSlide):
        jpeg2000.decode(stream[:200] + b"\x00" * 50)


def test_half_resolution_decode_is_the_area_mean_within_bounds(j2k_svs: Path) -> None:
    """The reduced decode is the wavelet's low-pass band: not the 2x2 mean, but close to the
    exact area mean of OpenSlide's full decode (and much closer than a neighbour tile)."""
    with open_slide(j2k_svs) as src:
        lv = src.levels[0]
        halves = [src.read_tile_half(0, c, r) for r in range(lv.rows) for c in range(lv.cols)]
        assert all(h is not None and h.shape == (128, 128, 3) for h in halves)
    ours = _assemble(halves, lv.cols, WIDTH // 2, HEIGHT // 2)  # type: ignore[arg-type]
    ref = area_reference(openslide_level0(j2k_svs), 1)
    assert psnr(ours, ref) >= 30.0
    assert psnr(ours, np.roll(ref, 64, axis=1)) < 25.0


def _codestreams(path: Path) -> list[bytes]:
    with open_slide(path) as src:
        lv = src.levels[0]
        return [src.read_encoded_tile(0, c, r) for r in range(lv.rows) for c in range(lv.cols)]


def test_half_resolution_decode_against_pillow(j2k_svs: Path) -> None:
    """Our reduced decode against Pillow's (another binding and build of OpenJPEG): the 9/7
    wavelet is floating point, so builds may differ by one in a few pixels (measured: 3 in
    10 million on the generated slide), never more."""
    for stream in _codestreams(j2k_svs):
        with Image.open(io.BytesIO(stream), formats=("JPEG2000",)) as image:
            image.reduce = 1  # type: ignore[method-assign, assignment]
            image.load()
            pillow = np.asarray(image.convert("RGB"))
        diff = np.abs(jpeg2000.decode_half(stream).astype(int) - pillow)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_decode_into_views_and_threads(j2k_svs: Path) -> None:
    """Decoding straight into a strided view (a tile's place in a strip, a quadrant) gives the
    same pixels as a whole decode, and threads decoding at once do not mix their streams."""
    streams = _codestreams(j2k_svs)
    whole = [jpeg2000.decode(s) for s in streams]
    strip = np.zeros((256, 256 * len(streams), 3), np.uint8)
    for i, stream in enumerate(streams):
        jpeg2000.decode_into(stream, strip[:, i * 256 : (i + 1) * 256])
    assert np.array_equal(strip, np.concatenate(whole, axis=1))
    below = np.zeros((256, 256, 3), np.uint8)
    jpeg2000.decode_into(streams[6], below[128:, :128], reduce=1)
    assert np.array_equal(below[128:, :128], jpeg2000.decode_half(streams[6]))
    assert not below[:128].any() and not below[:, 128:].any()  # nothing written outside
    with cf.ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert all(map(np.array_equal, pool.map(jpeg2000.decode, streams), whole))
    with pytest.raises(InvalidArgument):
        jpeg2000.decode_into(streams[0], np.zeros((128, 128, 3), np.uint8))  # full size needed
    huge = bytearray(streams[0])
    huge[8:16] = (100_000).to_bytes(4, "big") * 2  # SIZ Xsiz, Ysiz: a 100,000 px square "tile"
    with pytest.raises(InvalidArgument):
        jpeg2000.decode(bytes(huge))


def test_corrupt_codestreams_fail_with_openjpeg_reason(j2k_svs: Path) -> None:
    stream = max(_codestreams(j2k_svs), key=len)
    for reduce in (0, 1):
        out = np.zeros(jpeg2000.decoded_shape(256, 256, reduce), np.uint8)
        with pytest.raises(CorruptSlide, match="cannot decode JPEG 2000 tile"):
            jpeg2000.decode_into(stream[:300], out, reduce=reduce)
    with pytest.raises(CorruptSlide):
        # 5 decomposition levels: 6 resolutions, the smallest 1/32.
        jpeg2000.decode_into(stream, np.zeros((4, 4, 3), np.uint8), reduce=6)
    assert jpeg2000.decode(stream).shape == (256, 256, 3)  # the thread's decoder still works


def test_an_image_origin_past_the_image_is_a_corrupt_codestream(j2k_svs: Path) -> None:
    """A SIZ marker whose image origin (XOsiz, YOsiz) lies past the image's far corner (Xsiz,
    Ysiz) declares a negative size: it is refused as corrupt, where it used to reach
    numpy as a ValueError ("negative dimensions are not allowed"), which a stored tile served
    as JPEG (`to_jpeg`) or a source tile decoded did not report as a damaged slide."""
    stream = bytearray(min(_codestreams(j2k_svs), key=len))
    xsiz, ysiz = int.from_bytes(stream[8:12], "big"), int.from_bytes(stream[12:16], "big")
    stream[16:20] = (xsiz + 16).to_bytes(4, "big")  # SIZ XOsiz, YOsiz past Xsiz, Ysiz
    stream[20:24] = (ysiz + 16).to_bytes(4, "big")
    for decode in (jpeg2000.decode, jpeg2000.decode_half):
        with pytest.raises(CorruptSlide, match="SIZ"):
            decode(bytes(stream))
    with pytest.raises(CorruptSlide, match="SIZ"):
        jpeg2000.to_jpeg(bytes(stream), 80)


def _convert(path: Path, root: Path, **pyramid: object) -> tuple[Path, str]:
    settings = ConvertSettings(PyramidSettings(keep_background=True, **pyramid))  # type: ignore[arg-type]
    result = convert_slide(path, Store(StoreSettings(str(root))), settings)
    return root / result.slide_id, result.slide_id


def _level(slide: Path, k: int) -> np.ndarray:
    group = zarr.open_group(str(slide / "slide.zarr"), mode="r")
    array = group[str(k)]
    assert isinstance(array, zarr.Array)
    return np.moveaxis(cast(np.ndarray, array[:]), 0, -1)


def test_jpeg_output_within_psnr_bounds(j2k_svs: Path, tmp_path: Path) -> None:
    slide, _ = _convert(j2k_svs, tmp_path)
    level0 = openslide_level0(j2k_svs)
    meta = (slide / "slide.zarr" / "0" / "zarr.json").read_text()
    assert "wsistore.jpeg" in meta and "wsistore.jpeg2000" not in meta
    # Measured 36.0, 32.8, 31.0 dB: JPEG Q90 4:2:0 of a texture with sharp coloured edges.
    assert psnr(_level(slide, 0), level0) >= 34.0
    assert psnr(_level(slide, 1), area_reference(level0, 1)) >= 31.0
    assert psnr(_level(slide, 2), area_reference(level0, 2)) >= 29.0


@pytest.fixture(scope="module")
def kept(j2k_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return _convert(j2k_svs, tmp_path_factory.mktemp("kept"), keep_jpeg2000=True)


def test_keep_jpeg2000_stores_the_codestreams_as_they_are(
    j2k_svs: Path, kept: tuple[Path, str]
) -> None:
    slide, _ = kept
    meta = (slide / "slide.zarr" / "0" / "zarr.json").read_text()
    assert "wsistore.jpeg2000" in meta
    with open_slide(j2k_svs) as src:
        stored = jpeg2000.without_comments(src.read_encoded_tile(0, 2, 1))
    shard = (slide / "slide.zarr" / "0" / "c" / "0" / "0" / "0").read_bytes()
    assert stored in shard  # one copy, byte for byte but comments, in the object both views read
    level0 = openslide_level0(j2k_svs)
    assert np.array_equal(_level(slide, 0), level0)  # zarr-python through our codec
    # Level 1 from the reduced decode (not a 2x2 mean of the full one), then the cascade.
    with open_slide(j2k_svs) as src:
        half = src.read_tile_half(0, 1, 1)
    assert half is not None
    level1 = _level(slide, 1)
    assert psnr(level1[128:256, 128:256], half) >= 34.0  # only our JPEG encode between them
    # Measured 30.1, 29.8 dB against the box filter: the wavelet's low-pass is another filter.
    assert psnr(level1, area_reference(level0, 1)) >= 28.0
    assert psnr(_level(slide, 2), area_reference(level0, 2)) >= 28.0


def test_keep_jpeg2000_copies_every_exact_source_level(
    j2k_svs: Path, kept: tuple[Path, str]
) -> None:
    """The source's 1/4 level (Aperio's step) is our level 2: kept as its codestreams too, and
    the level below it is its 1/2 resolution decode. Nothing of it is decoded to be stored."""
    import openslide

    slide, _ = kept
    manifest = json.loads((slide / "manifest.json").read_text())
    origins = {o["level"]: o for o in manifest["levels"]}
    assert origins[0] == {"level": 0, "method": "copied", "source_level": 0}
    assert origins[1] == {"level": 1, "method": "wavelet-half", "from_level": 0}
    assert origins[2] == {"level": 2, "method": "copied", "source_level": 1}
    assert origins[3] == {"level": 3, "method": "wavelet-half", "from_level": 2}
    assert len(origins) == 4  # 1100 x 900 down to 137 x 112: one tile
    meta = json.loads((slide / "slide.zarr" / "2" / "zarr.json").read_text())
    assert "wsistore.jpeg2000" in json.dumps(meta["codecs"])
    shard = (slide / "slide.zarr" / "2" / "c" / "0" / "0" / "0").read_bytes()
    with open_slide(j2k_svs) as src:
        assert src.levels[1].width == WIDTH // 4
        assert jpeg2000.without_comments(src.read_encoded_tile(1, 1, 0)) in shard
        halves = [src.read_tile_half(1, col, 0) for col in (0, 1)]
    with openslide.OpenSlide(str(j2k_svs)) as ref:
        rgba = np.asarray(ref.read_region((0, 0), 1, ref.level_dimensions[1]))
    assert np.array_equal(_level(slide, 2), rgba[..., :3])  # OpenSlide decodes the same bytes
    # Level 3 (137 x 112, one tile): the two halves side by side, white below, our encode.
    tile = np.full((256, 256, 3), 255, np.uint8)
    for col, half in enumerate(halves):
        assert half is not None
        tile[:128, 128 * col : 128 * (col + 1)] = half
    expected = jpeg.decode(jpeg.encode_optimized(tile, 90, True))[:112, :137]
    assert np.array_equal(_level(slide, 3), expected)


def test_fill_of_a_jpeg2000_slide_from_half_resolution(tmp_path: Path) -> None:
    """The blank-glass grey is chosen from the smallest level decoded at 1/2 resolution: the
    same glass as from the full decode, at a fraction of the cost."""
    for ycbcr in (False, True):
        path = write_svs(tmp_path / f"{ycbcr}.svs", 3000, 2500, seed=2, ycbcr=ycbcr)
        with open_slide(path) as src:
            halves = choose_fill(src, 2)
            src.read_tile_half = lambda *args: None  # type: ignore[method-assign]
            full = choose_fill(src, 2)
        assert full != DEFAULT_FILL and abs(halves - full) <= 1


def test_the_fill_samples_half_tiles_make_the_level_below_without_a_second_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With blank glass judged, the fill's sample is the smallest level's tiles at 1/2
    resolution; where that level is kept as its codestreams (here the source's 1/16 level,
    384 x 64: two tiles, the second an edge tile), those same decodes make the level below:
    each of its codestreams is decoded once, and the level is what those decodes make."""
    path = write_svs(tmp_path / "wide.svs", 6144, 1024, seed=5)
    with open_slide(path) as src:
        smallest = len(src.levels) - 1
        lv = src.levels[smallest]
        cells = [(c, r) for r in range(lv.rows) for c in range(lv.cols)]
        codestreams = {src.read_encoded_tile(smallest, c, r): (c, r) for c, r in cells}
        halves = [src.read_tile_half(smallest, c, r) for c, r in cells]
    assert (lv.width, lv.height, len(codestreams)) == (384, 64, 2)
    decoded: list[tuple[int, int]] = []
    decode_into = jpeg2000.decode_into

    def counting(stream: bytes, out: np.ndarray, ycbcr: bool = False, reduce: int = 0) -> None:
        if stream in codestreams:
            decoded.append(codestreams[stream])
        decode_into(stream, out, ycbcr, reduce)

    monkeypatch.setattr(jpeg2000, "decode_into", counting)
    settings = ConvertSettings(PyramidSettings(keep_jpeg2000=True))
    result = convert_slide(path, Store(StoreSettings(str(tmp_path / "out"))), settings)
    assert sorted(decoded) == sorted(cells)  # the fill's decode, and no other
    slide = tmp_path / "out" / result.slide_id
    origins = json.loads((slide / "manifest.json").read_text())["levels"]
    assert origins[4] == {"level": 4, "method": "copied", "source_level": smallest}
    assert origins[5] == {"level": 5, "method": "wavelet-half", "from_level": 4}
    tile = np.full((256, 256, 3), 255, np.uint8)
    for (col, row), half in zip(cells, halves, strict=True):
        assert half is not None
        tile[128 * row : 128 * (row + 1), 128 * col : 128 * (col + 1)] = half
    expected = jpeg.decode(jpeg.encode_optimized(tile, 90, True))[:32, :192]
    assert np.array_equal(_level(slide, 5), expected)


def test_keep_jpeg2000_dicom_view(j2k_svs: Path, kept: tuple[Path, str]) -> None:
    slide, _ = kept
    base = slide / "slide.zarr" / "0" / "c" / "0" / "0" / "0"
    ds = pydicom.dcmread(base, stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == jpeg2000.JPEG2000
    assert ds.PhotometricInterpretation == "YBR_ICT"
    assert ds.LossyImageCompressionMethod == "ISO_15444_1"
    assert dciodvfy(base) == ([], [])
    objects = sorted(str(p) for p in (slide / "slide.zarr").rglob("c/0/0/0"))
    with wsidicom.WsiDicom.open(objects) as wsi_dicom:
        region = np.asarray(wsi_dicom.read_region((0, 0), 0, (WIDTH, HEIGHT)).convert("RGB"))
    # wsidicom's JPEG 2000 decoder may round the inverse wavelet differently by one.
    diff = np.abs(region.astype(int) - openslide_level0(j2k_svs))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_a_jpeg2000_dicom_series_is_kept_as_its_codestreams(
    kept: tuple[Path, str], tmp_path: Path
) -> None:
    """Our JPEG 2000 DICOM export (YBR_ICT codestreams) converted with `--keep-jpeg2000`: its
    frames are kept as they are, not decoded and encoded as JPEG, and every level comes out as
    the first conversion made it."""
    slide, slide_id = kept
    export_dicom(Store(StoreSettings(str(slide.parent))), slide_id, tmp_path / "dicom")
    with open_slide(tmp_path / "dicom") as src:
        assert src.tile_codec(0) is TileCodec.JPEG2000
        frame = src.read_encoded_tile(0, 2, 1)
    again, _ = _convert(tmp_path / "dicom", tmp_path / "again", keep_jpeg2000=True)
    shard = (again / "slide.zarr" / "0" / "c" / "0" / "0" / "0").read_bytes()
    assert frame.startswith(jpeg2000.SOC) and frame in shard
    manifest = json.loads((again / "manifest.json").read_text())
    assert {o["level"]: o["method"] for o in manifest["levels"]}[0] == "copied"
    for k in range(len(list((slide / "slide.zarr").glob("[0-9]*")))):
        assert np.array_equal(_level(again, k), _level(slide, k)), k


def test_a_jpeg2000_dicom_series_decodes_as_the_svs_it_came_from(
    j2k_svs: Path, kept: tuple[Path, str], tmp_path: Path
) -> None:
    """Converted to JPEG, the DICOM series holding the SVS's codestreams gives the SVS's level
    0 byte for byte: its frames are decoded by the same OpenJPEG binding, whole or at 1/2
    resolution (the wavelet's: for less than half the work of a whole decode)."""
    slide, slide_id = kept
    export_dicom(Store(StoreSettings(str(slide.parent))), slide_id, tmp_path / "dicom")
    from_svs, _ = _convert(j2k_svs, tmp_path / "svs")
    from_dicom, _ = _convert(tmp_path / "dicom", tmp_path / "dcm")
    with open_published(str(from_svs)) as svs_out, open_published(str(from_dicom)) as dicom_out:
        level = svs_out.levels[0]
        for row in range(level.rows):
            for col in range(level.cols):
                assert dicom_out.tile_bytes(0, col, row) == svs_out.tile_bytes(0, col, row)
    with open_slide(tmp_path / "dicom") as dicom, open_slide(j2k_svs) as svs:
        assert np.array_equal(dicom.read_tile(0, 1, 1), svs.read_tile(0, 1, 1))
        half, svs_half = dicom.read_tile_half(0, 1, 1), svs.read_tile_half(0, 1, 1)
        assert half is not None and svs_half is not None and np.array_equal(half, svs_half)


def test_keep_jpeg2000_served_as_jpeg(j2k_svs: Path, kept: tuple[Path, str]) -> None:
    slide, sid = kept
    level0 = openslide_level0(j2k_svs)

    async def check(c: TestClient) -> None:
        r = await c.get(f"/slides/{sid}/tiles/0/2/1")
        assert r.status == 200 and r.content_type == "image/jpeg"
        pixels = imagecodecs.jpeg8_decode(await r.read())
        assert psnr(pixels, level0[256:512, 512:768]) >= 33.0  # 35.4 measured
        dz = await c.get(f"/slides/{sid}_files/11/2_1.jpeg")  # DeepZoom's full resolution
        assert dz.status == 200 and dz.content_type == "image/jpeg"
        assert psnr(imagecodecs.jpeg8_decode(await dz.read()), level0[256:512, 512:768]) >= 33.0
        iiif = await c.get(f"/iiif/3/{sid}/512,256,256,256/max/0/default.jpg")
        assert iiif.status == 200 and iiif.content_type == "image/jpeg"
        region = np.asarray(Image.open(io.BytesIO(await iiif.read())).convert("RGB"))
        assert psnr(region, level0[256:512, 512:768]) >= 33.0

    async def main() -> None:
        settings = ServerSettings(store=str(slide.parent))
        async with TestClient(TestServer(create_app(settings))) as client:
            await check(client)

    asyncio.run(main())


def _parts(content_type: str, content: bytes) -> list[tuple[str, bytes]]:
    """(part Content-Type, body) of a multipart/related body (RFC 2046)."""
    assert content_type.startswith("multipart/related")
    boundary = next(
        p.split("=", 1)[1].strip('"')
        for p in (x.strip() for x in content_type.split(";"))
        if p.startswith("boundary=")
    ).encode()
    chunks = (b"\r\n" + content).split(b"\r\n--" + boundary)
    out = []
    for chunk in chunks[1:-1]:
        head, _, data = chunk[2:].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n") if ": " in line)
        out.append((headers["Content-Type"], data))
    return out


def test_keep_jpeg2000_dicomweb_negotiation(j2k_svs: Path, kept: tuple[Path, str]) -> None:
    slide, _ = kept
    base = slide / "slide.zarr" / "0" / "c" / "0" / "0" / "0"
    ds = pydicom.dcmread(base, stop_before_pixels=True)
    url = (
        f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    with open_slide(j2k_svs) as src:
        codestream = jpeg2000.without_comments(src.read_encoded_tile(0, 0, 0))
    level0 = openslide_level0(j2k_svs)
    syntax = jpeg2000.JPEG2000

    async def check(c: TestClient) -> None:
        found = await (
            await c.get(f"/dicomweb/instances?SOPInstanceUID={ds.SOPInstanceUID}")
        ).json()
        assert found[0]["00083002"]["Value"] == [syntax]  # AvailableTransferSyntaxUID
        # Frames: JPEG for viewers by default (transcoded), the codestream when asked for.
        r = await c.get(
            f"{url}/frames/1", headers={"Accept": 'multipart/related; type="image/jpeg"'}
        )
        [(kind, data)] = _parts(r.headers["Content-Type"], await r.read())
        assert kind.startswith("image/jpeg") and data[:2] == b"\xff\xd8"
        assert psnr(imagecodecs.jpeg8_decode(data), level0[:256, :256]) >= 33.0
        r = await c.get(
            f"{url}/frames/1", headers={"Accept": 'multipart/related; type="image/jp2"'}
        )
        assert _parts(r.headers["Content-Type"], await r.read()) == [
            (f"image/jp2; transfer-syntax={syntax}", codestream)
        ]
        named = f'multipart/related; type="image/jp2"; transfer-syntax={syntax}'
        r = await c.get(f"{url}/frames/1", headers={"Accept": named})
        assert _parts(r.headers["Content-Type"], await r.read()) == [
            (f"image/jp2; transfer-syntax={syntax}", codestream)
        ]
        # Lossless asked, lossy stored; octet-stream parts of a compressed syntax (PS3.18
        # pairs application/octet-stream with uncompressed frames or `*`): 406, not other frames.
        for accept in (
            f'multipart/related; type="image/jp2"; transfer-syntax={jpeg2000.JPEG2000_LOSSLESS}',
            f'multipart/related; type="application/octet-stream"; transfer-syntax={syntax}',
        ):
            r = await c.get(f"{url}/frames/1,2", headers={"Accept": accept})
            assert r.status == 406 and "json" in r.content_type, accept
        # The instance: as stored (JPEG 2000), or 406 when only JPEG baseline will do.
        r = await c.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
        assert _parts(r.headers["Content-Type"], await r.read()) == [
            (f"application/dicom; transfer-syntax={syntax}", base.read_bytes())
        ]
        baseline = (
            'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
        )
        r = await c.get(url, headers={"Accept": baseline})
        assert r.status == 406 and "json" in r.content_type

    async def main() -> None:
        settings = ServerSettings(store=str(slide.parent))
        async with TestClient(TestServer(create_app(settings))) as client:
            await check(client)

    asyncio.run(main())


PLANTED = b"DOE^JANE MRN12345"


def _commented(stream: bytes) -> bytes:
    """`stream` with the patient's name in a comment of its main header and of its first
    tile-part's header (that tile-part's length, Psot, grown to match)."""
    text = PLANTED + b" J2K"
    com = b"\xff\x64" + (len(text) + 4).to_bytes(2, "big") + b"\x00\x01" + text
    siz_end = 4 + int.from_bytes(stream[4:6], "big")
    stream = stream[:siz_end] + com + stream[siz_end:]
    sot = stream.index(b"\xff\x90\x00\x0a")
    psot = int.from_bytes(stream[sot + 6 : sot + 10], "big")
    grown = (psot + len(com)).to_bytes(4, "big") if psot else stream[sot + 6 : sot + 10]
    return stream[: sot + 6] + grown + stream[sot + 10 : sot + 12] + com + stream[sot + 12 :]


def test_kept_codestreams_lose_their_comments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --keep-jpeg2000 a source's codestreams were stored with their comment (COM)
    segments, free text in which an encoder or a site can write a patient's name: it reached
    the Zarr chunks, the DICOM frames and exports, under --deidentify too (a copied JPEG tile
    loses its comments). They are stored without them now: the same pixels."""
    import sample_data.make_j2k as make_j2k

    plain = make_j2k.encode_tile
    monkeypatch.setattr(make_j2k, "encode_tile", lambda *a: _commented(plain(*a)))
    path = write_svs(tmp_path / "commented.svs", 600, 400, seed=5)
    with open_slide(path) as src:
        source = src.read_encoded_tile(0, 1, 0)
    assert source.count(PLANTED) == 2
    stripped = jpeg2000.without_comments(source)
    assert PLANTED not in stripped and b"\xff\x64" not in stripped[: stripped.index(b"\xff\x93")]
    assert np.array_equal(jpeg2000.decode(stripped), jpeg2000.decode(source))
    assert jpeg2000.without_comments(stripped) is stripped
    settings = ConvertSettings(PyramidSettings(keep_jpeg2000=True), deidentify=True)
    result = convert_slide(path, Store(StoreSettings(str(tmp_path / "store"))), settings)
    stored = b"".join(p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file())
    assert b"wsistore.jpeg2000" in stored  # kept as codestreams
    assert PLANTED not in stored
    assert np.array_equal(_level(tmp_path / "store" / result.slide_id, 0), openslide_level0(path))
