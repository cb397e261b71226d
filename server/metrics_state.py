"""The metrics read from the server's components when scraped (cache, model manager, lockstep,
device memory, queue depth); the table in server/metrics.py lists them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from plinth.server.metrics import Metrics

log = logging.getLogger("plinth.metrics")


class StateCollector(Collector):
    """Reads the attached components' state when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        components = self._metrics.components
        if components is None:
            return
        ns = self._metrics.namespace

        def gauge(name: str, doc: str, value: Callable[[], float]) -> Iterator[Metric]:
            try:
                v = float(value())
            except Exception:  # one unreadable value must not spoil the whole scrape
                log.debug("metrics: could not read %s", name, exc_info=True)
                return
            family = GaugeMetricFamily(f"{ns}_{name}", doc)
            family.add_metric([], v)
            yield family

        def counter(name: str, doc: str, value: Callable[[], float]) -> Iterator[Metric]:
            try:
                v = float(value())
            except Exception:
                log.debug("metrics: could not read %s", name, exc_info=True)
                return
            family = CounterMetricFamily(f"{ns}_{name}", doc)
            family.add_metric([], v)
            yield family

        yield from gauge("queue_depth", "Jobs waiting in the queue.", lambda: len(components.jobs.queue))
        cache = getattr(components, "cache", None)
        if cache is not None:
            yield from counter("cache_hits", "Output cache lookups that found the node's output.", lambda: cache.hits)
            yield from counter("cache_misses", "Output cache lookups that ran the node.", lambda: cache.misses)
            yield from gauge("cache_bytes", "Bytes held by the output cache.", lambda: cache.bytes_used)
            yield from gauge("cache_max_bytes", "The output cache's byte budget.", lambda: cache.max_bytes)
            yield from gauge("cache_entries", "Node outputs in the output cache.", lambda: len(cache))
        models = getattr(components, "models", None)
        if models is not None:
            yield from counter(
                "model_loads", "Models loaded (cache misses of the model manager).", lambda: models.loads
            )
            yield from gauge(
                "model_memory_bytes",
                "Bytes of loaded models (model manager).",
                lambda: _retry(lambda: models.bytes_used),
            )
            yield from gauge("model_budget_bytes", "The model manager's byte budget.", lambda: models.budget_bytes)
            yield from gauge(
                "model_offloaded_bytes",
                "Bytes of models moved off the device to RAM.",
                lambda: _retry(lambda: models.offloaded_bytes),
            )
        lockstep = getattr(components, "lockstep", None)
        if lockstep is not None:
            yield from counter(
                "batched_forwards",
                "UNet forwards run for jobs side by side (batch_jobs > 1).",
                lambda: lockstep.stats.forwards,
            )
            yield from counter(
                "batched_calls",
                "Sampler UNet calls those forwards served; calls / forwards is the mean batch.",
                lambda: lockstep.stats.calls,
            )
        device = getattr(components, "device", None)
        if getattr(device, "type", "") == "cuda":
            import torch

            yield from gauge(
                "device_memory_allocated_bytes",
                "Bytes of device memory torch has allocated.",
                lambda: torch.cuda.memory_allocated(device),
            )
            yield from gauge(
                "device_memory_reserved_bytes",
                "Bytes of device memory torch's allocator holds.",
                lambda: torch.cuda.memory_reserved(device),
            )


def _retry(read: Callable[[], float], tries: int = 3) -> float:
    """ModelManager.bytes_used iterates its dict without the lock (taking the lock would wait out
    a whole model load); a load or eviction meanwhile makes the iteration fail: read again."""
    for attempt in range(tries):
        try:
            return read()
        except RuntimeError:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")
