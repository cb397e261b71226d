"""The Python client: run graphs on a Plinth server and get PIL images back.

    from plinth.clients import Client
    with Client("127.0.0.1:50051") as client:
        result = client.run(Path("graphs/txt2img.json"))
        result.images[0].save("out.png")

Images of any size go up and down in chunks; a graph's LoadImage names an upload by its id:

    graph["10"]["inputs"]["image"] = client.upload(Path("photo.png"))
    png = client.download(result.image_refs[0].id)

Models can be loaded ahead of the graphs that use them, and released:

    client.load_model("checkpoints", "v1-5-pruned-emaonly.safetensors")
    [(m.folder, m.name, m.loaded) for m in client.list_models()]

A server that needs a token and TLS:

    Client("plinth.internal:50051", token="...", tls=TLS(root_cert=Path("ca.pem")))
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

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

MAX_MESSAGE_BYTES = 64 << 20
# Bytes per Upload message: far below gRPC's default 4 MiB message limit.
CHUNK_BYTES = 1 << 20
UploadSource = bytes | str | Path


def upload_chunks(
    source: UploadSource, name: str | None = None, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[asp.UploadChunk]:
    """The Upload request stream for a file (read as it is sent) or bytes: the name in the
    first chunk (default: the file's name, or "upload"), then data only. A missing file
    raises OSError here, before any call is made."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = name or "upload"

        def chunks() -> Iterator[asp.UploadChunk]:
            yield asp.UploadChunk(name=name, data=data[:chunk_bytes])
            for start in range(chunk_bytes, len(data), chunk_bytes):
                yield asp.UploadChunk(data=data[start : start + chunk_bytes])

        return chunks()
    path = Path(source)
    handle = path.open("rb")
    name = name or path.name

    def from_file() -> Iterator[asp.UploadChunk]:
        with handle:
            yield asp.UploadChunk(name=name, data=handle.read(chunk_bytes))
            while data := handle.read(chunk_bytes):
                yield asp.UploadChunk(data=data)

    return from_file()


def _model_name(folder: str, name: str | None) -> tuple[str, str]:
    """(folder, name) from both, or from one "folder/name" string."""
    if name is None:
        folder, _, name = folder.partition("/")
    return folder, name


CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
EventHandler = Callable[[gs.JobEvent], None]
Metadata = tuple[tuple[str, str], ...]
TOKEN_VARIABLE = "PLINTH_TOKEN"


@dataclass(frozen=True)
class TLS:
    """How the client checks the server and, for mutual TLS, proves who it is (PEM files).

    root_cert: the CA certificate that signed the server's certificate (None: the system's
    roots). cert and key: this client's certificate chain and private key, both or neither.
    """

    root_cert: Path | str | None = None
    cert: Path | str | None = None
    key: Path | str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS: cert and key go together (both for mutual TLS, or neither)")
        return grpc.ssl_channel_credentials(_read(self.root_cert), _read(self.key), _read(self.cert))


def _read(path: Path | str | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def auth_metadata(token: str | None) -> Metadata | None:
    """The metadata every call carries: the bearer token, else $PLINTH_TOKEN when token is None.
    An empty token (given or from the environment) sends none."""
    token = os.environ.get(TOKEN_VARIABLE) if token is None else token
    return (("authorization", f"Bearer {token}"),) if token else None


class Client:
    """Calls to one server. `token` goes out as "authorization: Bearer <token>" on every call
    (None: $PLINTH_TOKEN); `tls` switches the channel to TLS (None: plain text)."""

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
            grpc.secure_channel(address, tls.credentials(), options=CHANNEL_OPTIONS)
            if tls is not None
            else grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        )
        self.graphs = gs_grpc.GraphServiceStub(self.channel)
        self.nodes = ns_grpc.NodeServiceStub(self.channel)
        self.assets = asp_grpc.AssetServiceStub(self.channel)
        self.models = ms_grpc.ModelServiceStub(self.channel)

    def run(
        self,
        graph: GraphLike,
        inputs: Mapping[str, ImageLike] | None = None,
        priority: int = 0,
        on_event: EventHandler | None = None,
        check: bool = True,
        omit_image_bytes: bool = False,
        results_only: bool | None = None,
    ) -> RunResult:
        """Submit a graph, follow it to the end and return its images and per-node status.

        Raises PlinthError when the server refuses the graph, and JobFailed when the job fails
        or is cancelled (unless check=False). Without on_event the server streams only the
        outputs and the end (results_only; `result.events` then holds just those).
        """
        result = RunResult()
        try:
            if results_only is None:  # nobody to show progress to: only the outputs and the end
                results_only = on_event is None
            request = submit_request(graph, inputs, priority, omit_image_bytes, results_only=results_only)
            for event in self.graphs.Run(request, timeout=self.timeout, metadata=self.metadata):
                result.add(event)
                if on_event:
                    on_event(event)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return checked(result, check)

    def submit(
        self,
        graph: GraphLike,
        inputs: Mapping[str, ImageLike] | None = None,
        priority: int = 0,
        deadline_seconds: float = 0.0,
    ) -> str:
        """Queue a graph and return its job id; with deadline_seconds the server cancels the job
        if it has not ended by then."""
        request = submit_request(graph, inputs, priority, deadline_seconds=deadline_seconds)
        return self._call(self.graphs.Submit, request).job_id

    def watch(self, job_id: str) -> Iterator[gs.JobEvent]:
        try:
            yield from self.graphs.Watch(gs.WatchRequest(job_id=job_id), timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def get_job(self, job_id: str) -> gs.Job:
        return self._call(self.graphs.GetJob, gs.GetJobRequest(job_id=job_id))

    def cancel(self, job_id: str) -> gs.Job:
        return self._call(self.graphs.CancelJob, gs.CancelJobRequest(job_id=job_id))

    def list_jobs(
        self, statuses: Iterable[str] = (), page_size: int = 100, page_token: str = ""
    ) -> gs.ListJobsResponse:
        request = gs.ListJobsRequest(
            statuses=[STATUS_VALUES[s] for s in statuses], page_size=page_size, page_token=page_token
        )
        return self._call(self.graphs.ListJobs, request)

    def get_image(self, image_id: str) -> bytes:
        """The PNG bytes of a stored output image (for jobs run with omit_image_bytes)."""
        return self._call(self.graphs.GetImage, gs.GetImageRequest(image_id=image_id)).png

    def list_nodes(self) -> list[ns.NodeSchema]:
        return list(self._call(self.nodes.ListNodes, ns.ListNodesRequest()).nodes)

    # assets

    def upload(self, source: UploadSource, name: str | None = None, chunk_bytes: int = CHUNK_BYTES) -> str:
        """Upload an image (a path, read as it is sent, or bytes) in chunks and return its asset
        id, the sha256 a graph's LoadImage names it by: {"image": asset_id}."""
        return self.upload_asset(source, name, chunk_bytes).id

    def upload_asset(self, source: UploadSource, name: str | None = None, chunk_bytes: int = CHUNK_BYTES) -> asp.Asset:
        """As upload, returning the whole Asset (id, name, size, width, height, format)."""
        return self._call(self.assets.Upload, upload_chunks(source, name, chunk_bytes))

    def download(self, asset_id: str) -> bytes:
        """The bytes of a stored output image or an uploaded asset, fetched in chunks."""
        return b"".join(c.data for c in self.download_chunks(asset_id))

    def download_chunks(self, asset_id: str) -> Iterator[asp.DownloadChunk]:
        """The Download stream itself: the first chunk's `asset` describes the file."""
        try:
            yield from self.assets.Download(
                asp.DownloadRequest(id=asset_id), timeout=self.timeout, metadata=self.metadata
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    # models

    def list_models(self, folder: str = "") -> list[ms.Model]:
        """Every model of the server's models directory (or of one folder), and which are loaded."""
        return list(self._call(self.models.ListModels, ms.ListModelsRequest(folder=folder)).models)

    def load_model(self, folder: str, name: str | None = None) -> ms.Model:
        """Load a model as a graph's loader node would ("checkpoints", "x.safetensors", or
        "checkpoints/x.safetensors"), so later graphs find it loaded."""
        folder, name = _model_name(folder, name)
        return self._call(self.models.LoadModel, ms.LoadModelRequest(folder=folder, name=name))

    def unload_model(self, folder: str, name: str | None = None) -> ms.Model:
        """Release a loaded model (nothing happens when it is not loaded)."""
        folder, name = _model_name(folder, name)
        return self._call(self.models.UnloadModel, ms.UnloadModelRequest(folder=folder, name=name))

    def health(self, service: str = "") -> str:
        """The server's health status name, e.g. "SERVING"."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        reply = self._call(
            health_pb2_grpc.HealthStub(self.channel).Check, health_pb2.HealthCheckRequest(service=service)
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
