"""Converting the workflow files ComfyUI's editor saves into the API format Plinth runs.

The editor saves its canvas: `nodes` whose widget values sit in `widgets_values` by position,
`links` between output and input slots, and editor-only things (groups, notes, reroutes,
primitive nodes, muted and bypassed nodes, subgraphs). ComfyUI's server accepts only the API
format, so users must remember "Save (API format)", and converters outside ComfyUI need every
node's widget order and break on nodes they do not know (ANCHORS.md §3). Plinth's node schemas
declare that order, so the server can take either file: this module does what the editor's API
export does, and reports everything it cannot convert (every unsupported node type by name,
broken links, short widget lists) together in one GraphValidationError, so one round trip
shows it all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from plinth.nodes.core.schema import Choice, Int, Node
from plinth.server.engine.editor_format import BYPASSED, EDITOR_ONLY_TYPES, MUTED, PRIMITIVE, REROUTE
from plinth.server.engine.graph import GraphError, GraphValidationError
from plinth.server.engine.subgraphs import expand_subgraphs


def is_editor_workflow(obj: Any) -> bool:
    """True for a file the editor saved (an object with a "nodes" list and a "links" list).

    An API-format graph maps node ids to node objects, so even a node with id "nodes" is an
    object there, never a list: the two formats cannot be mistaken for each other.
    """
    return isinstance(obj, dict) and isinstance(obj.get("nodes"), list) and isinstance(obj.get("links"), list)


def to_api_format(workflow: dict[str, Any], registry: Mapping[str, type[Node]]) -> dict[str, Any]:
    """The API-format graph ({"<id>": {"class_type", "inputs", "_meta"}}) of an editor workflow.

    Widget values are mapped by each node schema's widget order (its non-link inputs in
    declaration order), skipping the values of the editor's own widgets: a seed's control mode
    and an image upload button (see _widget_layout). Editor-only nodes are dissolved: a
    Reroute passes its source on, a PrimitiveNode's value becomes the target's literal input,
    notes are dropped. Muted nodes are left out, and so are the inputs linked to them; a
    bypassed node is replaced by its input of the consumed output's type, as ComfyUI does.
    Subgraphs are expanded first (subgraphs.py), their inner nodes under path ids ("12:5").
    Raises GraphValidationError with every problem found.
    """
    errors: list[GraphError] = []
    nodes, links = _read(expand_subgraphs(workflow, registry) if is_editor_workflow(workflow) else workflow, errors)
    if errors:
        raise GraphValidationError(errors)
    sources = _Sources(nodes, links)
    graph: dict[str, Any] = {}
    for node_id, node in nodes.items():
        class_type = node["type"]
        if class_type in EDITOR_ONLY_TYPES or node.get("mode") in (MUTED, BYPASSED):
            continue
        node_cls = registry.get(class_type)
        if node_cls is None:
            errors.append(
                GraphError(
                    node_id,
                    class_type,
                    "",
                    "unknown_class_type",
                    f"this server does not support node type {class_type!r} (ListNodes shows the types it "
                    "has); remove the node, or mute or bypass it in the editor",
                )
            )
            continue
        inputs = _node_inputs(node_id, node, node_cls, sources, errors)
        title = node.get("title")
        graph[node_id] = {
            "class_type": class_type,
            "inputs": inputs,
            "_meta": {"title": title if isinstance(title, str) and title else node_cls.schema.display_name},
        }
    if errors:
        raise GraphValidationError(errors)
    return graph


@dataclass(frozen=True)
class _Link:
    origin_id: str
    origin_slot: int
    type: str


@dataclass(frozen=True)
class _Literal:
    """A PrimitiveNode's value: it reaches its target as a literal input, not as a link."""

    value: Any


class _BrokenLink(Exception):
    """A link that cannot be followed; the message completes "input 'x' ..."."""


def _read(workflow: Any, errors: list[GraphError]) -> tuple[dict[str, dict[str, Any]], dict[Any, _Link]]:
    """The nodes by string id and the links by id; what is malformed goes to `errors`."""
    if not is_editor_workflow(workflow):
        errors.append(_invalid('not a ComfyUI editor workflow: it needs a "nodes" list and a "links" list'))
        return {}, {}
    return _read_nodes(workflow["nodes"], errors), _read_links(workflow["links"], errors)


def _invalid(message: str) -> GraphError:
    return GraphError("", "", "", "invalid_workflow", message)


