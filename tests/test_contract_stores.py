"""The store contract on a local folder and on S3 (the SeaweedFS `tests/s3server.py` starts)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from wsi.store import Store, StoreSettings

from .contracts.stores import SLIDE, Boom, StoreContract, pieces
from .s3server import SeaweedFS
from .s3server import seaweedfs as _seaweedfs_fixture  # noqa: F401

S3_PART = 5 * 1024 * 1024
"""The smallest part S3 accepts: failed writes of more than this abort a multipart upload."""


class TestLocalStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Store:
        return Store(StoreSettings(str(tmp_path / "store")))

    def test_delete_objects_keeps_the_slides_folder(self, store: Store) -> None:
        """Emptied folders go up to the slide's own, which stays: it is the slide (its
        manifest's folder), which deleting objects of a version never removes."""
        store.put(f"{SLIDE}/slide.zarr/0/c/0/0/0", b"x")
        store.delete_objects(SLIDE, [f"{SLIDE}/slide.zarr/0/c/0/0/0"])
        assert os.listdir(store.root) == [SLIDE]
        assert os.listdir(store.path(SLIDE)) == []


@pytest.mark.s3
class TestS3Store(StoreContract):
    @pytest.fixture
    def store(self, seaweedfs: SeaweedFS) -> Store:
        url = seaweedfs.url(f"contract-{uuid.uuid4().hex[:12]}")
        return Store(StoreSettings(url, seaweedfs.endpoint_url, upload_part_bytes=S3_PART))

    def test_failed_write_leaves_no_unfinished_upload(self, store: Store) -> None:
        """Parts of an abandoned multipart upload are stored (and billed) until aborted."""
        bucket, _, root = store.path("f").partition("/")

        def uploads() -> list[str]:
            found = store.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=root + "/")
            return [u["Key"] for u in found.get("Uploads", [])]

        with pytest.raises(Boom), store.open_write("f/obj.bin") as f:
            for part in pieces(3 * S3_PART):
                f.write(part)
            assert uploads() == [f"{root}/obj.bin"]  # the parts really went out
            raise Boom
        assert uploads() == []
