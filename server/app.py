"""Assembling the gRPC server: Plinth's services, health checking and reflection, behind
bearer tokens and TLS when the config's `auth` asks for them."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from plinth.clients.v1 import (
    asset_service_pb2,
    asset_service_pb2_grpc,
    graph_service_pb2,
    graph_service_pb2_grpc,
    model_service_pb2,
    model_service_pb2_grpc,
    node_service_pb2,
    node_service_pb2_grpc,
)
from plinth.server.api.asset_service import AssetServicer
from plinth.server.api.auth import BearerTokenInterceptor
from plinth.server.api.graph_service import GraphServicer
from plinth.server.api.model_service import ModelServicer
from plinth.server.api.node_service import NodeServicer
from plinth.server.components import build_components
from plinth.server.config import Auth, Config, ConfigError, tokens
from plinth.server.metrics import Metrics

log = logging.getLogger("plinth.server")
# Threads beyond one per admissible job: the running job's stream, late watchers, unary calls.
STREAM_HEADROOM = 64

SERVICE_NAMES = (
    graph_service_pb2.DESCRIPTOR.services_by_name["GraphService"].full_name,
    node_service_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name,
    asset_service_pb2.DESCRIPTOR.services_by_name["AssetService"].full_name,
    model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
)


# Reachable without a token, so load balancers, Kubernetes probes and grpcurl need no secret.
OPEN_SERVICES = (health.SERVICE_NAME, reflection.SERVICE_NAME)


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server reachable from this machine only: localhost,
    127.0.0.0/8 or ::1. Any other name counts as reachable from the network."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _accepted_tokens(config: Config) -> frozenset[str]:
    """The configured bearer tokens; none is an error unless the server listens on loopback
    only, where every caller is already on this machine."""
    accepted = tokens(config.auth)
    if not accepted and not is_loopback(config.host):
        raise ConfigError(
            f"host {config.host!r} is not loopback, so bearer tokens are required: set auth.token_file "
            "or auth.tokens (PLINTH_AUTH_TOKEN_FILE or PLINTH_AUTH_TOKENS), or bind 127.0.0.1"
        )
    if accepted and config.auth.tls_cert is None and not is_loopback(config.host):
        log.warning("bearer tokens will cross the network in clear text: set auth.tls_cert and auth.tls_key")
    return accepted


def _read_setting(auth: Auth, name: str) -> bytes | None:
    """The bytes of the file auth.<name> names, or None when unset; unreadable is a ConfigError."""
    path = getattr(auth, name)
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"auth.{name} {path}: {exc}") from exc


def _server_credentials(auth: Auth) -> grpc.ServerCredentials | None:
    """TLS credentials from auth.tls_cert and auth.tls_key (PEM), requiring client certificates
    signed by auth.tls_client_ca when that is set; None for plain text."""
    if auth.tls_cert is None and auth.tls_key is None:
        if auth.tls_client_ca is not None:
            raise ConfigError("auth.tls_client_ca needs auth.tls_cert and auth.tls_key")
        return None
    if auth.tls_cert is None or auth.tls_key is None:
        raise ConfigError("auth.tls_cert and auth.tls_key go together: set both or neither")
    client_ca = _read_setting(auth, "tls_client_ca")
    return grpc.ssl_server_credentials(
        [(_read_setting(auth, "tls_key"), _read_setting(auth, "tls_cert"))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class PlinthServer:
    """A running Plinth server: its components (server/components.py) behind a gRPC server bound
    to host:port.

    Port 0 picks a free port; `port` tells which after start(). Each open Watch or Run stream
    holds one of the `thread for its job's life: the pool has room for every job the queue admits plus
    STREAM_HEADROOM more, so health checks, cancels and refusals are still answered.
    `config.auth` decides the rest: with tokens every call but health and reflection must carry
    one, with tls_cert and tls_key the port speaks TLS only (mutual TLS with tls_client_ca).
    Anything but a loopback host without tokens raises ConfigError before anything starts.
    """

    def __init__(self, config: Config) -> None:
        accepted = _accepted_tokens(config)
        credentials = _server_credentials(config.auth)
        self.config = config
        self.components = build_components(config)
        self.metrics: Metrics | None = None
        self.metrics_port = 0
        self._stop_metrics: Callable[[], None] = lambda: None
        self.host = config.host
        self.health = health.HealthServicer()
        options = [
            ("grpc.max_send_message_length", config.limits.max_message_bytes),
            ("grpc.max_receive_message_length", config.limits.max_message_bytes),
        ]
        interceptors = [BearerTokenInterceptor(accepted, exempt=OPEN_SERVICES)] if accepted else []
        workers = futures.ThreadPoolExecutor(
            max_workers=config.limits.max_queue + STREAM_HEADROOM, thread_name_prefix="plinth-rpc"
        )
        self.grpc = grpc.server(workers, options=options, interceptors=interceptors)
        parts = self.components
        graph_servicer = GraphServicer(parts.jobs, parts.assets, config.limits)
        graph_service_pb2_grpc.add_GraphServiceServicer_to_server(graph_servicer, self.grpc)
        node_service_pb2_grpc.add_NodeServiceServicer_to_server(NodeServicer(parts), self.grpc)
        asset_servicer = AssetServicer(parts.assets, config.limits)
        asset_service_pb2_grpc.add_AssetServiceServicer_to_server(asset_servicer, self.grpc)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(parts), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((*SERVICE_NAMES, *OPEN_SERVICES), self.grpc)
        target = f"{config.host}:{config.port}"
        self.port = (
            self.grpc.add_secure_port(target, credentials) if credentials else self.grpc.add_insecure_port(target)
        )
        if self.port == 0:
            raise OSError(f"could not bind {config.host}:{config.port}")

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self) -> PlinthServer:
        self.components.jobs.start()
        self.grpc.start()
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.metrics_port:
            self.metrics = Metrics(self.components)
            self.metrics_port, self._stop_metrics = self.metrics.start_http(self.config.metrics_port, self.config.host)
            log.info("metrics on http://%s:%d/metrics", self.config.host, self.metrics_port)
        log.info("serving on %s (device %s)", self.address, self.components.device)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Graceful: health says NOT_SERVING, no new jobs, the running job gets `grace` seconds
        (default config.shutdown_grace) before it is cancelled and recorded; then the RPCs end,
        the job store is closed and the data directory released."""
        self.health.enter_graceful_shutdown()
        self.components.jobs.stop(self.config.shutdown_grace if grace is None else grace)
        self.grpc.stop(1.0).wait()
        self._stop_metrics()
        self.components.jobs.close()

    def wait(self) -> None:
        self.grpc.wait_for_termination()

    def __enter__(self) -> PlinthServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
