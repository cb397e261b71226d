"""Turning engine errors into gRPC statuses with structured details."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from plinth.clients.v1 import common_pb2
from plinth.server.api import convert
from plinth.server.engine.graph import GraphValidationError


def invalid_graph(error: GraphValidationError) -> grpc.Status:
    """INVALID_ARGUMENT with every error: a plinth.v1.GraphErrors detail for Plinth clients and a
    google.rpc.BadRequest (field `nodes.<id>.inputs.<name>`) for generic gRPC tooling."""
    errors = common_pb2.GraphErrors(errors=[convert.node_error(e) for e in error.errors])
    bad_request = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=_field_path(e.node_id, e.input), description=str(e))
        for e in error.errors])
    details = []
    for message in (errors, bad_request):
        packed = any_pb2.Any()
        packed.Pack(message)
        details.append(packed)
    summary = f"graph is invalid ({len(error.errors)} error{'s' if len(error.errors) != 1 else ''}): {error}"
    return rpc_status.to_status(status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT, message=summary[:4000], details=details))


def _field_path(node_id: str, input_name: str) -> str:
    if not node_id:
        return "graph"
    return f"nodes.{node_id}.inputs.{input_name}" if input_name else f"nodes.{node_id}"
