"""Workflows saved by ComfyUI's editor (nodes, links, widgets_values) converted to the API format.

The files under tests/data/workflows/ are written as the editor saves them: txt2img.json in the
0.4 layout (links as arrays), txt2img-lora-bypassed.v1.json in schema version 1 (links as
objects, every widget with an input socket) with a Reroute, a PrimitiveNode, notes, a bypassed
and a muted node, and txt2img-custom-nodes.json with custom nodes this server does not have.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from support.graph_builder import node_of
from support.paths import DATA

from plinth.nodes.core.registry import NODES
from plinth.nodes.core.schema import Choice, Int, Node, Output
from plinth.server.engine.graph import GraphValidationError
from plinth.server.engine.workflow import is_editor_workflow, to_api_format

WORKFLOWS = DATA / "workflows"


def load(name: str) -> dict[str, Any]:
    return json.loads((WORKFLOWS / name).read_text())


def node(workflow: dict[str, Any], node_id: int) -> dict[str, Any]:
    return next(n for n in workflow["nodes"] if n["id"] == node_id)


def add_link(
    workflow: dict[str, Any], origin: int, origin_slot: int, target: int, target_slot: int, link_type: str
) -> int:
    """Add a 0.4-style link and return its id; the caller points the target's input at it."""
    link_id = max(link[0] for link in workflow["links"]) + 1
    workflow["links"].append([link_id, origin, origin_slot, target, target_slot, link_type])
    return link_id


def relink(workflow: dict[str, Any], link_id: int, origin: int, origin_slot: int) -> None:
    """Make an existing link start at another node's output."""
    link = next(link for link in workflow["links"] if link[0] == link_id)
    link[1], link[2] = origin, origin_slot


def conversion_errors(workflow: dict[str, Any], registry=NODES) -> list:
    with pytest.raises(GraphValidationError) as info:
        to_api_format(workflow, registry)
    return info.value.errors


@pytest.fixture
def expected(txt2img) -> dict[str, Any]:
    """What the test workflows mean: graphs/txt2img.json with a batch of one."""
    node_of(txt2img, "EmptyLatentImage").inputs["batch_size"] = 1
    return txt2img


# formats


def test_saved_workflows_are_told_apart_from_api_graphs(txt2img):
    assert is_editor_workflow(load("txt2img.json"))
    assert is_editor_workflow(load("txt2img-lora-bypassed.v1.json"))
    assert not is_editor_workflow(txt2img)
    assert not is_editor_workflow({"nodes": {"class_type": "SaveImage", "inputs": {}}})  # node id "nodes"
    assert not is_editor_workflow([])


def test_txt2img_workflow_converts_to_the_demo_graph(expected):
    graph = to_api_format(load("txt2img.json"), NODES)
    assert graph == expected  # ids as strings, seed's "randomize" skipped, titles in _meta
    assert graph["3"]["inputs"]["seed"] == 42 and graph["3"]["inputs"]["steps"] == 2


def test_converted_workflow_runs(server):
    job = server.components.jobs.submit(to_api_format(load("txt2img.json"), NODES))
    list(job.watch())
    assert job.status.value == "completed", job.error


def test_object_links_of_schema_version_1_convert_like_arrays(expected):
    workflow = load("txt2img.json")
    workflow["version"] = 1
    workflow["links"] = [
        dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), link, strict=False))
        for link in workflow["links"]
    ]
    assert to_api_format(workflow, NODES) == expected


def test_newer_editor_file_with_reroute_primitive_notes_bypass_and_mute(expected):
    """One file with everything the editor adds around the same graph converts to that graph:
    seed 42 comes from the PrimitiveNode, not the stale 918273645 stored on the KSampler."""
    assert to_api_format(load("txt2img-lora-bypassed.v1.json"), NODES) == expected


# editor-only nodes


def test_reroutes_are_followed_to_the_real_source():
    workflow = load("txt2img.json")
    for reroute_id in (20, 21):
        workflow["nodes"].append(
            {
                "id": reroute_id,
                "type": "Reroute",
                "mode": 0,
                "inputs": [{"name": "", "type": "*", "link": None}],
                "outputs": [{"name": "", "type": "VAE", "links": []}],
                "properties": {},
            }
        )
    node(workflow, 20)["inputs"][0]["link"] = add_link(workflow, 4, 2, 20, 0, "VAE")
    node(workflow, 21)["inputs"][0]["link"] = add_link(workflow, 20, 0, 21, 0, "VAE")
    relink(workflow, 8, 21, 0)  # VAEDecode's vae now arrives through two reroutes
    graph = to_api_format(workflow, NODES)
    assert graph["8"]["inputs"]["vae"] == ["4", 2]
    assert "20" not in graph and "21" not in graph


