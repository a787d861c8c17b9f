"""A bounded cache for the tokenize/detokenize hot paths, shared by every token service."""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from typing import Any


class BoundedCache:
    """Two generations of ``{namespace: {key: value}}``, at most `capacity` entries in all.

    Lookups are one C-level ``map(dict.get, keys)`` on the hot path; when the newer
    generation fills up it becomes the older one and the oldest is dropped, so entries used
    since the last rollover survive and memory never exceeds the bound.
    """

    __slots__ = ("_cold", "_half", "_hot", "_hot_size", "_lock")

    def __init__(self, capacity: int) -> None:
        self._half = max(capacity // 2, 0)
        self._hot: dict[Hashable, dict[Any, str]] = {}
        self._cold: dict[Hashable, dict[Any, str]] = {}
        self._hot_size = 0
        self._lock = threading.Lock()

    def lookup(self, namespace: Hashable, keys: list[Any]) -> list[str | None]:
        hot = self._hot.get(namespace)
        out: list[str | None] = list(map(hot.get, keys)) if hot else [None] * len(keys)
        cold = self._cold.get(namespace)
        if cold and out.count(None) > keys.count(None):
            promote = []
            for i, (k, v) in enumerate(zip(keys, out, strict=True)):
                if v is None and k is not None:
                    v = cold.get(k)
                    if v is not None:
                        out[i] = v
                        promote.append((k, v))
            self.store(namespace, promote)
        return out

    def store(self, namespace: Hashable, items: Sequence[tuple[Any, str]]) -> None:
        if self._half == 0 or not items:
            return
        with self._lock:
            hot = self._hot.setdefault(namespace, {})
            if self._hot_size + len(items) < self._half:
                # No rollover possible: one C-level update (hot path).
                before = len(hot)
                hot.update(items)
                self._hot_size += len(hot) - before
                return
            for k, v in items:
                if k not in hot:
                    self._hot_size += 1
                hot[k] = v
                if self._hot_size >= self._half:
                    self._cold, self._hot, self._hot_size = self._hot, {}, 0
                    hot = self._hot.setdefault(namespace, {})

    def clear(self) -> None:
        """Drop every entry (a vault erased something: no entry may be served again)."""
        with self._lock:
            self._hot, self._cold, self._hot_size = {}, {}, 0

    def __len__(self) -> int:
        return sum(map(len, self._hot.values())) + sum(map(len, self._cold.values()))
