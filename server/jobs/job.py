"""A job: one submitted graph, its status, and the log of its events that watchers replay.

A live job (submitted to this process) holds its plan and request; a job read back from the
job store (after a restart, or once evicted from memory) has neither, only its record and
events. Every change a live job goes through is also handed to its journal, the job store, so
the record outlives the process.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from plinth.nodes.core.context import ImageRef
from plinth.server.engine import events as ev
from plinth.server.engine.validate import ExecutionPlan

if TYPE_CHECKING:
    from plinth.server.jobs.resources import JobResources

# The events a results-only watcher gets.
RESULTS = (ev.Output, *ev.TERMINAL)


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


class JobJournal(Protocol):
    """Where a live job records itself (plinth.server.jobs.store.JobStore)."""

    def event(self, event: ev.Event) -> None: ...

    def started(self, job: Job) -> None: ...

    def finished(self, job: Job, status: JobStatus, event: ev.Event) -> None: ...


# Why a running job stopped when the caller gave no reason (CancelJob, an abandoned Run).
CANCELLED_WHILE_RUNNING = "cancelled while running"


def stopped_reason(status: JobStatus) -> str:
    """Why a job that was queued or running when the server stopped never finished."""
    return f"server stopped while the job was {status.value}"


@dataclass(eq=False)
class Job:
    plan: ExecutionPlan | None  # None for a job read back from the store
    resources: JobResources | None
    priority: int = 0
    # Output events carry image ids only (GetImage fetches them); previews keep their bytes.
    omit_image_bytes: bool = False
    # Unix time after which the job is cancelled, queued or running (0: none).
    deadline: float = 0.0
    journal: JobJournal | None = None
    # Called with (job, event) after each event is added, under the job's lock: keep them quick
    # (metrics). The job manager passes its own list, so observers added later see every job.
    observers: list[Callable[[Job, ev.Event], None]] = field(default_factory=list, repr=False)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: JobStatus = JobStatus.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float = 0.0
    finished_at: float = 0.0
    error: str = ""
    outputs: list[ImageRef] = field(default_factory=list)
    output_nodes: dict[str, str] = field(default_factory=dict)  # image id -> the node that made it
    nodes: dict[str, ev.NodeRun] = field(default_factory=dict)
    events: list[ev.Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        lock = threading.RLock()
        self._changed = threading.Condition(lock)  # every event
        self._results = threading.Condition(lock)  # Output and terminal events only
        self._cancel = threading.Event()
        self.cancel_reason = CANCELLED_WHILE_RUNNING

    # JobControl, for the executor

    def emit(self, payload: ev.EventPayload) -> None:
        """Append an event; once the job has ended nothing more is added (a node that finishes
        after the server gave up on it must not write past the terminal event)."""
        with self._changed:
            if self.status.terminal:
                return
            event = ev.Event(self.id, len(self.events), time.time(), payload)
            if isinstance(payload, ev.Output):
                self.output_nodes.update((i.id, payload.node_id) for i in payload.images)
            if self.journal is not None:
                self.journal.event(event)
            self.events.append(event)
            self._notify(event)

    def is_cancelled(self) -> bool:
        if self.deadline and not self._cancel.is_set() and time.time() > self.deadline:
            self.request_cancel(self.deadline_reason)
        return self._cancel.is_set()

    @property
    def deadline_reason(self) -> str:
        """Why a job past its deadline was cancelled (the deadline's one wording)."""
        return f"deadline exceeded ({self.deadline - self.created_at:.3g} s after submission)"

    # lifecycle

    def request_cancel(self, reason: str = CANCELLED_WHILE_RUNNING) -> None:
        """Ask a running job to stop at its next check; the first reason given is the one kept."""
        with self._changed:
            if not self._cancel.is_set():
                self.cancel_reason = reason
                self._cancel.set()

    def start(self) -> None:
        self.status, self.started_at = JobStatus.RUNNING, time.time()
        if self.journal is not None:
            self.journal.started(self)

    def cancel(self, reason: str | None = None) -> None:
        """End the job cancelled, with `reason` (also asking a node still running to stop), or
        without one the reason its cancellation was requested with (request_cancel)."""
        if reason is None:
            reason = self.cancel_reason
        else:
            self.request_cancel(reason)
        self._finish(JobStatus.CANCELLED, ev.Cancelled(reason), reason)

    def fail(self, failure: ev.Failed) -> None:
        """End the job failed; its error is the failure's message."""
        self._finish(JobStatus.FAILED, failure, failure.message)

    def complete(self, summary: ev.Completed) -> None:
        self._finish(JobStatus.COMPLETED, summary)

    def _finish(self, status: JobStatus, terminal: ev.EventPayload, error: str = "") -> None:
        """Record the final status, then send the one terminal event. The journal has it on disk
        before the status turns terminal here, so nothing (a watcher, eviction from memory) sees
        an end the store could lose."""
        with self._changed:
            if self.status.terminal:
                return
            event = ev.Event(self.id, len(self.events), time.time(), terminal)
            self.error, self.finished_at = error, event.time
            if self.journal is not None:
                self.journal.finished(self, status, event)
            self.status = status
            if self.resources is not None:
                self.resources.inputs.clear()  # uploads are not needed once the job has ended
            self.events.append(event)
            self._notify(event)

    def _notify(self, event: ev.Event) -> None:
        self._changed.notify_all()
        if isinstance(event.payload, RESULTS):
            self._results.notify_all()
        for observe in self.observers:
            observe(self, event)

    def watch(
        self, start: int = 0, stop: threading.Event | None = None, results_only: bool = False
    ) -> Iterator[ev.Event]:
        """Every event from `start` on, as it comes, until the terminal event (or `stop`). With
        results_only just the Output events and the terminal one, and the watcher is not woken
        for the others (a sampler step each), so it takes no CPU from the run."""
        index = start
        wake = self._results if results_only else self._changed
        while True:
            with self._changed:
                while index >= len(self.events) or (
                    results_only and not any(isinstance(e.payload, RESULTS) for e in self.events[index:])
                ):
                    if self.status.terminal or (stop is not None and stop.is_set()):
                        return
                    wake.wait(timeout=0.5)
                batch = self.events[index:]
            for event in batch:
                if results_only and not isinstance(event.payload, RESULTS):
                    continue
                yield event
                if isinstance(event.payload, ev.TERMINAL):
                    return
            index += len(batch)
