"""The reader of published slides, checked against independent readers of the same bytes.

Two slides are converted into a store (`tests/helpers.py`: `store`): the bundled
CMU-1-Small-Region (Aperio JPEG, copied tile for tile) and a generated JPEG TIFF. Pixels are
compared with zarr-python reading the same store and with OpenSlide reading the source; tile bytes
with the shard index parsed by hand (the README's recipe); associated images are refused unless
allowed; the layout's JSON round trips with the bytes a real conversion wrote. The store of
published slides the reader keeps open (re-checks, caches, the sync and async faces, S3) is
`tests/test_published_store.py`'s.
"""

from __future__ import annotations

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
from PIL import Image

import wsi
from wsi import (
    AssociatedImageRefused,
    ConvertSettings,
    CorruptSlide,
    InvalidArgument,
    ReaderSettings,
    SlideNotFound,
    UnsupportedSlide,
    open_published,
)
from wsi.published import layout
from wsi.published.layout import Manifest, SlideAttributes, SlideKeys

from .conftest import openslide_level0
from .published_fixtures import ALL_ASSOCIATED, zarr_level
from .published_fixtures import CMU_SMALL_REGION as CMU
from .published_fixtures import generated_jpeg_tiff as _generated_fixture  # noqa: F401
from .published_fixtures import published_store as _store_fixture  # noqa: F401


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


def test_a_dicom_only_slide_reads_as_with_both_views(generated: Path, tmp_path: Path) -> None:
    """A slide published with `--format dicom` (no Zarr view) was refused by the readers
    (UnsupportedSlide), though its level objects are the ones `--format both` writes: its
    manifest keeps the root attributes now, and it reads as the same slide with both views.
    One published so by an earlier version (no attributes kept) is still refused, clearly."""
    read = {}
    for formats in (("zarr", "dicom"), ("dicom",)):
        root = tmp_path / "-".join(formats)
        st = wsi.Store(wsi.StoreSettings(str(root)))
        sid = wsi.convert_slide(generated, st, ConvertSettings(formats=formats)).slide_id
        with open_published(f"{root}/{sid}", settings=ALL_ASSOCIATED) as slide:
            level = slide.levels[-1]
            read[formats] = (
                slide.attributes,
                [(lv.width, lv.height, lv.codec, lv.fill) for lv in slide.levels],
                slide.region(0, 0, 0, 700, 500).tobytes(),
                slide.region(level.index, 0, 0, level.width, level.height).tobytes(),
                slide.tile_bytes(0, 1, 1),
                {n: slide.associated_image(n).tobytes() for n in slide.associated},
                [slide.frame_bytes(i, 1) for i in slide.dicom.instances] if slide.dicom else None,
            )
    assert read[("dicom",)][-1] and read[("dicom",)] == read[("zarr", "dicom")]
    manifest = st.manifest(sid)
    st.publish(sid, dataclasses.replace(manifest, attributes=None))
    with pytest.raises(UnsupportedSlide, match=r"without its Zarr view.*convert it again"):
        open_published(f"{root}/{sid}")
    with pytest.raises(SlideNotFound):
        open_published(f"{root}/no-such-slide")


def test_reader_options_are_keywords_only(store: dict[str, Any]) -> None:
    """`open_published(url, ReaderSettings(...))` took the settings for the S3 endpoint and read
    with the defaults (refusing the associated images they allowed): refused at the call now,
    by both faces."""
    location = f"{store['root']}/{store['cmu']}"
    for opener in (open_published, wsi.open_published_async):
        untyped: Any = opener  # the call a caller without a type checker makes
        with pytest.raises(TypeError, match="positional"):
            untyped(location, ALL_ASSOCIATED)
    with open_published(location, settings=ALL_ASSOCIATED) as slide:
        assert slide.associated_image("label").shape[2] == 3


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
        for level in attributes.levels:
            meta = json.loads(st.get(keys.array_metadata(level.path)))
            assert layout.codec_of_array(meta, level.path) == level.codec
            assert meta["attributes"]["downsample"] == level.downsample
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


def test_a_manifest_checksum_is_checked_however_the_manifest_is_laid_out(
    store: dict[str, Any],
) -> None:
    """The checksum is checked on the bytes as written (the checksum's line left out), and by
    encoding the document again when a manifest is laid out otherwise: either way, any byte
    changed in what it covers is a damaged manifest."""
    raw = store["store"].get(SlideKeys(store["cmu"]).manifest)
    good = Manifest.from_bytes(raw)
    relaid = json.dumps(json.loads(raw), indent=4).encode()  # another tool's layout
    assert Manifest.from_bytes(relaid) == good
    doc = json.loads(raw)
    line = f'\n "checksum": "{doc["checksum"]}",'.encode()
    twice = raw.replace(line, line + line)  # the same key twice: JSON keeps the last
    assert Manifest.from_bytes(twice) == good
    size = f'"stored_bytes": {good.stored_bytes}'.encode()
    assert raw.count(size) == 1
    for damaged in (
        raw.replace(size, f'"stored_bytes": {good.stored_bytes + 1}'.encode()),
        raw.replace(line, line.replace(b'": "', b'": "0', 1)[:-3] + b'",'),
        relaid.replace(b'"stored_bytes": ', b'"stored_bytes": 1'),
    ):
        with pytest.raises(CorruptSlide, match="damaged"):
            Manifest.from_bytes(damaged)
