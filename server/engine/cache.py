"""The output cache: node outputs by cache key, least recently used first out, bounded in bytes.

It is kept across jobs, so a graph that changes only its seed re-runs only what depends on the
seed. Models are not in here (loader outputs are handles); the model manager holds weights.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from typing import Any

import torch

from plinth.nodes.core.context import ImageRef

SMALL_OBJECT = 64  # bytes charged for a value that holds no tensor or image


def size_of(value: Any) -> int:
    """Approximate bytes held by a node output: tensors, PNGs and what contains them."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, ImageRef):
        return len(value.png) + SMALL_OBJECT
    if isinstance(value, (list, tuple)):
        return sum(size_of(v) for v in value) + SMALL_OBJECT
    if isinstance(value, dict):
        return sum(size_of(v) for v in value.values()) + SMALL_OBJECT
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(size_of(getattr(value, f.name)) for f in dataclasses.fields(value)) + SMALL_OBJECT
    return SMALL_OBJECT


class OutputCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: str, value: Any) -> None:
        size = size_of(value)
        with self._lock:
            if key in self._entries:
                self._bytes -= self._entries.pop(key)[1]
            if size > self.max_bytes:
                return
            while self._entries and self._bytes + size > self.max_bytes:
                self._bytes -= self._entries.popitem(last=False)[1][1]
            self._entries[key] = (value, size)
            self._bytes += size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)
