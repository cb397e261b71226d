"""The server's core without gRPC: validate and queue jobs, run them one at a time on a worker
thread, and keep them for GetJob, Watch and ListJobs."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Iterable

import torch

from plinth.nodes.registry import NODES
from plinth.server.config import Config
from plinth.server.engine import events as ev
from plinth.server.engine.cache import OutputCache
from plinth.server.engine.executor import Executor
from plinth.server.engine.graph import Graph, load_json, parse_graph
from plinth.server.engine.validate import validate
from plinth.server.engine.workflow import is_editor_workflow, to_api_format
from plinth.server.jobs.job import Job, JobStatus
from plinth.server.jobs.queue import JobQueue
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


def pick_device(name: str) -> tuple[torch.device, torch.dtype]:
    """CUDA in fp16 when there is one (or when asked), else the CPU in float32."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    return device, torch.float16 if device.type == "cuda" else torch.float32


# Finished jobs kept in memory for GetJob, Watch and ListJobs.
MAX_FINISHED_JOBS = 1000


class PlinthService:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.workspace = Workspace(config.models_dir, config.data_dir)
        self.device, self.dtype = pick_device(config.device)
        self.models = ModelManager(config.model_budget_bytes or _default_model_budget(self.device))
        self.cache = OutputCache(config.cache_bytes)
        self.executor = Executor(self.cache, self.device, self.dtype)
        self.registry = NODES
        self.queue = JobQueue()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._jobs_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._running: Job | None = None

    # lifecycle

    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="plinth-worker", daemon=True)
        self._worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.queue.close()
        running = self._running
        if running is not None:
            running.request_cancel()
        if self._worker is not None:
            self._worker.join(timeout)

    # requests

    def submit(self, graph: str | dict[str, Any], inputs: dict[str, bytes] | None = None,
               priority: int = 0, omit_image_bytes: bool = False) -> Job:
        """Validate and queue; raises GraphValidationError with every error found."""
        resources = JobResources(self.workspace, self.models, dict(inputs or {}))
        plan = validate(self.parse(graph), self.registry, resources)
        job = Job(plan, resources, priority, omit_image_bytes=omit_image_bytes)
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
        with self._jobs_lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        job.request_cancel()
        if self.queue.remove(job):
            job.finish(JobStatus.CANCELLED, ev.Cancelled("cancelled while queued"), "cancelled while queued")
        return job

    def jobs(self, statuses: Iterable[JobStatus] = ()) -> list[Job]:
        """Jobs newest first, optionally only those in `statuses`."""
        wanted = set(statuses)
        with self._jobs_lock:
            found = list(reversed(self._jobs.values()))
        return [j for j in found if not wanted or j.status in wanted]

    # worker

    def _work(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if job.is_cancelled():
                job.finish(JobStatus.CANCELLED, ev.Cancelled("cancelled while queued"), "cancelled while queued")
                continue
            self._running = job
            try:
                self._run(job)
            finally:
                self._running = None

    def _run(self, job: Job) -> None:
        job.status, job.started_at = JobStatus.RUNNING, time.time()
        start = time.perf_counter()
        try:
            result = self.executor.run(job.plan, job.resources, job)
        except Exception as exc:  # the executor itself broke: record it, keep serving
            log.exception("job %s failed outside any node", job.id)
            job.finish(JobStatus.FAILED, ev.Failed(str(exc), error_type=type(exc).__name__), str(exc))
            return
        job.nodes, job.outputs = result.nodes, [i for i in result.images if i.kind == "output"]
        if result.status == "completed":
            job.finish(JobStatus.COMPLETED, ev.Completed(time.perf_counter() - start))
        elif result.status == "cancelled":
            job.finish(JobStatus.CANCELLED, ev.Cancelled("cancelled while running"), "cancelled while running")
        else:
            failure = result.failure or ev.Failed("failed")
            job.finish(JobStatus.FAILED, failure, failure.message)
        log.info("job %s %s in %.3f s", job.id, job.status.value, time.perf_counter() - start)

    def _prune(self) -> None:
        finished = [j for j in self._jobs.values() if j.status.terminal]
        for job in finished[: max(0, len(finished) - MAX_FINISHED_JOBS)]:
            del self._jobs[job.id]
