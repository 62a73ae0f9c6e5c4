"""`wsi delete`: a published slide removed with every object of it, locally and on S3.

There was no way to remove a slide but by hand (`rm -r` of its folder, which readers saw half
gone, or objects deleted one by one in a bucket): an erasure request, a slide published by
mistake or a de-identified copy published under its linkable content id stayed."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

import wsi
from server.app import create_app
from server.settings import ServerSettings

from .conftest import sample
from .helpers import run_wsi, wait_until
from .s3server import SeaweedFS
from .s3server import seaweedfs as _seaweedfs_fixture  # noqa: F401


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    root = tmp_path_factory.mktemp("delete") / "store"
    store = wsi.Store(wsi.StoreSettings(str(root)))
    small = wsi.convert_slide(sample("openslide-python-fixtures/small.svs"), store).slide_id
    cmu = wsi.convert_slide(sample("CMU-1-Small-Region.svs"), store).slide_id
    return root, small, cmu


def test_a_deleted_slide_leaves_nothing_and_the_others_are_untouched(
    two_slides: tuple[Path, str, str], tmp_path: Path
) -> None:
    root = tmp_path / "store"
    shutil.copytree(two_slides[0], root)
    _, small, cmu = two_slides
    stored = wsi.Store(wsi.StoreSettings(str(root))).manifest(small).stored_bytes
    done = run_wsi("delete", str(root), small)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{small}\tdeleted\t{stored} bytes\n" and done.stderr == ""
    assert not (root / small).exists()
    listed = run_wsi("list", str(root))
    assert listed.stdout.split() == [cmu]
    verified = run_wsi("verify", str(root))
    assert verified.returncode == 0, verified.stderr
    # Again, an id that is not one, a path: one line each, exit 1, nothing else touched.
    for bad, says in (
        (small, f"slide {small} is not published"),
        ("../store", "slide id"),
        ("NOPE", "slide id"),
    ):
        done = run_wsi("delete", str(root), bad)
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.startswith(f"wsi: delete: {bad}: ") and says in done.stderr
        assert len(done.stderr.splitlines()) == 1
    assert wsi.Store(wsi.StoreSettings(str(root))).published_slides() == [cmu]
    missing = run_wsi("delete", str(tmp_path / "typo"), cmu)
    assert missing.returncode == 1 and not (tmp_path / "typo").exists()


def test_a_slide_converting_here_is_not_deleted(two_slides: tuple[Path, str, str]) -> None:
    root, small, _ = two_slides
    store = wsi.Store(wsi.StoreSettings(str(root)))
    with store.slide_lock(small):  # a conversion of it runs on this machine
        done = run_wsi("delete", str(root), small)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    assert store.is_published(small)


def test_a_running_service_stops_serving_a_deleted_slide(
    two_slides: tuple[Path, str, str], tmp_path: Path
) -> None:
    root = tmp_path / "store"
    shutil.copytree(two_slides[0], root)
    _, small, cmu = two_slides

    async def main() -> None:
        async with TestClient(TestServer(create_app(ServerSettings(store=str(root))))) as c:
            assert (await c.get(f"/slides/{small}/tiles/0/0/0")).status == 200
            done = await asyncio.to_thread(run_wsi, "delete", str(root), small)
            assert done.returncode == 0, done.stderr

            async def gone() -> bool:
                listed = (await (await c.get("/slides")).json())["slides"]
                tile = await c.get(f"/slides/{small}/tiles/0/0/0")
                return [s["id"] for s in listed] == [cmu] and tile.status == 404

            await wait_until(gone, 30)

    asyncio.run(main())


def test_a_slide_in_a_bucket_is_deleted_with_every_object(
    two_slides: tuple[Path, str, str], seaweedfs: SeaweedFS
) -> None:
    root, small, cmu = two_slides
    url = seaweedfs.url(f"delete-{uuid.uuid4().hex[:8]}")
    synced = run_wsi("sync", str(root), url, "--s3-endpoint", seaweedfs.endpoint_url)
    assert synced.returncode == 0, synced.stderr
    bucket = wsi.Store(wsi.StoreSettings(url, endpoint_url=seaweedfs.endpoint_url))
    assert bucket.list_keys(small)
    done = run_wsi("delete", url, small, "--s3-endpoint", seaweedfs.endpoint_url)
    assert done.returncode == 0 and done.stdout.startswith(f"{small}\tdeleted\t"), done.stderr
    assert bucket.list_keys(small) == [] and small not in bucket.children()
    assert bucket.published_slides() == [cmu]
