"""Slides in a bucket as conversion sources (SeaweedFS, no mocks).

A staged copy must be laid out as the scanner wrote it and hash to the id of the original local
file, which `remote_slide_id` must give without a download; the spool folder must never outlive
the `with` block; URLs from HTTP requests must be refused before anything is read.
"""

from __future__ import annotations

import itertools
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import s3fs

from wsi.errors import InvalidArgument, SlideNotFound, StoreError
from wsi.ingest.spool import COPIES_FOLDER, RESERVED, SpoolFull
from wsi.ingest.staging import (
    StagingLimits,
    is_remote,
    parse_s3_url,
    remote_slide_id,
    staged,
)
from wsi.metadata import sidecar_path
from wsi.slide_id import content_slide_id

from .conftest import sample

# Imported as in test_s3.py: the alias registers the fixture as `seaweedfs`, one server per session.
from .s3server import SeaweedFS
from .s3server import seaweedfs as _seaweedfs_fixture  # noqa: F401

SMALL_SVS = "CMU-1-Small-Region.svs"
DICOM_SERIES = "highdicom"
"""A folder of DICOM files, staged as a folder (prefix) slide."""

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def s3(seaweedfs: SeaweedFS) -> s3fs.S3FileSystem:
    """A client of its own for uploads, as a scanner or archive would use."""
    return s3fs.S3FileSystem(**seaweedfs.storage_options())


@pytest.fixture
def prefix(seaweedfs: SeaweedFS) -> str:
    """A fresh `bucket/prefix` per test: the server is shared by the session."""
    return f"{seaweedfs.bucket}/staging-{uuid.uuid4().hex[:12]}"


def _upload_tree(s3: s3fs.S3FileSystem, local: Path, remote: str) -> None:
    """Every file below `local` to `remote/<relative path>`."""
    for path in sorted(local.rglob("*")):
        if path.is_file():
            s3.put_file(str(path), f"{remote}/{path.relative_to(local).as_posix()}")


