"""A small bounded, thread-safe map for state carried between two signals."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class BoundedStore(Generic[V]):
    """Insertion-ordered map that evicts its oldest entries beyond ``capacity``.

    Between-signal state must be cleaned up even when the closing signal never comes (a publish
    that raised, a pool child killed mid-task): eviction is that cleanup, and ``on_evict`` lets
    the owner end whatever the entry held.
    """

    def __init__(self, capacity: int, on_evict: Callable[[str, V], None] | None = None) -> None:
        self._items: OrderedDict[str, V] = OrderedDict()
        self._capacity = capacity
        self._on_evict = on_evict
        self._lock = threading.Lock()

    def put(self, key: str, value: V) -> None:
        evicted: list[tuple[str, V]] = []
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._capacity:
                evicted.append(self._items.popitem(last=False))
        if self._on_evict is not None:
            for item in evicted:
                self._on_evict(*item)

    def pop(self, key: str) -> V | None:
        with self._lock:
            return self._items.pop(key, None)

    def get(self, key: str) -> V | None:
        return self._items.get(key)

    def pop_older(self, is_old: Callable[[V], bool]) -> list[tuple[str, V]]:
        """Remove and return the oldest entries while ``is_old`` holds for them."""
        out: list[tuple[str, V]] = []
        with self._lock:
            while self._items:
                value = next(iter(self._items.values()))
                if not is_old(value):
                    break
                out.append(self._items.popitem(last=False))
        return out

    def __len__(self) -> int:
        return len(self._items)
