"""GraphService: Submit, Watch, Run, GetJob, CancelJob, ListJobs over the PlinthService."""

from __future__ import annotations

import threading
from typing import Iterator

import grpc

from plinth.clients.v1 import graph_service_pb2 as gs, graph_service_pb2_grpc as gs_grpc
from plinth.server.api import convert
from plinth.server.api.errors import invalid_graph
from plinth.server.engine.graph import GraphValidationError
from plinth.server.jobs.job import Job
from plinth.server.service import PlinthService

MAX_PAGE = 500


class GraphServicer(gs_grpc.GraphServiceServicer):
    def __init__(self, service: PlinthService) -> None:
        self.service = service

    def _submit(self, request: gs.SubmitRequest, context: grpc.ServicerContext) -> Job:
        inputs: dict[str, bytes] = {}
        for image in request.inputs:
            if not image.name:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input image with an empty name")
            if image.name in inputs:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"input image {image.name!r} sent twice")
            inputs[image.name] = image.data
        try:
            return self.service.submit(request.graph_json, inputs, request.priority)
        except GraphValidationError as exc:
            context.abort_with_status(invalid_graph(exc))
            raise  # abort_with_status raises; this line only satisfies type checkers

    def _job(self, job_id: str, context: grpc.ServicerContext) -> Job:
        try:
            return self.service.get(job_id)
        except KeyError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no job {job_id!r}")
            raise

    def _stream(self, job: Job, context: grpc.ServicerContext, with_bytes: bool) -> Iterator[gs.JobEvent]:
        gone = threading.Event()
        context.add_callback(gone.set)
        for event in job.watch(stop=gone):
            yield convert.event(event, with_bytes)

    def Submit(self, request, context):
        return gs.SubmitResponse(job_id=self._submit(request, context).id)

    def Watch(self, request, context):
        yield from self._stream(self._job(request.job_id, context), context, True)

    def Run(self, request, context):
        job = self._submit(request, context)

        def cancel_if_abandoned() -> None:
            if not job.status.terminal:
                self.service.cancel(job.id)

        context.add_callback(cancel_if_abandoned)
        yield from self._stream(job, context, not request.omit_image_bytes)

    def GetJob(self, request, context):
        return convert.job(self._job(request.job_id, context))

    def CancelJob(self, request, context):
        self._job(request.job_id, context)
        return convert.job(self.service.cancel(request.job_id))

    def ListJobs(self, request, context):
        if request.page_size < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_size must not be negative")
        try:
            offset = int(request.page_token or 0)
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad page_token {request.page_token!r}")
        unknown = [s for s in request.statuses if s not in convert.PB_TO_STATUS]
        if unknown:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown status value(s) {unknown}")
        size = min(request.page_size or 100, MAX_PAGE)
        jobs = self.service.jobs(convert.PB_TO_STATUS[s] for s in request.statuses)
        page = jobs[offset:offset + size]
        next_token = str(offset + size) if offset + size < len(jobs) else ""
        return gs.ListJobsResponse(jobs=[convert.job(j) for j in page], next_page_token=next_token)
