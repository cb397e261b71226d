"""A job: one submitted graph, its status, and the log of its events that watchers replay."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterator

from plinth.nodes.context import ImageRef
from plinth.server.engine import events as ev
from plinth.server.engine.executor import NodeRun
from plinth.server.engine.validate import ExecutionPlan
from plinth.server.workspace import JobResources


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(eq=False)
class Job:
    plan: ExecutionPlan
    resources: JobResources
    priority: int = 0
    # Output events carry image ids only (GetImage fetches them); previews keep their bytes.
    omit_image_bytes: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: JobStatus = JobStatus.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float = 0.0
    finished_at: float = 0.0
    error: str = ""
    outputs: list[ImageRef] = field(default_factory=list)
    nodes: dict[str, NodeRun] = field(default_factory=dict)
    events: list[ev.Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._changed = threading.Condition()
        self._cancel = threading.Event()

    # JobControl, for the executor

    def emit(self, payload: ev.EventPayload) -> None:
        with self._changed:
            self.events.append(ev.Event(self.id, len(self.events), time.time(), payload))
            self._changed.notify_all()

    def is_cancelled(self) -> bool:
        return self._cancel.is_set()

    # lifecycle

    def request_cancel(self) -> None:
        self._cancel.set()

    def finish(self, status: JobStatus, terminal: ev.EventPayload, error: str = "") -> None:
        """Record the final status, then send the one terminal event."""
        with self._changed:
            if self.status.terminal:
                return
            self.status, self.error, self.finished_at = status, error, time.time()
            self.resources.inputs.clear()  # uploads are not needed once the job has ended
            self.emit(terminal)

    def watch(self, start: int = 0, stop: threading.Event | None = None) -> Iterator[ev.Event]:
        """Every event from `start` on, as it comes, until the terminal event (or `stop`)."""
        index = start
        while True:
            with self._changed:
                while index >= len(self.events):
                    if self.status.terminal or (stop is not None and stop.is_set()):
                        return
                    self._changed.wait(timeout=0.5)
                batch = self.events[index:]
            for event in batch:
                yield event
                if isinstance(event.payload, ev.TERMINAL):
                    return
            index += len(batch)
