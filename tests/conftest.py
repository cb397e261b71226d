"""Conventions: which test goes where.

- tests/unit: no server and no gRPC. Nodes run as functions on a small context, engine pieces
  (parsing, planning, cache, batching on a JobManager/service object), config, the job store,
  pure functions. Fast; run them first.
- tests/integration: anything that talks to a real Plinth server over gRPC (the shared session
  server from tests/support/live_server.py, or a module's own server), or the `plinth` CLI
  against one. Each module starts with an empty output cache (an autouse fixture), so tests never
  pick seeds only to miss another module's cached outputs.
- tests/compat: ComfyUI compatibility: editor-format workflows converted to the API format, graphs
  written in ComfyUI itself, and the node-schema contract against tests/data/comfyui-core-nodes.json.
  These may use the shared server too (tests/compat/conftest.py registers it).
- tests/support: helpers, never tests (model-file writers, paths, the live server, GraphBuilder).
  tests/data: files the tests read.

Graphs in tests are built with support.graph_builder.GraphBuilder, and nodes of a saved graph are
found by class_type (support.graph_builder.nodes_of), not by hard-coded node ids.

Test module basenames are unique across folders (no __init__.py: pytest's default import mode and
pytest-xdist rely on that). The suite runs in CI as `python -m pytest -n 2`.

Shared fixtures here: the tiny-sd models directory (made once per session) and a fresh copy of the
saved demo graph."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
from support.paths import GRAPHS

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


@pytest.fixture
def txt2img() -> dict:
    """A fresh copy of graphs/txt2img.json for each test to change."""
    return copy.deepcopy(json.loads((GRAPHS / "txt2img.json").read_text()))
