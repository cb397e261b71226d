"""Validating a parsed graph against the node registry and turning it into an execution plan.

Every node is checked (not only those that feed outputs: nothing a client sent is ignored
silently) and every error is collected, so a client fixes a graph in one round trip.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import networkx as nx

from plinth.nodes.core.context import ValidationEnv
from plinth.nodes.core.schema import WIDGET_TYPES, Int, Node
from plinth.server.config import Limits
from plinth.server.engine.graph import Graph, GraphError, GraphValidationError, LinkRef


@dataclass
class PlannedNode:
    """A node ready to run: its class, coerced literal inputs, links and cache key."""

    id: str
    node_cls: type[Node]
    literals: dict[str, Any]
    links: dict[str, LinkRef]
    key: str = ""

    @property
    def class_type(self) -> str:
        return self.node_cls.schema.class_type

    @property
    def output_node(self) -> bool:
        return self.node_cls.schema.output_node


class LimitExceeded(GraphValidationError):
    """The graph asks for more than the server's limits allow (RESOURCE_EXHAUSTED, not a
    malformed graph): every limit passed, named by node and input."""


@dataclass
class ExecutionPlan:
    """The nodes that feed output nodes, in topological order."""

    graph: Graph
    nodes: list[PlannedNode]


def validate(
    graph: Graph, registry: Mapping[str, type[Node]], env: ValidationEnv, limits: Limits | None = None
) -> ExecutionPlan:
    """The plan for a valid graph; raises GraphValidationError with every error, or, for a
    valid graph that asks too much, LimitExceeded with every limit passed."""
    errors: list[GraphError] = []
    planned: dict[str, PlannedNode] = {}
    for node in graph.nodes.values():
        node_cls = registry.get(node.class_type)
        if node_cls is None:
            errors.append(
                GraphError(
                    node.id, node.class_type, "", "unknown_class_type", f"unknown class_type {node.class_type!r}"
                )
            )
            continue
        planned[node.id] = _check_node(node.id, node.inputs, node_cls, graph, registry, env, errors)

    dag = nx.DiGraph()
    dag.add_nodes_from(graph.nodes)
    dag.add_edges_from(
        (link.node_id, p.id) for p in planned.values() for link in p.links.values() if link.node_id in graph.nodes
    )
    cycle_nodes = {n for scc in nx.strongly_connected_components(dag) if len(scc) > 1 for n in scc}
    cycle_nodes |= {n for n in dag.nodes if dag.has_edge(n, n)}
    for node_id in sorted(cycle_nodes):
        errors.append(
            GraphError(
                node_id, graph.nodes[node_id].class_type, "", "dependency_cycle", "node is part of a cycle of links"
            )
        )

    outputs = [p.id for p in planned.values() if p.output_node]
    if not outputs and not any(e.code == "unknown_class_type" for e in errors):
        errors.append(
            GraphError("", "", "", "prompt_no_outputs", "graph has no output node (e.g. SaveImage or PreviewImage)")
        )
    if errors:
        raise GraphValidationError(errors)
    if limits is not None:
        _check_limits(graph, planned, limits)

    needed = set(outputs).union(*(nx.ancestors(dag, o) for o in outputs))
    order = [planned[n] for n in nx.lexicographical_topological_sort(dag.subgraph(needed), key=_id_order)]
    embedded = {"prompt": graph.raw, "workflow": graph.workflow}  # what SaveImage writes into PNGs
    graph_hash = hashlib.sha256(json.dumps(embedded, sort_keys=True, default=repr).encode()).hexdigest()
    for p in order:
        p.key = _cache_key(p, planned, env, graph_hash)
    return ExecutionPlan(graph, order)


def _check_limits(graph: Graph, planned: dict[str, PlannedNode], limits: Limits) -> None:
    exceeded = []
    if len(graph.nodes) > limits.max_nodes:
        exceeded.append(
            GraphError(
                "", "", "", "limit_exceeded", f"graph has {len(graph.nodes)} nodes; the limit is {limits.max_nodes}"
            )
        )
    for node in planned.values():
        tagged = {
            spec.limit: (spec.name, node.literals[spec.name])
            for spec in node.node_cls.schema.inputs
            if isinstance(spec, Int) and spec.limit and spec.name in node.literals
        }

        def over(kind: str, maximum: int, what: str, node=node, tagged=tagged) -> None:
            if kind in tagged and tagged[kind][1] > maximum:
                name, value = tagged[kind]
                exceeded.append(
                    GraphError(
                        node.id,
                        node.class_type,
                        name,
                        "limit_exceeded",
                        f"{what} {value} is over the server's limit of {maximum}",
                    )
                )

        over("steps", limits.max_steps, "steps")
        over("batch", limits.max_batch, "batch")
        if "width" in tagged and "height" in tagged:
            width, height = tagged["width"][1], tagged["height"][1]
            if width * height > limits.max_pixels:
                exceeded.append(
                    GraphError(
                        node.id,
                        node.class_type,
                        "width",
                        "limit_exceeded",
                        f"{width}x{height} is {width * height} pixels; the server's limit is {limits.max_pixels}",
                    )
                )
    if exceeded:
        raise LimitExceeded(exceeded)


def _id_order(node_id: str) -> tuple:
    """Numeric ids in numeric order, then the rest by name (ties broken by name)."""
    numeric = node_id.isascii() and node_id.isdigit() and len(node_id) < 20
    return (0, int(node_id) if numeric else 0, node_id) if numeric else (1, 0, node_id)


def _check_node(
    node_id: str,
    inputs: dict[str, Any],
    node_cls: type[Node],
    graph: Graph,
    registry: Mapping[str, type[Node]],
    env: ValidationEnv,
    errors: list[GraphError],
) -> PlannedNode:
    schema = node_cls.schema
    literals: dict[str, Any] = {}
    links: dict[str, LinkRef] = {}
    count = len(errors)

    def error(name: str, code: str, message: str) -> None:
        errors.append(GraphError(node_id, schema.class_type, name, code, message))

    editor_widgets = {"upload"} if any(getattr(i, "image_upload", False) for i in schema.inputs) else set()
    for name in inputs:
        if schema.input(name) is None and name not in editor_widgets:  # ComfyUI exports "upload": "image"
            known = ", ".join(i.name for i in schema.inputs) or "none"
            error(name, "unknown_input", f"{schema.class_type} has no input {name!r} (inputs: {known})")
    for spec in schema.inputs:
        value = inputs.get(spec.name, _MISSING)
        if value is _MISSING:
            if spec.has_default:
                literals[spec.name] = spec.coerce(spec.default)
            elif not spec.optional:
                error(spec.name, "required_input_missing", "required input is missing")
            continue
        if isinstance(value, LinkRef):
            reason = _check_link(value, spec.type, graph, registry)
            if reason:
                error(spec.name, *reason)
            else:
                links[spec.name] = value
            continue
        if spec.is_link:
            error(
                spec.name,
                "invalid_input_type",
                f"expects a link [node_id, output_index] to a {spec.type} output, got {value!r}",
            )
            continue
        problem = spec.check(value, env)
        if problem:
            error(spec.name, *problem)
        else:
            literals[spec.name] = spec.coerce(value)
    if len(errors) == count:
        for name, code, message in node_cls.check_inputs(literals):
            error(name, code, message)
    return PlannedNode(node_id, node_cls, literals, links)


_MISSING = object()


def _check_link(link: LinkRef, wanted: str, graph: Graph, registry: Mapping[str, type[Node]]) -> tuple[str, str] | None:
    source = graph.nodes.get(link.node_id)
    if source is None:
        return "bad_link", f"links to node {link.node_id!r}, which is not in the graph"
    source_cls = registry.get(source.class_type)
    if source_cls is None:
        return None  # reported on the source node itself
    outputs = source_cls.schema.outputs
    if not 0 <= link.index < len(outputs):
        return "bad_link", (
            f"links to output {link.index} of node {link.node_id} ({source.class_type}), "
            f"which has {len(outputs)} output(s)"
        )
    given = outputs[link.index].type
    if given != wanted and not (wanted == "COMBO" and given in WIDGET_TYPES):
        return "link_type_mismatch", (
            f"expects {wanted} but output {link.index} of node {link.node_id} ({source.class_type}) is {given}"
        )
    return None


def _cache_key(node: PlannedNode, planned: dict[str, PlannedNode], env: ValidationEnv, graph_hash: str) -> str:
    """class_type + literal inputs + parents' keys + the fingerprint of every model file or
    image an input names (a dynamic choice, a prompt's embeddings: InputSpec.files):
    independent of node ids, so identical subgraphs share cache entries across graphs and
    jobs, and a file replaced under the same name is read anew."""
    files = {
        spec.name: {f"{source}/{name}": env.fingerprint(source, name) for source, name in named}
        for spec in node.node_cls.schema.inputs
        if spec.name in node.literals and (named := spec.files(node.literals[spec.name], env))
    }
    material = {
        "class_type": node.class_type,
        "literals": node.literals,
        "links": {name: [planned[link.node_id].key, link.index] for name, link in node.links.items()},
        "files": files,
        "graph": graph_hash if node.node_cls.USES_GRAPH else "",
    }
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()
