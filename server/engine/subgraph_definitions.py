"""Reading the subgraph definitions of an editor workflow, and what an instance of one says.

A definition (`definitions.subgraphs[i]`, nested ones in a definition's own `definitions`) has
its nodes and links, an ordered list of inputs and outputs, and the ids of its input and output
nodes, where links from its inputs start and links to its outputs end. An instance (a node whose
type is the definition's id) says which outer link feeds each input and holds widget values for
the inputs that feed an inner widget. subgraphs.py expands instances with these answers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from plinth.nodes.core.schema import Int, Node
from plinth.server.engine.editor_format import SUBGRAPH_INPUT_ID, SUBGRAPH_OUTPUT_ID

# How deep _widget_target follows an input into nested definitions (subgraphs.py stops expanding there).
MAX_DEPTH = 32


@dataclass
class SubgraphDefinition:
    """One definition, read once however many instances use it."""

    id: str
    name: str
    nodes: list[Any]
    links: list[tuple[Any, ...] | None]  # read_link's tuples; None for what is not a link
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    input_node: str
    by_id: dict[str, dict[str, Any]] = field(default_factory=dict)
    links_from_input: dict[Any, list[tuple[Any, ...]]] = field(default_factory=dict)
    # The id of the inner link feeding each output: the first one, as the editor takes it.
    link_to_output: dict[Any, Any] = field(default_factory=dict)


def node_type(node: Any) -> str:
    """A node's type, or "" for what is not a node with a type."""
    return node["type"] if isinstance(node, dict) and isinstance(node.get("type"), str) else ""


def read_link(raw: Any) -> tuple[Any, ...] | None:
    """A link of either form as (id, origin_id, origin_slot, target_id, target_slot, type)."""
    if isinstance(raw, (list, tuple)) and len(raw) >= 5:
        return (*raw[:5], raw[5] if len(raw) > 5 else "")
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot")
    if isinstance(raw, dict) and all(key in raw for key in keys):
        return (*(raw[key] for key in keys), raw.get("type", ""))
    return None


class Definitions:
    """The workflow's definitions by id, read when first used."""

    def __init__(self, raw: Any, registry: Mapping[str, type[Node]]) -> None:
        self.raw = _collect(raw)
        self.registry = registry
        self._read: dict[str, SubgraphDefinition | None] = {}
        self._widget_targets: dict[tuple[str, int], tuple[str, str] | None] = {}

    def __contains__(self, subgraph_id: str) -> bool:
        return subgraph_id in self.raw

    def get(self, subgraph_id: str) -> SubgraphDefinition | None:
        """The definition, or None when it is malformed (or not there)."""
        if subgraph_id not in self._read:
            raw = self.raw.get(subgraph_id)
            self._read[subgraph_id] = _read_definition(raw) if raw is not None else None
        return self._read[subgraph_id]

    def outer_links(self, node: dict[str, Any], definition: SubgraphDefinition) -> list[Any]:
        """The outer link id into each subgraph input (None where none). The instance's saved
        inputs match the definition's by name and type, then by name, as in the editor: older
        files leave out the inputs that carry only a widget."""
        links: list[Any] = [None] * len(definition.inputs)
        free_by_key: dict[tuple[str, ...], list[int]] = {}
        for slot in reversed(range(len(definition.inputs))):
            entry = definition.inputs[slot]
            free_by_key.setdefault((entry["name"], str(entry["type"])), []).append(slot)
            free_by_key.setdefault((entry["name"],), []).append(slot)
        taken: set[int] = set()
        for entry in node.get("inputs") or []:
            if not isinstance(entry, dict):
                continue
            name = str(entry.get("name"))
            for key in ((name, str(entry.get("type"))), (name,)):
                free = free_by_key.get(key, [])
                while free and free[-1] in taken:
                    free.pop()
                if free:
                    taken.add(free[-1])
                    links[free.pop()] = entry.get("link")
                    break
        return links

    def instance_values(self, node: dict[str, Any], definition: SubgraphDefinition) -> dict[int, Any]:
        """The instance's widget values by subgraph input slot.

        With `properties.proxyWidgets` (frontend 1.27 on) the values follow that list, whose
        entries ["-1", name] name a subgraph input (an entry naming an inner node's own widget
        shows that widget, whose value the definition holds). Before it: one value per input
        that feeds a widget, in input order, and in files with more values than that, a seed's
        "control_after_generate" value after it. A value keyed by input name is taken as such.
        """
        stored = node.get("widgets_values")
        names = {entry["name"]: slot for slot, entry in reversed(list(enumerate(definition.inputs)))}
        if isinstance(stored, dict):
            return {names[name]: value for name, value in stored.items() if name in names and value is not None}
        if not isinstance(stored, list):
            return {}
        proxies = _proxy_widgets(node)
        if proxies:
            return {
                names[proxy[1]]: value
                for proxy, value in zip(proxies, stored, strict=False)
                if str(proxy[0]) == "-1" and isinstance(proxy[1], str) and proxy[1] in names and value is not None
            }
        widgets = [slot for slot in range(len(definition.inputs)) if self._widget_target(definition, slot)]
        with_controls = len(stored) > len(widgets)
        values: dict[int, Any] = {}
        position = 0
        for slot in widgets:
            if position < len(stored) and stored[position] is not None:
                values[slot] = stored[position]
            position += 1 + (with_controls and self._controls_after_generate(definition, slot))
        return values

    def _widget_target(self, definition: SubgraphDefinition, slot: int, depth: int = 0) -> tuple[str, str] | None:
        """(class_type, input name) of the first inner widget input that subgraph input `slot`
        feeds, or None: a widget there makes the input one of the instance's widgets."""
        key = (definition.id, slot)
        if key not in self._widget_targets:
            self._widget_targets[key] = self._find_widget_target(definition, slot, depth)
        return self._widget_targets[key]

    def _find_widget_target(self, definition: SubgraphDefinition, slot: int, depth: int) -> tuple[str, str] | None:
        for link in definition.links_from_input.get(slot, []):
            target = definition.by_id.get(str(link[3]))
            entries = target.get("inputs") if target else None
            entry = next((e for e in entries or [] if isinstance(e, dict) and e.get("link") == link[0]), None)
            if target is None or entry is None:
                continue
            name = str(entry.get("name", ""))
            nested = self.get(target["type"]) if target["type"] in self else None
            found: tuple[str, str] | None = None
            if nested is not None:  # an instance of another subgraph: what its input feeds inside
                inner = next((i for i, e in enumerate(nested.inputs) if e["name"] == name), None)
                found = (
                    self._widget_target(nested, inner, depth + 1) if inner is not None and depth < MAX_DEPTH else None
                )
            elif isinstance(entry.get("widget"), dict):
                found = target["type"], str(entry["widget"].get("name", name))
            else:
                node_cls = self.registry.get(target["type"])
                if node_cls and any(spec.name == name and not spec.is_link for spec in node_cls.schema.inputs):
                    found = target["type"], name
            if found:
                return found
        return None

    def _controls_after_generate(self, definition: SubgraphDefinition, slot: int) -> bool:
        """Whether the inner widget that input `slot` feeds is a seed with a control_after_generate."""
        target = self._widget_target(definition, slot)
        node_cls = self.registry.get(target[0]) if target else None
        if target is None or node_cls is None:
            return False
        return any(
            isinstance(spec, Int) and spec.control_after_generate and spec.name == target[1]
            for spec in node_cls.schema.inputs
        )


