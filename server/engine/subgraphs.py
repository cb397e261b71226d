"""Expanding the subgraphs of an editor workflow into plain nodes, as the editor's API export does.

The editor (ComfyUI frontend 1.24 and later) folds nodes into subgraphs: a definition in
`definitions.subgraphs` holds its own nodes and links and an ordered list of inputs and outputs,
and each use of it is a node whose `type` is the definition's id (subgraph_definitions.py reads
them). Inside a definition, links from the subgraph's inputs start at its input node (id -10)
and links to its outputs end at its output node (-20). The API export flattens every instance:
an inner node's id becomes the path of instance ids down to it, "12:5" (nested: "12:7:5"), the
id ComfyUI's errors and progress name.

This module does the same before conversion, so reroutes, primitives, bypass and mute inside a
subgraph work as they do outside and every error names the inner node's path. Each instance is
replaced by its inner nodes under path ids; each of its inputs by a Reroute fed by the outer
link or, when nothing links it, by a PrimitiveNode holding the instance's widget value (with
no value, nothing feeds the inner input and the inner widget keeps its own); each of its
outputs by a Reroute fed by the inner link to that output. A muted instance runs nothing inside;
a bypassed one passes an input of the consumed type through. A definition holding an instance
of itself, nesting deeper than MAX_DEPTH, or an expansion past the size bounds is an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from plinth.nodes.core.schema import Node
from plinth.server.engine.editor_format import (
    BYPASSED,
    MUTED,
    PRIMITIVE,
    REROUTE,
    SUBGRAPH_INPUT_ID,
    SUBGRAPH_OUTPUT_ID,
)
from plinth.server.engine.graph import GraphError, GraphValidationError
from plinth.server.engine.subgraph_definitions import MAX_DEPTH, Definitions, SubgraphDefinition, node_type, read_link

# A few kilobytes can nest ten instances of a subgraph holding ten of the next, and so on, into
# billions of nodes: expansion stops at these bounds (every instance's nodes and links counted).
MAX_EXPANDED_NODES = 10_000
MAX_EXPANDED_LINKS = 50_000


def expand_subgraphs(workflow: dict[str, Any], registry: Mapping[str, type[Node]]) -> dict[str, Any]:
    """The workflow with every subgraph instance replaced by its inner nodes, or the workflow
    itself when it uses none. `workflow` has "nodes" and "links" lists (is_editor_workflow).
    Raises GraphValidationError with every structural problem of the subgraphs it uses."""
    definitions = Definitions(workflow.get("definitions"), registry)
    if not any(node_type(node) in definitions for node in workflow["nodes"]):
        return workflow
    expander = _Expander(definitions)
    expander.expand_scope(workflow["nodes"], workflow["links"], "", None, ())
    if expander.errors:
        raise GraphValidationError(expander.errors)
    return {**workflow, "nodes": expander.nodes, "links": expander.links}


def _path(path: str, node_id: Any) -> str:
    return f"{path}:{node_id}" if path else str(node_id)


def _link_id(path: str, link_id: Any) -> Any:
    """A link id made unique across instances; root ids and values that are not ids stay as they are."""
    if not path or isinstance(link_id, bool) or not isinstance(link_id, (int, str)):
        return link_id
    return f"{path}:{link_id}"


def _invalid(node_id: str, message: str) -> GraphError:
    return GraphError(node_id, "", "", "invalid_workflow", message)


def _reroute(node_id: str, link: Any, slot_type: Any) -> dict[str, Any]:
    return {
        "id": node_id,
        "type": REROUTE,
        "mode": 0,
        "inputs": [{"name": "", "type": "*", "link": link}],
        "outputs": [{"name": "", "type": slot_type, "links": []}],
    }


class _Expander:
    """Emits the flat workflow's nodes and links, one graph (the root or an instance) at a time."""

    def __init__(self, definitions: Definitions) -> None:
        self.definitions = definitions
        self.nodes: list[Any] = []
        self.links: list[Any] = []
        self.errors: list[GraphError] = []
        self.too_large = False

    def expand_scope(
        self, nodes: list[Any], links: list[Any], path: str, inside: SubgraphDefinition | None, stack: tuple[str, ...]
    ) -> None:
        """Emit one graph: the root's (path "", inside None, passed on as it is but for links from
        expanded instances) or the nodes and links of definition `inside` for the instance at `path`."""
        expanded: set[str] = set()
        for index, node in enumerate(nodes):
            if not node_type(node) or not isinstance(node.get("id"), (int, str)):
                if inside is None:
                    self.nodes.append(node)  # the converter reports it
                else:
                    self.errors.append(_invalid(path, f"subgraph {inside.name!r}: nodes[{index}] has no id or type"))
            elif node["type"] not in self.definitions:
                self.nodes.append(self._relinked(node, path) if inside else node)
            elif node.get("mode") in (MUTED, BYPASSED):
                self._closed_instance(node, path)
            elif self._expand_instance(node, path, stack):
                expanded.add(str(node["id"]))
        for index, raw in enumerate(links):
            link = read_link(raw)
            if link is None and inside is not None:
                self.errors.append(_invalid(path, f"subgraph {inside.name!r}: links[{index}] is not a link"))
            elif link is None or (inside is None and str(link[1]) not in expanded):
                self.links.append(raw)
            else:
                link_id, origin, slot, target, target_slot, link_type = link
                if str(origin) in expanded:  # from an instance's output: that output's Reroute
                    origin, slot = f"{_path(path, origin)}:{SUBGRAPH_OUTPUT_ID}:{slot}", 0
                elif inside is not None and str(origin) == inside.input_node:  # from an input of this subgraph
                    origin, slot = f"{path}:{SUBGRAPH_INPUT_ID}:{slot}", 0
                else:
                    origin = _path(path, origin)
                self.links.append([_link_id(path, link_id), origin, slot, _path(path, target), target_slot, link_type])

    def _relinked(self, node: dict[str, Any], path: str) -> dict[str, Any]:
        """An inner node under its path id, its inputs naming this instance's copies of the links."""
        inputs = node.get("inputs")
        if isinstance(inputs, list):
            inputs = [
                {**entry, "link": _link_id(path, entry.get("link"))} if isinstance(entry, dict) else entry
                for entry in inputs
            ]
        return {**node, "id": _path(path, node["id"]), "inputs": inputs}

    def _expand_instance(self, node: dict[str, Any], path: str, stack: tuple[str, ...]) -> bool:
        """Emit an instance's boundary and inner nodes; False (with the error) when it cannot be."""
        here = _path(path, node["id"])
        definition = self._definition(node["type"], here)
        if definition is None:
            return False
        if definition.id in stack:
            chain = [self._name(sub) for sub in (*stack[stack.index(definition.id) :], definition.id)]
            message = f"subgraph {definition.name!r} holds an instance of itself ({' > '.join(chain)})"
            self.errors.append(_invalid(here, message + ", so it would expand forever"))
            return False
        if len(stack) >= MAX_DEPTH:
            self.errors.append(_invalid(here, f"subgraphs nest more than {MAX_DEPTH} deep here"))
            return False
        if not self._count(definition):
            return False
        outer = self.definitions.outer_links(node, definition)
        values = self.definitions.instance_values(node, definition)
        for slot, entry in enumerate(definition.inputs):
            boundary = f"{here}:{SUBGRAPH_INPUT_ID}:{slot}"
            if outer[slot] is None and slot in values:
                outputs = [{"name": entry["name"], "type": entry["type"], "links": []}]
                self.nodes.append(
                    {"id": boundary, "type": PRIMITIVE, "mode": 0, "outputs": outputs, "widgets_values": [values[slot]]}
                )
            else:
                self.nodes.append(_reroute(boundary, _link_id(path, outer[slot]), entry["type"]))
        for slot, entry in enumerate(definition.outputs):
            inner = _link_id(here, definition.link_to_output.get(slot))
            self.nodes.append(_reroute(f"{here}:{SUBGRAPH_OUTPUT_ID}:{slot}", inner, entry["type"]))
        self.expand_scope(definition.nodes, definition.links, here, definition, (*stack, definition.id))
        return True

    def _closed_instance(self, node: dict[str, Any], path: str) -> None:
        """A muted or bypassed instance stays one node, with an input per subgraph input in order,
        for the converter to leave out or bypass; nothing inside it runs."""
        here = _path(path, node["id"])
        definition = self._definition(node["type"], here)
        if definition is None:
            return
        outer = self.definitions.outer_links(node, definition)
        inputs = [
            {"name": entry["name"], "type": entry["type"], "link": _link_id(path, link)}
            for entry, link in zip(definition.inputs, outer, strict=True)
        ]
        outputs = [{"name": entry["name"], "type": entry["type"]} for entry in definition.outputs]
        self.nodes.append(
            {"id": here, "type": node["type"], "mode": node["mode"], "inputs": inputs, "outputs": outputs}
        )

    def _definition(self, subgraph_id: str, here: str) -> SubgraphDefinition | None:
        """The definition an instance uses; None, reported at the instance, when it is malformed."""
        definition = self.definitions.get(subgraph_id)
        if definition is None:
            message = (
                f"subgraph {subgraph_id!r} in definitions.subgraphs needs lists of nodes, links, inputs "
                "and outputs (inputs and outputs of objects with a name and a type)"
            )
            self.errors.append(_invalid(here, message))
        return definition

    def _name(self, subgraph_id: str) -> str:
        definition = self.definitions.get(subgraph_id)
        return repr(definition.name if definition else subgraph_id)

    def _count(self, definition: SubgraphDefinition) -> bool:
        """Count an instance against the bounds; False (reported once) when it goes past them."""
        nodes = len(self.nodes) + len(definition.nodes) + len(definition.inputs) + len(definition.outputs)
        links = len(self.links) + len(definition.links)
        if not self.too_large and nodes <= MAX_EXPANDED_NODES and links <= MAX_EXPANDED_LINKS:
            return True
        if not self.too_large:
            message = (
                f"the workflow's subgraphs expand to more than {MAX_EXPANDED_NODES} nodes or "
                f"{MAX_EXPANDED_LINKS} links, more than this server takes in one graph"
            )
            self.errors.append(_invalid("", message))
        self.too_large = True
        return False
