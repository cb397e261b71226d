"""NodeService: the node library's schemas, as validation uses them."""

from __future__ import annotations

from plinth.clients.v1 import node_service_pb2 as ns
from plinth.clients.v1 import node_service_pb2_grpc as ns_grpc
from plinth.server.api import convert
from plinth.server.jobs.resources import JobResources
from plinth.server.service import PlinthService


class NodeServicer(ns_grpc.NodeServiceServicer):
    def __init__(self, service: PlinthService) -> None:
        self.service = service

    def ListNodes(self, request, context):
        choices = JobResources(self.service.folders, self.service.assets, self.service.models).choices
        return ns.ListNodesResponse(
            nodes=[convert.node_schema(cls.schema, choices) for cls in self.service.registry.values()]
        )
