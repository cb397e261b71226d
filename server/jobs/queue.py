"""The job queue: highest priority first, then first come, first served."""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable

from plinth.server.jobs.job import Job


class JobQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Job]] = []
        self._order = itertools.count()
        self._ready = threading.Condition()
        self._closed = False

    def put(self, job: Job, on_queued: Callable[[int], None]) -> None:
        """Queue a job. `on_queued(jobs_ahead)` runs first, under the queue's lock, so nothing
        (the worker, a cancel) sees the job before it has recorded being queued."""
        with self._ready:
            on_queued(sum(1 for priority, _, _ in self._heap if -priority >= job.priority))
            heapq.heappush(self._heap, (-job.priority, next(self._order), job))
            self._ready.notify()

    def get(self, timeout: float | None = None) -> Job | None:
        """The next job, waiting up to `timeout`; None when closed or timed out."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._heap or self._closed, timeout=timeout):
                return None
            if self._closed:
                return None
            return heapq.heappop(self._heap)[2]

    def remove(self, job: Job) -> bool:
        with self._ready:
            for i, entry in enumerate(self._heap):
                if entry[2] is job:
                    self._heap.pop(i)
                    heapq.heapify(self._heap)
                    return True
            return False

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def __len__(self) -> int:
        with self._ready:
            return len(self._heap)