def test_primitive_node_feeds_a_converted_widget_as_a_literal():
    workflow = load("txt2img.json")
    workflow["nodes"].append(
        {
            "id": 20,
            "type": "PrimitiveNode",
            "mode": 0,
            "inputs": [],
            "outputs": [{"name": "INT", "type": "INT", "widget": {"name": "steps"}, "links": []}],
            "widgets_values": [3, "fixed"],
        }
    )
    link_id = add_link(workflow, 20, 0, 3, 4, "INT")
    node(workflow, 3)["inputs"].append({"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": link_id})
    graph = to_api_format(workflow, NODES)
    assert graph["3"]["inputs"]["steps"] == 3  # not the stored 2
    assert "20" not in graph


class SeedSource(Node):
    """A node with an INT output, to feed a converted widget from a real node."""

    OUTPUTS = (Output("INT"),)
    value = Int(default=0)


def test_converted_widget_linked_to_a_node_takes_the_link_over_the_stored_value():
    workflow = load("txt2img.json")
    workflow["nodes"].append(
        {
            "id": 20,
            "type": "SeedSource",
            "mode": 0,
            "widgets_values": [7],
            "outputs": [{"name": "INT", "type": "INT", "links": []}],
        }
    )
    link_id = add_link(workflow, 20, 0, 3, 4, "INT")
    node(workflow, 3)["inputs"].append({"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": link_id})
    graph = to_api_format(workflow, {**NODES, "SeedSource": SeedSource})
    assert graph["3"]["inputs"]["seed"] == ["20", 0]
    assert graph["20"] == {"class_type": "SeedSource", "inputs": {"value": 7}, "_meta": {"title": "SeedSource"}}


def test_notes_and_groups_are_ignored(expected):
    workflow = load("txt2img.json")
    workflow["nodes"] += [
        {"id": 20, "type": "Note", "mode": 0, "widgets_values": ["seed 42 looks best"], "properties": {}},
        {"id": 21, "type": "MarkdownNote", "mode": 0, "widgets_values": ["# Packshots"], "properties": {}},
    ]
    assert workflow["groups"]
    assert to_api_format(workflow, NODES) == expected


# muted and bypassed nodes


def test_muted_node_is_left_out_with_the_links_into_it():
    workflow = load("txt2img.json")
    node(workflow, 8)["mode"] = 2  # VAEDecode muted: SaveImage loses its images input, as in ComfyUI
    graph = to_api_format(workflow, NODES)
    assert "8" not in graph
    assert graph["9"]["inputs"] == {"filename_prefix": "packshot"}
    assert graph["3"]["inputs"]["model"] == ["4", 0]


def test_bypassed_node_passes_through_its_input_of_the_consumed_type():
    """A bypassed LoraLoader hands on model and clip: each consumer gets the input of its type."""
    workflow = load("txt2img.json")
    workflow["nodes"].append(
        {
            "id": 20,
            "type": "LoraLoader",
            "mode": 4,
            "inputs": [
                {"name": "model", "type": "MODEL", "link": None},
                {"name": "clip", "type": "CLIP", "link": None},
            ],
            "outputs": [
                {"name": "MODEL", "type": "MODEL", "links": [1]},
                {"name": "CLIP", "type": "CLIP", "links": [3, 5]},
            ],
            "widgets_values": ["style.safetensors", 1.0, 1.0],
        }
    )
    node(workflow, 20)["inputs"][0]["link"] = add_link(workflow, 4, 0, 20, 0, "MODEL")
    node(workflow, 20)["inputs"][1]["link"] = add_link(workflow, 4, 1, 20, 1, "CLIP")
    for link_id, slot in ((1, 0), (3, 1), (5, 1)):
        relink(workflow, link_id, 20, slot)
    graph = to_api_format(workflow, NODES)
    assert "20" not in graph  # and, bypassed, not reported as unsupported
    assert graph["3"]["inputs"]["model"] == ["4", 0]
    assert graph["6"]["inputs"]["clip"] == graph["7"]["inputs"]["clip"] == ["4", 1]


def test_bypassed_node_finds_the_matching_type_in_another_slot():
    """Bypassed ImageUpscaleWithModel(upscale_model, image) -> IMAGE: output 0 passes `image`
    (slot 1), and an unconnected bypassed loader upstream contributes nothing."""
    workflow = load("txt2img.json")
    workflow["nodes"] += [
        {
            "id": 20,
            "type": "UpscaleModelLoader",
            "mode": 4,
            "widgets_values": ["4x-UltraSharp.pth"],
            "outputs": [{"name": "UPSCALE_MODEL", "type": "UPSCALE_MODEL", "links": []}],
        },
        {
            "id": 21,
            "type": "ImageUpscaleWithModel",
            "mode": 4,
            "inputs": [
                {"name": "upscale_model", "type": "UPSCALE_MODEL", "link": None},
                {"name": "image", "type": "IMAGE", "link": None},
            ],
            "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [9]}],
        },
    ]
    node(workflow, 21)["inputs"][0]["link"] = add_link(workflow, 20, 0, 21, 0, "UPSCALE_MODEL")
    node(workflow, 21)["inputs"][1]["link"] = add_link(workflow, 8, 0, 21, 1, "IMAGE")
    relink(workflow, 9, 21, 0)
    graph = to_api_format(workflow, NODES)
    assert graph["9"]["inputs"]["images"] == ["8", 0]
    assert "20" not in graph and "21" not in graph


