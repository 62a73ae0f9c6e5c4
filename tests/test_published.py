"""The reader of published slides, checked against independent readers of the same bytes.

Two slides are converted into a store: the bundled CMU-1-Small-Region (Aperio JPEG, copied tile
for tile) and a generated JPEG TIFF. Pixels are compared with zarr-python reading the same store
and with OpenSlide reading the source; tile bytes with the shard index parsed by hand (the README's
recipe); the layout's JSON round trips with the bytes a real conversion wrote. S3 runs against the
SeaweedFS the session starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pytest
import zarr
import zarr.storage
from PIL import Image

import wsi
from wsi import (
    AssociatedImageRefused,
    ConvertSettings,
    CorruptSlide,
    InvalidArgument,
    PublishedStore,
    ReaderSettings,
    SlideNotFound,
    UnsupportedSlide,
    open_published,
    open_published_async,
)
from wsi.published import layout
from wsi.published.cache import ByteLRU
from wsi.published.layout import Manifest, SlideAttributes, SlideKeys

from .conftest import BUNDLED, make_tiff, openslide_level0
from .s3server import SeaweedFS
from .s3server import seaweedfs as _seaweedfs_fixture  # noqa: F401

CMU = BUNDLED / "CMU-1-Small-Region.svs"
ALL_ASSOCIATED = ReaderSettings(allow_associated=frozenset(layout.ASSOCIATED_FLAVOR))


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Odd-sized JPEG pyramid: partial edge tiles in both directions."""
    return make_tiff(tmp_path_factory.mktemp("gen") / "gen.tif", 1237, 1029, seed=7)


