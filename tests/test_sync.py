"""`wsi sync`: published slides copied to a second store (a SeaweedFS bucket here), resumable,
verified, manifest last; `wsi sync --repair`: damaged objects replaced from the other copy.

The kill is deterministic: the copy runs at a bounded read rate, and the test kills it as soon as
the first object appears in the bucket. The copy then still has to read that object back
(verification, at the same rate) before it writes the next one, so the kill always lands after
the first object and before the manifest.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import wsi
from wsi.published.verify import verify_store

from .conftest import sample
from .helpers import empty_folders, run_wsi, zarr_members
from .s3server import SeaweedFS
from .s3server import seaweedfs as _seaweedfs_fixture  # noqa: F401

pytestmark = pytest.mark.s3

RATE_MB = 0.4
"""The killed copy's read rate: its first object (~1.3 MB) takes seconds to copy and as long
again to verify, so the test has seconds to see it and kill."""


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """CMU-1-Small-Region published in a local store (store A)."""
    root = tmp_path_factory.mktemp("sync-a")
    result = wsi.convert_slide(
        sample("CMU-1-Small-Region.svs"), wsi.Store(wsi.StoreSettings(str(root)))
    )
    return root, result.slide_id


@pytest.fixture
def store_a(source: tuple[Path, str], tmp_path: Path) -> tuple[Path, str]:
    root, sid = source
    shutil.copytree(root, tmp_path / "a")
    return tmp_path / "a", sid


def bucket_store(server: SeaweedFS) -> tuple[str, wsi.Store]:
    url = server.url(f"sync-{uuid.uuid4().hex[:8]}")
    return url, wsi.Store(wsi.StoreSettings(url, endpoint_url=server.endpoint_url))


def local_objects(root: Path, sid: str) -> dict[str, bytes]:
    folder = root / sid
    return {
        f"{sid}/{p.relative_to(folder).as_posix()}": p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file()
    }


def assert_equal(root: Path, sid: str, bucket: wsi.Store) -> None:
    """Both stores hold exactly the same objects, byte for byte, and both verify."""
    expected = local_objects(root, sid)
    assert bucket.list_keys(sid) == sorted(expected)
    for key, data in expected.items():
        assert bucket.get(key) == data, key
    for store in (wsi.Store(wsi.StoreSettings(str(root))), bucket):
        [check] = verify_store(store, [sid])
        assert check.ok and check.bytes_read == sum(map(len, expected.values())), check.line()


def test_killed_copy_resumes(
    store_a: tuple[Path, str], seaweedfs: SeaweedFS, tmp_path: Path
) -> None:
    root, sid = store_a
    url, bucket = bucket_store(seaweedfs)
    keys = sorted(local_objects(root, sid))
    first = next(k for k in keys if not k.endswith("manifest.json"))
    log = tmp_path / "killed-sync.log"
    command = [sys.executable, "-m", "server.cli", "sync", str(root), url, "--rate", str(RATE_MB)]
    with log.open("wb") as out, subprocess.Popen(command, stdout=out, stderr=out) as proc:
        deadline = time.monotonic() + 120
        while not bucket.exists(first):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the first object never appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not bucket.is_published(sid)  # a slide appears only complete
    assert bucket.exists(first) and not bucket.exists(f"{sid}/manifest.json")
    partial = bucket.list_keys(sid)
    assert 0 < len(partial) < len(keys)

    done = run_wsi("sync", str(root), url)
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    assert line.startswith(f"{sid}\tcopied\tcopied ")
    assert f"kept {len(partial)}" in line  # what the killed run wrote is not copied again
    assert_equal(root, sid, bucket)

    again = run_wsi("sync", str(root), url)
    assert again.returncode == 0
    assert again.stdout.splitlines() == [f"{sid}\tup to date\t{len(keys) - 1} objects"]


def test_damaged_objects_are_repaired_from_the_other_copy(
    store_a: tuple[Path, str], seaweedfs: SeaweedFS
) -> None:
    root, sid = store_a
    url, bucket = bucket_store(seaweedfs)
    assert run_wsi("sync", str(root), url).returncode == 0
    level0, level1 = f"{sid}/slide.zarr/0/c/0/0/0", f"{sid}/slide.zarr/1/c/0/0/0"
    good = bucket.get(level0)
    rotten = bytearray(good)
    rotten[len(rotten) // 2] ^= 0x10
    bucket.put(level0, bytes(rotten))  # bit rot in the bucket
    (root / level1).unlink()  # an object lost from the local store

    found = run_wsi("verify", url, sid)
    assert found.returncode == 1 and "slide.zarr/0/c/0/0/0: crc mismatch" in found.stdout
    done = run_wsi("sync", "--repair", str(root), url)
    assert done.returncode == 0, done.stdout + done.stderr
    [line] = done.stdout.splitlines()
    assert line.startswith(f"{sid}\trepaired\t")
    assert "slide.zarr/0/c/0/0/0: crc mismatch" in line and "in B" in line
    assert "slide.zarr/1/c/0/0/0: missing in A" in line
    assert_equal(root, sid, bucket)
    assert oct((root / level1).stat().st_mode & 0o777) == "0o640"

    # The same object damaged in both copies cannot be repaired, and says so.
    bucket.put(level0, bytes(rotten))
    (root / level0).write_bytes(bytes(rotten))
    lost = run_wsi("sync", "--repair", str(root), url)
    assert lost.returncode == 1
    assert lost.stdout.startswith(f"{sid}\tUNRECOVERABLE\tslide.zarr/0/c/0/0/0: crc mismatch")


def test_a_new_version_replaces_the_copy(store_a: tuple[Path, str], seaweedfs: SeaweedFS) -> None:
    """A slide published again in A (here without its associated images) replaces B's copy,
    whose objects the new version lacks are deleted, with the folders SeaweedFS kept for them
    (listed as common prefixes, as zarr-python lists a group's members)."""
    root, sid = store_a
    url, bucket = bucket_store(seaweedfs)
    assert run_wsi("sync", str(root), url).returncode == 0
    before = set(bucket.list_keys(sid))
    wsi.convert_slide(
        sample("CMU-1-Small-Region.svs"),
        wsi.Store(wsi.StoreSettings(str(root))),
        wsi.ConvertSettings(include_associated=False),
    )
    after = set(local_objects(root, sid))
    assert after < before
    done = run_wsi("sync", str(root), url)
    assert done.returncode == 0, done.stderr
    assert f"removed {len(before - after)}" in done.stdout
    assert_equal(root, sid, bucket)
    in_group = {key.split("/")[2] for key in after if key.startswith(f"{sid}/slide.zarr/")}
    assert "associated" not in in_group
    assert bucket.children(f"{sid}/slide.zarr") == sorted(in_group)


def test_a_new_version_leaves_no_empty_folder_in_a_local_copy(
    store_a: tuple[Path, str], tmp_path: Path
) -> None:
    """Objects only B's old version had were deleted from a local B but their folders stayed
    (`associated/label/c/0/0`, ...), which zarr-python lists as members it does not recognise."""
    root, sid = store_a
    target = tmp_path / "b"
    assert run_wsi("sync", str(root), str(target)).returncode == 0
    wsi.convert_slide(
        sample("CMU-1-Small-Region.svs"),
        wsi.Store(wsi.StoreSettings(str(root))),
        wsi.ConvertSettings(include_associated=False),
    )
    done = run_wsi("sync", str(root), str(target))
    assert done.returncode == 0, done.stderr
    assert "removed" in done.stdout
    assert empty_folders(target / sid) == []
    members, warned = zarr_members(target / sid / "slide.zarr")
    assert warned == []
    assert members == zarr_members(root / sid / "slide.zarr")[0]
    assert not [m for m in members if m.startswith("associated")]


def test_sync_errors(store_a: tuple[Path, str], tmp_path: Path) -> None:
    """A slide A does not publish, or whose object in A is damaged, is not published in B."""
    root, sid = store_a
    target = tmp_path / "b"
    missing = run_wsi("sync", str(root), str(target), "0000notpublished")
    assert missing.returncode == 1
    assert missing.stdout == "0000notpublished\tFAILED\tnot published in the source\n"
    shard = root / sid / "slide.zarr/2/c/0/0/0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    done = run_wsi("sync", str(root), str(target))
    assert done.returncode == 1
    assert done.stdout.startswith(f"{sid}\tFAILED\t{sid}/slide.zarr/2/c/0/0/0 in the source")
    assert not (target / sid / "manifest.json").exists()
    assert not (target / sid / "slide.zarr/2/c/0/0/0").exists()


def test_a_store_synced_to_itself_or_a_rate_below_zero_is_refused(
    store_a: tuple[Path, str], tmp_path: Path, seaweedfs: SeaweedFS
) -> None:
    """`wsi sync A A` (or A through a symlink, or one bucket prefix twice) was accepted and
    reported every slide "ok in both stores"; `--rate -5` said "got -5000000.0", in bytes a
    second where the user typed MB/s."""
    root, _sid = store_a
    (tmp_path / "link").symlink_to(root)
    url, bucket = bucket_store(seaweedfs)
    endpoint = ["--s3-endpoint", seaweedfs.endpoint_url]
    for a, b, more in (
        (str(root), str(root), []),
        (str(root), str(tmp_path / "link"), ["--repair"]),
        (url, url + "/", endpoint),
    ):
        run = run_wsi("sync", a, b, *more)
        assert (run.returncode, run.stdout) == (1, ""), run.stderr
        assert (
            run.stderr
            == f"wsi: error: {a} and {b} are the same store: sync copies to a second one\n"
        )
    assert bucket.published_slides() == []
    for rate in ("-5", "0", "nan"):
        run = run_wsi("sync", str(root), str(tmp_path / "b"), "--rate", rate)
        assert run.stderr == f"wsi: error: --rate must be a positive number of MB/s, got {rate}\n"
        assert run.returncode == 1 and not (tmp_path / "b").exists()
    # Another prefix of the same bucket, another S3 endpoint: other stores.
    other = wsi.Store(wsi.StoreSettings(url + "-x", endpoint_url=seaweedfs.endpoint_url))
    assert not bucket.is_same_store(other)
    elsewhere = wsi.Store(wsi.StoreSettings(url, endpoint_url="http://127.0.0.2:1"))
    assert not bucket.is_same_store(elsewhere)
    assert bucket.is_same_store(
        wsi.Store(wsi.StoreSettings(url, endpoint_url=seaweedfs.endpoint_url))
    )


def test_a_damaged_new_version_leaves_the_copy_published_as_it_was(
    store_a: tuple[Path, str], seaweedfs: SeaweedFS
) -> None:
    """Syncing a new version unpublished the target's copy first and overwrote its objects as
    it went: a damaged object of the source's new version then left neither version in the
    target. The new version is now copied and checked beside the target's, then swapped in."""
    root, sid = store_a
    url, bucket = bucket_store(seaweedfs)
    assert run_wsi("sync", str(root), url).returncode == 0
    before = {k: bucket.get(k) for k in bucket.list_keys(sid)}
    again = wsi.ConvertSettings(wsi.PyramidSettings(quality=70, reuse_levels=False))
    wsi.convert_slide(
        sample("CMU-1-Small-Region.svs"), wsi.Store(wsi.StoreSettings(str(root))), again
    )
    level1 = root / sid / "slide.zarr" / "1" / "c" / "0" / "0" / "0"
    damaged = bytearray(level1.read_bytes())
    damaged[len(damaged) // 2] ^= 0x10
    level1.write_bytes(bytes(damaged))
    done = run_wsi("sync", str(root), url)
    assert done.returncode == 1 and "does not match its manifest" in done.stdout + done.stderr
    assert {k: bucket.get(k) for k in bucket.list_keys(sid)} == before  # not one byte changed
    [check] = verify_store(bucket, [sid])
    assert check.ok, check.line()


def test_a_bit_flipped_in_a_manifest_is_the_manifests_damage_and_repaired(
    store_a: tuple[Path, str], seaweedfs: SeaweedFS
) -> None:
    """One hex digit of an object's CRC flipped in A's manifest, which still parses: verify
    blamed the intact object, `--repair` took the two manifests for two versions and did
    nothing (exit 0). The manifest's own checksum makes it the damaged one: repaired from B."""
    root, sid = store_a
    url, bucket = bucket_store(seaweedfs)
    assert run_wsi("sync", str(root), url).returncode == 0
    path = root / sid / "manifest.json"
    good = path.read_bytes()
    at = good.index(b'"crc32c": "') + len(b'"crc32c": "')
    flipped = good[:at] + bytes([good[at] ^ 0x01]) + good[at + 1 :]
    assert json.loads(flipped)  # still a JSON document
    path.write_bytes(flipped)
    found = run_wsi("verify", str(root), sid)
    assert found.returncode == 1 and "manifest" in found.stdout, found.stdout
    assert "crc mismatch" not in found.stdout  # no object blamed
    done = run_wsi("sync", "--repair", str(root), url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"{sid}\trepaired\t"), done.stdout
    assert path.read_bytes() == good
    assert_equal(root, sid, bucket)
