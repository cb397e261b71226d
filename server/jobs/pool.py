"""The worker pool: takes jobs off the queue as slots free up and hands each to the job runner.

With batch_jobs 1 there is one slot and jobs run on the worker thread, one after the other;
with more, each job runs on a member thread of the lockstep (server/engine/batching.py), so
up to batch_jobs jobs run side by side with their sampler steps batched.
"""

from __future__ import annotations

import logging
import threading
import time

from plinth.server.jobs.job import Job, JobStatus, stopped_reason
from plinth.server.jobs.queue import JobQueue
from plinth.server.jobs.runner import JobRunner

log = logging.getLogger("plinth.jobs")

STOPPED_QUEUED = stopped_reason(JobStatus.QUEUED)
STOPPED_RUNNING = stopped_reason(JobStatus.RUNNING)
# Seconds join() waits, once it has cancelled the running jobs, for a node to reach its next
# cancellation check (sampler steps check; a long decode may not) before recording it cancelled.
CANCEL_WAIT = 10.0


class WorkerPool:
    def __init__(self, queue: JobQueue, runner: JobRunner, slots: int) -> None:
        self.queue = queue
        self.runner = runner
        self._stopping = False
        self._worker: threading.Thread | None = None  # takes jobs off the queue
        self._members: set[threading.Thread] = set()  # jobs running side by side (slots > 1)
        self._running: set[Job] = set()
        self._running_lock = threading.Lock()
        self._slots = threading.Semaphore(slots)

    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="plinth-worker", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        """Start no more jobs: one the worker takes from now on is cancelled before it starts."""
        self._stopping = True

    def join(self, grace: float) -> None:
        """Give the running jobs `grace` seconds to finish, then cancel them; returns once every
        one has ended (or is recorded cancelled, CANCEL_WAIT seconds after being asked to stop)."""
        if self._worker is None:
            return
        self._join(time.monotonic() + grace)
        if not self._busy():
            return
        # Jobs are running, or the worker has just taken one (it cancels that itself, seeing
        # _stopping): either way wait for them to end before the store closes.
        for job in self._running_now():
            job.request_cancel(STOPPED_RUNNING)
        self._join(time.monotonic() + CANCEL_WAIT)
        for job in self._running_now():
            if not job.status.terminal:
                log.warning(
                    "job %s did not stop within %.0f s of being cancelled; recorded as cancelled", job.id, CANCEL_WAIT
                )
                job.cancel(STOPPED_RUNNING)

    def _work(self) -> None:
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
                job.cancel()
                self._release(job)
                continue
            if self.runner.lockstep is None:
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
            self.runner.run(job)
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
