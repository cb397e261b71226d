"""The model manager: loaded models by key, least recently used evicted first, under a budget.

Loader nodes output ModelHandles; nodes resolve them here, so weights are loaded once and shared
by every job and every graph that names the same model, and never pinned by the output cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from plinth.nodes.context import ModelHandle

log = logging.getLogger("plinth.models")


def model_bytes(model: Any) -> int:
    """Memory a loaded model holds: its own nbytes() when it has one, else a torch module's
    parameters and buffers; 0 for anything else."""
    if hasattr(model, "nbytes") and callable(model.nbytes):
        return int(model.nbytes())
    import torch

    if isinstance(model, torch.nn.Module):
        return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return 0


class ModelTooLarge(RuntimeError):
    """A model does not fit the memory budget even with every other model unloaded."""


@dataclass
class LoadedModel:
    key: str
    model: Any
    nbytes: int
    load_seconds: float


class ModelManager:
    def __init__(self, budget_bytes: int, device: Any = None, offload_budget_bytes: int = 0) -> None:
        self.budget_bytes = budget_bytes
        self.device = device
        self.offload_budget_bytes = offload_budget_bytes
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.RLock()
        self.loads = 0

    def get(self, handle: ModelHandle) -> Any:
        with self._lock:
            entry = self._loaded.get(handle.key)
            if entry is not None:
                self._loaded.move_to_end(handle.key)
                return entry.model
            start = time.perf_counter()
            model = handle.load()
            nbytes = model_bytes(model)
            if nbytes > self.budget_bytes:
                raise ModelTooLarge(f"model {handle.key} needs {nbytes / 2**30:.2f} GiB, more than the "
                                    f"model memory budget of {self.budget_bytes / 2**30:.2f} GiB")
            while self._loaded and self.bytes_used + nbytes > self.budget_bytes:
                evicted = self._loaded.popitem(last=False)[1]
                log.info("unloaded %s (%d MiB) to make room for %s", evicted.key, evicted.nbytes >> 20, handle.key)
            base = handle.key.split("@")[0]
            for stale in [k for k in self._loaded if k.split("@")[0] == base]:
                del self._loaded[stale]  # the same file, since replaced
            entry = LoadedModel(handle.key, model, nbytes, time.perf_counter() - start)
            self._loaded[handle.key] = entry
            self.loads += 1
            log.info("loaded %s (%d MiB) in %.2f s", handle.key, nbytes >> 20, entry.load_seconds)
            return model

    def unload(self, key: str) -> bool:
        with self._lock:
            return self._loaded.pop(key, None) is not None

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._loaded.values())

    @property
    def bytes_used(self) -> int:
        return sum(e.nbytes for e in self._loaded.values())
