"""`StoreContract`: what a slide store promises wherever it lives, tested through `Store` only.

A store's test module subclasses the contract and provides `store`: a new, empty `Store` per
test (a fresh local folder, or a fresh prefix in a bucket). Writes that fail in the middle are
made to span more than one upload part (`upload_part_bytes`), so on S3 they go through a
multipart upload, the case where a half-written object could be left behind.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest

from wsi.errors import InvalidArgument, SlideNotFound, StoreError
from wsi.store import MANIFEST, Store

_MiB = 1024 * 1024
SLIDE = "0123456789abcdef01234567"
OTHER_SLIDE = "fedcba9876543210fedcba98"
BAD_KEYS = [
    "",
    "/etc/passwd",
    "/abs/key",
    "a//b",
    "a/",
    "..",
    ".",
    "../escape",
    "a/../../escape",
    "a/./b",
    "a\\..\\b",
    "a b",
    "-a",
    "a/\0",
]
BAD_SLIDE_IDS = ["", "..", "../x", "a/b", "UPPER", "-x", "x" * 65]


class Boom(Exception):
    """Raised inside a write to abandon it (what a failing conversion does)."""


def pieces(total: int, piece: int = _MiB) -> Iterator[bytes]:
    """`total` bytes in `piece`-sized parts, each part different (so misplaced bytes show)."""
    for start in range(0, total, piece):
        n = min(piece, total - start)
        yield bytes([(start // piece) % 251]) * n


class StoreContract:
    """The `Store` interface's promises; subclass and provide `store` (new and empty)."""

    @pytest.fixture
    def store(self) -> Store:
        raise NotImplementedError("a store test module provides `store`")

    # -- whole objects --------------------------------------------------------------------------

    def test_put_get_size_exists(self, store: Store) -> None:
        data = bytes(range(256)) * 40
        store.put("a/b/obj.bin", data)
        assert store.get("a/b/obj.bin") == data
        assert store.size("a/b/obj.bin") == len(data)
        assert store.exists("a/b/obj.bin")
        store.put("a/empty", b"")
        assert (store.get("a/empty"), store.size("a/empty")) == (b"", 0)

    def test_missing_objects(self, store: Store) -> None:
        assert not store.exists("a/missing")
        calls: list[Callable[[], object]] = [
            lambda: store.get("a/missing"),
            lambda: store.get_range("a/missing", 0, 4),
            lambda: store.size("a/missing"),
        ]
        for call in calls:
            with pytest.raises(SlideNotFound) as info:
                call()
            assert isinstance(info.value, FileNotFoundError)

    def test_put_replaces_the_whole_object(self, store: Store) -> None:
        store.put("k", b"a much longer first version")
        store.put("k", b"short")
        assert store.get("k") == b"short"
        assert store.size("k") == 5

    def test_get_range_is_half_open(self, store: Store) -> None:
        data = bytes(range(200))
        store.put("r/obj", data)
        for start, end in [(0, 1), (3, 10), (0, 200), (184, 200), (199, 200), (100, 101)]:
            assert store.get_range("r/obj", start, end) == data[start:end], (start, end)

    # -- streamed writes: whole or not at all ---------------------------------------------------

    def test_streamed_object_appears_only_when_complete(self, store: Store) -> None:
        total = store.settings.upload_part_bytes + _MiB + 123
        with store.open_write("s/big.bin") as f:
            for part in pieces(total):
                f.write(part)
            assert not store.exists("s/big.bin")
            with pytest.raises(SlideNotFound):
                store.get("s/big.bin")
            assert store.list_keys("s") == []
        assert store.size("s/big.bin") == total
        assert store.get("s/big.bin") == b"".join(pieces(total))
        assert store.list_keys("s") == ["s/big.bin"]

    def test_failed_write_leaves_no_object(self, store: Store) -> None:
        total = store.settings.upload_part_bytes + _MiB
        with pytest.raises(Boom), store.open_write("f/obj.bin") as f:
            for part in pieces(total):
                f.write(part)
            raise Boom
        assert not store.exists("f/obj.bin")
        with pytest.raises(SlideNotFound):
            store.get("f/obj.bin")
        assert store.list_keys("f", include_temporary=True) == []
        assert store.children("f") == []

    def test_children_never_shows_a_write_in_progress(self, store: Store) -> None:
        store.put("s/done.bin", b"whole")
        with store.open_write("s/partial.bin") as f:
            f.write(b"half")
            assert store.children("s") == ["done.bin"]
        assert store.children("s") == ["done.bin", "partial.bin"]

    def test_failed_rewrite_keeps_the_old_object(self, store: Store) -> None:
        store.put("f/obj.bin", b"version 1")
        with pytest.raises(Boom), store.open_write("f/obj.bin") as f:
            for part in pieces(store.settings.upload_part_bytes + _MiB):
                f.write(part)
            raise Boom
        assert store.get("f/obj.bin") == b"version 1"
        assert store.list_keys("f", include_temporary=True) == ["f/obj.bin"]

    def test_small_failed_write_leaves_no_object(self, store: Store) -> None:
        with pytest.raises(Boom), store.open_write("f/small") as f:
            f.write(b"a few bytes")
            raise Boom
        assert not store.exists("f/small")
        assert store.list_keys("f", include_temporary=True) == []

    # -- listing and deleting -------------------------------------------------------------------

    def test_listing(self, store: Store) -> None:
        for key in ("a/x", "a/b/y", "a/b/z", "c/w", "ab/v"):
            store.put(key, key.encode())
        assert store.list_keys("a") == ["a/b/y", "a/b/z", "a/x"]
        assert store.list_keys("a/b") == ["a/b/y", "a/b/z"]
        assert store.list_keys("nothing") == []
        assert store.children() == ["a", "ab", "c"]
        assert store.children("a") == ["b", "x"]
        assert store.children("nothing") == []

    def test_delete(self, store: Store) -> None:
        store.put("d/one", b"1")
        store.put("d/two", b"2")
        store.delete("d/one")
        assert not store.exists("d/one")
        assert store.list_keys("d") == ["d/two"]
        store.delete("d/one")  # already gone: not an error
        store.delete("d/never")

    def test_delete_prefix_stays_inside_its_prefix(self, store: Store) -> None:
        for key in ("p/x", "p/q/y", "pq/z", "p.tif/w"):
            store.put(key, b"x")
        store.delete_prefix("p")
        assert not store.exists("p/x") and not store.exists("p/q/y")
        assert store.list_keys("pq") == ["pq/z"]
        assert store.list_keys("p.tif") == ["p.tif/w"]
        store.delete_prefix("p")  # nothing left: not an error

    def test_delete_objects_leaves_no_emptied_folder(self, store: Store) -> None:
        """A slide's objects deleted with the folders they leave empty, up to the slide's own:
        an emptied folder of a deleted array is what zarr-python warns about when it lists the
        group ("Object at label is not recognized as a component of a Zarr hierarchy")."""
        group = f"{SLIDE}/slide.zarr/associated"
        label = [f"{group}/label/zarr.json", f"{group}/label/c/0/0/0"]
        kept = [f"{group}/zarr.json", f"{group}/thumbnail/c/0/0/0", f"{group}/thumbnail/c/0/0/1"]
        for key in [*label, *kept, f"{OTHER_SLIDE}/x"]:
            store.put(key, b"x")
        store.delete_objects(SLIDE, [*label, f"{group}/thumbnail/c/0/0/0"])
        assert store.list_keys(SLIDE) == [f"{group}/thumbnail/c/0/0/1", f"{group}/zarr.json"]
        assert store.children(group) == ["thumbnail", "zarr.json"]
        assert store.children(f"{group}/thumbnail/c/0/0") == ["1"]
        store.delete_objects(SLIDE, store.list_keys(SLIDE))
        assert store.list_keys(SLIDE) == []
        assert store.children(SLIDE) == []
        store.delete_objects(SLIDE, [f"{group}/zarr.json"])  # already gone: not an error
        with pytest.raises(InvalidArgument):
            store.delete_objects(SLIDE, [f"{OTHER_SLIDE}/x"])
        with pytest.raises(InvalidArgument):
            store.delete_objects(SLIDE, [SLIDE])
        assert store.list_keys(OTHER_SLIDE) == [f"{OTHER_SLIDE}/x"]

    def test_list_keys_names_only_objects(self, store: Store) -> None:
        """Emptied folders are not objects: listing them must not return the folder itself."""
        for key in ("e/x", "e/q/y", "g/z"):
            store.put(key, b"x")
        store.delete_prefix("e")
        store.delete("g/z")
        assert store.list_keys("e", include_temporary=True) == []
        assert store.list_keys("e/q", include_temporary=True) == []
        assert store.list_keys("g", include_temporary=True) == []

    def test_remove_temporaries_keeps_whole_objects(self, store: Store) -> None:
        store.put(f"{SLIDE}/slide.zarr/zarr.json", b"{}")
        with store.open_write(f"{SLIDE}/slide.zarr/0/c/0/0/0") as f:
            f.write(b"shard")
        store.remove_temporaries(SLIDE)
        assert store.list_keys(SLIDE, include_temporary=True) == [
            f"{SLIDE}/slide.zarr/0/c/0/0/0",
            f"{SLIDE}/slide.zarr/zarr.json",
        ]

    # -- slides: the manifest is the commit point -----------------------------------------------

    def test_only_slides_with_a_manifest_are_published(self, store: Store) -> None:
        store.put(f"{SLIDE}/slide.zarr/0/c/0/0/0", b"half a shard")
        assert store.children() == [SLIDE]
        assert store.published_slides() == []
        assert not store.is_published(SLIDE)
        with pytest.raises(SlideNotFound):
            store.read_manifest(SLIDE)

        # A published neighbour is listed, the partial one still is not.
        store.put(f"{OTHER_SLIDE}/slide.zarr/zarr.json", b"{}")
        manifest = {"slide_id": OTHER_SLIDE, "objects": {"slide.zarr/zarr.json": {"size": 2}}}
        store.publish(OTHER_SLIDE, manifest)
        assert store.published_slides() == [OTHER_SLIDE]
        assert store.is_published(OTHER_SLIDE)
        assert store.read_manifest(OTHER_SLIDE) == manifest
        assert store.exists(f"{OTHER_SLIDE}/{MANIFEST}")

    def test_folders_that_are_not_slide_ids_are_not_slides(self, store: Store) -> None:
        store.put(f"Not.A.Slide/{MANIFEST}", b"{}")
        store.put(f"{SLIDE}/{MANIFEST}.bak", b"{}")
        assert store.published_slides() == []

    def test_unpublish_hides_the_slide_and_keeps_its_objects(self, store: Store) -> None:
        store.put(f"{SLIDE}/slide.zarr/zarr.json", b"{}")
        store.publish(SLIDE, {"slide_id": SLIDE})
        store.unpublish(SLIDE)
        assert store.published_slides() == []
        assert not store.is_published(SLIDE)
        assert store.list_keys(SLIDE) == [f"{SLIDE}/slide.zarr/zarr.json"]
        store.unpublish(SLIDE)  # already hidden: not an error

    def test_republishing_replaces_the_manifest(self, store: Store) -> None:
        store.publish(SLIDE, {"version": 1})
        store.publish(SLIDE, {"version": 2})
        assert store.read_manifest(SLIDE) == {"version": 2}
        assert store.published_slides() == [SLIDE]

    def test_manifest_that_is_not_json_is_a_store_error(self, store: Store) -> None:
        store.put(f"{SLIDE}/{MANIFEST}", b"{not json")
        with pytest.raises(StoreError):
            store.read_manifest(SLIDE)

    def test_manifest_is_json_on_disk(self, store: Store) -> None:
        store.publish(SLIDE, {"b": [1, 2], "a": "x"})
        assert json.loads(store.get(f"{SLIDE}/{MANIFEST}")) == {"a": "x", "b": [1, 2]}

    # -- keys -----------------------------------------------------------------------------------

    @pytest.mark.parametrize("key", BAD_KEYS)
    def test_invalid_keys_are_refused(self, store: Store, key: str) -> None:
        calls: list[Callable[[], object]] = [
            lambda: store.put(key, b"x"),
            lambda: store.get(key),
            lambda: store.get_range(key, 0, 1),
            lambda: store.exists(key),
            lambda: store.size(key),
            lambda: store.delete(key),
            lambda: store.delete_prefix(key),
            lambda: store.list_keys(key),
            lambda: store.remove_temporaries(key),
            lambda: store.full_url(key) if key else store.path(key),
        ]
        if key:  # an empty prefix means the root for `children`
            calls.append(lambda: store.children(key))
        for call in calls:
            with pytest.raises(InvalidArgument):
                call()
        with pytest.raises(InvalidArgument), store.open_write(key) as f:
            f.write(b"x")
        assert store.children() == []

    @pytest.mark.parametrize("slide_id", BAD_SLIDE_IDS)
    def test_invalid_slide_ids_are_refused(self, store: Store, slide_id: str) -> None:
        calls: list[Callable[[], object]] = [
            lambda: store.publish(slide_id, {}),
            lambda: store.read_manifest(slide_id),
            lambda: store.is_published(slide_id),
            lambda: store.unpublish(slide_id),
            lambda: store.manifest_key(slide_id),
        ]
        for call in calls:
            with pytest.raises(InvalidArgument):
                call()
        assert store.children() == []

    def test_full_url_names_the_object(self, store: Store) -> None:
        base = store.full_url()
        assert store.full_url("a/b.bin") == f"{base}/a/b.bin"
        assert base.startswith("s3://") == store.settings.is_s3