@pytest.fixture(scope="module")
def store(generated: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both slides converted into one local store, every source tile stored as it is (so the
    reader is checked against the source's own bytes; tests/test_sparse.py and
    tests/test_huffman.py read slides converted with blank glass left out and tiles optimised)."""
    root = tmp_path_factory.mktemp("published")
    st = wsi.Store(wsi.StoreSettings(str(root)))
    as_stored = wsi.ConvertSettings(
        wsi.PyramidSettings(optimize_huffman=False, keep_background=True)
    )
    cmu = wsi.convert_slide(CMU, st, as_stored).slide_id
    gen = wsi.convert_slide(generated, st, as_stored).slide_id
    return {
        "root": root,
        "store": st,
        "cmu": cmu,
        "gen": gen,
        "sources": {cmu: CMU, gen: generated},
        "settings": as_stored,
    }


def zarr_level(root: Path, slide_id: str, path: str) -> np.ndarray:
    """A level (or associated image) as zarr-python reads it, channels last."""
    group = zarr.open_group(str(root / slide_id / "slide.zarr"), mode="r")
    return np.asarray(group[path][:]).transpose(1, 2, 0)


def chunk_by_hand(shard: bytes, chunks: int, chunk: int) -> bytes:
    """A chunk's bytes through the index at the end of the shard, as the README describes."""
    raw = shard[-(16 * chunks + 4) :]
    (crc,) = struct.unpack("<I", raw[-4:])
    assert google_crc32c.value(raw[:-4]) == crc
    offset, nbytes = struct.unpack_from("<QQ", raw, 16 * chunk)
    return shard[offset : offset + nbytes]


# -- pixels ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["cmu", "gen"])
def test_every_level_equals_zarr_python(store: dict[str, Any], which: str) -> None:
    sid = store[which]
    with open_published(f"{store['root']}/{sid}") as slide:
        assert slide.slide_id == sid
        assert len(slide.levels) > 2
        for level in slide.levels:
            ours = slide.region(level.index, 0, 0, level.width, level.height)
            assert np.array_equal(ours, zarr_level(store["root"], sid, str(level.index)))


@pytest.mark.parametrize("which", ["cmu", "gen"])
def test_level0_equals_openslide_on_the_source(store: dict[str, Any], which: str) -> None:
    """The source's JPEG tiles are stored as they are: decoding them gives OpenSlide's pixels."""
    sid = store[which]
    reference = openslide_level0(store["sources"][sid])
    with open_published(f"{store['root']}/{sid}") as slide:
        level = slide.levels[0]
        assert (level.width, level.height) == (reference.shape[1], reference.shape[0])
        assert np.array_equal(slide.region(0, 0, 0, level.width, level.height), reference)


def test_tiles_are_cropped_to_the_level(store: dict[str, Any]) -> None:
    sid = store["gen"]
    expected = zarr_level(store["root"], sid, "0")
    with open_published(f"{store['root']}/{sid}") as slide:
        level = slide.levels[0]
        tw, th = level.tile_width, level.tile_height
        assert level.width % tw and level.height % th  # partial tiles both ways
        for col, row in [
            (0, 0),
            (level.cols - 1, 0),
            (0, level.rows - 1),
            (level.cols - 1, level.rows - 1),
        ]:
            tile = slide.tile(0, col, row)
            want = expected[row * th : (row + 1) * th, col * tw : (col + 1) * tw]
            assert tile.shape == want.shape == (*level.tile_shape(col, row), 3)
            assert np.array_equal(tile, want)
        with pytest.raises(InvalidArgument):
            slide.tile(0, level.cols, 0)


def test_regions_across_tile_edges_and_past_the_slide_edge(store: dict[str, Any]) -> None:
    sid = store["cmu"]
    full = zarr_level(store["root"], sid, "0")
    with open_published(f"{store['root']}/{sid}") as slide:
        level = slide.levels[0]
        tw, th = level.tile_width, level.tile_height
        across = slide.region(0, tw - 37, th - 11, 2 * tw + 5, th + 30)
        assert np.array_equal(across, full[th - 11 : 2 * th + 19, tw - 37 : 3 * tw - 32])

        # Overhanging the bottom-right corner (and the top-left): outside the level is white.
        x, y = level.width - 50, level.height - 20
        corner = slide.region(0, x, y, 120, 90)
        assert np.array_equal(corner[:20, :50], full[y:, x:])
        assert (corner[20:] == 255).all() and (corner[:, 50:] == 255).all()
        before = slide.region(0, -10, -5, 40, 30)
        assert (before[:5] == 255).all() and (before[:, :10] == 255).all()
        assert np.array_equal(before[5:, 10:], full[:25, :30])
        assert (slide.region(0, level.width + 1, 0, 16, 16) == 255).all()

        lower = slide.levels[2]
        sub = slide.region(2, 100, 200, 300, 150)
        assert np.array_equal(sub, zarr_level(store["root"], sid, "2")[200:350, 100:400])
        assert lower.downsample == 4.0
        with pytest.raises(InvalidArgument):
            slide.region(0, 0, 0, 0, 10)
        with pytest.raises(InvalidArgument):
            slide.region(9, 0, 0, 10, 10)


# -- stored bytes ---------------------------------------------------------------------------------
def test_tile_bytes_equal_the_index_and_the_source_tiles(store: dict[str, Any]) -> None:
    sid = store["cmu"]
    st: wsi.Store = store["store"]
    with open_published(f"{store['root']}/{sid}") as slide, wsi.open_slide(CMU) as source:
        for level in slide.levels:
            shard = st.get(level.key)
            assert len(shard) == level.size
            for col, row in [(0, 0), (level.cols - 1, level.rows - 1), (level.cols // 2, 0)]:
                data = slide.tile_bytes(level.index, col, row)
                assert data == chunk_by_hand(shard, level.tile_count, row * level.cols + col)
                assert data[:2] == b"\xff\xd8" and level.codec == "jpeg"
        # Level 0 is the source's own tiles, completed with the TIFF's JPEG tables.
        assert slide.tile_bytes(0, 3, 2) == source.read_encoded_tile(0, 3, 2)


def test_dicom_instances_and_frames(store: dict[str, Any]) -> None:
    sid = store["cmu"]
    with open_published(f"{store['root']}/{sid}", settings=ALL_ASSOCIATED) as slide:
        dicom = slide.dicom
        assert dicom is not None
        manifest = store["store"].read_manifest(sid)
        assert [i.sop_instance_uid for i in dicom.instances] == [
            i["sop_instance_uid"] for i in manifest["dicom"]
        ]
        volumes = [i for i in dicom.instances if i.flavor == "VOLUME"]
        assert [i.level for i in volumes] == list(range(len(slide.levels)))
        inst = volumes[1]
        assert inst.image is slide.levels[1] and inst.frames == slide.levels[1].tile_count
        assert slide.frame_bytes(inst, 1) == slide.tile_bytes(1, 0, 0)
        last = inst.frames
        assert slide.frame_bytes(inst, last) == slide.tile_bytes(
            1, inst.image.cols - 1, inst.image.rows - 1
        )
        with pytest.raises(InvalidArgument):
            slide.frame_bytes(inst, last + 1)
        head = slide.read_range(inst.key, 0, 132)
        assert head[128:132] == b"DICM"
        whole = slide.read_range(inst.key, 0, inst.size)
        assert whole == store["store"].get(inst.key)
        assert dicom.instance(inst.sop_instance_uid) is inst
        with pytest.raises(SlideNotFound):
            dicom.instance("1.2.3")
        label = next(i for i in dicom.instances if i.flavor == "LABEL")
        assert label.associated == "label" and label.level is None
        assert slide.frame_bytes(label, 1) == slide.associated_bytes("label")


def test_a_corrupt_shard_index_is_detected(store: dict[str, Any], tmp_path: Path) -> None:
    sid = store["gen"]
    copy = tmp_path / "copy"
    shutil.copytree(store["root"] / sid, copy / sid)
    shard = copy / sid / "slide.zarr" / "1" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x40  # inside the last index entry
    shard.write_bytes(bytes(data))
    with open_published(f"{copy}/{sid}") as slide:
        with pytest.raises(CorruptSlide, match=r"shard index .* corrupt"):
            slide.tile_bytes(1, 0, 0)
        with pytest.raises(CorruptSlide):
            slide.region(1, 0, 0, 10, 10)
        assert slide.tile(0, 0, 0).shape == (256, 256, 3)  # other levels still read


def test_a_chunk_the_shard_lacks_is_white_like_zarr_says(
    store: dict[str, Any], tmp_path: Path
) -> None:
    """An index entry marked absent (valid CRC): the background tile (a JPEG of the fill) is
    handed out, pixels are the fill value, as zarr-python reads them too."""
    sid = store["gen"]
    shutil.copytree(store["root"] / sid, tmp_path / sid)
    shard = tmp_path / sid / "slide.zarr" / "0" / "c" / "0" / "0" / "0"
    data = shard.read_bytes()
    with open_published(f"{tmp_path}/{sid}") as slide:
        level = slide.levels[0]
        n = level.tile_count
        index = layout.decode_index(data[-layout.index_nbytes(n) :], n, "shard").copy()
        index[level.cols + 1] = layout.EMPTY_CHUNK
        shard.write_bytes(data[: -layout.index_nbytes(n)] + layout.encode_index(index))
        background = slide.tile_bytes(0, 1, 1)
        assert (np.asarray(Image.open(io.BytesIO(background))) == 255).all()
        assert (slide.tile(0, 1, 1) == 255).all()
        region = slide.region(0, 0, 0, level.width, level.height)
    assert np.array_equal(region, zarr_level(tmp_path, sid, "0"))
    assert (region[256:512, 256:512] == 255).all()


# -- associated images ----------------------------------------------------------------------------
def test_associated_images_are_refused_by_default(store: dict[str, Any]) -> None:
    sid = store["cmu"]
    with open_published(f"{store['root']}/{sid}") as slide:
        assert slide.associated_names == ("label", "macro", "thumbnail")
        label = slide.associated["label"]
        assert (label.width, label.height, label.codec) == (387, 463, "jpeg")
        for name in slide.associated_names:
            with pytest.raises(AssociatedImageRefused, match=name) as refused:
                slide.associated_bytes(name)
            assert isinstance(refused.value, PermissionError)
            with pytest.raises(AssociatedImageRefused):
                slide.associated_image(name)
        with pytest.raises(AssociatedImageRefused):
            slide.read_range(label.key, 0, 16)
        assert slide.dicom is not None
        instance = next(i for i in slide.dicom.instances if i.flavor == "OVERVIEW")
        with pytest.raises(AssociatedImageRefused):
            slide.frame_bytes(instance, 1)


def test_associated_images_when_allowed(store: dict[str, Any]) -> None:
    sid = store["cmu"]
    settings = ReaderSettings(allow_associated=frozenset({"thumbnail"}))
    with open_published(f"{store['root']}/{sid}", settings=settings) as slide:
        thumb = slide.associated_image("thumbnail")
        assert np.array_equal(thumb, zarr_level(store["root"], sid, "associated/thumbnail"))
        shard = store["store"].get(slide.associated["thumbnail"].key)
        assert slide.associated_bytes("thumbnail") == chunk_by_hand(shard, 1, 0)
        with pytest.raises(AssociatedImageRefused):
            slide.associated_image("label")
        with pytest.raises(SlideNotFound):
            slide.associated_image("nothing")
    with pytest.raises(InvalidArgument, match="unknown associated"):
        ReaderSettings(allow_associated=frozenset({"lable"}))


# -- metadata -------------------------------------------------------------------------------------
def test_properties_and_downsamples_come_from_the_metadata(store: dict[str, Any]) -> None:
    sid = store["cmu"]
    root = json.loads((store["root"] / sid / "slide.zarr" / "zarr.json").read_bytes())
    attrs = root["attributes"]["wsistore"]
    with open_published(f"{store['root']}/{sid}") as slide:
        props = slide.properties
        assert props.vendor == "aperio" and props.mpp_x == attrs["mpp_x"] == pytest.approx(0.499)
        assert props.objective_power == 20
        assert props.vendor_properties["aperio.AppMag"] == "20"
        assert props.icc_profile is None or props.icc_profile[36:40] == b"acsp"
        assert [lv.downsample for lv in slide.levels] == [
            lv["downsample"] for lv in attrs["levels"]
        ]
        assert slide.best_level(1.0).index == 0
        assert slide.best_level(5.0).index == 2
        assert slide.best_level(1000.0).index == len(slide.levels) - 1


def republish_with_downsample(st: wsi.Store, slide_id: str, level: int, downsample: float) -> None:
    """Rewrite the attributes' downsample of one level and publish the slide again."""
    keys = SlideKeys(slide_id)
    raw = st.get(keys.root_metadata)
    attributes = SlideAttributes.from_root_metadata(raw, "root")
    levels = list(attributes.levels)
    levels[level] = dataclasses.replace(levels[level], downsample=downsample)
    doc = layout.root_metadata(dataclasses.replace(attributes, levels=tuple(levels)))
    data = layout.dump_json(doc)
    st.put(keys.root_metadata, data)
    manifest = st.manifest(slide_id)
    objects = dict(manifest.objects)
    objects[keys.in_slide(keys.root_metadata)] = layout.ObjectEntry(
        len(data), layout.crc32c_hex(data)
    )
    st.publish(slide_id, dataclasses.replace(manifest, objects=objects))


def test_republication_and_downsample_read_not_assumed(
    store: dict[str, Any], tmp_path: Path
) -> None:
    """A slide whose metadata says level 1 is 2.5x: the reader reports 2.5 (nothing assumes 2^k),
    and opening the slide again after the change gives a new version."""
    sid = store["gen"]
    shutil.copytree(store["root"] / sid, tmp_path / sid)
    st = wsi.Store(wsi.StoreSettings(str(tmp_path)))

    async def main() -> None:
        async with PublishedStore(str(tmp_path)) as published:
            assert await published.slide_ids() == [sid]
            first = await published.slide(sid)
            assert await published.slide(sid) is first  # manifest unchanged: the same object
            assert first.levels[1].downsample == 2.0
            republish_with_downsample(st, sid, 1, 2.5)
            second = await published.slide(sid)
            assert second is not first and second.version != first.version
            assert second.levels[1].downsample == 2.5
            assert second.best_level(2.4).index == 0
            assert await published.slide(sid) is second
            # Pixels did not change, and tiles cached under the old version are not mixed in.
            assert await second.tile_bytes(1, 0, 0) == await first.tile_bytes(1, 0, 0)
            st.unpublish(sid)
            with pytest.raises(SlideNotFound):
                await published.slide(sid)

    asyncio.run(main())


def test_an_opened_slide_is_trusted_for_recheck_seconds(
    store: dict[str, Any], tmp_path: Path
) -> None:
    sid = store["gen"]
    shutil.copytree(store["root"] / sid, tmp_path / sid)
    st = wsi.Store(wsi.StoreSettings(str(tmp_path)))
    now = [100.0]
    settings = ReaderSettings(recheck_seconds=5.0)

    async def main() -> None:
        async with PublishedStore(st, settings, clock=lambda: now[0]) as published:
            first = await published.slide(sid)
            republish_with_downsample(st, sid, 2, 3.0)
            now[0] += 4.9
            assert await published.slide(sid) is first  # not read again yet
            now[0] += 0.2
            second = await published.slide(sid)
            assert second.version != first.version and second.levels[2].downsample == 3.0

    asyncio.run(main())


def test_a_busy_service_rechecks_in_the_background_once_at_a_time(
    store: dict[str, Any], tmp_path: Path
) -> None:
    """With `recheck_in_background`, requests after the re-check time get the opened slide at
    once, and however many arrive together, one manifest read runs (the stall of a service in
    which every open request re-read the manifest when the time expired)."""
    sid = store["gen"]
    shutil.copytree(store["root"] / sid, tmp_path / sid)
    st = wsi.Store(wsi.StoreSettings(str(tmp_path)))
    now = [100.0]
    settings = ReaderSettings(recheck_seconds=2.0, recheck_in_background=True)
    manifest_key = SlideKeys(sid).manifest

    async def main() -> None:
        async with PublishedStore(st, settings, clock=lambda: now[0]) as published:
            reads: list[str] = []
            real_get = published.io.get

            async def counting_get(key: str) -> bytes:
                if key == manifest_key:
                    reads.append(key)
                return await real_get(key)

            published.io.get = counting_get  # type: ignore[method-assign]
            first = await published.slide(sid)
            assert len(reads) == 1
            republish_with_downsample(st, sid, 2, 3.0)
            now[0] += 2.5
            answers = await asyncio.gather(*(published.slide(sid) for _ in range(50)))
            assert all(a is first for a in answers)  # nobody waited for the re-read
            while ("recheck", sid) in published._inflight:
                await asyncio.sleep(0)
            assert len(reads) == 2  # fifty requests, one re-read
            second = await published.slide(sid)
            assert second is not first and second.levels[2].downsample == 3.0
            assert len(reads) == 2  # the re-read's result is trusted for recheck_seconds
            st.unpublish(sid)
            now[0] += 2.5
            assert await published.slide(sid) is second  # the re-read runs behind this answer
            while ("recheck", sid) in published._inflight:
                await asyncio.sleep(0)
            with pytest.raises(SlideNotFound):
                await published.slide(sid)

    asyncio.run(main())


def test_a_dicom_only_slide_is_refused_clearly(generated: Path, tmp_path: Path) -> None:
    st = wsi.Store(wsi.StoreSettings(str(tmp_path)))
    sid = wsi.convert_slide(generated, st, ConvertSettings(formats=("dicom",))).slide_id
    with pytest.raises(UnsupportedSlide, match="without its Zarr view"):
        open_published(f"{tmp_path}/{sid}")
    with pytest.raises(SlideNotFound):
        open_published(f"{tmp_path}/no-such-slide")


# -- the layout -----------------------------------------------------------------------------------
def test_layout_round_trips_the_stored_documents(store: dict[str, Any]) -> None:
    st: wsi.Store = store["store"]
    for sid in (store["cmu"], store["gen"]):
        keys = SlideKeys(sid)
        raw = st.get(keys.manifest)
        manifest = Manifest.from_bytes(raw)
        assert manifest.to_bytes() == raw  # the manifest parses and serialises to its own bytes
        assert manifest.stored_bytes == sum(o.size for o in manifest.objects.values())
        for key, entry in manifest.objects.items():
            data = st.get(keys.in_store(key))
            assert (len(data), layout.crc32c_hex(data)) == (entry.size, entry.crc32c), key
        root = st.get(keys.root_metadata)
        attributes = SlideAttributes.from_root_metadata(root, "root")
        assert layout.dump_json(layout.root_metadata(attributes)) == root
        again = SlideAttributes.from_json(json.loads(json.dumps(attributes.to_json())))
        assert again == attributes
        for entry in attributes.levels:
            meta = json.loads(st.get(keys.array_metadata(entry.path)))
            assert layout.codec_of_array(meta, entry.path) == entry.codec
            assert meta["attributes"]["downsample"] == entry.downsample
        assert [i.key for i in manifest.dicom] == [
            keys.in_slide(keys.shard(p))
            for p in [lv.path for lv in attributes.levels]
            + [a.path for a in attributes.associated_images]
        ]


def test_shard_index_encode_and_decode() -> None:
    index = layout.empty_index(5)
    index[0] = (100, 20)
    index[3] = (120, 7)
    raw = layout.encode_index(index)
    assert len(raw) == layout.index_nbytes(5) == 84
    decoded = layout.decode_index(raw, 5, "k")
    assert np.array_equal(decoded, index)
    assert layout.chunk_span(decoded, 3, 200, "k") == (120, 127)
    assert layout.chunk_span(decoded, 1, 200, "k") is None
    with pytest.raises(CorruptSlide, match="points past"):
        layout.chunk_span(decoded, 3, 125, "k")
    with pytest.raises(CorruptSlide, match="corrupt"):
        layout.decode_index(raw[:8] + bytes([raw[8] ^ 1]) + raw[9:], 5, "k")
    with pytest.raises(CorruptSlide):
        layout.decode_index(raw, 4, "k")
    assert layout.index_range(1000, 5, "k") == (916, 1000)
    with pytest.raises(CorruptSlide, match="too short"):
        layout.index_range(50, 5, "k")


def test_manifest_refuses_what_is_not_a_manifest() -> None:
    with pytest.raises(CorruptSlide, match="not valid JSON"):
        Manifest.from_bytes(b"{")
    with pytest.raises(CorruptSlide, match="format"):
        Manifest.from_bytes(b'{"format": "other"}')
    with pytest.raises(CorruptSlide, match="objects"):
        Manifest.from_json({"format": layout.MANIFEST_FORMAT, "slide_id": "abc"})


# -- faces, caches, S3 ----------------------------------------------------------------------------
def test_sync_face_from_a_worker_thread_of_a_running_loop(store: dict[str, Any]) -> None:
    sid = store["gen"]
    location = f"{store['root']}/{sid}"
    expected = zarr_level(store["root"], sid, "1")[:64, :64]

    def blocking() -> np.ndarray:
        with open_published(location) as slide:
            return slide.region(1, 0, 0, 64, 64)

    async def main() -> tuple[np.ndarray, np.ndarray]:
        in_worker = await asyncio.get_running_loop().run_in_executor(None, blocking)
        on_loop_thread = blocking()  # blocks this loop for the call, but works
        return in_worker, on_loop_thread

    in_worker, on_loop_thread = asyncio.run(main())
    assert np.array_equal(in_worker, expected) and np.array_equal(on_loop_thread, expected)

    slide = open_published(location)
    loop_thread = slide._runner.thread
    assert loop_thread.is_alive()
    failure: list[BaseException] = []

    async def from_the_readers_own_loop() -> None:
        try:
            slide.tile(0, 0, 0)
        except RuntimeError as exc:
            failure.append(exc)

    asyncio.run_coroutine_threadsafe(from_the_readers_own_loop(), slide._runner.loop).result()
    assert failure and "async API" in str(failure[0])
    slide.close()
    slide.close()
    assert not loop_thread.is_alive()
    with pytest.raises(InvalidArgument, match="closed"):
        slide.tile(0, 0, 0)


def test_async_face_and_shared_caches_stay_within_budget(store: dict[str, Any]) -> None:
    sid = store["cmu"]
    settings = ReaderSettings(tile_cache_bytes=60_000, index_cache_bytes=2_000)

    async def main() -> None:
        async with PublishedStore(str(store["root"]), settings) as published:
            slide = await published.slide(sid)
            level = slide.levels[0]
            peak = 0
            sizes = []
            for row in range(level.rows):
                for col in range(level.cols):
                    sizes.append(len(await slide.tile_bytes(0, col, row)))
                    peak = max(peak, published.tiles.used)
                    assert published.tiles.used <= 60_000
                    assert published.indexes.used <= 2_000
            assert sum(sizes) > 10 * 60_000 and published.tiles.stats().evictions > 0
            assert 0 < peak <= 60_000
            hits = published.tiles.hits
            await slide.tile_bytes(0, level.cols - 1, level.rows - 1)  # the last one is cached
            assert published.tiles.hits == hits + 1
            # Many tiles of one level at once: all answered, within budget.
            tiles = await asyncio.gather(
                *(slide.tile(1, c, 0) for c in range(slide.levels[1].cols))
            )
            assert all(t.shape[0] == level.tile_height for t in tiles)
            assert published.tiles.used <= 60_000

        async with await open_published_async(f"{store['root']}/{sid}") as owned:
            assert (await owned.tile(owned.levels[-1].index, 0, 0)).shape[2] == 3

    asyncio.run(main())


def test_byte_lru_counts_bytes_of_any_value() -> None:
    cache: ByteLRU[tuple[str, int], object] = ByteLRU(1000)
    cache.put(("a", 1), b"x" * 400)
    cache.put(("b", 2), np.zeros((10, 10, 3), np.uint8))  # 300 bytes
    cache.put(("c", 3), bytearray(250))
    assert cache.used == 950 and len(cache) == 3
    assert cache.get(("a", 1)) is not None  # now the most recent
    cache.put(("d", 4), b"y" * 200)  # drops ("b", 2), the least recent
    assert ("b", 2) not in cache and cache.used == 850 and cache.evictions == 1
    cache.put(("e", 5), b"z" * 1001)  # larger than the budget: not kept
    assert ("e", 5) not in cache and cache.used <= 1000
    cache.put(("a", 1), b"short")  # replacing a value updates the count
    assert cache.used == 5 + 250 + 200
    assert cache.get(("zz", 0)) is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 3)
    counted: ByteLRU[str, str] = ByteLRU(2, size=lambda _: 1)
    for name in "xyz":
        counted.put(name, name)
    assert len(counted) == 2 and "x" not in counted
    with pytest.raises(TypeError):
        ByteLRU[str, object](10).put("k", object())


@pytest.mark.s3
def test_reading_from_s3_equals_the_local_store(
    seaweedfs: SeaweedFS, store: dict[str, Any]
) -> None:
    s3 = wsi.Store(
        wsi.StoreSettings(seaweedfs.url("published"), endpoint_url=seaweedfs.endpoint_url)
    )
    sid = wsi.convert_slide(CMU, s3, store["settings"]).slide_id
    assert sid == store["cmu"]
    location = f"{seaweedfs.url('published')}/{sid}"
    local = f"{store['root']}/{sid}"
    with (
        open_published(location, seaweedfs.endpoint_url, ALL_ASSOCIATED) as remote,
        open_published(local, settings=ALL_ASSOCIATED) as here,
    ):
        assert remote.version == here.version  # the same manifest bytes
        assert remote.levels == here.levels  # keys are relative to the store root
        for level in remote.levels:
            assert np.array_equal(
                remote.region(level.index, 0, 0, level.width, level.height),
                here.region(level.index, 0, 0, level.width, level.height),
            )
        assert remote.tile_bytes(0, 2, 3) == here.tile_bytes(0, 2, 3)
        assert remote.associated_bytes("macro") == here.associated_bytes("macro")
        zstore = zarr.storage.FsspecStore.from_url(
            f"{location}/slide.zarr",
            storage_options={"endpoint_url": seaweedfs.endpoint_url},
            read_only=True,
        )
        level2 = np.asarray(zarr.open_group(zstore, mode="r")["2"][:]).transpose(1, 2, 0)
        assert np.array_equal(remote.region(2, 0, 0, level2.shape[1], level2.shape[0]), level2)

    async def concurrently() -> None:
        async with PublishedStore(
            seaweedfs.url("published"), s3_endpoint=seaweedfs.endpoint_url
        ) as p:
            assert await p.slide_ids() == [sid]
            slide = await p.slide(sid)
            level = slide.levels[0]
            tiles = await asyncio.gather(
                *(slide.tile_bytes(0, c, r) for r in range(level.rows) for c in range(level.cols))
            )
            assert all(t[:2] == b"\xff\xd8" for t in tiles)

    asyncio.run(concurrently())
