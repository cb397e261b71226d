"""Building and changing API-format graphs in tests without hard-coding node ids.

`GraphBuilder` adds nodes by class_type and inputs and gives a handle per node; `handle.out(i)` is
the link `[node_id, i]` to the node's i-th output. `nodes_of(graph, class_type)` finds the nodes
of a saved graph (the txt2img fixture, a file from graphs/) so a test changes "the KSampler"
rather than node "3": the test keeps working when the saved graph is renumbered."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Node:
    """One node of a graph dict: its id, and a live view of its class_type and inputs."""

    graph: dict[str, dict[str, Any]]
    id: str

    @property
    def class_type(self) -> str:
        return self.graph[self.id]["class_type"]

    @property
    def inputs(self) -> dict[str, Any]:
        """The node's inputs dict itself: changing it changes the graph."""
        return self.graph[self.id]["inputs"]

    def out(self, index: int = 0) -> list[str | int]:
        """The link to this node's output `index`, as API-format inputs write it."""
        return [self.id, index]


class GraphBuilder:
    """An API-format graph built node by node, optionally on top of a copy of a saved graph.

    New nodes get ids after the largest numeric id present ("1", "2", ... in an empty builder)."""

    def __init__(self, graph: dict[str, dict[str, Any]] | None = None) -> None:
        self._graph: dict[str, dict[str, Any]] = copy.deepcopy(graph) if graph else {}

    def add(self, class_type: str, **inputs: Any) -> Node:
        """Add a node; link inputs with another handle's `.out(i)`."""
        node_id = str(max((int(k) for k in self._graph if k.isdigit()), default=0) + 1)
        self._graph[node_id] = {"class_type": class_type, "inputs": dict(inputs)}
        return Node(self._graph, node_id)

    def replace(self, node: Node, class_type: str, **inputs: Any) -> Node:
        """Put a node of another class in `node`'s place: same id, so links to it still hold."""
        self._graph[node.id] = {"class_type": class_type, "inputs": dict(inputs)}
        return Node(self._graph, node.id)

    def find(self, class_type: str) -> Node:
        """The one node of `class_type` already in the graph (an error when there are none or several)."""
        return node_of(self._graph, class_type)

    def build(self) -> dict[str, dict[str, Any]]:
        """The API-format graph: a copy, so the builder can go on without changing it."""
        return copy.deepcopy(self._graph)


def nodes_of(graph: dict[str, dict[str, Any]], class_type: str) -> list[Node]:
    """The nodes of `class_type` in `graph`, in the graph's order, as live handles."""
    return [Node(graph, node_id) for node_id, node in graph.items() if node["class_type"] == class_type]


def node_of(graph: dict[str, dict[str, Any]], class_type: str) -> Node:
    """The one node of `class_type` in `graph` (an error when there are none or several)."""
    (node,) = nodes_of(graph, class_type)
    return node


def linked(graph: dict[str, dict[str, Any]], node: Node, input_name: str) -> Node:
    """The node that `node`'s input `input_name` is linked to (e.g. a KSampler's "positive" prompt)."""
    source_id, _ = node.inputs[input_name]
    return Node(graph, source_id)
