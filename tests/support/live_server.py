"""The shared real Plinth server for integration and compat tests, and what tests read from it.

The fixtures are registered by tests/integration/conftest.py and tests/compat/conftest.py (each
folder gets its own session server). Every module starts with an empty output cache, so no test
depends on which modules ran before it on the same worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

_running: list = []  # servers started by the `server` fixture in this process


@pytest.fixture(scope="session")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from plinth.server.app import PlinthServer
    from plinth.server.config import Config, Limits

    # long-running jobs for the cancel tests sample 400 steps
    config = Config(
        models_dir=models_dir,
        data_dir=tmp_path_factory.mktemp("data"),
        device="cpu",
        port=0,
        limits=Limits(max_steps=1000),
    )
    with PlinthServer(config) as running:
        _running.append(running)
        yield running
        _running.remove(running)


@pytest.fixture(scope="session")
def client(server) -> Iterator:
    from plinth.clients import Client

    with Client(server.address, timeout=120) as c:
        yield c


@pytest.fixture(scope="module", autouse=True)
def fresh_output_cache() -> None:
    """Empty the shared server's output cache before each module (starting no server that is
    not running yet): a module's first run of a graph really executes, whatever ran before."""
    for running in _running:
        output_cache(running).clear()


def output_cache(server):
    """The shared server's output cache: the one place tests reach for it."""
    return server.components.cache


def executed(result) -> set[str]:
    """class_types of the nodes a run executed (not taken from the cache)."""
    return {n.class_type for n in result.nodes.values() if n.status == "executed"}


def node_output(server, job, node_id: str):
    """A node's output value in a finished job (its id or the client's result), from the
    server's output cache: the exact tensors, before any PNG encoding."""
    job = server.components.jobs.get(getattr(job, "job_id", job))
    key = next(n.key for n in job.plan.nodes if n.id == node_id)
    value = output_cache(server).get(key)
    assert value is not None, f"node {node_id} output not cached"
    return value
