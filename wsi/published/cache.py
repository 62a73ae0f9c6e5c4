"""A least-recently-used cache bounded by the bytes its values hold (stored tiles, decoded pixels,
shard indexes): memory stays within a budget whatever the tile sizes are."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from wsi.errors import InvalidArgument

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def nbytes(value: object) -> int:
    """The bytes a cached value holds: `len` of bytes-like values, `.nbytes` of arrays."""
    if isinstance(value, bytes | bytearray):
        return len(value)
    if isinstance(value, np.ndarray | memoryview):
        return int(value.nbytes)
    raise TypeError(f"cannot size a {type(value).__name__}: pass a size function")


@dataclass(frozen=True)
class CacheStats:
    """Counters of one cache (for metrics)."""

    hits: int
    misses: int
    used: int
    """Sum of the sizes of the values held (bytes, with the default size function)."""
    budget: int
    entries: int
    evictions: int


class ByteLRU(Generic[K, V]):
    """Least-recently-used values within `budget` (as counted by `size`, bytes by default).

    A value larger than the whole budget is not kept (so a budget of 0 disables the cache).
    Safe to share between threads: every operation takes one lock, held for dictionary work only.
    """

    def __init__(self, budget: int, size: Callable[[V], int] = nbytes) -> None:
        if budget < 0:
            raise InvalidArgument(f"cache budget must be >= 0, got {budget}")
        self.budget = budget
        self._size = size
        self._items: collections.OrderedDict[K, tuple[V, int]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.used = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: K) -> V | None:
        """The value of `key` (now the most recently used), or None; counts a hit or a miss."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def get_if_held(self, key: K) -> V | None:
        """`get` for a caller that falls back to one that counts: a hit is counted here, a
        miss is left to the fallback's `get` (each request counts once)."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: K, value: V) -> None:
        """Keep `value` under `key`, dropping the least recently used values beyond the budget."""
        size = self._size(value)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.used -= old[1]
            if size > self.budget:
                return
            self._items[key] = (value, size)
            self.used += size
            while self.used > self.budget:
                _, (_, dropped) = self._items.popitem(last=False)
                self.used -= dropped
                self.evictions += 1

    def pop(self, key: K) -> V | None:
        """Remove `key`; its value, or None when absent."""
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return None
            self.used -= item[1]
            return item[0]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.used = 0

    def __contains__(self, key: object) -> bool:
        """Membership without touching recency or counters."""
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                self.hits, self.misses, self.used, self.budget, len(self._items), self.evictions
            )
