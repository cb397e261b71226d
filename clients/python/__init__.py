"""Plinth's Python SDK: generated stubs (plinth.clients.v1), Client and AsyncClient.

Imports neither torch nor the server, so scripts and the command line start fast.
"""

from plinth.clients.aio import AsyncClient
from plinth.clients.client import TLS, Client
from plinth.clients.results import JobFailed, NodeStatus, PlinthError, RunResult

__all__ = ["TLS", "AsyncClient", "Client", "JobFailed", "NodeStatus", "PlinthError", "RunResult"]
