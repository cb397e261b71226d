"""Parsing ComfyUI's API format into a graph of nodes and links.

`{"3": {"class_type": "KSampler", "inputs": {"seed": 5, "model": ["4", 0]}}}`: node ids map to
a class_type and inputs; an input is a literal or a link `[node_id, output_index]`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GraphError:
    """One thing wrong with a graph, naming where: node id, input name and a reason."""

    node_id: str
    class_type: str
    input: str
    code: str
    message: str

    def __str__(self) -> str:
        where = f"node {self.node_id}" if self.node_id else "graph"
        if self.class_type:
            where += f" ({self.class_type})"
        if self.input:
            where += f" input {self.input!r}"
        return f"{where}: {self.message}"


class GraphValidationError(ValueError):
    """A graph failed validation; `errors` holds every error found, not just the first."""

    def __init__(self, errors: list[GraphError]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


@dataclass(frozen=True)
class LinkRef:
    node_id: str
    index: int


@dataclass
class GraphNode:
    id: str
    class_type: str
    inputs: dict[str, Any] = field(default_factory=dict)  # literal or LinkRef


@dataclass
class Graph:
    nodes: dict[str, GraphNode]
    raw: dict[str, Any]  # the API-format graph
    workflow: dict[str, Any] | None = None  # the editor file it was converted from, if any


def _as_link(value: Any) -> LinkRef | None:
    if (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], (str, int))
        and not isinstance(value[0], bool)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    ):
        return LinkRef(str(value[0]), value[1])
    return None


def load_json(source: str | bytes | dict[str, Any]) -> Any:
    """Decoded graph JSON (an already decoded object passes through)."""
    if not isinstance(source, (str, bytes)):
        return source
    try:
        return json.loads(source)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise GraphValidationError(
            [GraphError("", "", "", "invalid_json", f"graph is not valid JSON: {exc}")]
        ) from None


def parse_graph(source: str | bytes | dict[str, Any]) -> Graph:
    """Parse API-format JSON (text or an already decoded object); raise GraphValidationError."""
    raw = load_json(source)
    if not isinstance(raw, dict) or not raw:
        raise GraphValidationError(
            [
                GraphError(
                    "",
                    "",
                    "",
                    "invalid_graph",
                    "graph must be a non-empty JSON object of node id -> {class_type, inputs} (ComfyUI API format)",
                )
            ]
        )
    errors, nodes = [], {}
    raw = {str(node_id): spec for node_id, spec in raw.items()}
    for node_id, spec in raw.items():
        if not isinstance(spec, dict):
            errors.append(
                GraphError(node_id, "", "", "invalid_node", "node must be an object with class_type and inputs")
            )
            continue
        class_type = spec.get("class_type")
        inputs = spec.get("inputs", {})
        if not isinstance(class_type, str) or not class_type:
            errors.append(GraphError(node_id, "", "", "missing_class_type", "node has no class_type string"))
            continue
        if not isinstance(inputs, dict):
            errors.append(GraphError(node_id, class_type, "", "invalid_node", "inputs must be an object"))
            continue
        nodes[node_id] = GraphNode(node_id, class_type, {name: _as_link(v) or v for name, v in inputs.items()})
    if errors:
        raise GraphValidationError(errors)
    return Graph(nodes, raw)
