"""The asyncio twin of Client, on grpc.aio, with the same methods as coroutines."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping

import grpc

from plinth.clients.client import (
    CHANNEL_OPTIONS,
    CHUNK_BYTES,
    TLS,
    EventHandler,
    UploadSource,
    _model_name,
    auth_metadata,
    upload_chunks,
)
from plinth.clients.results import (
    STATUS_VALUES,
    GraphLike,
    ImageLike,
    RunResult,
    checked,
    error_from_rpc,
    submit_request,
)
from plinth.clients.v1 import asset_service_pb2 as asp
from plinth.clients.v1 import asset_service_pb2_grpc as asp_grpc
from plinth.clients.v1 import graph_service_pb2 as gs
from plinth.clients.v1 import graph_service_pb2_grpc as gs_grpc
from plinth.clients.v1 import model_service_pb2 as ms
from plinth.clients.v1 import model_service_pb2_grpc as ms_grpc
from plinth.clients.v1 import node_service_pb2 as ns
from plinth.clients.v1 import node_service_pb2_grpc as ns_grpc


class AsyncClient:
    """As Client: the same token ($PLINTH_TOKEN when None) and TLS options."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        timeout: float | None = None,
        token: str | None = None,
        tls: TLS | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.metadata = auth_metadata(token)
        self.channel = (
            grpc.aio.secure_channel(address, tls.credentials(), options=CHANNEL_OPTIONS)
            if tls is not None
            else grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        )
        self.graphs = gs_grpc.GraphServiceStub(self.channel)
        self.nodes = ns_grpc.NodeServiceStub(self.channel)
        self.assets = asp_grpc.AssetServiceStub(self.channel)
        self.models = ms_grpc.ModelServiceStub(self.channel)

    async def run(
        self,
        graph: GraphLike,
        inputs: Mapping[str, ImageLike] | None = None,
        priority: int = 0,
        on_event: EventHandler | None = None,
        check: bool = True,
        omit_image_bytes: bool = False,
        results_only: bool | None = None,
    ) -> RunResult:
        """As Client.run."""
        result = RunResult()
        try:
            if results_only is None:  # nobody to show progress to: only the outputs and the end
                results_only = on_event is None
            request = submit_request(graph, inputs, priority, omit_image_bytes, results_only=results_only)
            async for event in self.graphs.Run(request, timeout=self.timeout, metadata=self.metadata):
                result.add(event)
                if on_event:
                    on_event(event)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return checked(result, check)

    async def submit(
        self,
        graph: GraphLike,
        inputs: Mapping[str, ImageLike] | None = None,
        priority: int = 0,
        deadline_seconds: float = 0.0,
    ) -> str:
        """As Client.submit."""
        request = submit_request(graph, inputs, priority, deadline_seconds=deadline_seconds)
        return (await self._call(self.graphs.Submit, request)).job_id

    async def watch(self, job_id: str) -> AsyncIterator[gs.JobEvent]:
        try:
            async for event in self.graphs.Watch(
                gs.WatchRequest(job_id=job_id), timeout=self.timeout, metadata=self.metadata
            ):
                yield event
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    async def get_job(self, job_id: str) -> gs.Job:
        return await self._call(self.graphs.GetJob, gs.GetJobRequest(job_id=job_id))

    async def cancel(self, job_id: str) -> gs.Job:
        return await self._call(self.graphs.CancelJob, gs.CancelJobRequest(job_id=job_id))

    async def list_jobs(
        self, statuses: Iterable[str] = (), page_size: int = 100, page_token: str = ""
    ) -> gs.ListJobsResponse:
        request = gs.ListJobsRequest(
            statuses=[STATUS_VALUES[s] for s in statuses], page_size=page_size, page_token=page_token
        )
        return await self._call(self.graphs.ListJobs, request)

    async def get_image(self, image_id: str) -> bytes:
        """As Client.get_image."""
        return (await self._call(self.graphs.GetImage, gs.GetImageRequest(image_id=image_id))).png

    async def list_nodes(self) -> list[ns.NodeSchema]:
        return list((await self._call(self.nodes.ListNodes, ns.ListNodesRequest())).nodes)

    async def upload(self, source: UploadSource, name: str | None = None, chunk_bytes: int = CHUNK_BYTES) -> str:
        """As Client.upload."""
        return (await self.upload_asset(source, name, chunk_bytes)).id

    async def upload_asset(
        self, source: UploadSource, name: str | None = None, chunk_bytes: int = CHUNK_BYTES
    ) -> asp.Asset:
        """As Client.upload_asset."""
        return await self._call(self.assets.Upload, upload_chunks(source, name, chunk_bytes))

    async def download(self, asset_id: str) -> bytes:
        """As Client.download."""
        return b"".join([c.data async for c in self.download_chunks(asset_id)])

    async def download_chunks(self, asset_id: str) -> AsyncIterator[asp.DownloadChunk]:
        """As Client.download_chunks."""
        try:
            async for chunk in self.assets.Download(
                asp.DownloadRequest(id=asset_id), timeout=self.timeout, metadata=self.metadata
            ):
                yield chunk
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    async def list_models(self, folder: str = "") -> list[ms.Model]:
        """As Client.list_models."""
        return list((await self._call(self.models.ListModels, ms.ListModelsRequest(folder=folder))).models)

    async def load_model(self, folder: str, name: str | None = None) -> ms.Model:
        """As Client.load_model."""
        folder, name = _model_name(folder, name)
        return await self._call(self.models.LoadModel, ms.LoadModelRequest(folder=folder, name=name))

    async def unload_model(self, folder: str, name: str | None = None) -> ms.Model:
        """As Client.unload_model."""
        folder, name = _model_name(folder, name)
        return await self._call(self.models.UnloadModel, ms.UnloadModelRequest(folder=folder, name=name))

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
