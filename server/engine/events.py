"""What the executor reports while it runs a job, as plain data (no gRPC in here).

Order within a job: Queued, Started, then per node NodeStarted, Progress..., NodeFinished (or
NodeCached), Output after an output node, and exactly one of Completed, Failed, Cancelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from plinth.nodes.core.context import ImageRef


@dataclass
class NodeRun:
    """How one node of a job ran, reported with the terminal event."""

    class_type: str
    status: str  # "executed" or "cached"
    seconds: float


@dataclass(frozen=True)
class Queued:
    position: int


@dataclass(frozen=True)
class Started:
    node_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class NodeStarted:
    node_id: str
    class_type: str


@dataclass(frozen=True)
class Progress:
    node_id: str
    step: int
    total: int


@dataclass(frozen=True)
class NodeCached:
    node_id: str
    class_type: str


@dataclass(frozen=True)
class NodeFinished:
    node_id: str
    class_type: str
    seconds: float


@dataclass(frozen=True)
class Output:
    node_id: str
    images: list[ImageRef]


@dataclass(frozen=True)
class Completed:
    seconds: float


@dataclass(frozen=True)
class Failed:
    message: str
    node_id: str = ""
    class_type: str = ""
    error_type: str = ""


@dataclass(frozen=True)
class Cancelled:
    reason: str


EventPayload = (
    Queued | Started | NodeStarted | Progress | NodeCached | NodeFinished | Output | Completed | Failed | Cancelled
)
TERMINAL = (Completed, Failed, Cancelled)


@dataclass(frozen=True)
class Event:
    job_id: str
    seq: int
    time: float
    payload: EventPayload
