"""The job runner: runs one job from start to its terminal event.

The job's models stay on the device while it runs (the model manager's job scope), the
executor runs its plan, and the result becomes the job's one terminal event: Completed,
Cancelled, or Failed (a failure outside any node is recorded too, and the server keeps serving).
"""

from __future__ import annotations

import logging
import time

from plinth.server.engine import events as ev
from plinth.server.engine.batching import Lockstep
from plinth.server.engine.executor import Executor
from plinth.server.jobs.job import Job
from plinth.server.logs import job_context
from plinth.server.model_manager import ModelManager

log = logging.getLogger("plinth.jobs")


class JobRunner:
    def __init__(self, models: ModelManager, executor: Executor, lockstep: Lockstep | None = None) -> None:
        self.models = models
        self.executor = executor
        self.lockstep = lockstep  # jobs side by side batch their sampler steps through it

    def run(self, job: Job) -> None:
        with job_context(job.id):  # every log line of the run carries the job id
            if self.lockstep is None:
                self._run(job)
            else:
                with self.lockstep.member():
                    self._run(job)

    def _run(self, job: Job) -> None:
        job.start()
        start = time.perf_counter()
        try:
            with self.models.job_scope():  # its models stay on the device while it runs
                result = self.executor.run(job.plan, job.resources, job, self.lockstep)
        except Exception as exc:  # the executor itself broke: record it, keep serving
            log.exception("job %s failed outside any node", job.id)
            job.fail(ev.Failed(str(exc), error_type=type(exc).__name__))
            return
        job.nodes, job.outputs = result.nodes, [i for i in result.images if i.kind == "output"]
        if result.status == "completed":
            job.complete(ev.Completed(time.perf_counter() - start))
        elif result.status == "cancelled":
            job.cancel()
        else:
            failure = result.failure or ev.Failed("failed")
            if failure.error_type == "OutOfMemoryError":  # give the next job the memory back
                self.models.free_memory()
            job.fail(failure)
        log.info("job %s %s in %.3f s", job.id, job.status.value, time.perf_counter() - start)