def _files(root: Path) -> dict[str, bytes]:
    """The files below `root`, but the spool's note of the room a copy reserved."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != RESERVED
    }


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    path.mkdir()
    return path


# -- single file ----------------------------------------------------------------------------


def test_single_file_staged_with_the_original_id(
    seaweedfs: SeaweedFS, s3: s3fs.S3FileSystem, prefix: str, spool: Path
) -> None:
    original = sample(SMALL_SVS)
    s3.put_file(str(original), f"{prefix}/scanner/{original.name}")
    url = f"s3://{prefix}/scanner/{original.name}"
    sid = content_slide_id(original)

    assert remote_slide_id(url, endpoint_url=seaweedfs.endpoint_url) == sid
    calls: list[tuple[int, int]] = []
    with staged(url, seaweedfs.endpoint_url, spool, lambda d, t: calls.append((d, t))) as path:
        assert path.name == original.name
        assert path.parent.parent == spool.resolve()  # a fresh folder inside the spool
        assert path.read_bytes() == original.read_bytes()
        assert content_slide_id(path) == sid
        folder = path.parent
    assert not folder.exists()
    assert list(spool.iterdir()) == []

    size = original.stat().st_size
    assert calls[0] == (0, size)
    assert calls[-1] == (size, size)
    assert all(t == size for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_streams_in_chunks(seaweedfs: SeaweedFS, s3: s3fs.S3FileSystem, prefix: str) -> None:
    original = sample(SMALL_SVS)
    s3.put_file(str(original), f"{prefix}/{original.name}")
    calls: list[int] = []
    chunk = 256 * 1024
    with staged(
        f"s3://{prefix}/{original.name}",
        seaweedfs.endpoint_url,
        progress=lambda d, t: calls.append(d),
        chunk_bytes=chunk,
    ) as path:
        assert content_slide_id(path) == content_slide_id(original)
    steps = [b - a for a, b in itertools.pairwise(calls)]
    assert len(steps) == -(-original.stat().st_size // chunk)
    assert max(steps) == chunk


def test_spool_folder_removed_when_the_body_raises(
    seaweedfs: SeaweedFS, s3: s3fs.S3FileSystem, prefix: str, spool: Path
) -> None:
    s3.pipe_file(f"{prefix}/a.svs", b"not really a slide")
    seen: list[Path] = []
    with (
        pytest.raises(RuntimeError, match="conversion failed"),
        staged(f"s3://{prefix}/a.svs", seaweedfs.endpoint_url, spool) as path,
    ):
        seen.append(path)
        assert path.is_file()
        raise RuntimeError("conversion failed")
    assert seen
    assert not seen[0].exists()
    assert list(spool.iterdir()) == []


def test_default_spool_is_the_temp_folder(
    seaweedfs: SeaweedFS,
    s3: s3fs.S3FileSystem,
    prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    s3.pipe_file(f"{prefix}/a.svs", b"bytes")
    with staged(f"s3://{prefix}/a.svs", seaweedfs.endpoint_url) as path:
        assert path.parent.parent == tmp_path.resolve()
    assert list(tmp_path.iterdir()) == []


# -- multi-file slides ----------------------------------------------------------------------


def test_folder_slide(
    seaweedfs: SeaweedFS, s3: s3fs.S3FileSystem, prefix: str, tmp_path: Path, spool: Path
) -> None:
    # The DICOM series as a scanner wrote it, plus nested names whose order differs between
    # plain strings and path segments (`a-b` < `a/c` as strings, not as paths).
    local = tmp_path / "series"
    shutil.copytree(sample(DICOM_SERIES), local)
    (local / "a").mkdir()
    (local / "a" / "c.dcm").write_bytes(b"nested")
    (local / "a-b.dcm").write_bytes(b"sibling")
    _upload_tree(s3, local, f"{prefix}/series")
    # Neighbours sharing the name as a string prefix are not part of the slide.
    s3.pipe_file(f"{prefix}/series-2/x.dcm", b"other slide")
    s3.pipe_file(f"{prefix}/seriesx", b"other object")
    url = f"s3://{prefix}/series/"
    sid = content_slide_id(local)
    assert len(_files(local)) >= 4

    assert remote_slide_id(url, seaweedfs.endpoint_url) == sid
    with staged(url, seaweedfs.endpoint_url, spool) as path:
        assert path.is_dir()
        assert path.name == "series"
        assert _files(path) == _files(local)
        assert content_slide_id(path) == sid
    assert list(spool.iterdir()) == []


def test_mirax_slide_takes_its_companion_folder(
    seaweedfs: SeaweedFS, s3: s3fs.S3FileSystem, prefix: str, tmp_path: Path, spool: Path
) -> None:
    local = tmp_path / "scan"
    (local / "slide" / "sub").mkdir(parents=True)
    (local / "slide.mrxs").write_bytes(b"[GENERAL]\nfake mirax index\n")
    (local / "slide" / "Slidedat.ini").write_bytes(b"[GENERAL]\n")
    (local / "slide" / "Data0000.dat").write_bytes(os.urandom(100_000))
    (local / "slide" / "sub" / "Index.dat").write_bytes(b"index")
    _upload_tree(s3, local, f"{prefix}/scan")
    s3.pipe_file(f"{prefix}/scan/slide-2/Data0000.dat", b"another slide's data")
    s3.pipe_file(f"{prefix}/scan/other.svs", b"another slide")
    url = f"s3://{prefix}/scan/slide.mrxs"
    sid = content_slide_id(local / "slide.mrxs")

    assert remote_slide_id(url, seaweedfs.endpoint_url) == sid
    with staged(url, seaweedfs.endpoint_url, spool) as path:
        assert path.name == "slide.mrxs"
        assert _files(path.parent) == _files(local)
        assert content_slide_id(path) == sid


def test_mirax_without_companion_folder_is_one_object(
    seaweedfs: SeaweedFS, s3: s3fs.S3FileSystem, prefix: str, tmp_path: Path
) -> None:
    local = tmp_path / "lonely.vms"
    local.write_bytes(b"vms index only")
    s3.put_file(str(local), f"{prefix}/lonely.vms")
    url = f"s3://{prefix}/lonely.vms"
    assert remote_slide_id(url, seaweedfs.endpoint_url) == content_slide_id(local)
    with staged(url, seaweedfs.endpoint_url) as path:
        assert _files(path.parent) == {"lonely.vms": b"vms index only"}


# -- bounds: one source, and the spool ------------------------------------------------------


def test_a_source_over_its_caps_is_refused_before_any_download(
    seaweedfs: SeaweedFS, s3: s3fs.S3FileSystem, prefix: str, spool: Path
) -> None:
    for i in range(4):
        s3.pipe_file(f"{prefix}/many/{i}.dcm", b"x" * 100)
    url = f"s3://{prefix}/many/"
    exactly = StagingLimits(max_objects=4, max_bytes=400, spool_quota=1000)
    assert remote_slide_id(url, seaweedfs.endpoint_url, exactly)
    for limits, words in [
        (StagingLimits(max_objects=3, max_bytes=400, spool_quota=1000), "over 3 objects"),
        (StagingLimits(max_objects=4, max_bytes=399, spool_quota=1000), "over the 399-byte"),
    ]:
        with pytest.raises(InvalidArgument, match=words):
            remote_slide_id(url, seaweedfs.endpoint_url, limits)
        with (
            pytest.raises(InvalidArgument, match=words),
            staged(url, seaweedfs.endpoint_url, spool, limits=limits),
        ):
            pass
        assert list(spool.iterdir()) == []
    one = f"s3://{prefix}/many/0.dcm"
    with pytest.raises(InvalidArgument, match="over the 99-byte"):
        remote_slide_id(one, seaweedfs.endpoint_url, StagingLimits(10, 99, 1000))


def test_a_copy_that_would_overfill_the_spool_is_refused_or_waits(
    seaweedfs: SeaweedFS, s3: s3fs.S3FileSystem, prefix: str, spool: Path
) -> None:
    s3.pipe_file(f"{prefix}/q/case.svs", b"y" * 1000)
    url = f"s3://{prefix}/q/case.svs"
    limits = StagingLimits(max_objects=10, max_bytes=1000, spool_quota=1500)
    # Another conversion's copy (a live process: this one), still downloading: the room it
    # reserved is taken even though its bytes are not there yet.
    other = spool / f"wsi-staged-{os.getpid()}-other"
    other.mkdir()
    (other / RESERVED).write_text("1000\n")
    with pytest.raises(SpoolFull), staged(url, seaweedfs.endpoint_url, spool, limits=limits):
        pass
    assert [p.name for p in spool.iterdir()] == [other.name]  # nothing downloaded

    waiting = threading.Event()
    copied: list[bytes] = []

    def convert() -> None:
        with staged(url, seaweedfs.endpoint_url, spool, limits=limits, waiting=waiting.set) as p:
            copied.append(p.read_bytes())

    thread = threading.Thread(target=convert)
    thread.start()
    assert waiting.wait(60)  # told it waits (a converter then shows it is alive)
    assert not copied
    shutil.rmtree(other)  # that conversion ended
    thread.join(60)
    assert copied == [b"y" * 1000]

    # A copy left by a process that is gone holds no room: it is swept.
    dead = spool / "wsi-staged-999999999-gone"
    dead.mkdir()
    (dead / RESERVED).write_text("1000\n")
    with staged(url, seaweedfs.endpoint_url, spool, limits=limits) as path:
        assert path.read_bytes() == b"y" * 1000
    assert list(spool.iterdir()) == []


def test_only_copies_take_room_in_the_spool(
    seaweedfs: SeaweedFS,
    s3: s3fs.S3FileSystem,
    prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default spool is the system's temp folder: other programs' files there are not
    copies and take none of the quota (they made every copy wait for room for ever once they
    outgrew it); the service's bucket copies (`copies/`) and other copies do."""
    s3.pipe_file(f"{prefix}/r/case.svs", b"z" * 1000)
    url = f"s3://{prefix}/r/case.svs"
    limits = StagingLimits(max_objects=10, max_bytes=1000, spool_quota=1500)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    (tmp_path / "someone-elses.bin").write_bytes(b"x" * 5000)
    (tmp_path / "pytest-of-someone" / "deep").mkdir(parents=True)
    (tmp_path / "pytest-of-someone" / "deep" / "big.bin").write_bytes(b"x" * 5000)
    with staged(url, seaweedfs.endpoint_url, limits=limits) as path:
        assert path.read_bytes() == b"z" * 1000
    copy = tmp_path / COPIES_FOLDER / ".partial-abc"
    copy.mkdir(parents=True)
    (copy / RESERVED).write_text("1000\n")
    with pytest.raises(SpoolFull), staged(url, seaweedfs.endpoint_url, limits=limits):
        pass


