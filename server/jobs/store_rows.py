"""How jobs and events map to the job store's rows and back (server/jobs/store.py has the schema)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, get_args

from plinth.nodes.core.context import ImageRef
from plinth.server.engine import events as ev
from plinth.server.jobs.job import Job, JobStatus
from plinth.server.jobs.store_writer import Statement

JOB_COLUMNS = "n, id, created_at, priority, status, omit_image_bytes, started_at, finished_at, error, outputs, nodes"
PAYLOADS = {cls.__name__: cls for cls in get_args(ev.EventPayload)}


def event_row(event: ev.Event) -> Statement:
    p = event.payload
    if isinstance(p, ev.Output):
        data: dict[str, Any] = {
            "node_id": p.node_id,
            "images": [
                {"id": i.id, "filename": i.filename, "width": i.width, "height": i.height, "kind": i.kind}
                for i in p.images
            ],
        }
    else:
        data = dataclasses.asdict(p)
    return (
        "INSERT INTO events (job_id, seq, time, kind, payload) VALUES (?, ?, ?, ?, ?)",
        (event.job_id, event.seq, event.time, type(p).__name__, json.dumps(data)),
    )


def event_payload(kind: str, payload: str) -> ev.EventPayload:
    data = json.loads(payload)
    if kind == "Output":
        return ev.Output(data["node_id"], [ImageRef(png=b"", **i) for i in data["images"]])
    return PAYLOADS[kind](**data)


def job_from_row(row: tuple) -> Job:
    """A stored job without plan, request or events."""
    _, job_id, created_at, priority, status, omit, started_at, finished_at, error, outputs, nodes = row
    images = json.loads(outputs)
    return Job(
        None,
        None,
        priority,
        omit_image_bytes=bool(omit),
        id=job_id,
        status=JobStatus(status),
        created_at=created_at,
        started_at=started_at,
        finished_at=finished_at,
        error=error,
        outputs=[ImageRef(i["id"], i["filename"], i["width"], i["height"], b"", i["kind"]) for i in images],
        output_nodes={i["id"]: i["node_id"] for i in images},
        nodes={k: ev.NodeRun(**v) for k, v in json.loads(nodes).items()},
    )
