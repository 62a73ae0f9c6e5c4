"""Tiles of a slide still converting come from its source: a low zoom level of a single-level
slide covers a huge square of its base, which used to be read in one `read_region` (a DeepZoom
tile of a 40,000 x 30,000 slide asked numpy for 12 GiB). Now it is read in bounded pieces from
the nearest source level, inside the render budget, and equals an exact area downsample."""

from __future__ import annotations

import asyncio
import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

import wsi
from server.app import create_app
from server.converting import PIECE_PIXELS, SourceSlides
from server.settings import ServerSettings
from wsi.codecs import jpeg

from .conftest import area_reference, make_tiff, openslide_level0, psnr

WIDTH, HEIGHT = 8000, 6000


@pytest.fixture(scope="module")
def single_level(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("converting")
    return make_tiff(folder / "flat.tif", WIDTH, HEIGHT, pyramid=False)


def test_a_low_level_tile_is_read_in_bounded_pieces(single_level: Path) -> None:
    slides = SourceSlides((str(single_level.parent),), pixel_budget=100_000_000)
    try:
        (slide_id,) = slides.scan()
        view = slides.view(slide_id)
        assert len(view.levels) > 5
        tracemalloc.start()
        try:
            data = slides.tile(slide_id, 5, 0, 0)  # 8192 x 8192 base pixels (201 MB at once)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        slides.close()
    assert peak < 4 * PIECE_PIXELS * 3, f"peak {peak / 1e6:.0f} MB"
    tile = jpeg.decode(data)
    exact = np.full((256, 256, 3), 255, np.uint8)
    reference = area_reference(openslide_level0(single_level), 5)
    h, w = reference.shape[:2]  # 187 x 250: the level, rounded down
    exact[:h, :w] = np.round(reference)
    # At 1/32 the generated tissue is random colour per pixel, which 4:2:0 JPEG cannot keep:
    # compare with the same encoding of the exact area downsample.
    expected = jpeg.decode(jpeg.encode(exact, 90, True))
    assert psnr(tile[:h, :w], expected[:h, :w]) >= 40


def test_over_the_budget_a_tile_is_refused_not_allocated(single_level: Path) -> None:
    async def main() -> None:
        settings = ServerSettings(
            store=str(single_level.parent / "store"),
            sources=(str(single_level.parent),),
            max_render_pixels=5_000_000,
        )
        async with TestClient(TestServer(create_app(settings))) as c:
            (slide,) = (await (await c.get("/slides")).json())["slides"]
            sid = slide["id"]
            assert slide["status"] == "converting"
            assert (await c.get(f"/slides/{sid}/tiles/3/0/0")).status == 200  # 4.2 MP
            r = await c.get(f"/slides/{sid}/tiles/4/0/0")  # 16.8 MP of base pixels
            assert r.status == 400
            assert "budget" in (await r.json())["error"]
            r = await c.get(f"/slides/{sid}_files/1/0_0.jpeg")  # the whole slide in one tile
            assert r.status == 400
            assert (await c.get("/healthz")).status == 200

    asyncio.run(main())


def test_pieces_match_one_read(tmp_path: Path) -> None:
    """Piece boundaries leave no seam: the same tile read whole and in pieces is identical."""
    from server import converting

    source = make_tiff(tmp_path / "small.tif", 1500, 1100, pyramid=False)
    with wsi.open_slide(source) as slide:
        whole = converting.reduced_region(slide, 0, (0.0, 0.0), 4.0, (256, 256), 10**9)
        saved = converting.PIECE_PIXELS
        converting.PIECE_PIXELS = 64 * 64  # pieces of 16 x 16 output pixels
        try:
            pieces = converting.reduced_region(slide, 0, (0.0, 0.0), 4.0, (256, 256), 10**9)
        finally:
            converting.PIECE_PIXELS = saved
    assert np.array_equal(whole, pieces)
    reference = area_reference(openslide_level0(source), 2)[:256, :256]
    assert np.abs(whole.astype(int) - np.round(reference)).max() <= 1


def test_scans_rehash_only_changed_files_and_open_sources_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listing slides used to re-hash every source file each time, and every source opened for a
    tile stayed open for ever (EMFILE after a few hundred)."""
    from server import converting

    folder = tmp_path / "sources"
    folder.mkdir()
    for i in range(6):
        make_tiff(folder / f"s{i}.tif", 300, 300, pyramid=False, seed=i)
    (folder / "notes.txt").write_text("not a slide")
    hashed: list[Path] = []
    real = converting.content_slide_id

    def counting(path):  # type: ignore[no-untyped-def]
        hashed.append(Path(path))
        return real(path)

    monkeypatch.setattr(converting, "content_slide_id", counting)
    monkeypatch.setattr(converting, "MAX_OPEN_SOURCES", 2)
    slides = SourceSlides((str(folder),))
    try:
        ids = slides.scan()
        assert len(ids) == 6 and len(hashed) == 6
        slides.scan()
        assert len(hashed) == 6  # nothing changed: nothing re-read
        changed = folder / "s0.tif"
        make_tiff(changed, 320, 300, pyramid=False, seed=9)
        assert len(slides.scan()) == 6 and hashed[-1] == changed and len(hashed) == 7
        fds = len(os.listdir("/proc/self/fd"))
        for slide_id in slides.scan():
            slides.view(slide_id)
            jpeg.decode(slides.tile(slide_id, 0, 0, 0))
            assert len(slides._open) <= 2
        assert len(os.listdir("/proc/self/fd")) <= fds + 8
    finally:
        slides.close()


PLANTED = b"DOE^JANE MRN12345"


def commented_tiff(path: Path) -> Path:
    """A tiled JPEG TIFF whose every tile carries the patient's name in a comment (COM) and in
    an EXIF ImageDescription (APP1), as a scanner's or camera's encoder may write them."""
    import io

    import tifffile
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(120, 240, (512, 512, 3), dtype=np.uint8)

    def tiles() -> Iterator[bytes]:
        for y in range(0, 512, 256):
            for x in range(0, 512, 256):
                out = io.BytesIO()
                exif = Image.Exif()
                exif[0x010E] = PLANTED.decode() + " EXIF"
                Image.fromarray(pixels[y : y + 256, x : x + 256]).save(
                    out, "JPEG", quality=90, comment=PLANTED + b" COM", exif=exif.tobytes()
                )
                yield out.getvalue()

    tifffile.imwrite(
        path, tiles(), shape=(512, 512, 3), dtype=np.uint8, tile=(256, 256),
        compression="jpeg", photometric="ycbcr", subsampling=(2, 2),
    )  # fmt: skip
    return path


def test_a_converting_tile_carries_no_comment_or_exif_of_its_source(tmp_path: Path) -> None:
    """A converting slide's level-0 tile was the source's JPEG bytes as they are: a comment and
    an EXIF block holding the patient's name went out to every viewer (DeepZoom and IIIF too),
    under --deidentify as well, though the converted slide's tiles never carry them. The tile
    is the same pixels without them now."""
    (tmp_path / "sources").mkdir()
    source = commented_tiff(tmp_path / "sources" / "slide.tif")
    assert source.read_bytes().count(PLANTED) == 8

    async def main() -> None:
        settings = ServerSettings(store=str(tmp_path / "store"), sources=(str(source.parent),))
        async with TestClient(TestServer(create_app(settings))) as c:
            (slide,) = (await (await c.get("/slides")).json())["slides"]
            sid = slide["id"]
            assert slide["status"] == "converting"
            for path in (
                f"/slides/{sid}/tiles/0/1/1",
                f"/slides/{sid}_files/9/1_1.jpeg",
                f"/iiif/3/{sid}/256,256,256,256/256,/0/default.jpg",
            ):
                r = await c.get(path)
                assert r.status == 200, path
                body = await r.read()
                assert b"DOE" not in body, path
                assert np.array_equal(jpeg.decode(body), jpeg.decode(jpeg.without_text(body)))

    asyncio.run(main())


def test_without_text_keeps_the_colour_segments_and_the_scan() -> None:
    """JFIF and Adobe segments say how to decode: kept; comments and other APPn go; a stream
    without them is returned as it is; a header cut short is left alone."""
    plain = jpeg.encode(np.full((16, 16, 3), 128, np.uint8), 90, True)
    assert jpeg.without_text(plain) is plain
    com = b"\xff\xfe\x00\x0aDOE^JANE"
    app1 = b"\xff\xe1\x00\x0aExif\x00DOE"
    adobe = jpeg.APP14_RGB
    noted = plain[:2] + com + adobe + app1 + plain[2:]
    assert jpeg.without_text(noted) == plain[:2] + adobe + plain[2:]
    assert jpeg.without_text(noted[:8]) == noted[:8]


def _reference_without_text(stream: bytes) -> bytes:
    """The rule of `jpeg.without_text`, written plainly here (the library's is in C)."""
    pieces, kept, pos = [], 2, 2
    while pos + 4 <= len(stream) and stream[pos] == 0xFF and stream[pos + 1] != 0xDA:
        marker = stream[pos + 1]
        end = pos + 2 + int.from_bytes(stream[pos + 2 : pos + 4], "big")
        if end > len(stream):
            break
        colour = {0xE0: b"JFIF\x00", 0xEE: b"Adobe"}.get(marker)
        text = marker == 0xFE or (0xE0 <= marker <= 0xEF and colour is None)
        if text or (colour is not None and not stream[pos + 4 : end].startswith(colour)):
            pieces.append(stream[kept:pos])
            kept = end
        pos = end
    return b"".join((stream[:2], *pieces, stream[kept:])) if pieces else stream


def test_without_text_on_any_header_is_the_rule() -> None:
    """Random headers of every kind of segment, cut anywhere, lengths that run past the end,
    a hundred comments: what the C walk keeps is the rule's, and nothing else is read."""
    rng = np.random.default_rng(7)
    plain = jpeg.encode(np.full((16, 16, 3), 128, np.uint8), 90, True)
    kinds = [0xFE, 0xE0, 0xE1, 0xE2, 0xED, 0xEE, 0xEF, 0xDB, 0xC4, 0xDD]
    for case in range(3000):
        segments = []
        for _ in range(int(rng.integers(0, 8 if case % 50 else 100))):
            marker = int(rng.choice(kinds))
            payload = bytes(rng.integers(0, 256, int(rng.integers(0, 12)), dtype=np.uint8))
            if marker in (0xE0, 0xEE) and rng.random() < 0.5:
                payload = (b"JFIF\x00" if marker == 0xE0 else b"Adobe") + payload
            length = len(payload) + 2 if rng.random() < 0.95 else int(rng.integers(0, 65536))
            segments.append(bytes([0xFF, marker]) + length.to_bytes(2, "big") + payload)
        stream = plain[:2] + b"".join(segments) + plain[2:]
        if case % 3 == 0:
            stream = stream[: int(rng.integers(0, len(stream) + 1))]
        got = jpeg.without_text(stream)
        assert got == _reference_without_text(stream), case
        if got == stream:
            assert got is stream


def test_a_slide_is_described_once_however_many_are_converting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every listing describes every slide still converting (`SourceSlides.view`): with more of
    them than the sources kept open, each listing opened every one again (300 slides queued:
    1.6-2.1 s a `GET /slides?limit=10`). A closed source is opened again for its tiles only."""
    from server import converting

    for i in range(6):
        make_tiff(tmp_path / f"s{i}.tif", 300, 300, pyramid=False, seed=i)
    opened: list[Path] = []
    real = converting.open_slide

    def counting(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(converting, "open_slide", counting)
    monkeypatch.setattr(converting, "MAX_OPEN_SOURCES", 2)
    slides = SourceSlides((str(tmp_path),))
    try:
        ids = sorted(slides.scan())
        first = [slides.view(i) for i in ids]
        assert len(opened) == 6
        assert [slides.view(i) for i in ids] == first  # a second listing: nothing opened
        assert len(opened) == 6 and len(slides._open) <= 2
        jpeg.decode(slides.tile(ids[0], 0, 0, 0))  # closed since: opened again to read
        assert len(opened) == 7
        (tmp_path / "s1.tif").unlink()  # converted and moved away: forgotten
        assert ids[1] not in slides.scan()
        with pytest.raises(wsi.SlideNotFound):
            slides.view(ids[1])
    finally:
        slides.close()
