"""Where a published slide's objects are: the keys of the manifest, the Zarr group, its arrays
and their shards, relative to the store root, and the slide ids they are built from."""

from __future__ import annotations

import re
from dataclasses import dataclass

from wsi.errors import InvalidArgument

SLIDE_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
"""Whole ids only (`fullmatch`: `$` would also match before a final newline)."""
MANIFEST = "manifest.json"
ZARR_ROOT = "slide.zarr"
METADATA = "zarr.json"
STAGING = "staging-"
"""Prefix of the folder (inside a slide's folder) where a new version is built while the
published one stays readable."""
SHARD = "c/0/0/0"
"""The only chunk key of every array: one shard covers the whole level."""
ASSOCIATED_GROUP = "associated"


def check_slide_id(slide_id: str) -> str:
    """Slide ids are opaque, lower-case and safe as one path segment or object-key segment."""
    if not isinstance(slide_id, str) or not SLIDE_ID.fullmatch(slide_id) or ".." in slide_id:
        raise InvalidArgument(
            "slide id must be 1-64 characters of a-z, 0-9, '.', '_', '-', starting alphanumeric"
        )
    return slide_id


def level_path(index: int) -> str:
    """Array path of pyramid level `index` inside the Zarr group."""
    return str(index)


def associated_path(name: str) -> str:
    """Array path of an associated image inside the Zarr group."""
    return f"{ASSOCIATED_GROUP}/{name}"


@dataclass(frozen=True)
class SlideKeys:
    """The object keys of one slide, relative to the store root.

    `root` is where this version's objects are written: the slide's own folder, or a staging
    folder inside it (`<id>/staging-<run>`) while a new version is built beside the published
    one. The manifest (the commit point) is always `<id>/manifest.json`, and keys in a manifest
    are relative to the root, so staged objects keep them when promoted."""

    slide_id: str
    root: str = ""

    def __post_init__(self) -> None:
        check_slide_id(self.slide_id)
        if not self.root:
            object.__setattr__(self, "root", self.slide_id)
        elif not self.root.startswith(f"{self.slide_id}/{STAGING}"):
            raise InvalidArgument(f"{self.root!r} is not a staging folder of {self.slide_id}")

    def staging(self, run: str) -> SlideKeys:
        """The keys of a version built in `<id>/staging-<run>` (run: a-z0-9)."""
        if not run.isalnum() or not run.isascii():
            raise InvalidArgument(f"bad run id {run!r}")
        return SlideKeys(self.slide_id, f"{self.slide_id}/{STAGING}{run}")

    @property
    def manifest(self) -> str:
        return f"{self.slide_id}/{MANIFEST}"

    @property
    def zarr_root(self) -> str:
        return f"{self.root}/{ZARR_ROOT}"

    @property
    def root_metadata(self) -> str:
        return f"{self.zarr_root}/{METADATA}"

    @property
    def associated_group_metadata(self) -> str:
        return f"{self.zarr_root}/{ASSOCIATED_GROUP}/{METADATA}"

    def array_metadata(self, path: str) -> str:
        """zarr.json of the array at `path` (a level path or an associated path)."""
        return f"{self.zarr_root}/{path}/{METADATA}"

    def shard(self, path: str) -> str:
        """The one shard object of the array at `path`."""
        return f"{self.zarr_root}/{path}/{SHARD}"

    def in_slide(self, key: str) -> str:
        """A store key of this version -> the key relative to the slide (the manifest's form)."""
        head = f"{self.root}/"
        if not key.startswith(head):
            raise InvalidArgument(f"{key!r} is not a key of slide {self.slide_id}")
        return key[len(head) :]

    def in_store(self, key_in_slide: str) -> str:
        """A key relative to the slide (the manifest's form) -> the store key of this version."""
        return f"{self.root}/{key_in_slide}"
