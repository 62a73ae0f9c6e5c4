"""A map-style dataset of patches of a published slide, for PyTorch's DataLoader and for code
without PyTorch.

It follows the protocol `torch.utils.data.Dataset` describes (`__len__`, `__getitem__`) without
importing torch. DataLoader worker processes get the dataset pickled (spawn) or copied by fork:
neither may carry an open reader, whose event-loop thread and thread pool do not exist in the
worker. So the slide is opened lazily, in the process that first reads an item; pickling drops
it; and a copy made by fork notices the other process id and opens its own.

`__getitems__` (which DataLoader's automatic batching calls when a dataset has it) reads a whole
batch with one `patches` call, so tiles shared by the batch's patches are decoded once and the
batch is decoded on the reader's threads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi.errors import InvalidArgument
from wsi.published.patches import PatchSettings, as_coords, patch_size
from wsi.published.values import ReaderSettings

if TYPE_CHECKING:
    from wsi.published.sync import PublishedSlide

_FORKED: list[object] = []
"""Readers inherited through fork: their threads are gone, so they are neither used nor closed
(closing would wait for a loop thread that does not exist); kept referenced so that collecting
them does not run finalisers that expect those threads."""


def to_chw_float(patch: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 -> (3, h, w) float32 in [0, 1]: the layout and range vision models take.
    DataLoader's default collation turns a batch of these into a float tensor."""
    return np.ascontiguousarray(patch.transpose(2, 0, 1), dtype=np.float32) / np.float32(255)


class PatchDataset:
    """Patches of one published slide at given positions: item `i` is the patch of `level` whose
    top-left corner is `coords[i]` (pixels of that level), `size` pixels (an int or (width,
    height)), as (h, w, 3) uint8 RGB, or whatever `transform` makes of it (`to_chw_float`, a
    torchvision transform...). With `labels`, items are (patch, labels[i]).

    Several slides: one dataset each, joined with `torch.utils.data.ConcatDataset`. Call `close`
    (or use `with`) to release the reader of this process.
    """

    def __init__(
        self,
        location: str,
        level: int,
        coords: Any,
        size: int | tuple[int, int],
        *,
        transform: Callable[[np.ndarray], Any] | None = None,
        labels: Sequence[Any] | None = None,
        s3_endpoint: str | None = None,
        settings: ReaderSettings | None = None,
        patch_settings: PatchSettings | None = None,
    ) -> None:
        self.location = location
        self.level = level
        self.coords = as_coords(coords)
        self.size = patch_size(size)
        self.transform = transform
        self.labels = labels
        self.s3_endpoint = s3_endpoint
        self.settings = settings
        self.patch_settings = patch_settings
        if labels is not None and len(labels) != len(self.coords):
            raise InvalidArgument(f"{len(labels)} labels for {len(self.coords)} patches")
        self._slide: PublishedSlide | None = None
        self._pid: int | None = None
        with self.slide as slide:  # fails here, not in a worker: the level, the patch size
            slide.patches(level, np.zeros((0, 2), np.int64), self.size)
        self._slide = None  # no reader threads to copy when DataLoader forks its workers

    @property
    def slide(self) -> PublishedSlide:
        """The reader of this process, opened on first use (and again after a fork)."""
        if self._slide is not None and self._pid == os.getpid():
            return self._slide
        if self._slide is not None:
            _FORKED.append(self._slide)
        from wsi.published.sync import open_published

        self._slide = open_published(
            self.location, s3_endpoint=self.s3_endpoint, settings=self.settings
        )
        self._pid = os.getpid()
        return self._slide

    def __len__(self) -> int:
        return len(self.coords)

    def _item(self, index: int, patch: np.ndarray) -> Any:
        sample = self.transform(patch) if self.transform is not None else patch
        return (sample, self.labels[index]) if self.labels is not None else sample

    def _index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is outside 0..{len(self) - 1}")
        return index % len(self)

    def __getitem__(self, index: int) -> Any:
        index = self._index(index)
        [patch] = self.slide.patches(
            self.level, self.coords[index : index + 1], self.size, self.patch_settings
        )
        return self._item(index, patch)

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """Many items with one `patches` call (DataLoader's automatic batching uses this)."""
        numbers = [self._index(int(i)) for i in indices]
        patches = self.slide.patches(
            self.level, self.coords[numbers], self.size, self.patch_settings
        )
        return [self._item(i, patch) for i, patch in zip(numbers, patches, strict=True)]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_slide"] = None
        state["_pid"] = None
        return state

    def close(self) -> None:
        """Close the reader of this process (a later read opens it again)."""
        slide, self._slide = self._slide, None
        if slide is not None and self._pid == os.getpid():
            slide.close()

    def __enter__(self) -> PatchDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<PatchDataset {self.location} level {self.level}: {len(self)} patches "
            f"of {self.size[0]}x{self.size[1]}>"
        )
