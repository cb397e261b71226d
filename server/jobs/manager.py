"""The job manager: takes jobs (validate, admit, store, queue), answers for them (get, cancel,
list) and ends them (deadlines, stop, close). Running them is the worker pool's part
(server/jobs/pool.py). Live and recent jobs are kept in memory, every one in the job store
(data_dir/jobs.sqlite3), which is what survives a restart.

Restart policy: jobs the previous process left queued or running are marked failed ("server
stopped while the job was queued/running"), never run again (their uploaded images are not
kept). A graceful stop() cancels them instead, with the same reasons.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from plinth.nodes.core.schema import Node
from plinth.server.config import Limits
from plinth.server.engine import events as ev
from plinth.server.engine.graph import Graph, load_json, parse_graph
from plinth.server.engine.validate import validate
from plinth.server.engine.workflow import is_editor_workflow, to_api_format
from plinth.server.jobs.job import Job, JobStatus
from plinth.server.jobs.pool import STOPPED_QUEUED, WorkerPool
from plinth.server.jobs.queue import JobQueue
from plinth.server.jobs.resources import JobResources
from plinth.server.jobs.store import JobStore

log = logging.getLogger("plinth.jobs")

# Finished jobs kept in memory too, so a Watch or GetJob soon after the end reads no database;
# their Output events hold the PNG bytes, so this stays small (older ones come from the store).
MAX_FINISHED_JOBS = 100


class NotAcceptingJobs(RuntimeError):
    """Submit after stop() began: this server takes no new jobs (gRPC UNAVAILABLE)."""


class QueueFull(Exception):
    """The queue holds max_queue jobs: the caller should retry later (RESOURCE_EXHAUSTED)."""

    def __init__(self, queued: int, limit: int) -> None:
        self.retry_after = 1.0 + 0.1 * queued  # a hint, not a promise
        super().__init__(f"the job queue is full ({queued} of {limit} jobs); retry in {self.retry_after:.0f} s")


class JobManager:
    """`resources` makes a job's JobResources from the images sent with it."""

    def __init__(
        self,
        limits: Limits,
        registry: dict[str, type[Node]],
        resources: Callable[[dict[str, bytes]], JobResources],
        store: JobStore,
        queue: JobQueue,
        pool: WorkerPool,
    ) -> None:
        self.limits = limits
        self.registry = registry
        self.resources = resources
        self.store = store
        self.queue = queue
        self.pool = pool
        self.observers: list[Callable[[Job, ev.Event], None]] = []  # e.g. metrics
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._jobs_lock = threading.Lock()
        self._submit_lock = threading.Lock()  # orders submits against stop()
        self._stopping = False
        recovered = self.store.recover()
        if recovered:
            log.warning("%d job(s) the previous server left queued or running are marked failed", len(recovered))

    # lifecycle

    def start(self) -> None:
        self.pool.start()

    def stop(self, grace: float = 0.0) -> None:
        """Take no more jobs (submit raises NotAcceptingJobs), cancel the queued ones, give the
        running ones `grace` seconds to finish and then cancel them. Returns once every job has
        ended and is stored; reads (get, list, watch) keep working until close()."""
        with self._submit_lock:
            self._stopping = True
        self.pool.stop()
        self.queue.close()
        with self._jobs_lock:
            queued = [j for j in self._jobs.values() if j.status == JobStatus.QUEUED]
        for job in queued:
            if self.queue.remove(job):
                job.cancel(STOPPED_QUEUED)
        self.pool.join(grace)
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
        """Validate, store and queue; raises GraphValidationError with every error found,
        QueueFull, or NotAcceptingJobs once stop() has begun. With deadline_seconds the job is
        cancelled once that long has passed since now, whether it is still queued or running.
        What the request carries is checked by size and kind before (plinth.server.api.uploads)."""
        resources = self.resources(dict(inputs or {}))
        plan = validate(self.parse(graph), self.registry, resources, self.limits)
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
                raise NotAcceptingJobs("the server is stopping and takes no new jobs")
            if len(self.queue) >= self.limits.max_queue:
                raise QueueFull(len(self.queue), self.limits.max_queue)
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
            job.cancel("cancelled while queued")
        else:
            job.request_cancel()  # running: it stops at its next check; or it has just ended
        return job

    def list(
        self, statuses: Iterable[JobStatus] = (), limit: int = 100, before: int | None = None
    ) -> tuple[list[Job], int | None]:
        """A page of jobs newest first, optionally only those in `statuses`, and the cursor for
        the next page (see JobStore.list); summaries without events."""
        return self.store.list(statuses, limit, before)

    def _expire(self, job: Job) -> None:
        """A job's deadline passed: a queued job ends now (and frees its place in the queue), a
        running one at its next check."""
        if job.status.terminal:
            return
        if self.queue.remove(job):
            job.cancel(job.deadline_reason)
        else:
            job.request_cancel(job.deadline_reason)

    def _prune(self) -> None:
        finished = [j for j in self._jobs.values() if j.status.terminal]
        for job in finished[: max(0, len(finished) - MAX_FINISHED_JOBS)]:
            del self._jobs[job.id]