def _read_nodes(raw_nodes: list[Any], errors: list[GraphError]) -> dict[str, dict[str, Any]]:
    nodes: dict[str, dict[str, Any]] = {}
    for index, node in enumerate(raw_nodes):
        node_id = node.get("id") if isinstance(node, dict) else None
        if (
            isinstance(node_id, bool)
            or not isinstance(node_id, (int, str))
            or not isinstance(node.get("type"), str)
            or not node["type"]
        ):
            errors.append(_invalid(f"nodes[{index}] is not a node with an id and a type"))
        elif str(node_id) in nodes:
            errors.append(_invalid(f"node id {node_id} is used by more than one node"))
        elif not all(_is_slot_list(node.get(key)) for key in ("inputs", "outputs")):
            errors.append(_invalid(f'node {node_id}: "inputs" and "outputs" must be lists of objects'))
        elif not isinstance(node.get("widgets_values"), (list, dict, type(None))):
            errors.append(_invalid(f'node {node_id}: "widgets_values" must be a list or an object'))
        else:
            nodes[str(node_id)] = node
    return nodes


def _read_links(raw_links: list[Any], errors: list[GraphError]) -> dict[Any, _Link]:
    """Links in either form: arrays [id, origin_id, origin_slot, target_id, target_slot, type]
    (version 0.4) or objects {id, origin_id, origin_slot, target_id, target_slot, type} (schema
    version 1). Only the origin matters: each node's inputs name the links that feed them."""
    links: dict[Any, _Link] = {}
    for index, raw in enumerate(raw_links):
        if isinstance(raw, list) and len(raw) >= 5:
            link_id, origin_id, origin_slot = raw[:3]
            link_type = raw[5] if len(raw) > 5 else ""
        elif isinstance(raw, dict) and {"id", "origin_id", "origin_slot"} <= raw.keys():
            link_id, origin_id, origin_slot = raw["id"], raw["origin_id"], raw["origin_slot"]
            link_type = raw.get("type", "")
        else:
            errors.append(
                _invalid(
                    f"links[{index}] is neither [id, origin_id, origin_slot, target_id, target_slot, "
                    "type] nor {id, origin_id, origin_slot, target_id, target_slot, type}"
                )
            )
            continue
        if (
            isinstance(origin_slot, bool)
            or not isinstance(origin_slot, int)
            or origin_slot < 0
            or not isinstance(link_id, (int, str))
        ):
            errors.append(_invalid(f"links[{index}] needs an id and an origin slot that is an integer from 0"))
            continue
        links[link_id] = _Link(str(origin_id), origin_slot, str(link_type))
    return links


def _is_slot_list(value: Any) -> bool:
    return value is None or (isinstance(value, list) and all(isinstance(v, dict) for v in value))


class _Sources:
    """Follows a link back through editor-only and bypassed nodes to what feeds the input."""

    def __init__(self, nodes: dict[str, dict[str, Any]], links: dict[Any, _Link]) -> None:
        self.nodes = nodes
        self.links = links

    def resolve(self, link_id: Any) -> list[Any] | _Literal | None:
        """An API link [node_id, output_index], a PrimitiveNode's literal, or None when nothing
        runnable feeds it (a muted source, or a reroute or bypassed node with nothing linked)."""
        seen: set[int | str] = set()
        while True:
            if not isinstance(link_id, (int, str)) or isinstance(link_id, bool):
                raise _BrokenLink(f"has link {link_id!r}, which is not a link id")
            if link_id in seen:
                raise _BrokenLink("is linked through a loop of Reroute or bypassed nodes")
            seen.add(link_id)
            link = self.links.get(link_id)
            if link is None:
                raise _BrokenLink(f"refers to link {link_id}, which is not in the workflow's links")
            origin = self.nodes.get(link.origin_id)
            if origin is None:
                raise _BrokenLink(f"is linked to node {link.origin_id}, which is not in the workflow")
            if origin["type"] == PRIMITIVE:
                return _Literal(_primitive_value(link.origin_id, origin))
            if origin["type"] == REROUTE:
                passed = next(iter(origin.get("inputs") or []), None)
            elif origin.get("mode") == BYPASSED:
                passed = _bypass_input(origin, link)
            elif origin.get("mode") == MUTED:
                return None
            else:
                return [link.origin_id, link.origin_slot]
            if passed is None or passed.get("link") is None:
                return None
            link_id = passed["link"]


