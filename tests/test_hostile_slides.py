"""Hostile and corrupt slides: a tile whose JPEG header declares a huge size is refused where it
enters (the source backends) and wherever stored bytes are decoded, instead of making every crop,
region or rendered frame allocate gigabytes."""

from __future__ import annotations

import asyncio
import resource
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from aiohttp.test_utils import TestClient, TestServer

import wsi
from sample_data.make_leica import write_leica
from sample_data.make_philips import write_philips
from server.app import create_app
from server.settings import ServerSettings
from wsi.codecs import jpeg
from wsi.sources import open_slide

from .conftest import make_tiff
from .helpers import run_wsi


def declare_size(stream: bytes, width: int, height: int) -> bytes:
    """`stream` with its SOF0 frame header claiming width x height pixels."""
    at = stream.index(b"\xff\xc0")
    return stream[: at + 5] + struct.pack(">HH", height, width) + stream[at + 9 :]


def hostile_tile_tiff(path: Path) -> Path:
    """A small JPEG pyramid whose tile (1, 1) of level 0 declares 65000 x 65000 pixels (a few
    KB: only the SOF header changes; a decoder would allocate 12 GiB for it)."""
    make_tiff(path, 700, 600, pyramid=False)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        cols = -(-page.imagewidth // page.tilewidth)
        index = 1 * cols + 1  # tile (col 1, row 1), row-major
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(count)
        patched = declare_size(data, 65000, 65000)
        assert len(patched) == len(data)
        f.seek(offset)
        f.write(patched)
    return path


@pytest.fixture
def huge_tile_tiff(tmp_path: Path) -> Path:
    return hostile_tile_tiff(tmp_path / "hostile.tif")


def test_jpeg_decode_refuses_a_declared_size_it_did_not_expect() -> None:
    pixels = np.full((256, 256, 3), 200, np.uint8)
    stream = jpeg.encode(pixels, 90)
    assert jpeg.decode(stream, expected=(256, 256)).shape == (256, 256, 3)
    hostile = declare_size(stream, 65000, 65000)
    with pytest.raises(wsi.CorruptSlide, match="declares 65000x65000"):
        jpeg.decode(hostile, expected=(256, 256))
    with pytest.raises(wsi.CorruptSlide, match="declares 65000x65000"):
        jpeg.check_size(hostile, 256, 256)


def test_source_refuses_the_tile(huge_tile_tiff: Path) -> None:
    with open_slide(huge_tile_tiff) as src:
        assert src.name == "tiff"
        assert len(src.read_encoded_tile(0, 0, 0)) > 0  # its neighbours are fine
        with pytest.raises(wsi.CorruptSlide, match="declares 65000x65000"):
            src.read_encoded_tile(0, 1, 1)


def test_convert_fails_in_one_line(huge_tile_tiff: Path, tmp_path: Path) -> None:
    done = run_wsi("convert", str(huge_tile_tiff), "--out", str(tmp_path / "out"), "--no-progress")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "declares 65000x65000" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not any((tmp_path / "out").glob("*/manifest.json"))  # nothing published


def test_served_from_its_source_the_tile_is_a_422(huge_tile_tiff: Path) -> None:
    """While a slide converts it is served from its source: the hostile tile must not reach a
    decoder there either."""

    async def main() -> None:
        folder = huge_tile_tiff.parent
        settings = ServerSettings(store=str(folder / "store"), sources=(str(folder),))
        async with TestClient(TestServer(create_app(settings))) as c:
            listing = await (await c.get("/slides")).json()
            (sid,) = [s["id"] for s in listing["slides"]]
            ok = await c.get(f"/slides/{sid}/tiles/0/0/0")
            assert ok.status == 200
            bad = await c.get(f"/slides/{sid}/tiles/0/1/1")
            assert bad.status == 422
            assert "declares 65000x65000" in (await bad.json())["error"]
            # A DeepZoom tile that covers it at a lower zoom: refused, not allocated.
            low = await c.get(f"/slides/{sid}_files/8/0_0.jpeg")
            assert low.status == 422
            assert (await c.get("/healthz")).status == 200

    asyncio.run(main())


def test_a_hostile_stored_tile_is_refused_by_every_renderer(tmp_path: Path) -> None:
    """Bytes in the store are trusted only as far as their declared size: a stored chunk that
    claims 65000 x 65000 pixels gives a 422 on crops, regions and rendered frames, not an
    allocation of 12 GiB."""
    source = make_tiff(tmp_path / "ok.tif", 700, 600, pyramid=False)
    root = tmp_path / "store"
    sid = wsi.convert_slide(source, wsi.Store(wsi.StoreSettings(str(root)))).slide_id
    shard = root / sid / "slide.zarr" / "0" / "c" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    n = 3 * 3  # 700 x 600 in 256-px tiles
    index = np.frombuffer(bytes(raw[len(raw) - 16 * n - 4 : -4]), "<u8").reshape(n, 2)
    offset, length = (int(v) for v in index[1 * 3 + 1])  # tile (1, 1)
    chunk = bytes(raw[offset : offset + length])
    raw[offset : offset + length] = declare_size(chunk, 65000, 65000)
    shard.write_bytes(bytes(raw))

    async def main() -> None:
        settings = ServerSettings(store=str(root))
        async with TestClient(TestServer(create_app(settings))) as c:
            assert (await c.get(f"/slides/{sid}/tiles/0/0/0")).status == 200
            for url in (
                f"/iiif/3/{sid}/300,300,100,100/max/0/default.jpg",  # a crop of that tile
                f"/iiif/3/{sid}/200,200,300,300/max/0/default.png",  # a region across it
                f"/iiif/3/{sid}/256,256,256,256/200,/0/default.jpg",  # that tile, scaled
            ):
                r = await c.get(url)
                assert r.status == 422, (url, r.status)
                assert "declares 65000x65000" in (await r.json())["error"]

    asyncio.run(main())


def widen(path: Path, width: int) -> Path:
    """`path` with its first page declaring `width` pixels across, its tile table as it was."""
    with tifffile.TiffFile(path, mode="r+") as tif:
        page = tif.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        page.tags["ImageWidth"].overwrite(width)
    return path


@pytest.mark.parametrize("vendor", ["tiff", "philips"])
def test_a_page_larger_than_its_tile_table_is_refused(vendor: str, tmp_path: Path) -> None:
    """A damaged width makes the tile grid longer than the tile table: the reading indexed past
    it (an IndexError, which the CLI took for a transient failure, exit 75), and Philips TIFF
    fell back to OpenSlide, which published the tiles on a wrong grid (exit 0)."""
    if vendor == "philips":
        image = np.random.default_rng(3).integers(0, 255, (1024, 1024, 3), np.uint8)
        source = write_philips(tmp_path / "s.tiff", image, tile=256, levels=3)
    else:
        source = make_tiff(tmp_path / "s.tif", 1024, 1024)
    widen(source, 5000)
    done = run_wsi("convert", str(source), "--out", str(tmp_path / "out"), "--no-progress")
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "its tile table lists 16" in lines[0], done.stderr
    assert not any((tmp_path / "out").glob("*/manifest.json"))


def _one_byte_count(path: Path, page_index: int, tile: int, count: int) -> Path:
    """`path` with the byte count of one tile of one page set to `count` (offsets unchanged)."""
    with tifffile.TiffFile(path, mode="r+") as tif:
        page = tif.pages[page_index]
        assert isinstance(page, tifffile.TiffPage)
        counts = list(page.tags["TileByteCounts"].value)
        counts[tile] = count
        page.tags["TileByteCounts"].overwrite(counts)
    return path


def test_a_tile_running_past_the_end_of_the_file_is_refused_in_one_line(tmp_path: Path) -> None:
    """A byte count of 2^32 - 1 in a Leica slide's tile table: OpenSlide, which decoded that
    level, allocated what it declared, and under a 3 GiB address-space limit (as ingest's
    machines may have) GLib aborted the process (SIGABRT, no line, a partial `slide.zarr/`).
    (A backend that reads tiles itself gives that tile's error: `test_batched_reads.py`.)"""
    image = np.random.default_rng(5).integers(0, 255, (1024, 1024, 3), np.uint8)
    source = write_leica(tmp_path / "s.scn", image)
    with tifffile.TiffFile(source) as tif:
        page = next(i for i, p in enumerate(tif.pages) if p.shape[1] == 1024)
    _one_byte_count(source, page, 2, 2**32 - 1)
    done = subprocess.run(
        [sys.executable, "-m", "wsi.cli", "convert", str(source), "--out", str(tmp_path / "out"),
         "--no-progress"],
        capture_output=True, text=True, check=False,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "runs past the end of the file" in lines[0], done.stderr
    assert not any((tmp_path / "out").glob("*/slide.zarr"))


def sparse_tiff(path: Path, side: int) -> Path:
    """A tiled JPEG TIFF declaring side x side pixels with one stored tile (the rest sparse):
    a few hundred KB that a naive converter turns into tens of gigapixels of white tiles."""
    tile = np.full((1024, 1024, 3), 255, np.uint8)
    count = (-(-side // 1024)) ** 2

    def tiles():  # type: ignore[no-untyped-def]
        yield tile
        for _ in range(count - 1):
            yield None

    tifffile.imwrite(
        path, tiles(), shape=(side, side, 3), dtype="uint8", tile=(1024, 1024),
        compression="jpeg", photometric="rgb", bigtiff=True,
    )  # fmt: skip
    return path


@pytest.mark.timeout(120)
def test_a_sparse_file_declaring_huge_pixels_is_refused(tmp_path: Path) -> None:
    source = sparse_tiff(tmp_path / "sparse.tif", 200_000)
    assert source.stat().st_size < 1_000_000
    done = run_wsi("convert", str(source), "--out", str(tmp_path / "out"), "--no-progress")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "declares 200000 x 200000 pixels in" in lines[0], done.stderr
    assert not any((tmp_path / "out").rglob("*.json"))
    # The absolute limit is a setting too.
    small = make_tiff(tmp_path / "small.tif", 700, 600, pyramid=False)
    store = wsi.Store(wsi.StoreSettings(str(tmp_path / "store")))
    with pytest.raises(wsi.CorruptSlide, match="over the 100000 pixel limit"):
        wsi.convert_slide(small, store, wsi.ConvertSettings(max_pixels=100_000))
    assert wsi.convert_slide(small, store).slide_id


def test_a_corrupt_shard_index_is_a_422(tmp_path: Path) -> None:
    """A shard index whose CRC32C disagrees is a corrupt slide (422), not an unreachable store
    (503): retrying will not help. The other levels, with their own indexes, are still served."""
    source = make_tiff(tmp_path / "ok.tif", 700, 600, pyramid=False)
    root = tmp_path / "store"
    sid = wsi.convert_slide(source, wsi.Store(wsi.StoreSettings(str(root)))).slide_id
    shard = root / sid / "slide.zarr" / "0" / "c" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) - 16 * 9 - 4] ^= 0x01  # first offset of the 3 x 3 tile index, CRC unchanged
    shard.write_bytes(bytes(raw))

    async def main() -> None:
        async with TestClient(TestServer(create_app(ServerSettings(store=str(root))))) as c:
            r = await c.get(f"/slides/{sid}/tiles/0/0/0")
            assert r.status == 422
            assert "CRC32C" in (await r.json())["error"]
            assert (await c.get(f"/iiif/3/{sid}/0,0,100,100/max/0/default.jpg")).status == 422
            assert (await c.get(f"/slides/{sid}/tiles/1/0/0")).status == 200

    asyncio.run(main())


def test_an_unreadable_instance_is_left_out_of_instance_searches(tmp_path: Path) -> None:
    """A published slide whose base level object was damaged afterwards (its DICOM header no
    longer readable) has that instance left out of instance searches, store-wide or of its
    series: the other instances are still listed. Before, `GET /dicomweb/instances` answered
    422 for the whole store because of one damaged object."""
    root = tmp_path / "store"
    store = wsi.Store(wsi.StoreSettings(str(root)))
    wsi.convert_slide(make_tiff(tmp_path / "good.tif", 700, 600), store)
    bad = wsi.convert_slide(make_tiff(tmp_path / "bad.tif", 900, 500, seed=3), store).slide_id
    (root / bad / "slide.zarr" / "0" / "c" / "0" / "0" / "0").write_bytes(b"")

    async def main() -> None:
        async with TestClient(TestServer(create_app(ServerSettings(store=str(root))))) as c:
            r = await c.get("/dicomweb/instances")
            assert r.status == 200, await r.text()
            found = await r.json()
            assert len(found) >= 2  # the good slide's levels at least
            r = await c.get("/dicomweb/series")
            assert r.status == 200
            series = [
                (s["0020000D"]["Value"][0], s["0020000E"]["Value"][0]) for s in await r.json()
            ]
            assert len(series) == 2  # the damaged slide's series is still listed
            per_series = []
            for study, uid in series:
                r = await c.get(f"/dicomweb/studies/{study}/series/{uid}/instances")
                assert r.status == 200, await r.text()
                per_series.append(len(await r.json()))
            assert sum(per_series) == len(found)  # each instance once, the damaged one left out
            assert (await c.get("/healthz")).status == 200

    asyncio.run(main())


def test_a_tile_width_tag_of_many_values_is_a_corrupt_slide(tmp_path: Path) -> None:
    """A damaged TileWidth entry of a reduced level (its count 1 become 255: the value is then
    read from wherever the entry now points) made tifffile's `is_tiled` compare a tuple with an
    int: a TypeError, which `wsi convert` took for an unexpected failure (exit 75, retried by
    ingest five times). It is a corrupt slide: exit 1, one line."""
    path = make_tiff(tmp_path / "damaged.tif", 900, 700)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[1]
        assert isinstance(page, tifffile.TiffPage)
        entry = page.tags[322].offset  # TileWidth's entry: tag, type, then its count
    with open(path, "r+b") as f:
        f.seek(entry + 4)
        f.write(b"\xff")
    done = run_wsi("convert", str(path), "--out", str(tmp_path / "out"), "--no-progress")
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wsi: error: {path}: "), done.stderr
    assert "cannot convert (" not in lines[0]


def test_an_associated_image_declaring_a_billion_pixels_is_refused(tmp_path: Path) -> None:
    """A Leica macro page whose ImageLength was damaged to 4,000,000 (a 1 KB change): OpenSlide
    allocates the whole RGBA image before reading it, 4 GB. Without a memory limit the
    conversion held 4 GB for 20 s before failing on the tiles; under one it was a MemoryError
    that `wsi convert` took for an unexpected failure (exit 75, retried by ingest). It is
    refused from the size OpenSlide reports, before anything is allocated: exit 1, one line."""
    rng = np.random.default_rng(0)
    path = write_leica(tmp_path / "damaged.scn", rng.integers(0, 255, (512, 512, 3), np.uint8))
    with tifffile.TiffFile(path) as tif:
        macro = next(p for p in tif.pages if isinstance(p, tifffile.TiffPage) and p.index == 0)
        length = macro.tags[257]
        at, kind = length.valueoffset, length.dtype
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(struct.pack("<I" if kind == 4 else "<H", 4_000_000 if kind == 4 else 65535))
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "convert", str(path), "--out", str(tmp_path / "out"),
         "--no-progress"],
        capture_output=True, text=True, timeout=300, check=False, preexec_fn=_limited,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "associated image 'macro'" in lines[0], done.stderr


def _limited() -> None:
    """3 GiB of address space, as tests/test_corrupt_corpus.py runs conversions."""
    resource.setrlimit(resource.RLIMIT_AS, (3 * 1024**3, 3 * 1024**3))
