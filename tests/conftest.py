"""Shared fixtures: one real Plinth server on 127.0.0.1 (port 0) for the session, its client,
and the saved demo graph. Models are made once per session in a temporary models directory."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
GRAPHS = REPO / "graphs"


def pytest_configure(config: pytest.Config) -> None:
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for lib in (dlog, tlog):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from plinth.nodes.models.tiny_sd import ensure_tiny_sd

    path = tmp_path_factory.mktemp("models")
    ensure_tiny_sd(path)
    return path


@pytest.fixture(scope="session")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
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
        yield running


@pytest.fixture(scope="session")
def client(server):
    from plinth.clients import Client

    with Client(server.address, timeout=120) as c:
        yield c


@pytest.fixture
def txt2img() -> dict:
    """A fresh copy of graphs/txt2img.json for each test to change."""
    return copy.deepcopy(json.loads((GRAPHS / "txt2img.json").read_text()))


def executed(result) -> set[str]:
    """class_types of the nodes a run executed (not taken from the cache)."""
    return {n.class_type for n in result.nodes.values() if n.status == "executed"}


def node_output(server, job, node_id: str):
    """A node's output value in a finished job (its id or the client's result), from the
    server's output cache: the exact tensors, before any PNG encoding."""
    job = server.components.jobs.get(getattr(job, "job_id", job))
    key = next(n.key for n in job.plan.nodes if n.id == node_id)
    value = server.components.cache.get(key)
    assert value is not None, f"node {node_id} output not cached"
    return value
