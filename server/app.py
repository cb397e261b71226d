"""Assembling the gRPC server: Plinth's services, health checking and reflection."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from plinth.clients.v1 import graph_service_pb2, graph_service_pb2_grpc, node_service_pb2, node_service_pb2_grpc
from plinth.server.api.graph_service import GraphServicer
from plinth.server.api.node_service import NodeServicer
from plinth.server.config import Config
from plinth.server.service import PlinthService

log = logging.getLogger("plinth.server")

SERVICE_NAMES = (
    graph_service_pb2.DESCRIPTOR.services_by_name["GraphService"].full_name,
    node_service_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name,
)


class PlinthServer:
    """A running Plinth server: the service core plus a gRPC server bound to host:port.

    Port 0 picks a free port; `port` tells which after start(). Each open Watch or Run stream
    holds one of the `max_workers` threads for its job's life; calls beyond that wait.
    """

    def __init__(self, config: Config, max_workers: int = 128) -> None:
        self.config = config
        self.service = PlinthService(config)
        self.host = config.host
        self.health = health.HealthServicer()
        options = [("grpc.max_send_message_length", config.limits.max_message_bytes),
                   ("grpc.max_receive_message_length", config.limits.max_message_bytes)]
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="plinth-rpc"),
                                options=options)
        graph_service_pb2_grpc.add_GraphServiceServicer_to_server(GraphServicer(self.service), self.grpc)
        node_service_pb2_grpc.add_NodeServiceServicer_to_server(NodeServicer(self.service), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        self.port = self.grpc.add_insecure_port(f"{config.host}:{config.port}")
        if self.port == 0:
            raise OSError(f"could not bind {config.host}:{config.port}")

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self) -> "PlinthServer":
        self.service.start()
        self.grpc.start()
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving on %s (device %s)", self.address, self.service.device)
        return self

    def stop(self, grace: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.grpc.stop(grace).wait()
        self.service.stop()

    def wait(self) -> None:
        self.grpc.wait_for_termination()

    def __enter__(self) -> "PlinthServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