# widget values


def test_image_upload_value_after_load_image_is_skipped():
    workflow = {
        "nodes": [
            {
                "id": 1,
                "type": "LoadImage",
                "mode": 0,
                "widgets_values": ["photo.png", "image"],
                "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": []}],
            }
        ],
        "links": [],
    }
    assert to_api_format(workflow, NODES)["1"]["inputs"] == {"image": "photo.png"}


class MaskFile(Node):
    """Shaped like LoadImageMask plus an optional widget: the editor appends its upload button to
    the required inputs, so the button's "image" follows `channel`, not `image`."""

    OUTPUTS = (Output("MASK"),)
    image = Choice(source="input_images", image_upload=True)
    channel = Choice(options=("alpha", "red"))
    feather = Int(optional=True)


def test_upload_value_sits_after_the_last_required_widget():
    workflow = {
        "nodes": [
            {
                "id": 1,
                "type": "MaskFile",
                "mode": 0,
                "widgets_values": ["mask.png", "red", "image", 6],
                "outputs": [{"name": "MASK", "type": "MASK", "links": []}],
            }
        ],
        "links": [],
    }
    graph = to_api_format(workflow, {"MaskFile": MaskFile})
    assert graph["1"]["inputs"] == {"image": "mask.png", "channel": "red", "feather": 6}


def test_widgets_values_keyed_by_name():
    workflow = load("txt2img.json")
    node(workflow, 5)["widgets_values"] = {"width": 96, "height": 64, "batch_size": 2}
    assert to_api_format(workflow, NODES)["5"]["inputs"] == {"width": 96, "height": 64, "batch_size": 2}


# errors


def test_three_unsupported_custom_nodes_are_reported_by_name_at_once():
    errors = conversion_errors(load("txt2img-custom-nodes.json"))
    assert [(e.node_id, e.class_type, e.code) for e in errors] == [
        ("20", "IPAdapterUnifiedLoader", "unknown_class_type"),
        ("21", "IPAdapterFaceID", "unknown_class_type"),
        ("23", "FaceDetailer", "unknown_class_type"),
    ]  # the bypassed "Image Filter Adjustments" and muted "Image Save" are not needed, so not reported
    for error in errors:
        assert "does not support" in error.message and repr(error.class_type) in error.message


def test_structural_problems_are_graph_errors_reported_together():
    workflow = load("txt2img.json")
    relink(workflow, 8, 99, 2)  # VAEDecode's vae from a node that is not there
    node(workflow, 3)["widgets_values"] = [42, "randomize", 2, 7]  # no sampler, scheduler or denoise
    node(workflow, 9)["inputs"][0]["link"] = 77  # a link id the links list lacks
    errors = conversion_errors(workflow)
    assert [(e.node_id, e.input, e.code) for e in errors] == [
        ("3", "", "missing_widget_values"),
        ("8", "vae", "bad_link"),
        ("9", "images", "bad_link"),
    ]
    assert "no value for sampler_name, scheduler, denoise" in errors[0].message
    assert "stores 7 (seed, control_after_generate, steps, cfg" in errors[0].message
    assert "node 99, which is not in the workflow" in errors[1].message
    assert "link 77" in errors[2].message


def test_a_loop_of_reroutes_is_an_error_not_a_hang():
    workflow = load("txt2img.json")
    workflow["nodes"] += [
        {
            "id": reroute_id,
            "type": "Reroute",
            "mode": 0,
            "inputs": [{"name": "", "type": "*", "link": link_id}],
            "outputs": [{"name": "", "type": "VAE", "links": []}],
        }
        for reroute_id, link_id in ((20, 10), (21, 11))
    ]
    workflow["links"] += [[10, 21, 0, 20, 0, "VAE"], [11, 20, 0, 21, 0, "VAE"]]
    relink(workflow, 8, 20, 0)
    errors = conversion_errors(workflow)
    assert [(e.node_id, e.input, e.code) for e in errors] == [("8", "vae", "bad_link")]
    assert "loop" in errors[0].message


@pytest.mark.parametrize(
    "broken",
    [
        {"nodes": [{"id": 1}], "links": []},
        {"nodes": [{"id": 1, "type": "SaveImage"}, {"id": 1, "type": "SaveImage"}], "links": []},
        {"nodes": [], "links": [[1, 2]]},
        {"nodes": [{"id": 1, "type": "SaveImage", "inputs": "images"}], "links": []},
        {"nodes": "all of them", "links": []},
    ],
)
def test_malformed_files_are_invalid_workflow_errors(broken):
    errors = conversion_errors(copy.deepcopy(broken))
    assert [e.code for e in errors] == ["invalid_workflow"]


def test_an_editor_file_runs_through_submit_and_is_embedded_in_the_png(client):
    import json as _json

    workflow = _json.loads((WORKFLOWS / "txt2img.json").read_text())
    result = client.run(workflow)
    assert result.status == "completed"
    assert _json.loads(result.images[0].text["workflow"]) == workflow
    assert _json.loads(result.images[0].text["prompt"])["3"]["class_type"] == "KSampler"