def test_staged_copies_are_private_whatever_the_umask(
    seaweedfs: SeaweedFS, s3: s3fs.S3FileSystem, prefix: str, tmp_path: Path
) -> None:
    s3.pipe_file(f"{prefix}/private/series/a/1.dcm", b"one")
    s3.pipe_file(f"{prefix}/private/series/2.dcm", b"two")
    spool = tmp_path / "new" / "spool"
    old = os.umask(0)
    try:
        with staged(f"s3://{prefix}/private/series/", seaweedfs.endpoint_url, spool) as path:
            made = [tmp_path / "new", spool, *spool.rglob("*")]
            assert (path / "a" / "1.dcm") in made
            for made_path in made:
                assert made_path.stat().st_mode & 0o007 == 0, made_path
    finally:
        os.umask(old)


# -- sidecar metadata -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slide", "sidecar"),
    [("case-7.svs", "case-7.svs.json"), ("case-7.svs", "case-7.json"), ("series/", "series.json")],
)
def test_sidecar_json_is_staged_beside_the_slide(
    seaweedfs: SeaweedFS, s3: s3fs.S3FileSystem, prefix: str, slide: str, sidecar: str
) -> None:
    body = b'{"PatientID": "P-7"}'
    if slide.endswith("/"):
        s3.pipe_file(f"{prefix}/{slide}frame-1.dcm", b"frame")
    else:
        s3.pipe_file(f"{prefix}/{slide}", b"slide bytes")
    s3.pipe_file(f"{prefix}/{sidecar}", body)
    url = f"s3://{prefix}/{slide}"
    with staged(url, seaweedfs.endpoint_url) as path:
        found = sidecar_path(path)
        assert found is not None
        assert found.name == sidecar
        assert found.read_bytes() == body
        sid = content_slide_id(path)
    # The sidecar is metadata, not content: it does not change the id.
    assert remote_slide_id(url, seaweedfs.endpoint_url) == sid


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["missing.svs", "missing/", "folder"])
def test_missing_object(
    seaweedfs: SeaweedFS, s3: s3fs.S3FileSystem, prefix: str, spool: Path, name: str
) -> None:
    # `folder` exists only as a prefix: a folder slide's URL must end in `/`.
    s3.pipe_file(f"{prefix}/folder/a.dcm", b"frame")
    url = f"s3://{prefix}/{name}"
    with pytest.raises(SlideNotFound, match=f"no such object {url}"):
        remote_slide_id(url, seaweedfs.endpoint_url)
    with pytest.raises(SlideNotFound, match=f"no such object {url}"):  # noqa: SIM117
        with staged(url, seaweedfs.endpoint_url, spool):
            pytest.fail("staged a missing object")
    assert list(spool.iterdir()) == []


