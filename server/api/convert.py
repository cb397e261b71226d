"""Conversions between the engine's plain objects and the wire messages."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator

from plinth.clients.v1 import common_pb2
from plinth.clients.v1 import graph_service_pb2 as gs
from plinth.clients.v1 import node_service_pb2 as ns
from plinth.nodes.core.context import ImageRef
from plinth.nodes.core.schema import Choice, Float, Int, NodeSchema, String
from plinth.server.engine import events as ev
from plinth.server.engine.graph import GraphError
from plinth.server.jobs.job import Job, JobStatus

STATUS_TO_PB = {
    JobStatus.QUEUED: common_pb2.JOB_STATUS_QUEUED,
    JobStatus.RUNNING: common_pb2.JOB_STATUS_RUNNING,
    JobStatus.COMPLETED: common_pb2.JOB_STATUS_COMPLETED,
    JobStatus.FAILED: common_pb2.JOB_STATUS_FAILED,
    JobStatus.CANCELLED: common_pb2.JOB_STATUS_CANCELLED,
}
PB_TO_STATUS = {v: k for k, v in STATUS_TO_PB.items()}


# Reads a stored output PNG by image id (AssetStore.read_image); None when it is gone.
ReadImage = Callable[[str], bytes | None]


def image_ref(
    image: ImageRef, node_id: str, with_bytes: bool, read_image: ReadImage | None = None, max_inline: int = 1 << 62
) -> common_pb2.ImageRef:
    """A reference; previews always carry their bytes, since they are not stored to fetch. An
    output read back from the job store has no bytes in memory: `read_image` fetches them. An
    output bigger than `max_inline` goes without its bytes (Download streams it), so no event
    is ever too big to send."""
    png = b""
    if with_bytes or image.kind != "output":
        png = image.png
        if not png and image.kind == "output" and read_image is not None:
            png = read_image(image.id) or b""
        if len(png) > max_inline and image.kind == "output":
            png = b""
    return common_pb2.ImageRef(
        id=image.id,
        node_id=node_id,
        filename=image.filename,
        width=image.width,
        height=image.height,
        png=png,
        kind=image.kind,
    )


def event(
    event: ev.Event, with_bytes: bool = True, read_image: ReadImage | None = None, max_inline: int = 1 << 62
) -> gs.JobEvent:
    p = event.payload
    msg = gs.JobEvent(job_id=event.job_id, seq=event.seq, time=event.time)
    if isinstance(p, ev.Queued):
        msg.queued.position = p.position
    elif isinstance(p, ev.Started):
        msg.started.node_ids.extend(p.node_ids)
    elif isinstance(p, ev.NodeStarted):
        msg.node_started.CopyFrom(gs.NodeStarted(node_id=p.node_id, class_type=p.class_type))
    elif isinstance(p, ev.Progress):
        msg.progress.CopyFrom(gs.Progress(node_id=p.node_id, step=p.step, total=p.total))
    elif isinstance(p, ev.NodeCached):
        msg.node_cached.CopyFrom(gs.NodeCached(node_id=p.node_id, class_type=p.class_type))
    elif isinstance(p, ev.NodeFinished):
        msg.node_finished.CopyFrom(gs.NodeFinished(node_id=p.node_id, class_type=p.class_type, seconds=p.seconds))
    elif isinstance(p, ev.Output):
        msg.output.node_id = p.node_id
        msg.output.images.extend(image_ref(i, p.node_id, with_bytes, read_image, max_inline) for i in p.images)
    elif isinstance(p, ev.Completed):
        msg.completed.seconds = p.seconds
    elif isinstance(p, ev.Failed):
        msg.failed.CopyFrom(
            gs.Failed(message=p.message, node_id=p.node_id, class_type=p.class_type, error_type=p.error_type)
        )
    elif isinstance(p, ev.Cancelled):
        msg.cancelled.reason = p.reason
    return msg


def packed_outputs(
    events: list[ev.Event], with_bytes: bool, read_image: ReadImage | None, max_inline: int
) -> Iterator[gs.JobEvent]:
    """Output events as few messages: consecutive images of one node share an Output event
    (with the first one's seq and time) while their bytes fit `max_inline`."""
    message: gs.JobEvent | None = None
    size = 0
    for event in events:
        for image in event.payload.images:
            ref = image_ref(image, event.payload.node_id, with_bytes, read_image, max_inline)
            if message is None or message.output.node_id != event.payload.node_id or size + len(ref.png) > max_inline:
                if message is not None:
                    yield message
                message = gs.JobEvent(job_id=event.job_id, seq=event.seq, time=event.time)
                message.output.node_id, size = event.payload.node_id, 0
            message.output.images.append(ref)
            size += len(ref.png)
    if message is not None:
        yield message


def job(job: Job) -> gs.Job:
    return gs.Job(
        job_id=job.id,
        status=STATUS_TO_PB[job.status],
        priority=job.priority,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=job.error,
        outputs=[image_ref(i, job.output_nodes.get(i.id, ""), False) for i in job.outputs],
        nodes={k: node_run(v) for k, v in job.nodes.items()},
    )


def node_run(run: ev.NodeRun) -> gs.NodeRun:
    return gs.NodeRun(class_type=run.class_type, status=run.status, seconds=run.seconds)


def node_error(error: GraphError) -> common_pb2.NodeError:
    return common_pb2.NodeError(
        node_id=error.node_id, class_type=error.class_type, input=error.input, code=error.code, message=error.message
    )


def node_schema(schema: NodeSchema, choices) -> ns.NodeSchema:
    """`choices(source)` resolves dynamic choice lists (model files, uploaded images)."""
    msg = ns.NodeSchema(
        class_type=schema.class_type,
        display_name=schema.display_name,
        category=schema.category,
        description=schema.description,
        output_node=schema.output_node,
        origin=schema.origin,
        outputs=[ns.OutputSchema(name=o.label, type=o.type) for o in schema.outputs],
    )
    for spec in schema.inputs:
        item = ns.InputSchema(name=spec.name, type=spec.type, required=not spec.optional, tooltip=spec.tooltip)
        if spec.has_default:
            item.default_json = json.dumps(spec.default)
        if isinstance(spec, (Int, Float)):
            for bound in ("min", "max", "step"):
                value = getattr(spec, bound)
                if math.isfinite(value):
                    setattr(item, bound, float(value))
        if isinstance(spec, Int):
            item.control_after_generate = spec.control_after_generate
        if isinstance(spec, String):
            item.multiline = spec.multiline
        if isinstance(spec, Choice):
            item.choices.extend(spec.options if not spec.source else choices(spec.source))
            item.image_upload = spec.image_upload
        msg.inputs.append(item)
    return msg
