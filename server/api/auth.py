"""Bearer-token authentication: a server interceptor that lets a call through only when its
`authorization: Bearer <token>` metadata names one of the configured tokens.

gRPC has no per-service switch for this, so the check sits in front of every handler; the
services a load balancer or grpcurl must reach without a secret (health, reflection) are named
as exempt. Refusals are UNAUTHENTICATED with a message that says what was wrong without ever
repeating what the caller sent, and tokens are compared in constant time so response timing
does not reveal how much of a guess was right.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterable

import grpc

log = logging.getLogger("plinth.auth")

HandlerFactory = Callable[..., grpc.RpcMethodHandler]
# The handler constructor for each (request_streaming, response_streaming) pair, so a refusal
# answers with the same RPC kind the client expects.
_HANDLER_KINDS: dict[tuple[bool, bool], HandlerFactory] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call to a service outside `exempt` unless it carries an accepted token.

    `exempt` holds full service names (e.g. "grpc.health.v1.Health").
    """

    def __init__(self, tokens: Iterable[str], exempt: Iterable[str] = ()) -> None:
        self._tokens = tuple(token.encode() for token in tokens)
        if not self._tokens:
            raise ValueError("BearerTokenInterceptor needs at least one token")
        self._exempt = frozenset(exempt)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").partition("/")[0]
        if handler is None or service in self._exempt:
            return handler
        problem = self._problem(handler_call_details.invocation_metadata or ())
        return handler if problem is None else _refusal(handler, handler_call_details.method, problem)

    def _problem(self, metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
        """Why the call's credentials are refused, or None when they are accepted."""
        value = next((v for k, v in metadata if k == "authorization"), None)
        if value is None:
            return "missing bearer token: send 'authorization: Bearer <token>' metadata"
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "malformed authorization metadata: expected 'Bearer <token>'"
        return None if self._accepts(token.strip().encode()) else "invalid bearer token"

    def _accepts(self, token: bytes) -> bool:
        # A list, not a generator: compare against every token so timing does not tell which matched.
        return any([hmac.compare_digest(token, known) for known in self._tokens])


def _refusal(handler: grpc.RpcMethodHandler, method: str, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that aborts with UNAUTHENTICATED. It leaves the
    request undecoded: nothing an unauthenticated caller sent is parsed."""

    def refuse(request: object, context: grpc.ServicerContext) -> None:
        log.warning("refused %s from %s: %s", method, context.peer(), message)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)](refuse)