BAD_URLS = [
    "s3://a/../x",
    "s3://bucket/../x",
    "s3://bucket/a/./x",
    "s3://bucket/a//x",
    "s3://bucket//x",
    "s3://bucket/x/..",
    "s3://bucket/x//",
    "s3://Bad_Bucket/x",
    "s3://bu/x",
    "s3://" + "b" * 64 + "/x",
    "s3://-bucket/x",
    "s3://bucket-/x",
    "s3://buck..et/x",
    "s3://192.168.1.1/x",
    "http://x/y",
    "S3://bucket/x",
    "/local/path.svs",
    "s3://bucket/",
    "s3://bucket",
    "s3://",
    "s3://bucket/x\x00.svs",
    "s3://bucket/x\n.svs",
    "s3://bucket/x\x7f",
    "s3://bucket/" + "k" * 1025,
    "s3://bucket/" + "é" * 513,
    "s3://bucket/" + "n" * 256 + "/x",
    "s3://bucket/x.svs?versionId=abc",
    "s3://bucket/\ud800",
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_bad_urls_are_refused_before_any_request(url: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_s3_url(url)
    # An unreachable endpoint: an InvalidArgument here proves no request was tried.
    with pytest.raises(InvalidArgument):
        remote_slide_id(url, endpoint_url="http://127.0.0.1:1")
    with pytest.raises(InvalidArgument), staged(url, endpoint_url="http://127.0.0.1:1"):
        pytest.fail("staged a bad URL")


def test_error_messages_quote_input_safely() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_s3_url("s3://bucket/a\x00b/" + "x" * 5000)
    message = str(info.value)
    assert "\x00" not in message
    assert len(message) < 400


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket/CMU-1.svs", ("bucket", "CMU-1.svs")),
        ("s3://my.bucket-1/a/b/series/", ("my.bucket-1", "a/b/series/")),
        ("s3://abc/with space (1).ndpi", ("abc", "with space (1).ndpi")),
        ("s3://abc/%2e%2e/x#y?z", ("abc", "%2e%2e/x#y?z")),  # literal, never decoded
        ("s3://abc/..x/x..", ("abc", "..x/x..")),
        ("s3://abc/" + "k" * 254 + "/" + "é" * 127, ("abc", "k" * 254 + "/" + "é" * 127)),
    ],
)
def test_good_urls(url: str, expected: tuple[str, str]) -> None:
    assert parse_s3_url(url) == expected
    assert is_remote(url)


