"""Head-last objects on a local store: the DICOM header put in front of frames already written,
by inserting file-system blocks (no byte of the frames moves) or, where that cannot be done, by
copying the frames behind it; and the header padding that makes the first way possible."""

from __future__ import annotations

import io
import os
import shutil
import stat
import tempfile
from pathlib import Path

import google_crc32c
import numpy as np
import pydicom
import pytest
import zarr
from openslide import OpenSlide

import wsi
from wsi.published.layout import StoredObject
from wsi.store.head_last import _insert_blocks, open_head_last
from wsi.store.objects import FILE_MODE, TEMP_MARK, Store, StoreSettings
from wsi.writers.dicom import (
    DELIMITER,
    EMPTY_BOT,
    HEADER_BLOCK,
    PADDED_FROM,
    PADDING_CREATOR_UID,
    PIXEL_DATA_HEADER,
    padded_header,
    transfer_syntax,
    with_transfer_syntax,
)

from .conftest import make_tiff
from .test_dicom import dciodvfy

BODY = 3 * 1024 * 1024 + 5


def body(seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, BODY, dtype=np.uint8).tobytes()


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if TEMP_MARK in p.name]


def can_insert(folder: Path) -> bool:
    """Whether this file system inserts blocks into files (ext4, XFS do; tmpfs does not)."""
    probe = folder / "probe"
    probe.write_bytes(b"x" * 2 * HEADER_BLOCK)
    with open(probe, "r+b") as f:
        done = _insert_blocks(f.fileno(), HEADER_BLOCK)
    data = probe.read_bytes()
    probe.unlink()
    assert data == (
        bytes(HEADER_BLOCK) + b"x" * 2 * HEADER_BLOCK if done else b"x" * 2 * HEADER_BLOCK
    )
    return done


def write_head_last(
    store: Store, key: str, head: bytes, data: bytes, tail: bytes
) -> tuple[int, StoredObject]:
    """Writes the object in three writes: (inode of the file the body went into, what `finish`
    said of the object)."""
    with open_head_last(store, key) as target:
        third = len(data) // 3
        for start in (0, third, 2 * third):
            target.write(data[start : start + third if start < 2 * third else len(data)])
        (written,) = temporaries(Path(store.root))
        inode = written.stat().st_ino
        stored = target.finish(head, tail)
        assert not Path(store.path(key)).exists()  # appears at the end of the block only
    return inode, stored


def check_stored(stored: StoredObject, whole: bytes) -> None:
    assert stored.size == len(whole)
    assert stored.crc32c == f"{google_crc32c.value(whole):08x}"


def test_a_block_sized_head_is_inserted_in_front_of_the_body(tmp_path: Path) -> None:
    if not can_insert(tmp_path):
        pytest.skip("this file system cannot insert blocks (the copy is tested below)")
    store = Store(StoreSettings(str(tmp_path / "store")))
    head, data, tail = b"H" * (2 * HEADER_BLOCK), body(), b"tail" * 7
    inode, stored = write_head_last(store, "a/level", head, data, tail)
    path = Path(store.path("a/level"))
    assert path.read_bytes() == head + data + tail
    check_stored(stored, head + data + tail)
    assert path.stat().st_ino == inode  # the file the body went into: nothing was copied
    assert stat.S_IMODE(path.stat().st_mode) == FILE_MODE
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("head_length", [1, 4094, HEADER_BLOCK + 2])
def test_any_other_head_gets_the_body_copied_behind_it(tmp_path: Path, head_length: int) -> None:
    store = Store(StoreSettings(str(tmp_path / "store")))
    head, data, tail = b"h" * head_length, body(1), b"T" * 3
    inode, stored = write_head_last(store, "a/level", head, data, tail)
    path = Path(store.path("a/level"))
    assert path.read_bytes() == head + data + tail
    check_stored(stored, head + data + tail)
    assert path.stat().st_ino != inode
    assert stat.S_IMODE(path.stat().st_mode) == FILE_MODE
    assert temporaries(tmp_path) == []


