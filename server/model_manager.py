"""The model manager: loaded models by key, least recently used evicted first, under a budget.

Loader nodes output ModelHandles; nodes resolve them here, so weights are loaded once and shared
by every job and every graph that names the same model, and never pinned by the output cache.

Two tiers on an accelerator: with a device other than the CPU and an offload budget, a model
evicted from the device budget moves to the CPU (an "offloaded" LRU under offload_budget_bytes,
dropped past it), and a get() of an offloaded model moves it back (after making room) instead of
reading it from disk again. On the CPU, or with no offload budget, eviction drops the model.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from plinth.nodes.core.context import ModelHandle

log = logging.getLogger("plinth.models")

# mover(model, device) -> True when the model's weights now live on `device` (moved in place),
# False when it cannot be moved (then it is dropped rather than kept in the offloaded tier).
Mover = Callable[[Any, Any], bool]


def model_bytes(model: Any) -> int:
    """Memory a loaded model holds: its own nbytes() when it has one, else a torch module's
    parameters and buffers; 0 for anything else."""
    if hasattr(model, "nbytes") and callable(model.nbytes):
        return int(model.nbytes())
    import torch

    if isinstance(model, torch.nn.Module):
        return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return 0


def move_model(model: Any, device: Any) -> bool:
    """The default mover: a torch module, or any object with a `.to(device)` that moves it in
    place (StableDiffusion has one); anything else cannot be moved."""
    import torch

    if isinstance(model, torch.nn.Module):
        model.to(device)
        return True
    to = getattr(model, "to", None)
    if callable(to):
        to(device)
        return True
    return False


class ModelTooLarge(RuntimeError):
    """A model does not fit the memory budget even with every other model unloaded."""


@dataclass
class LoadedModel:
    key: str
    model: Any
    nbytes: int
    load_seconds: float
    device: str = ""  # where its weights are: the manager's device, or "cpu" when offloaded


def _device_type(device: Any) -> str:
    if device is None:
        return "cpu"
    return str(getattr(device, "type", None) or str(device).split(":")[0])


class ModelManager:
    def __init__(
        self, budget_bytes: int, device: Any = None, offload_budget_bytes: int = 0, mover: Mover | None = None
    ) -> None:
        self.budget_bytes = budget_bytes
        self.device = device
        self.offload_budget_bytes = offload_budget_bytes
        self.mover: Mover = mover or move_model
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()  # on the device, LRU first
        self._offloaded: OrderedDict[str, LoadedModel] = OrderedDict()  # moved to the CPU, LRU first
        self._lock = threading.RLock()
        # Keys each running job got (job_scope), by job: never moved out while it runs. A job
        # runs on one thread (jobs side by side each on their own), so get() finds its set there.
        self._scopes: list[set[str]] = []
        self._scope = threading.local()
        self.loads = 0  # reads from disk
        self.restores = 0  # offloaded models moved back to the device

    @property
    def two_tier(self) -> bool:
        return self.offload_budget_bytes > 0 and _device_type(self.device) != "cpu"

    def get(self, handle: ModelHandle) -> Any:
        with self._lock:
            key = handle.key
            scope = getattr(self._scope, "keys", None)
            if scope is not None:
                scope.add(key)
            entry = self._loaded.get(key)
            if entry is not None:
                self._loaded.move_to_end(key)
                return entry.model
            entry = self._offloaded.pop(key, None)
            if entry is not None:
                start = time.perf_counter()
                self._make_room(entry.nbytes, key)
                try:
                    self.mover(entry.model, self.device)
                except Exception:  # e.g. out of device memory: it stays offloaded
                    self._offloaded[key] = entry
                    raise
                entry.device = str(self.device)
                self._loaded[key] = entry
                self.restores += 1
                log.info(
                    "moved %s (%d MiB) back to %s in %.2f s",
                    key,
                    entry.nbytes >> 20,
                    self.device,
                    time.perf_counter() - start,
                )
                return entry.model
            start = time.perf_counter()
            model = handle.load()
            nbytes = model_bytes(model)
            if nbytes > self.budget_bytes:
                raise ModelTooLarge(
                    f"model {key} needs {nbytes / 2**30:.2f} GiB, more than the "
                    f"model memory budget of {self.budget_bytes / 2**30:.2f} GiB"
                )
            base = key.split("@")[0]
            for tier in (self._loaded, self._offloaded):
                for stale in [k for k in tier if k.split("@")[0] == base]:
                    del tier[stale]  # the same file, since replaced
            self._make_room(nbytes, key)
            entry = LoadedModel(
                key, model, nbytes, time.perf_counter() - start, str(self.device) if self.device is not None else ""
            )
            self._loaded[key] = entry
            self.loads += 1
            log.info("loaded %s (%d MiB) in %.2f s", key, nbytes >> 20, entry.load_seconds)
            return model

    def _make_room(self, nbytes: int, for_key: str) -> None:
        """Evict least recently used device models until `nbytes` more fit the budget; models
        the running job holds (job_scope) stay, even past the budget, until the job ends."""
        in_use = self._in_use()
        while self.bytes_used + nbytes > self.budget_bytes:
            victim = next((k for k in self._loaded if k not in in_use and k != for_key), None)
            if victim is None:
                if self._loaded and nbytes:
                    log.warning(
                        "model memory over budget for %s: %d MiB in use by the running job",
                        for_key,
                        self.bytes_used >> 20,
                    )
                return
            self._evict(self._loaded.pop(victim), for_key)

    def _evict(self, entry: LoadedModel, for_key: str) -> None:
        reason = f"to make room for {for_key}" if for_key else "over budget"
        if not self.two_tier or entry.nbytes > self.offload_budget_bytes:
            log.info("unloaded %s (%d MiB) %s", entry.key, entry.nbytes >> 20, reason)
            return
        while self._offloaded and self.offloaded_bytes + entry.nbytes > self.offload_budget_bytes:
            dropped = self._offloaded.popitem(last=False)[1]
            log.info(
                "unloaded %s (%d MiB) from the CPU to make room for %s", dropped.key, dropped.nbytes >> 20, entry.key
            )
        try:
            moved = self.mover(entry.model, "cpu")
        except Exception:  # e.g. out of host memory: dropping is always possible
            log.warning("could not offload %s to the CPU; unloaded it", entry.key, exc_info=True)
            return
        if not moved:
            log.info("unloaded %s (%d MiB) %s (it cannot move to the CPU)", entry.key, entry.nbytes >> 20, reason)
            return
        entry.device = "cpu"
        self._offloaded[entry.key] = entry
        log.info("offloaded %s (%d MiB) to the CPU %s", entry.key, entry.nbytes >> 20, reason)

    @contextlib.contextmanager
    def job_scope(self) -> Iterator[None]:
        """Around one job's run, on the thread that runs it: models it gets are not moved off
        the device while it runs (a node may hold one while getting another); the budget is
        enforced again when it ends."""
        keys: set[str] = set()
        with self._lock:
            self._scopes.append(keys)
        self._scope.keys = keys
        try:
            yield
        finally:
            self._scope.keys = None
            with self._lock:
                self._scopes = [k for k in self._scopes if k is not keys]  # by identity: sets may be equal
                self._make_room(0, "")

    def _in_use(self) -> set[str]:
        return set().union(*self._scopes)

    def unload(self, key: str) -> bool:
        with self._lock:
            found = self._loaded.pop(key, None) is not None
            return (self._offloaded.pop(key, None) is not None) or found

    def loaded(self) -> list[LoadedModel]:
        """Every model held, offloaded ones (device "cpu") first, then the device's, each tier
        least recently used first."""
        with self._lock:
            return [*self._offloaded.values(), *self._loaded.values()]

    def free_memory(self, unload_device_models: bool = False) -> int:
        """Release what memory can be released now: drop the offloaded models (and, when asked,
        every device model the running job is not using), collect garbage and return cached
        CUDA blocks to the driver. Returns the bytes of models dropped. Call it on an out-of-
        memory error before failing or retrying."""
        with self._lock:
            dropped = self.offloaded_bytes
            self._offloaded.clear()
            if unload_device_models:
                in_use = self._in_use()
                for key in [k for k in self._loaded if k not in in_use]:
                    dropped += self._loaded.pop(key).nbytes
        gc.collect()
        import torch

        if _device_type(self.device) == "cuda" and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        if dropped:
            log.info("freed %d MiB of models", dropped >> 20)
        return dropped

    @property
    def bytes_used(self) -> int:
        """Bytes of models on the device (the budgeted tier)."""
        return sum(e.nbytes for e in self._loaded.values())

    @property
    def offloaded_bytes(self) -> int:
        return sum(e.nbytes for e in self._offloaded.values())
