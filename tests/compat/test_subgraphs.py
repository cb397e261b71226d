"""Editor workflows with subgraphs, expanded into the API format as the editor's export does.

tests/data/workflows/txt2img-subgraph.json is txt2img.json with its prompts, sampler and decoder
folded into the subgraph "Text to image" (instance node 10), saved as the editor (frontend 1.28)
saves it: model, clip, vae and latent linked in from outside, seed and prompt promoted to widgets
of the instance (properties.proxyWidgets), and inside a bypassed LoraLoader, a Reroute and a
muted PreviewImage. Its inner nodes get the editor's path ids: "10:3" is node 3 inside node 10.
ComfyUI's own templates with subgraphs come from the comfyui-workflow-templates packages.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from support.live_server import output_cache
from support.paths import DATA
from support.template_models import template_path

from plinth.nodes.core.registry import NODES
from plinth.server.engine.graph import GraphValidationError
from plinth.server.engine.subgraphs import MAX_DEPTH, MAX_EXPANDED_NODES
from plinth.server.engine.workflow import to_api_format

WORKFLOWS = DATA / "workflows"
TEXT_TO_IMAGE = "3f6c1a58-5b1e-4c55-9a57-2f3f0c9d8e21"
# The twin's nodes that sit inside instance 10 in the subgraph workflow.
INSIDE_10 = {"3": "10:3", "6": "10:6", "7": "10:7", "8": "10:8"}


def load(name: str) -> dict[str, Any]:
    return json.loads((WORKFLOWS / name).read_text())


def node(nodes: list[dict[str, Any]], node_id: int) -> dict[str, Any]:
    return next(n for n in nodes if n["id"] == node_id)


def text_to_image(workflow: dict[str, Any]) -> dict[str, Any]:
    return next(d for d in workflow["definitions"]["subgraphs"] if d["id"] == TEXT_TO_IMAGE)


def twin(paths: dict[str, str]) -> dict[str, Any]:
    """txt2img.json converted, its nodes renamed by `paths` ({"3": "10:3"}), links included."""
    graph = to_api_format(load("txt2img.json"), NODES)

    def renamed(value: Any) -> Any:
        return [paths.get(value[0], value[0]), value[1]] if isinstance(value, list) else value

    return {
        paths.get(node_id, node_id): {**n, "inputs": {k: renamed(v) for k, v in n["inputs"].items()}}
        for node_id, n in graph.items()
    }


def conversion_errors(workflow: dict[str, Any]) -> list:
    with pytest.raises(GraphValidationError) as info:
        to_api_format(workflow, NODES)
    return info.value.errors


def instance(node_id: int, subgraph_id: str, mode: int = 0, **extra: Any) -> dict[str, Any]:
    return {"id": node_id, "type": subgraph_id, "mode": mode, "inputs": [], "outputs": [], **extra}


def definition(subgraph_id: str, nodes: list[dict[str, Any]], **parts: Any) -> dict[str, Any]:
    return {
        "id": subgraph_id,
        "name": subgraph_id.title(),
        "inputNode": {"id": -10},
        "outputNode": {"id": -20},
        "inputs": [],
        "outputs": [],
        "nodes": nodes,
        "links": [],
        **parts,
    }


# the subgraph workflow and its flattened twin


def test_subgraph_workflow_converts_to_its_flattened_twin():
    graph = to_api_format(load("txt2img-subgraph.json"), NODES)
    assert graph == twin(INSIDE_10)
    # the instance's seed and prompt, not the inner nodes' stale 918273645 and placeholder
    assert graph["10:3"]["inputs"]["seed"] == 42
    assert graph["10:6"]["inputs"]["text"].startswith("studio packshot")


def test_subgraph_workflow_runs_like_its_flattened_twin(client, server):
    flat = client.run(load("txt2img.json"))
    output_cache(server).clear()  # the folded run computes everything again
    folded = client.run(load("txt2img-subgraph.json"))
    assert folded.nodes["10:3"].class_type == "KSampler" and folded.nodes["10:3"].status == "executed"
    assert np.array_equal(np.asarray(folded.images[0]), np.asarray(flat.images[0]))


def test_nested_subgraphs_convert_to_the_flattened_twin():
    """Instance 11 of "Generate" holds the loader, the latent and instance 10 of "Text to image"
    (defined inside Generate's own definitions). Generate's one widget, its seed, reaches the
    KSampler two levels down through instance 10's seed input, over instance 10's own value 7."""
    folded = load("txt2img-subgraph.json")
    inner = {n["id"]: n for n in folded["nodes"]}
    inner[10]["inputs"].append({"name": "seed", "type": "INT", "link": 15})
    inner[10]["widgets_values"][1] = 7
    generate = definition(
        "generate",
        [inner[4], inner[5], inner[10]],
        inputs=[{"name": "seed", "type": "INT", "linkIds": [15]}],
        outputs=[{"name": "IMAGE", "type": "IMAGE", "linkIds": [16]}],
        links=[
            {"id": i, "origin_id": o, "origin_slot": s, "target_id": t, "target_slot": ts, "type": ty}
            for i, o, s, t, ts, ty in [*folded["links"][:4], [15, -10, 0, 10, 4, "INT"], [16, 10, 0, -20, 0, "IMAGE"]]
        ],
        definitions={"subgraphs": [text_to_image(folded)]},
    )
    save = {**inner[9], "inputs": [{"name": "images", "type": "IMAGE", "link": 17}]}
    outer = instance(11, "generate", outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [17]}])
    outer["widgets_values"] = [42, "randomize"]  # saved before proxyWidgets: the seed and its control
    nested = {"nodes": [outer, save], "links": [[17, 11, 0, 9, 0, "IMAGE"]], "definitions": {"subgraphs": [generate]}}
    paths = {"4": "11:4", "5": "11:5"} | {k: f"11:{v}" for k, v in INSIDE_10.items()}
    assert to_api_format(nested, NODES) == twin(paths)


# the instance's inputs and widget values


def test_unlinked_input_without_a_value_leaves_the_inner_widget_its_own():
    workflow = load("txt2img-subgraph.json")
    node(workflow["nodes"], 10)["properties"]["proxyWidgets"] = [["-1", "prompt"]]
    node(workflow["nodes"], 10)["widgets_values"] = ["a red sneaker"]
    graph = to_api_format(workflow, NODES)
    assert graph["10:3"]["inputs"]["seed"] == 918273645
    assert graph["10:6"]["inputs"]["text"] == "a red sneaker"


def test_instance_input_linked_from_outside_feeds_the_inner_widget():
    workflow = load("txt2img-subgraph.json")
    workflow["nodes"].append(
        {"id": 20, "type": "PrimitiveNode", "mode": 0, "outputs": [{"type": "INT"}], "widgets_values": [5, "fixed"]}
    )
    workflow["links"].append([10, 20, 0, 10, 4, "INT"])
    node(workflow["nodes"], 10)["inputs"].append(
        {"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 10}
    )
    assert to_api_format(workflow, NODES)["10:3"]["inputs"]["seed"] == 5


@pytest.mark.parametrize(
    "values",
    [
        [42, "randomize", "a red sneaker"],  # one value per widget input in input order, the seed's control after it
        [42, "a red sneaker"],
        {"prompt": "a red sneaker", "seed": 42},
    ],
    ids=["with-control", "without-control", "by-name"],
)
def test_instance_values_saved_without_proxy_widgets(values):
    workflow = load("txt2img-subgraph.json")
    instance_10 = node(workflow["nodes"], 10)
    del instance_10["properties"]["proxyWidgets"]
    instance_10["widgets_values"] = values
    graph = to_api_format(workflow, NODES)
    assert graph["10:3"]["inputs"]["seed"] == 42
    assert graph["10:6"]["inputs"]["text"] == "a red sneaker"


# modes of an instance


def with_invert(mode: int) -> dict[str, Any]:
    """txt2img-subgraph.json with instance 12 of "Invert" (an ImageInvert inside) between the
    text-to-image instance and SaveImage."""
    workflow = load("txt2img-subgraph.json")
    invert = {"id": 1, "type": "ImageInvert", "mode": 0, "inputs": [{"name": "image", "type": "IMAGE", "link": 1}]}
    workflow["definitions"]["subgraphs"].append(
        definition(
            "invert",
            [invert],
            inputs=[{"name": "image", "type": "IMAGE", "linkIds": [1]}],
            outputs=[{"name": "IMAGE", "type": "IMAGE", "linkIds": [2]}],
            links=[[1, -10, 0, 1, 0, "IMAGE"], [2, 1, 0, -20, 0, "IMAGE"]],
        )
    )
    workflow["nodes"].append(
        instance(
            12,
            "invert",
            mode,
            inputs=[{"name": "image", "type": "IMAGE", "link": 10}],
            outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [9]}],
        )
    )
    workflow["links"] = [link for link in workflow["links"] if link[0] != 9]
    workflow["links"] += [[10, 10, 0, 12, 0, "IMAGE"], [9, 12, 0, 9, 0, "IMAGE"]]
    return workflow


def test_instance_output_feeds_another_instance():
    graph = to_api_format(with_invert(0), NODES)
    assert graph["12:1"]["inputs"] == {"image": ["10:8", 0]}
    assert graph["9"]["inputs"]["images"] == ["12:1", 0]


def test_bypassed_instance_passes_its_input_of_the_consumed_type_through():
    graph = to_api_format(with_invert(4), NODES)
    assert "12:1" not in graph
    assert graph["9"]["inputs"]["images"] == ["10:8", 0]


def test_muted_instance_runs_nothing_inside():
    workflow = load("txt2img-subgraph.json")
    node(workflow["nodes"], 10)["mode"] = 2
    graph = to_api_format(workflow, NODES)
    assert sorted(graph) == ["4", "5", "9"]
    assert graph["9"]["inputs"] == {"filename_prefix": "packshot"}


# errors


def test_conversion_errors_inside_a_subgraph_name_the_node_path():
    workflow = load("txt2img-subgraph.json")
    inner = text_to_image(workflow)["nodes"]
    node(inner, 3)["widgets_values"] = [1, "fixed", 2]
    node(inner, 7)["type"] = "FancyTextEncode"
    errors = conversion_errors(workflow)
    assert [(e.node_id, e.class_type, e.code) for e in errors] == [
        ("10:7", "FancyTextEncode", "unknown_class_type"),
        ("10:3", "KSampler", "missing_widget_values"),
    ]


def test_validation_errors_inside_a_subgraph_name_the_node_path(server):
    workflow = load("txt2img-subgraph.json")
    node(workflow["nodes"], 10)["widgets_values"][1] = -1  # the instance's seed, below KSampler's minimum
    with pytest.raises(GraphValidationError) as info:
        server.components.jobs.submit(workflow)
    assert [(e.node_id, e.input, e.code) for e in info.value.errors] == [("10:3", "seed", "value_smaller_than_min")]


def test_a_subgraph_holding_itself_is_an_error_not_a_hang():
    workflow = load("txt2img-subgraph.json")
    text_to_image(workflow)["nodes"].append(instance(30, TEXT_TO_IMAGE))
    errors = conversion_errors(workflow)
    assert [(e.node_id, e.code) for e in errors] == [("10:30", "invalid_workflow")]
    assert "'Text to image' holds an instance of itself ('Text to image' > 'Text to image')" in errors[0].message


def test_subgraphs_holding_each_other_are_an_error():
    ping = definition("ping", [instance(2, "pong")])
    pong = definition("pong", [instance(3, "ping")])
    workflow = {"nodes": [instance(1, "ping")], "links": [], "definitions": {"subgraphs": [ping, pong]}}
    errors = conversion_errors(workflow)
    assert [(e.node_id, e.code) for e in errors] == [("1:2:3", "invalid_workflow")]
    assert "('Ping' > 'Pong' > 'Ping')" in errors[0].message


def test_nesting_deeper_than_the_bound_is_an_error():
    chain = [definition(f"level{i}", [instance(1, f"level{i + 1}")]) for i in range(MAX_DEPTH + 5)]
    workflow = {"nodes": [instance(1, "level0")], "links": [], "definitions": {"subgraphs": chain}}
    errors = conversion_errors(workflow)
    assert [e.node_id.count(":") for e in errors] == [MAX_DEPTH]
    assert f"nest more than {MAX_DEPTH} deep" in errors[0].message


def test_an_exploding_expansion_stops_at_the_bound():
    """Ten instances of a subgraph holding ten of the next, six levels: a million nodes from a
    few kilobytes. The expansion stops at the bound with one error."""
    levels = [definition(f"level{i}", [instance(j, f"level{i + 1}") for j in range(10)]) for i in range(6)]
    levels.append(
        definition("level6", [{"id": 1, "type": "EmptyLatentImage", "mode": 0, "widgets_values": [64, 64, 1]}])
    )
    workflow = {"nodes": [instance(1, "level0")], "links": [], "definitions": {"subgraphs": levels}}
    errors = conversion_errors(workflow)
    assert [e.code for e in errors] == ["invalid_workflow"]
    assert f"expand to more than {MAX_EXPANDED_NODES} nodes" in errors[0].message


def test_a_malformed_definition_is_reported_at_its_instance():
    workflow = load("txt2img-subgraph.json")
    text_to_image(workflow)["nodes"] = "everything"
    errors = conversion_errors(workflow)
    assert [(e.node_id, e.code) for e in errors] == [("10", "invalid_workflow")]
    assert TEXT_TO_IMAGE in errors[0].message


# ComfyUI's templates


TEMPLATES = {
    "comfyui_workflow_templates_media_image": [
        "01_qwen_t2i_subgraphed",
        "02_qwen_Image_edit_subgraphed",
        "depth_t2i_adapter",
        "flux1_dev_uso_reference_image_gen",
        "flux_depth_lora_example",
        "image_flux.1_fill_dev_OneReward",
        "image_netayume_lumina_t2i",
        "image_qwen_image_instantx_controlnet",
        "image_qwen_image_instantx_inpainting_controlnet",
    ],
    "comfyui_workflow_templates_media_other": [
        "04_hunyuan_3d_2.1_subgraphed",
        "05_audio_ace_step_1_t2a_song_subgraphed",
        "sd3.5_large_depth",
    ],
}


def template(package: str, name: str) -> dict[str, Any]:
    path = template_path(name)
    assert path.parent.parent.name == package
    return json.loads(path.read_text())


def lacking(workflow: dict[str, Any]) -> dict[str, str]:
    """Every node that runs and whose type this server lacks, by the editor's path id."""
    definitions = {d["id"]: d for d in workflow["definitions"]["subgraphs"]}
    found: dict[str, str] = {}

    def walk(nodes: list[dict[str, Any]], prefix: str) -> None:
        for n in nodes:
            if n.get("mode") in (2, 4) or n["type"] in ("Reroute", "PrimitiveNode", "Note", "MarkdownNote"):
                continue
            if n["type"] in definitions:
                walk(definitions[n["type"]]["nodes"], f"{prefix}{n['id']}:")
            elif n["type"] not in NODES:
                found[f"{prefix}{n['id']}"] = n["type"]

    walk(workflow["nodes"], "")
    return found


@pytest.mark.parametrize(
    ("package", "name"), [(package, name) for package, names in TEMPLATES.items() for name in names]
)
def test_comfyui_templates_with_subgraphs_convert(package, name):
    """Only the node types this server lacks stop them, each reported by name at its path."""
    workflow = template(package, name)
    missing = lacking(workflow)
    if not missing:
        assert to_api_format(workflow, NODES)
        return
    errors = conversion_errors(workflow)
    assert {e.code for e in errors} == {"unknown_class_type"}
    assert {e.node_id: e.class_type for e in errors} == missing


def test_depth_t2i_adapter_template_takes_its_instance_values():
    """The SD1.5 template's "Lotus Depth" instance (node 48) holds the VAE, UNet, sigma and
    sampler of the nodes inside it; with the nodes this server lacks muted, the rest converts."""
    workflow = template("comfyui_workflow_templates_media_image", "depth_t2i_adapter")
    missing = lacking(workflow)
    for definition_ in workflow["definitions"]["subgraphs"]:
        for n in definition_["nodes"]:
            if f"48:{n['id']}" in missing:
                n["mode"] = 2
    for n in workflow["nodes"]:
        if str(n["id"]) in missing:
            n["mode"] = 2
    graph = to_api_format(workflow, NODES)
    assert graph["48:89"]["inputs"]["vae_name"] == "vae-ft-mse-840000-ema-pruned.safetensors"
    assert graph["48:97"]["inputs"]["pixels"] == ["20", 0]  # the instance's input, linked from LoadImage
    assert graph["48:99"]["class_type"] == "ImageInvert"