def test_a_file_system_that_cannot_insert_gets_the_body_copied(tmp_path: Path) -> None:
    """tmpfs refuses FALLOC_FL_INSERT_RANGE: a block-sized head is then put in front by the copy,
    with the same bytes."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm (tmpfs) here")
    folder = Path(tempfile.mkdtemp(dir=shm))
    try:
        assert not can_insert(folder)
        store = Store(StoreSettings(str(folder / "store")))
        head, data, tail = b"H" * (2 * HEADER_BLOCK), body(2), b"t"
        inode, stored = write_head_last(store, "a/level", head, data, tail)
        path = Path(store.path("a/level"))
        assert path.read_bytes() == head + data + tail
        check_stored(stored, head + data + tail)
        assert path.stat().st_ino != inode
        assert temporaries(folder) == []
    finally:
        shutil.rmtree(folder)


def test_a_failed_or_unfinished_object_leaves_nothing(tmp_path: Path) -> None:
    store = Store(StoreSettings(str(tmp_path / "store")))
    with pytest.raises(RuntimeError), open_head_last(store, "a/x") as target:
        target.write(body())
        raise RuntimeError("the level failed")
    with (
        pytest.raises(wsi.WsiError, match="never finished"),
        open_head_last(store, "a/y") as target,
    ):
        target.write(b"frames")
    with pytest.raises(RuntimeError), open_head_last(store, "a/z") as target:
        target.write(body())
        target.finish(b"H" * HEADER_BLOCK, b"")
        raise RuntimeError("failed after finish")
    assert sorted(p.name for p in (tmp_path / "store").rglob("*") if p.is_file()) == []


def test_padding_leaves_the_data_set_and_the_transfer_syntax_round_trip(
    synthetic_jpeg_tiff: Path, tmp_path: Path
) -> None:
    store = Store(StoreSettings(str(tmp_path / "s")))
    result = wsi.convert_slide(synthetic_jpeg_tiff, store, wsi.ConvertSettings())
    manifest = store.read_manifest(result.slide_id)
    key = f"{result.slide_id}/{manifest['dicom'][0]['key']}"
    data = store.get(key)
    end = data.index(PIXEL_DATA_HEADER + EMPTY_BOT)
    header = data[:end]
    assert padded_header(header, 1) == padded_header(header, 2) == header  # even already
    for multiple in (512, HEADER_BLOCK, 3 * HEADER_BLOCK):
        assert len(header) % multiple
        padded = padded_header(header, multiple)
        assert len(padded) % multiple == 0
        assert padded_header(padded, multiple) == padded
        before = pydicom.dcmread(io.BytesIO(header + data[end:]), stop_before_pixels=True)
        after = pydicom.dcmread(io.BytesIO(padded + data[end:]), stop_before_pixels=True)
        assert after == before  # the data set, element for element
        assert after.file_meta[0x0002, 0x0100].value == PADDING_CREATOR_UID
        assert set(after.file_meta[0x0002, 0x0102].value) <= {0}
        other = with_transfer_syntax(padded, "1.2.840.10008.1.2.4.111")
        assert transfer_syntax(other) == "1.2.840.10008.1.2.4.111"
        assert with_transfer_syntax(other, transfer_syntax(padded)) == padded


def test_a_large_level_is_padded_inserted_and_read_by_dicom_readers(tmp_path: Path) -> None:
    """A base level past `PADDED_FROM`: its header fills whole blocks, it validates, OpenSlide and
    the Zarr view read the same pixels; the small levels carry no padding."""
    src = make_tiff(tmp_path / "big.tif", 4096, 3072, pyramid=False, quality=95, seed=3)
    store = Store(StoreSettings(str(tmp_path / "s")))
    result = wsi.convert_slide(src, store, wsi.ConvertSettings())
    manifest = store.read_manifest(result.slide_id)
    padded = []
    for inst in manifest["dicom"]:
        path = Path(store.path(f"{result.slide_id}/{inst['key']}"))
        data = path.read_bytes()
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        frames_start = data.index(PIXEL_DATA_HEADER + EMPTY_BOT) + len(
            PIXEL_DATA_HEADER + EMPTY_BOT
        )
        frames_end = data.rindex(DELIMITER + b"\xfc\xff\xfc\xffOB")
        has_padding = (0x0002, 0x0102) in ds.file_meta
        assert has_padding == (frames_end - frames_start >= PADDED_FROM)
        if has_padding:
            padded.append(inst["key"])
            assert frames_start % HEADER_BLOCK == 0
        assert dciodvfy(path)[0] == []
    assert padded, "the base level should be large enough to be padded"
    base = Path(store.path(f"{result.slide_id}/{manifest['dicom'][0]['key']}"))
    with OpenSlide(str(base)) as slide:
        rgba = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))
    group = zarr.open_group(store.path(f"{result.slide_id}/slide.zarr"), mode="r")
    array = group["0"]
    assert isinstance(array, zarr.Array)
    stored = np.moveaxis(np.asarray(array[:]), 0, -1)
    shown = rgba[..., 3] == 255  # OpenSlide leaves absent (blank-glass) tiles transparent
    assert shown.mean() > 0.2
    assert np.array_equal(rgba[..., :3][shown], stored[shown])
    assert temporaries(tmp_path / "s") == []
