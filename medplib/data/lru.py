"""A least-recently-used map bounded by the bytes of its values.

Preprocessing keeps each worker process's decoded masks and encoded image views in these, so a file shared by
many rows is decoded once per process while the memory a worker holds stays bounded on any dataset size.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class BoundedCache(Generic[V]):
    """`get` / `put` by key; past `max_bytes` (the sum of the `nbytes` given to `put`) the least recently used
    entries go. A value larger than the whole budget is not kept."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: Hashable, value: V, nbytes: int) -> None:
        if key in self._entries:
            self.nbytes -= self._entries.pop(key)[1]
        if nbytes > self.max_bytes:
            return
        self._entries[key] = (value, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.nbytes -= dropped
