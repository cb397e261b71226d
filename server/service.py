"""The server's core without gRPC: validate and queue jobs, run them on a worker thread (one at
a time, or up to batch_jobs side by side with their sampler steps batched: see
server/engine/batching.py), and keep them for GetJob, Watch and ListJobs: live and recent ones
in memory, every one in the job store (data_dir/jobs.sqlite3), which is what survives a restart.

Restart policy: jobs the previous process left queued or running are marked failed ("server
stopped while the job was queued/running"), never run again (their uploaded images are not
kept). A graceful stop() cancels them instead, with the same reasons.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from plinth.nodes.core.context import ModelOptions
from plinth.nodes.core.registry import NODES
from plinth.server.config import Config, ConfigError, Limits
from plinth.server.engine import events as ev
from plinth.server.engine.batching import Lockstep
from plinth.server.engine.cache import OutputCache
from plinth.server.engine.executor import Executor
from plinth.server.engine.graph import Graph, GraphError, GraphValidationError, load_json, parse_graph
from plinth.server.engine.validate import LimitExceeded, validate
from plinth.server.engine.workflow import is_editor_workflow, to_api_format
from plinth.server.jobs.job import Job, JobStatus, stopped_reason
from plinth.server.jobs.queue import JobQueue
from plinth.server.jobs.store import JobStore
from plinth.server.logs import job_context
from plinth.server.models.manager import ModelManager
from plinth.server.workspace import JobResources, Workspace

log = logging.getLogger("plinth.service")


def _default_model_budget(device: torch.device) -> int:
    """Half of the memory models live in (the GPU's, or RAM): room for weights beside
    activations and the output cache."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1] // 2
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str, precision: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The device (CUDA when there is one, for "auto") and the dtype models run in: float16 on
    CUDA and float32 on the CPU unless `precision` names one (bfloat16 takes half the time of
    float32 on this project's CPU and moves pixels by 0.84 levels of 255 on average, 8 at most:
    bench/compare.py --compare-precision)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if precision == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of auto, {', '.join(PRECISIONS)}")
    if precision == "float16" and device.type == "cpu":
        raise ConfigError("precision 'float16' is for CUDA; on the CPU use float32 or bfloat16")
    return device, PRECISIONS[precision]


def batch_jobs(config: Config, device: torch.device) -> int:
    """How many jobs may run side by side with their sampler steps batched: config.batch_jobs,
    or for 0 (auto) 8 on CUDA and 1 on the CPU, where the UNet's cost grows linearly with the
    batch and batching only adds latency (bench/compare.py measures both)."""
    if config.batch_jobs < 0:
        raise ConfigError(f"batch_jobs must be 0 (auto) or more, not {config.batch_jobs}")
    return config.batch_jobs or (8 if device.type == "cuda" else 1)


def _default_offload_budget() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


# Finished jobs kept in memory too, so a Watch or GetJob soon after the end reads no database;
# their Output events hold the PNG bytes, so this stays small (older ones come from the store).
MAX_FINISHED_JOBS = 100
STOPPED_QUEUED = stopped_reason(JobStatus.QUEUED)
STOPPED_RUNNING = stopped_reason(JobStatus.RUNNING)
# Seconds stop() waits, once it has cancelled the running job, for a node to reach its next
# cancellation check (sampler steps check; a long decode may not) before recording it cancelled.
CANCEL_WAIT = 10.0


class ServiceStopping(RuntimeError):
    """Submit after stop() began: this server takes no new jobs (gRPC UNAVAILABLE)."""


class QueueFull(Exception):
    """The queue holds max_queue jobs: the caller should retry later (RESOURCE_EXHAUSTED)."""

    def __init__(self, queued: int, limit: int) -> None:
        self.retry_after = 1.0 + 0.1 * queued  # a hint, not a promise
        super().__init__(f"the job queue is full ({queued} of {limit} jobs); retry in {self.retry_after:.0f} s")


# The image formats a client may send, as Pillow names them.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")


class ImageRefused(ValueError):
    """An image a client sent breaks one of check_image's rules. `code` is "limit_exceeded"
    (too many bytes or pixels: RESOURCE_EXHAUSTED) or "invalid_image" (not a readable PNG, JPEG
    or WebP: INVALID_ARGUMENT)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclass(frozen=True)
class ImageInfo:
    format: str  # "PNG", "JPEG" or "WEBP"
    width: int
    height: int


def check_image(data: bytes | Path, name: str, limits: Limits) -> ImageInfo:
    """The rules for every image a client sends, inline with a request (check_request) or
    uploaded in chunks (AssetService.Upload), before anything is decoded: at most
    limits.max_upload_bytes, PNG, JPEG or WebP only, and at most limits.max_pixels * 4 pixels
    by its header (decompression bombs). Reads the header only; raises ImageRefused."""
    size = len(data) if isinstance(data, (bytes, bytearray)) else Path(data).stat().st_size
    if size > limits.max_upload_bytes:
        raise ImageRefused("limit_exceeded", f"image {name!r} is {size} bytes; the limit is {limits.max_upload_bytes}")
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else Path(data)) as picture:
            kind, (width, height) = picture.format, picture.size
    except Image.DecompressionBombError as exc:  # Pillow's own ceiling, far above ours
        raise ImageRefused("limit_exceeded", f"image {name!r} is a decompression bomb ({exc})") from None
    except (OSError, ValueError) as exc:
        raise ImageRefused("invalid_image", f"image {name!r} is not a readable image ({exc})") from None
    if kind == "MPO":  # the JPEG phones write (a second, depth or stereo, frame): a JPEG file
        kind = "JPEG"
    if kind not in ACCEPTED_FORMATS:
        raise ImageRefused("invalid_image", f"image {name!r} is {kind}; only PNG, JPEG and WebP are accepted")
    if width * height > limits.max_pixels * 4:
        raise ImageRefused(
            "limit_exceeded",
            f"image {name!r} is {width}x{height} pixels; the limit is "
            f"{limits.max_pixels * 4} (a decompression bomb or simply too large)",
        )
    return ImageInfo(kind, width, height)


def check_request(graph: str | bytes | dict[str, Any], inputs: dict[str, bytes], limits: Limits) -> None:
    """Sizes and kinds of what a request carries, before anything is decoded: the graph's
    JSON size, and each image by check_image's rules. Raises LimitExceeded or
    GraphValidationError with every problem found."""
    too_big, bad = [], []
    if isinstance(graph, (str, bytes)) and len(graph) > limits.max_graph_bytes:
        too_big.append(
            GraphError(
                "", "", "", "limit_exceeded", f"graph JSON is {len(graph)} bytes; the limit is {limits.max_graph_bytes}"
            )
        )
    for name, data in inputs.items():
        try:
            check_image(data, name, limits)
        except ImageRefused as exc:
            (too_big if exc.code == "limit_exceeded" else bad).append(
                GraphError("", "", f"inputs.{name}", exc.code, str(exc))
            )
    if bad:
        raise GraphValidationError(bad + too_big)
    if too_big:
        raise LimitExceeded(too_big)


class PlinthService:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.workspace = Workspace(config.models_dir, config.data_dir, allow_pickle=config.allow_pickle)
        self.device, self.dtype = pick_device(config.device, config.precision)
        self.batch_jobs = batch_jobs(config, self.device)
        offload = (config.offload_budget_bytes or _default_offload_budget()) if self.device.type != "cpu" else 0
        self.models = ModelManager(
            config.model_budget_bytes or _default_model_budget(self.device),
            device=self.device,
            offload_budget_bytes=offload,
        )
        self.cache = OutputCache(config.cache_bytes)
        options = ModelOptions(
            attention=config.attention,
            channels_last=config.channels_last,
            compile=config.compile,
            warm_up=config.warm_up,
        )
        self.executor = Executor(self.cache, self.device, self.dtype, options)
        self.registry = NODES
        self.queue = JobQueue()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._jobs_lock = threading.Lock()
        self._submit_lock = threading.Lock()  # orders submits against stop()
        self._stopping = False
        self._worker: threading.Thread | None = None  # takes jobs off the queue
        self._members: set[threading.Thread] = set()  # jobs running side by side (batch_jobs > 1)
        self._running: set[Job] = set()
        self._running_lock = threading.Lock()
        self._slots = threading.Semaphore(self.batch_jobs)
        self.lockstep = Lockstep() if self.batch_jobs > 1 else None
        self.observers: list[Callable[[Job, ev.Event], None]] = []  # e.g. metrics
        self.store = JobStore(self.workspace.data_dir / "jobs.sqlite3")
        recovered = self.store.recover()
        if recovered:
            log.warning("%d job(s) the previous server left queued or running are marked failed", len(recovered))

    # lifecycle

    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="plinth-worker", daemon=True)
        self._worker.start()

    def stop(self, grace: float = 0.0) -> None:
        """Take no more jobs (submit raises ServiceStopping), cancel the queued ones, give the
        running one `grace` seconds to finish and then cancel it. Returns once every job has
        ended and is stored; reads (get, jobs, watch) keep working until close()."""
        with self._submit_lock:
            self._stopping = True
        self.queue.close()
        with self._jobs_lock:
            queued = [j for j in self._jobs.values() if j.status == JobStatus.QUEUED]
        for job in queued:
            if self.queue.remove(job):
                job.finish(JobStatus.CANCELLED, ev.Cancelled(STOPPED_QUEUED), STOPPED_QUEUED)
        if self._worker is not None:
            self._join(time.monotonic() + grace)
            if self._busy():
                # Jobs are running, or the worker has just taken one (it cancels that itself,
                # seeing _stopping): either way wait for them to end before the store closes.
                for job in self._running_now():
                    job.request_cancel(STOPPED_RUNNING)
                self._join(time.monotonic() + CANCEL_WAIT)
                for job in self._running_now():
                    if not job.status.terminal:
                        log.warning(
                            "job %s did not stop within %.0f s of being cancelled; recorded as cancelled",
                            job.id,
                            CANCEL_WAIT,
                        )
                        job.finish(JobStatus.CANCELLED, ev.Cancelled(STOPPED_RUNNING), STOPPED_RUNNING)
        self.store.flush()

    def close(self) -> None:
        """Close the job store and release the data directory; after stop() and after the gRPC
        server has stopped, since reads of stored jobs need the store."""
        self.store.close()

    # requests

    def submit(
        self,
        graph: str | dict[str, Any],
        inputs: dict[str, bytes] | None = None,
        priority: int = 0,
        omit_image_bytes: bool = False,
        deadline_seconds: float = 0.0,
    ) -> Job:
        """Validate, store and queue; raises GraphValidationError with every error found, or
        ServiceStopping once stop() has begun. With deadline_seconds the job is cancelled once
        that long has passed since now, whether it is still queued or running."""
        inputs = dict(inputs or {})
        check_request(graph, inputs, self.config.limits)
        resources = JobResources(self.workspace, self.models, inputs)
        plan = validate(self.parse(graph), self.registry, resources, self.config.limits)
        job = Job(
            plan, resources, priority, omit_image_bytes=omit_image_bytes, journal=self.store, observers=self.observers
        )
        if deadline_seconds > 0:
            job.deadline = job.created_at + deadline_seconds
            timer = threading.Timer(deadline_seconds, self._expire, args=(job,))
            timer.daemon = True
            timer.start()
        with self._submit_lock:
            if self._stopping:
                raise ServiceStopping("the server is stopping and takes no new jobs")
            if len(self.queue) >= self.config.limits.max_queue:
                raise QueueFull(len(self.queue), self.config.limits.max_queue)
            self.store.add(job)
            with self._jobs_lock:
                self._jobs[job.id] = job
                self._prune()
            self.queue.put(job, lambda ahead: job.emit(ev.Queued(ahead)))
        return job

    def parse(self, graph: str | dict[str, Any]) -> Graph:
        """A graph in API format, or a workflow file ComfyUI's editor saved (converted here)."""
        raw = load_json(graph)
        if is_editor_workflow(raw):
            parsed = parse_graph(to_api_format(raw, self.registry))
            parsed.workflow = raw
            return parsed
        return parse_graph(raw)

    def get(self, job_id: str) -> Job:
        """The live job, or the stored one (with its events, but no plan) once it has left
        memory; raises KeyError for an unknown id."""
        with self._jobs_lock:
            job = self._jobs.get(job_id)
        if job is None:
            job = self.store.load(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if self.queue.remove(job):
            job.request_cancel("cancelled while queued")
            job.finish(JobStatus.CANCELLED, ev.Cancelled(job.cancel_reason), job.cancel_reason)
        else:
            job.request_cancel()  # running: it stops at its next check; or it has just ended
        return job

    def _expire(self, job: Job) -> None:
        """A job's deadline passed: a queued job ends now (and frees its place in the queue), a
        running one at its next check."""
        if job.status.terminal:
            return
        reason = f"deadline exceeded ({job.deadline - job.created_at:.3g} s after submission)"
        if self.queue.remove(job):
            job.request_cancel(reason)
            job.finish(JobStatus.CANCELLED, ev.Cancelled(job.cancel_reason), job.cancel_reason)
        else:
            job.request_cancel(reason)

    def jobs(
        self, statuses: Iterable[JobStatus] = (), limit: int = 100, before: int | None = None
    ) -> tuple[list[Job], int | None]:
        """A page of jobs newest first, optionally only those in `statuses`, and the cursor for
        the next page (see JobStore.list); summaries without events."""
        return self.store.list(statuses, limit, before)

    # worker

    def _work(self) -> None:
        """Take jobs off the queue as slots free up: with batch_jobs 1 run each here, one after
        the other; else each on a member thread of the lockstep (server/engine/batching.py)."""
        while True:
            self._slots.acquire()  # a free slot before taking a job, so priorities hold
            job = self.queue.get()
            if job is None:
                self._slots.release()
                return
            with self._running_lock:
                self._running.add(job)
            if self._stopping:  # taken just as stop() began: it never starts
                job.request_cancel(STOPPED_QUEUED)
            if job.is_cancelled():  # by request, past its deadline while queued, or stopping
                job.finish(JobStatus.CANCELLED, ev.Cancelled(job.cancel_reason), job.cancel_reason)
                self._release(job)
                continue
            if self.lockstep is None:
                self._run_and_release(job)
                continue
            member = threading.Thread(
                target=self._run_and_release, args=(job,), name=f"plinth-job-{job.id[:8]}", daemon=True
            )
            with self._running_lock:
                self._members = {t for t in self._members if t.is_alive()} | {member}
            member.start()

    def _run_and_release(self, job: Job) -> None:
        try:
            with job_context(job.id):  # every log line of the run carries the job id
                if self.lockstep is None:
                    self._run(job)
                else:
                    with self.lockstep.member():
                        self._run(job)
        finally:
            self._release(job)

    def _release(self, job: Job) -> None:
        with self._running_lock:
            self._running.discard(job)
        self._slots.release()

    def _running_now(self) -> list[Job]:
        with self._running_lock:
            return list(self._running)

    def _busy(self) -> bool:
        with self._running_lock:
            if self._running or any(t.is_alive() for t in self._members):
                return True
        return self._worker is not None and self._worker.is_alive()

    def _join(self, deadline: float) -> None:
        """Wait until the worker and every member thread have ended, or the deadline."""
        assert self._worker is not None
        self._worker.join(max(0.0, deadline - time.monotonic()))
        with self._running_lock:
            members = list(self._members)
        for member in members:
            member.join(max(0.0, deadline - time.monotonic()))

    def _run(self, job: Job) -> None:
        job.start()
        start = time.perf_counter()
        try:
            with self.models.job_scope():  # its models stay on the device while it runs
                result = self.executor.run(job.plan, job.resources, job, self.lockstep)
        except Exception as exc:  # the executor itself broke: record it, keep serving
            log.exception("job %s failed outside any node", job.id)
            job.finish(JobStatus.FAILED, ev.Failed(str(exc), error_type=type(exc).__name__), str(exc))
            return
        job.nodes, job.outputs = result.nodes, [i for i in result.images if i.kind == "output"]
        if result.status == "completed":
            job.finish(JobStatus.COMPLETED, ev.Completed(time.perf_counter() - start))
        elif result.status == "cancelled":
            job.finish(JobStatus.CANCELLED, ev.Cancelled(job.cancel_reason), job.cancel_reason)
        else:
            failure = result.failure or ev.Failed("failed")
            if failure.error_type == "OutOfMemoryError":  # give the next job the memory back
                self.models.free_memory()
            job.finish(JobStatus.FAILED, failure, failure.message)
        log.info("job %s %s in %.3f s", job.id, job.status.value, time.perf_counter() - start)

    def _prune(self) -> None:
        finished = [j for j in self._jobs.values() if j.status.terminal]
        for job in finished[: max(0, len(finished) - MAX_FINISHED_JOBS)]:
            del self._jobs[job.id]