def _collect(raw: Any) -> dict[str, dict[str, Any]]:
    """Every definition by id: the workflow's, and those nested in definitions (the first wins)."""
    found: dict[str, dict[str, Any]] = {}
    pending = [raw]
    while pending:
        holder = pending.pop()
        subgraphs = holder.get("subgraphs") if isinstance(holder, dict) else None
        for definition in subgraphs if isinstance(subgraphs, list) else []:
            if isinstance(definition, dict) and isinstance(definition.get("id"), str):
                found.setdefault(definition["id"], definition)
                pending.append(definition.get("definitions"))
    return found


def _read_definition(raw: dict[str, Any]) -> SubgraphDefinition | None:
    nodes, links = raw.get("nodes"), raw.get("links", [])
    inputs, outputs = raw.get("inputs", []), raw.get("outputs", [])
    if not (isinstance(nodes, list) and all(isinstance(part, list) for part in (links, inputs, outputs))):
        return None
    if not all(isinstance(e, dict) and isinstance(e.get("name"), str) and "type" in e for e in inputs + outputs):
        return None
    name = raw.get("name")
    definition = SubgraphDefinition(
        id=raw["id"],
        name=name if isinstance(name, str) and name else raw["id"],
        nodes=nodes,
        links=[read_link(link) for link in links],
        inputs=inputs,
        outputs=outputs,
        input_node=_boundary_id(raw.get("inputNode"), SUBGRAPH_INPUT_ID),
    )
    output_node = _boundary_id(raw.get("outputNode"), SUBGRAPH_OUTPUT_ID)
    definition.by_id = {str(n["id"]): n for n in nodes if node_type(n) and isinstance(n.get("id"), (int, str))}
    for link in definition.links:
        if link and str(link[1]) == definition.input_node and isinstance(link[2], (int, str)):
            definition.links_from_input.setdefault(link[2], []).append(link)
        if link and str(link[3]) == output_node and isinstance(link[4], (int, str)):
            definition.link_to_output.setdefault(link[4], link[0])
    return definition


def _boundary_id(raw: Any, default: int) -> str:
    return str(raw.get("id", default) if isinstance(raw, dict) else default)


def _proxy_widgets(node: dict[str, Any]) -> list[list[Any]]:
    """properties.proxyWidgets: a list of [node id, widget name], saved as a list or as JSON text."""
    properties = node.get("properties")
    proxies = properties.get("proxyWidgets") if isinstance(properties, dict) else None
    if isinstance(proxies, str):
        try:
            proxies = json.loads(proxies)
        except ValueError:
            return []
    if not isinstance(proxies, list):
        return []
    return [p if isinstance(p, list) and len(p) >= 2 else ["", ""] for p in proxies]
