"""The wire contract: committed stubs match the .proto files, and ListNodes gives every node's
full schema, matching ComfyUI's own (names, order, types, defaults, ranges, choices)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support.paths import DATA, REPO

from plinth.nodes.core.registry import NODES

COMFY = json.loads((DATA / "comfyui-core-nodes.json").read_text())


def test_committed_stubs_match_the_protos():
    proc = subprocess.run(
        [sys.executable, str(REPO / "protos" / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_registered_node_is_listed(client):
    listed = {n.class_type: n for n in client.list_nodes()}
    assert set(listed) == set(NODES)
    for schema in listed.values():
        assert schema.category and schema.display_name and schema.description


def _comfy_inputs(class_type):
    spec = COMFY[class_type]
    order = spec["input_order"]
    for section in ("required", "optional"):
        for name in order.get(section, []):
            yield name, section, spec["input"][section][name]


@pytest.mark.parametrize("class_type", sorted(set(COMFY) & set(NODES)))
def test_schema_matches_comfyui(client, class_type):
    ours = next(n for n in client.list_nodes() if n.class_type == class_type)
    theirs = list(_comfy_inputs(class_type))
    assert [i.name for i in ours.inputs] == [name for name, _, _ in theirs], "input names and widget order"
    assert [o.type for o in ours.outputs] == COMFY[class_type]["output"]
    assert ours.output_node == COMFY[class_type]["output_node"]
    for item, (name, section, (ctype, *rest)) in zip(ours.inputs, theirs, strict=False):
        options = rest[0] if rest else {}
        assert item.required == (section == "required"), name
        if isinstance(ctype, list) or (ctype == "COMBO" and options.get("options")):
            assert item.type == "COMBO", name
            comfy_choices = ctype if isinstance(ctype, list) else options["options"]
            assert set(item.choices) <= set(comfy_choices), f"{name}: choices ComfyUI does not have"
        elif ctype.startswith("<"):
            assert item.type == "COMBO", name  # a dynamic list: model files or uploaded images
        else:
            assert item.type == ctype, name
        if "default" in options:
            assert json.loads(item.default_json) == options["default"], name
        for bound in ("min", "max", "step"):
            if bound in options:
                assert item.HasField(bound) and getattr(item, bound) == pytest.approx(float(options[bound])), (
                    name,
                    bound,
                )
        assert item.control_after_generate == bool(options.get("control_after_generate")), name


def test_sampler_and_scheduler_choices_are_comfyuis_full_lists(client):
    """All 42 samplers and 9 schedulers of ComfyUI 0.3.75, in its order, on every node that offers them."""
    required = COMFY["KSampler"]["input"]["required"]
    for class_type, names in (
        ("KSampler", ("sampler_name", "scheduler")),
        ("KSamplerAdvanced", ("sampler_name", "scheduler")),
        ("KSamplerSelect", ("sampler_name",)),
        ("BasicScheduler", ("scheduler",)),
    ):
        node = next(n for n in client.list_nodes() if n.class_type == class_type)
        inputs = {i.name: i for i in node.inputs}
        for name in names:
            assert list(inputs[name].choices) == required[name][0], (class_type, name)
    assert len(required["sampler_name"][0]) == 42 and len(required["scheduler"][0]) == 9


def test_the_default_model_is_offered(client):
    ckpt = next(n for n in client.list_nodes() if n.class_type == "CheckpointLoaderSimple").inputs[0]
    assert "tiny-sd" in ckpt.choices


def test_docs_node_table_is_current():
    from plinth.server.docs import nodes_markdown

    assert (REPO / "docs" / "nodes.md").read_text() == nodes_markdown(NODES), (
        "docs/nodes.md is stale: plinth nodes --markdown > docs/nodes.md"
    )


def test_every_comfyui_node_of_the_registry_is_a_core_node():
    for cls in NODES.values():
        if cls.schema.origin == "ComfyUI":
            assert cls.schema.class_type in COMFY, cls.schema.class_type
