"""The node reference in docs/nodes.md, generated from the registry (`plinth nodes --markdown`),
so the docs list exactly the nodes, inputs and defaults the server validates against."""

from __future__ import annotations

import json
from collections.abc import Mapping

from plinth.nodes.core.schema import Choice, Node

HEADER = """# Nodes

Generated from the node registry by `plinth nodes --markdown > docs/nodes.md`; a test fails when
this file is out of date. "ComfyUI" nodes keep ComfyUI's class_type, input names, widget order,
defaults, ranges and choice lists, so graphs saved in ComfyUI run unchanged. Links are shown as
their type; widgets as `name=default`. A choice list filled from the models directory or the
request's images is shown as `<folder>`.
"""


def _input(spec) -> str:
    if spec.is_link:
        text = f"{spec.name}: {spec.type}"
    elif isinstance(spec, Choice) and spec.source:
        text = f"{spec.name}: <{spec.source}>"
    elif spec.has_default:
        text = f"{spec.name}={json.dumps(spec.default)}"
    else:
        text = spec.name
    return f"[{text}]" if spec.optional else text


def nodes_markdown(registry: Mapping[str, type[Node]]) -> str:
    schemas = sorted(
        (cls.schema for cls in registry.values()),
        key=lambda s: (s.origin != "ComfyUI", s.origin, s.category, s.class_type),
    )
    origins = {}
    for schema in schemas:
        origins[schema.origin] = origins.get(schema.origin, 0) + 1
    counts = ", ".join(f"{n} from {o}" for o, n in origins.items())
    lines = [
        HEADER,
        f"{len(schemas)} nodes: {counts}.",
        "",
        "| class_type | origin | category | inputs ([optional]) | outputs |",
        "|---|---|---|---|---|",
    ]
    for s in schemas:
        inputs = ", ".join(_input(i) for i in s.inputs)
        outputs = ", ".join(o.type for o in s.outputs) or "(output node)"
        lines.append(f"| {s.class_type} | {s.origin} | {s.category} | {inputs.replace('|', '&#124;')} | {outputs} |")
    return "\n".join(lines) + "\n"