def test_is_remote() -> None:
    assert is_remote("s3://bucket/x.svs")
    assert is_remote("S3://bucket/x.svs")  # so that parse_s3_url says what is wrong with it
    assert not is_remote("/data/x.svs")
    assert not is_remote("x.svs")
    assert not is_remote("https://host/x.svs")


def test_unreachable_endpoint_is_a_quick_store_error(seaweedfs: SeaweedFS, spool: Path) -> None:
    # The fixture's AWS_* environment: credentials, and no instance-metadata lookups.
    url = f"s3://{seaweedfs.bucket}/x.svs"
    start = time.monotonic()
    with pytest.raises(StoreError, match="cannot read s3://"):
        remote_slide_id(url, endpoint_url="http://127.0.0.1:1")
    with pytest.raises(StoreError), staged(url, "http://127.0.0.1:1", spool):
        pytest.fail("staged from an unreachable store")
    assert time.monotonic() - start < 30
    assert list(spool.iterdir()) == []


# -- large objects --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """~70 MB of noise: over the 64 MiB threshold where the id samples instead of hashing all."""
    path = tmp_path_factory.mktemp("large") / "large.svs"
    rng = np.random.default_rng(7)
    path.write_bytes(rng.integers(0, 256, 70_000_000, dtype=np.uint8).tobytes())
    yield path
    path.unlink()


@pytest.mark.slow
def test_large_object_sampled_id(
    seaweedfs: SeaweedFS, s3: s3fs.S3FileSystem, prefix: str, large_file: Path, spool: Path
) -> None:
    s3.put_file(str(large_file), f"{prefix}/large.svs")
    url = f"s3://{prefix}/large.svs"
    sid = content_slide_id(large_file)
    assert remote_slide_id(url, seaweedfs.endpoint_url) == sid
    last: list[Any] = []
    with staged(url, seaweedfs.endpoint_url, spool, lambda d, t: last.append((d, t))) as path:
        assert path.stat().st_size == large_file.stat().st_size
        assert content_slide_id(path) == sid
    assert last[-1] == (70_000_000, 70_000_000)
    assert list(spool.iterdir()) == []
