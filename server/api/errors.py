"""Turning engine errors into gRPC statuses with structured details."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from plinth.clients.v1 import common_pb2
from plinth.server.api import convert
from plinth.server.engine.graph import GraphValidationError

# Status details travel in trailing metadata, which clients cap (8 KiB soft, 16 KiB hard by
# default); past the cap a client sees RESOURCE_EXHAUSTED and no errors at all.
DETAILS_BUDGET = 4000  # bytes before base64
SUMMARY_CHARS = 1000


def invalid_graph(error: GraphValidationError, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> grpc.Status:
    """INVALID_ARGUMENT (or RESOURCE_EXHAUSTED for limits) with every error that fits the
    metadata budget, and a last entry saying how many more there are: a plinth.v1.GraphErrors
    detail for Plinth clients and a google.rpc.BadRequest (field `nodes.<id>.inputs.<name>`)
    for generic gRPC tooling."""
    errors = common_pb2.GraphErrors()
    bad_request = error_details_pb2.BadRequest()
    for index, e in enumerate(error.errors):
        if errors.ByteSize() + bad_request.ByteSize() > DETAILS_BUDGET:
            more = len(error.errors) - index
            errors.errors.append(common_pb2.NodeError(code="too_many_errors", message=f"... and {more} more errors"))
            break
        errors.errors.append(convert.node_error(e))
        bad_request.field_violations.append(
            error_details_pb2.BadRequest.FieldViolation(field=_field_path(e.node_id, e.input), description=str(e)[:500])
        )
    details = []
    for message in (errors, bad_request):
        packed = any_pb2.Any()
        packed.Pack(message)
        details.append(packed)
    count = len(error.errors)
    what = "graph is invalid" if code == grpc.StatusCode.INVALID_ARGUMENT else "request is over the server's limits"
    summary = f"{what} ({count} error{'s' if count != 1 else ''}): {error}"
    if len(summary) > SUMMARY_CHARS:
        summary = summary[:SUMMARY_CHARS] + " ..."
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=summary, details=details))


def queue_full(error: Exception) -> grpc.Status:
    """RESOURCE_EXHAUSTED with a google.rpc.RetryInfo saying when to try again."""
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromMilliseconds(int(getattr(error, "retry_after", 1.0) * 1000))
    packed = any_pb2.Any()
    packed.Pack(retry)
    return rpc_status.to_status(
        status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=str(error), details=[packed])
    )


def _field_path(node_id: str, input_name: str) -> str:
    if not node_id:
        return "graph"
    return f"nodes.{node_id}.inputs.{input_name}" if input_name else f"nodes.{node_id}"