def _primitive_value(node_id: str, primitive: dict[str, Any]) -> Any:
    stored = primitive.get("widgets_values")
    if not isinstance(stored, list) or not stored:
        raise _BrokenLink(f"is fed by PrimitiveNode {node_id}, which holds no value")
    return stored[0]


def _bypass_input(node: dict[str, Any], link: _Link) -> dict[str, Any] | None:
    """The input a bypassed node passes through for the output `link` comes from: the input in
    the same slot if it has the output's type, else the first input of that type (ComfyUI's rule)."""
    outputs = node.get("outputs") or []
    wanted = outputs[link.origin_slot].get("type", link.type) if link.origin_slot < len(outputs) else link.type
    inputs = node.get("inputs") or []
    if link.origin_slot < len(inputs) and inputs[link.origin_slot].get("type") == wanted:
        return inputs[link.origin_slot]
    return next((entry for entry in inputs if entry.get("type") == wanted), None)


def _node_inputs(
    node_id: str, node: dict[str, Any], node_cls: type[Node], sources: _Sources, errors: list[GraphError]
) -> dict[str, Any]:
    """Literal widget values and links by input name. A linked input (a widget converted to an
    input included) takes its link; a link that leads nowhere leaves the stored widget value."""
    class_type = node_cls.schema.class_type
    linked: dict[str, Any] = {}
    for entry in node.get("inputs") or []:
        if entry.get("link") is None:
            continue
        widget = entry.get("widget")
        name = str((widget if isinstance(widget, dict) else entry).get("name", entry.get("name", "")))
        try:
            source = sources.resolve(entry["link"])
        except _BrokenLink as exc:
            errors.append(GraphError(node_id, class_type, name, "bad_link", f"input {name!r} {exc}"))
            continue
        if source is not None:
            linked[name] = source.value if isinstance(source, _Literal) else source
    values, problem = _widget_values(node.get("widgets_values"), node_cls, set(linked))
    if problem:
        errors.append(GraphError(node_id, class_type, "", "missing_widget_values", problem))
    return {**values, **linked}


def _widget_values(
    stored: list[Any] | dict[str, Any] | None, node_cls: type[Node], linked: set[str]
) -> tuple[dict[str, Any], str]:
    """The stored widget values by input name, and what is missing ("" when nothing is).

    A list holds the values in _widget_layout's order; a dict (written by some editor versions
    and custom nodes) is keyed by widget name.
    """
    widgets = [spec.name for spec in node_cls.schema.inputs if not spec.is_link]
    if isinstance(stored, dict):
        missing = [name for name in widgets if name not in stored and name not in linked]
        values = {name: stored[name] for name in widgets if name in stored}
        return values, f"widgets_values has no value for {', '.join(missing)}" if missing else ""
    stored = stored or []
    layout = _widget_layout(node_cls)
    values = {name: value for (name, is_input), value in zip(layout, stored, strict=False) if is_input}
    missing = [name for name in widgets if name not in values and name not in linked]
    if not missing:
        return values, ""
    return values, (
        f"widgets_values has {len(stored)} value(s), but {node_cls.schema.class_type} stores "
        f"{len(layout)} ({', '.join(name for name, _ in layout)}); no value for {', '.join(missing)}"
    )


def _widget_layout(node_cls: type[Node]) -> list[tuple[str, bool]]:
    """The widgets whose values the editor stores, in order, as (name, is the node's input).

    Besides the node's own widgets the editor adds two kinds: a "control_after_generate" combo
    ("randomize", "fixed", ...) right after each seed-like input, and for a node with an image
    upload input an "upload" button (value "image") appended to the required inputs, so after
    the last required widget (LoadImageMask saves ["mask.png", "red", "image"]).
    """
    widgets = [spec for spec in node_cls.schema.inputs if not spec.is_link]
    last_required = max((i for i, spec in enumerate(widgets) if not spec.optional), default=-1)
    has_upload = any(isinstance(spec, Choice) and spec.image_upload for spec in widgets)
    layout = []
    for index, spec in enumerate(widgets):
        layout.append((spec.name, True))
        if isinstance(spec, Int) and spec.control_after_generate:
            layout.append(("control_after_generate", False))
        if has_upload and index == last_required:
            layout.append(("upload", False))
    return layout
