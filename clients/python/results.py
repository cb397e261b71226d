"""Building requests and reading replies: the part the sync and asyncio clients share."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from PIL import Image

from plinth.clients.v1 import common_pb2
from plinth.clients.v1 import graph_service_pb2 as gs

GraphLike = Mapping[str, Any] | str | Path
ImageLike = bytes | str | Path | Image.Image
STATUS_NAMES = {
    common_pb2.JOB_STATUS_QUEUED: "queued",
    common_pb2.JOB_STATUS_RUNNING: "running",
    common_pb2.JOB_STATUS_COMPLETED: "completed",
    common_pb2.JOB_STATUS_FAILED: "failed",
    common_pb2.JOB_STATUS_CANCELLED: "cancelled",
}
STATUS_VALUES = {v: k for k, v in STATUS_NAMES.items()}


class PlinthError(Exception):
    """A refused call: `code` is the gRPC status name (e.g. "INVALID_ARGUMENT"), `errors` the
    per-node validation errors when the graph was invalid."""

    def __init__(self, code: str, message: str, errors: list[common_pb2.NodeError] | None = None) -> None:
        self.code, self.message, self.errors = code, message, errors or []
        super().__init__(f"{code}: {message}")


class JobFailed(PlinthError):
    """A job that ended failed or cancelled; `result` holds what it did produce."""

    def __init__(self, result: RunResult) -> None:
        self.result = result
        super().__init__(result.status.upper(), result.error or result.status)


def checked(result: RunResult, check: bool) -> RunResult:
    """The result, or JobFailed when asked to check and the job did not complete."""
    if check and result.status != "completed":
        raise JobFailed(result)
    return result


def error_from_rpc(error: grpc.RpcError) -> PlinthError:
    from grpc_status import rpc_status

    code = error.code().name if error.code() else "UNKNOWN"
    errors = []
    status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
    for detail in status.details if status else ():
        if detail.Is(common_pb2.GraphErrors.DESCRIPTOR):
            unpacked = common_pb2.GraphErrors()
            detail.Unpack(unpacked)
            errors.extend(unpacked.errors)
    return PlinthError(code, error.details() or "", errors)


def graph_json(graph: GraphLike) -> str:
    if isinstance(graph, Path):
        return graph.read_text()
    if isinstance(graph, str):
        return graph
    return json.dumps(graph)


def image_bytes(value: ImageLike) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    return Path(value).read_bytes()


def submit_request(
    graph: GraphLike,
    inputs: Mapping[str, ImageLike] | None,
    priority: int,
    omit_image_bytes: bool = False,
    deadline_seconds: float = 0.0,
    results_only: bool = False,
) -> gs.SubmitRequest:
    return gs.SubmitRequest(
        graph_json=graph_json(graph),
        priority=priority,
        omit_image_bytes=omit_image_bytes,
        deadline_seconds=deadline_seconds,
        results_only=results_only,
        inputs=[gs.InputImage(name=name, data=image_bytes(v)) for name, v in (inputs or {}).items()],
    )


@dataclass
class NodeStatus:
    class_type: str
    status: str  # "executed" or "cached"
    seconds: float


@dataclass
class RunResult:
    """A finished job as the client saw it: its images decoded, and how each node ran."""

    job_id: str = ""
    status: str = ""
    error: str = ""
    images: list[Image.Image] = field(default_factory=list)
    image_refs: list[common_pb2.ImageRef] = field(default_factory=list)
    nodes: dict[str, NodeStatus] = field(default_factory=dict)
    events: list[gs.JobEvent] = field(default_factory=list)

    def add(self, event: gs.JobEvent) -> None:
        """Fold one event into the result."""
        self.events.append(event)
        self.job_id = event.job_id
        kind = event.WhichOneof("kind")
        if kind == "node_cached":
            self.nodes[event.node_cached.node_id] = NodeStatus(event.node_cached.class_type, "cached", 0.0)
        elif kind == "node_finished":
            f = event.node_finished
            self.nodes[f.node_id] = NodeStatus(f.class_type, "executed", f.seconds)
        elif kind == "output":
            for ref in event.output.images:
                self.image_refs.append(ref)
                if ref.png:
                    self.images.append(Image.open(io.BytesIO(ref.png)))
        elif kind in ("completed", "failed", "cancelled"):
            self.status = kind
            for node_id, run in event.nodes.items():  # the whole picture, also when only results streamed
                self.nodes[node_id] = NodeStatus(run.class_type, run.status, run.seconds)
            if kind == "failed":
                f = event.failed
                where = f" in node {f.node_id} ({f.class_type})" if f.node_id else ""
                self.error = f"{f.error_type or 'error'}{where}: {f.message}"
            elif kind == "cancelled":
                self.error = event.cancelled.reason
