"""Prometheus metrics for a running server, on their own HTTP port.

    metrics = Metrics(server.components)      # its own registry: several servers per process
    port, stop = metrics.start_http(9400, "0.0.0.0")   # GET /metrics; port 0 picks one

The server's components do not import this module. Metrics learns about jobs in two ways:

- events: `observe(job, event)` is called with every event of every job (the job manager's
  observer hook calls it; see `attach`); counters and histograms are updated from them.
- state: gauges and the cache/model counters are read from the components when scraped
  (queue length, running jobs, output cache, model manager), so they are never stale.

Names (all prefixed `plinth_`):

| metric | type | labels | from |
|---|---|---|---|
| queue_depth | gauge | | len(components.jobs.queue) |
| jobs_running | gauge | | jobs between Started and their terminal event |
| jobs_queued_total | counter | | Queued events |
| jobs_total | counter | status (completed, failed, cancelled) | terminal events |
| job_duration_seconds | histogram | status | created (queued) to finished |
| job_run_seconds | histogram | status | started running to finished |
| job_queue_wait_seconds | histogram | | created to Started |
| node_duration_seconds | histogram | class_type | NodeFinished.seconds |
| node_executions_total | counter | class_type, outcome (executed, cached, failed) | NodeFinished, NodeCached, Failed |
| cache_hits_total, cache_misses_total | counter | | components.cache |
| cache_bytes, cache_max_bytes, cache_entries | gauge | | components.cache |
| model_loads_total | counter | | components.models.loads |
| model_memory_bytes, model_budget_bytes | gauge | | components.models |
| model_offloaded_bytes | gauge | | components.models (models moved off the GPU to RAM) |
| batched_forwards_total, batched_calls_total | counter | | components.lockstep (batch_jobs > 1): forwards, calls |
| device_memory_allocated_bytes, device_memory_reserved_bytes | gauge | | torch.cuda, CUDA only |

plus the standard `process_*` family (process_resident_memory_bytes is the RSS; Linux).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    make_wsgi_app,
)

from plinth.server.engine import events as ev
from plinth.server.metrics_state import StateCollector

log = logging.getLogger("plinth.metrics")

# Seconds: the tiny model's nodes take milliseconds, real models' samplers and whole jobs tens
# of seconds to minutes (with time spent queued).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    float("inf"),
)

FINAL_STATUSES = ("completed", "failed", "cancelled")
_FINAL = {ev.Completed: "completed", ev.Failed: "failed", ev.Cancelled: "cancelled"}

Observer = Callable[[Any, ev.Event], None]


class Metrics:
    """Everything Plinth exports, in a registry of its own (`self.registry`).

    `components` (plinth.server.components.Components, or anything with the same attributes)
    are read at scrape time; without them only the event-driven metrics and process_* are
    exported. With `subscribe`, `attach` also appends `self.observe` to the job manager's
    `observers` list (components.jobs.observers), so events arrive without further wiring.
    """

    def __init__(
        self,
        components: Any = None,
        *,
        namespace: str = "plinth",
        process: bool = True,
        subscribe: bool = True,
        buckets: Iterable[float] = LATENCY_BUCKETS,
    ) -> None:
        self.registry = CollectorRegistry()
        self.namespace = namespace
        self.components: Any = None
        buckets = tuple(buckets)
        r, ns = self.registry, namespace
        self.jobs_queued = Counter("jobs_queued", "Jobs accepted into the queue.", namespace=ns, registry=r)
        self.jobs = Counter("jobs", "Jobs finished, by final status.", ["status"], namespace=ns, registry=r)
        self.job_duration = Histogram(
            "job_duration_seconds",
            "Time from queued to finished, by final status.",
            ["status"],
            namespace=ns,
            buckets=buckets,
            registry=r,
        )
        self.job_run = Histogram(
            "job_run_seconds",
            "Time from starting to run to finished, by final status (jobs cancelled while queued never ran).",
            ["status"],
            namespace=ns,
            buckets=buckets,
            registry=r,
        )
        self.queue_wait = Histogram(
            "job_queue_wait_seconds", "Time from queued to starting to run.", namespace=ns, buckets=buckets, registry=r
        )
        self.node_duration = Histogram(
            "node_duration_seconds",
            "Time a node took to run (cache misses), by class_type.",
            ["class_type"],
            namespace=ns,
            buckets=buckets,
            registry=r,
        )
        self.node_executions = Counter(
            "node_executions",
            "Nodes gone through, by class_type and outcome: executed, cached (output cache hit) or failed.",
            ["class_type", "outcome"],
            namespace=ns,
            registry=r,
        )
        self._running: set[str] = set()  # ids of jobs between Started and their terminal event
        self._running_lock = threading.Lock()
        running = Gauge("jobs_running", "Jobs running now.", namespace=ns, registry=r)
        running.set_function(lambda: len(self._running))
        for status in FINAL_STATUSES:  # exported as 0 before the first job of each kind
            self.jobs.labels(status)
        if process:
            ProcessCollector(registry=r)
        self._collector = StateCollector(self)
        r.register(self._collector)
        if components is not None:
            self.attach(components, subscribe=subscribe)

    def attach(self, components: Any, subscribe: bool = True) -> None:
        """Export the components' state; with `subscribe`, observe their jobs' events through
        the job manager's `observers` list when it has one."""
        self.components = components
        observers = getattr(getattr(components, "jobs", None), "observers", None)
        if subscribe and isinstance(observers, list) and self.observe not in observers:
            observers.append(self.observe)

    def detach(self) -> None:
        observers = getattr(getattr(self.components, "jobs", None), "observers", None)
        if isinstance(observers, list) and self.observe in observers:
            observers.remove(self.observe)
        self.components = None

    # events

    def observe(self, job: Any, event: ev.Event) -> None:
        """Count one event of `job` (a plinth.server.jobs.job.Job). Called for every event as it
        is emitted, possibly under the job's lock, so it is quick and never raises."""
        try:
            self._observe(job, event)
        except Exception:  # metrics must never break a job
            log.warning("metrics: could not observe %r", event, exc_info=True)

    def _observe(self, job: Any, event: ev.Event) -> None:
        p = event.payload
        if isinstance(p, ev.NodeFinished):
            self.node_executions.labels(p.class_type, "executed").inc()
            self.node_duration.labels(p.class_type).observe(max(0.0, p.seconds))
        elif isinstance(p, ev.NodeCached):
            self.node_executions.labels(p.class_type, "cached").inc()
        elif isinstance(p, ev.Queued):
            self.jobs_queued.inc()
        elif isinstance(p, ev.Started):
            with self._running_lock:
                self._running.add(event.job_id)
            created = getattr(job, "created_at", 0.0)
            if created:
                self.queue_wait.observe(max(0.0, event.time - created))
        elif isinstance(p, ev.TERMINAL):
            status = _FINAL[type(p)]
            with self._running_lock:
                self._running.discard(event.job_id)
            self.jobs.labels(status).inc()
            if isinstance(p, ev.Failed) and p.class_type:
                self.node_executions.labels(p.class_type, "failed").inc()
            created = getattr(job, "created_at", 0.0)
            if created:
                self.job_duration.labels(status).observe(max(0.0, event.time - created))
            started = getattr(job, "started_at", 0.0)
            if started:
                self.job_run.labels(status).observe(max(0.0, event.time - started))

    # exposition

    def render(self) -> bytes:
        """The exposition text, as GET /metrics returns it."""
        return generate_latest(self.registry)

    def start_http(self, port: int = 0, host: str = "127.0.0.1") -> tuple[int, Callable[[], None]]:
        """Serve GET /metrics from this registry on host:port; see `start_http`."""
        return start_http(self.registry, port, host)


# HTTP


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no access log on stderr
        pass


def start_http(registry: CollectorRegistry, port: int = 0, host: str = "127.0.0.1") -> tuple[int, Callable[[], None]]:
    """Serve GET /metrics (any other path: 404) on host:port from a daemon thread. Returns the
    bound port (port 0 picks a free one) and a function that stops the server."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") in ("/metrics", "/metrics/"):
            return metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: metrics are at /metrics\n"]

    bind = host.strip("[]")
    family = socket.getaddrinfo(bind or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("_MetricsServer", (_Server,), {"address_family": family})
    httpd = make_server(bind, port, app, server_class, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="plinth-metrics", daemon=True)
    thread.start()
    bound = httpd.server_address[1]
    log.info("metrics on http://%s:%d/metrics", f"[{bind}]" if ":" in bind else bind, bound)
    stopped = threading.Event()

    def stop() -> None:
        if stopped.is_set():
            return
        stopped.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)

    return bound, stop
