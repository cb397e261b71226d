"""NodeService: the node library's schemas, as validation uses them."""

from __future__ import annotations

from plinth.clients.v1 import node_service_pb2 as ns
from plinth.clients.v1 import node_service_pb2_grpc as ns_grpc
from plinth.server.api import convert
from plinth.server.components import Components


class NodeServicer(ns_grpc.NodeServiceServicer):
    def __init__(self, components: Components) -> None:
        self.components = components

    def ListNodes(self, request, context):
        choices = self.components.resources().choices
        return ns.ListNodesResponse(
            nodes=[convert.node_schema(cls.schema, choices) for cls in self.components.registry.values()]
        )
