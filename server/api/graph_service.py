"""GraphService: Submit, Watch, Run, GetJob, CancelJob, ListJobs over the job manager.

Submit and Run check what the request carries (plinth.server.api.uploads) before the job
manager validates and queues it, and answer UNAVAILABLE once the server is stopping. ListJobs' page token is the
store's cursor (the last job's row number), so pages stay put while new jobs arrive.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator

import grpc
from PIL import Image

from plinth.clients.v1 import common_pb2
from plinth.clients.v1 import graph_service_pb2 as gs
from plinth.clients.v1 import graph_service_pb2_grpc as gs_grpc
from plinth.server.api import convert
from plinth.server.api.errors import invalid_graph, queue_full
from plinth.server.api.uploads import check_request
from plinth.server.config import Limits
from plinth.server.engine import events as ev
from plinth.server.engine.graph import GraphValidationError
from plinth.server.engine.validate import LimitExceeded
from plinth.server.jobs.job import Job
from plinth.server.jobs.manager import JobManager, NotAcceptingJobs, QueueFull
from plinth.server.storage.assets import AssetStore

MAX_PAGE = 500


class GraphServicer(gs_grpc.GraphServiceServicer):
    def __init__(self, jobs: JobManager, assets: AssetStore, limits: Limits) -> None:
        self.jobs = jobs
        self.assets = assets
        self.limits = limits

    def _submit(self, request: gs.SubmitRequest, context: grpc.ServicerContext, call_deadline: bool = False) -> Job:
        """Validate and queue; with call_deadline (Run) the job also ends when the call's own
        gRPC deadline passes."""
        if request.deadline_seconds < 0 or request.deadline_seconds != request.deadline_seconds:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "deadline_seconds must be a number >= 0")
        deadline = request.deadline_seconds
        remaining = context.time_remaining() if call_deadline else None
        if remaining is not None and remaining < 10 * 365 * 86400:  # no deadline reads as "forever"
            deadline = min(deadline, remaining) if deadline else remaining
        inputs: dict[str, bytes] = {}
        for image in request.inputs:
            if not image.name:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input image with an empty name")
            if image.name in inputs:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"input image {image.name!r} sent twice")
            inputs[image.name] = image.data
        try:
            check_request(request.graph_json, inputs, self.limits)
            return self.jobs.submit(request.graph_json, inputs, request.priority, request.omit_image_bytes, deadline)
        except LimitExceeded as exc:
            context.abort_with_status(invalid_graph(exc, grpc.StatusCode.RESOURCE_EXHAUSTED))
            raise  # abort_with_status raises; this line only satisfies type checkers
        except GraphValidationError as exc:
            context.abort_with_status(invalid_graph(exc))
            raise
        except QueueFull as exc:
            context.abort_with_status(queue_full(exc))
            raise
        except NotAcceptingJobs as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise

    def _job(self, job_id: str, context: grpc.ServicerContext) -> Job:
        try:
            return self.jobs.get(job_id)
        except KeyError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no job {job_id!r}")
            raise

    def _stream(self, job: Job, context: grpc.ServicerContext, results_only: bool = False) -> Iterator[gs.JobEvent]:
        """The job's events as they come; the terminal one carries how each node ran. With
        results_only just the outputs, at the end, packed into as few Output events as fit a
        message, and the terminal event: every streamed message costs a few tenths of a
        millisecond, most of a cached run's time."""
        gone = threading.Event()
        if not context.add_callback(gone.set):
            return  # the caller has already gone
        max_inline = self.limits.max_message_bytes - (1 << 16)  # room for the envelope
        with_bytes = not job.omit_image_bytes
        read_image = self.assets.read_image
        outputs: list[ev.Event] = []
        for event in job.watch(stop=gone, results_only=results_only):
            if results_only and isinstance(event.payload, ev.Output):
                outputs.append(event)
                continue
            if results_only:
                yield from convert.packed_outputs(outputs, with_bytes, read_image, max_inline)
            message = convert.event(event, with_bytes=with_bytes, read_image=read_image, max_inline=max_inline)
            if isinstance(event.payload, ev.TERMINAL):
                for node_id, run in job.nodes.items():
                    message.nodes[node_id].CopyFrom(convert.node_run(run))
            yield message

    def Submit(self, request, context):
        return gs.SubmitResponse(job_id=self._submit(request, context).id)

    def Watch(self, request, context):
        yield from self._stream(self._job(request.job_id, context), context)

    def Run(self, request, context):
        job = self._submit(request, context, call_deadline=True)

        def cancel_if_abandoned() -> None:
            if not job.status.terminal:
                self.jobs.cancel(job.id)

        if not context.add_callback(cancel_if_abandoned):
            cancel_if_abandoned()
            return
        yield from self._stream(job, context, request.results_only)

    def GetImage(self, request, context):
        png = self.assets.read_image(request.image_id)
        if png is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no stored image {request.image_id!r}")
        with Image.open(io.BytesIO(png)) as picture:
            width, height = picture.size
        return common_pb2.ImageRef(id=request.image_id, width=width, height=height, png=png, kind="output")

    def GetJob(self, request, context):
        return convert.job(self._job(request.job_id, context))

    def CancelJob(self, request, context):
        self._job(request.job_id, context)
        return convert.job(self.jobs.cancel(request.job_id))

    def ListJobs(self, request, context):
        if request.page_size < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_size must not be negative")
        token = request.page_token
        if token and not (token.isascii() and token.isdigit() and len(token) <= 18):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad page_token {request.page_token!r}")
        unknown = [s for s in request.statuses if s not in convert.PB_TO_STATUS]
        if unknown:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown status value(s) {unknown}")
        size = min(request.page_size or 100, MAX_PAGE)
        jobs, cursor = self.jobs.list(
            (convert.PB_TO_STATUS[s] for s in request.statuses), size, int(token) if token else None
        )
        return gs.ListJobsResponse(
            jobs=[convert.job(j) for j in jobs], next_page_token="" if cursor is None else str(cursor)
        )
