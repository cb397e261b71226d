"""tests/support/graph_builder.py: the builder's ids, links and copies, and the class_type lookups."""

from __future__ import annotations

import pytest
from support.graph_builder import GraphBuilder, linked, node_of, nodes_of


def test_builder_numbers_nodes_and_links_outputs_in_api_format():
    b = GraphBuilder()
    ckpt = b.add("CheckpointLoaderSimple", ckpt_name="tiny-sd")
    text = b.add("CLIPTextEncode", text="a cat", clip=ckpt.out(1))
    assert (ckpt.id, text.id) == ("1", "2")
    assert b.build() == {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
    }


def test_builder_on_a_saved_graph_adds_after_its_ids_and_leaves_it_unchanged(txt2img):
    saved = {k: dict(v, inputs=dict(v["inputs"])) for k, v in txt2img.items()}
    b = GraphBuilder(txt2img)
    sampler = b.find("KSampler")
    sampler.inputs["seed"] = 7
    extra = b.add("PreviewImage", images=b.find("VAEDecode").out())
    graph = b.build()
    assert extra.id == str(max(int(k) for k in txt2img) + 1)
    assert graph[sampler.id]["inputs"]["seed"] == 7 and graph[extra.id]["inputs"]["images"][1] == 0
    assert txt2img == saved


def test_build_returns_a_copy():
    b = GraphBuilder()
    node = b.add("EmptyLatentImage", width=64)
    first = b.build()
    node.inputs["width"] = 128
    assert first[node.id]["inputs"]["width"] == 64 and b.build()[node.id]["inputs"]["width"] == 128


def test_nodes_of_finds_by_class_type_and_changes_the_graph_in_place(txt2img):
    (sampler,) = nodes_of(txt2img, "KSampler")
    sampler.inputs["seed"] = 99
    assert sampler.class_type == "KSampler" and txt2img[sampler.id]["inputs"]["seed"] == 99
    assert len(nodes_of(txt2img, "CLIPTextEncode")) == 2 and nodes_of(txt2img, "LoraLoader") == []


def test_linked_follows_an_input_to_its_source(txt2img):
    (sampler,) = nodes_of(txt2img, "KSampler")
    positive, negative = linked(txt2img, sampler, "positive"), linked(txt2img, sampler, "negative")
    assert positive.class_type == negative.class_type == "CLIPTextEncode" and positive.id != negative.id


def test_find_refuses_a_class_type_that_is_not_there_once():
    b = GraphBuilder()
    b.add("CLIPTextEncode", text="a")
    b.add("CLIPTextEncode", text="b")
    with pytest.raises(ValueError):
        b.find("CLIPTextEncode")
    with pytest.raises(ValueError):
        b.find("KSampler")


def test_node_of_is_the_one_node_of_a_class_type(txt2img):
    assert node_of(txt2img, "KSampler") == nodes_of(txt2img, "KSampler")[0]
    with pytest.raises(ValueError):
        node_of(txt2img, "CLIPTextEncode")


def test_replace_keeps_the_id_so_links_to_the_node_still_hold(txt2img):
    b = GraphBuilder(txt2img)
    decode = b.find("VAEDecode")
    tiled = b.replace(decode, "VAEDecodeTiled", samples=b.find("KSampler").out(0), tile_size=64)
    graph = b.build()
    assert tiled.id == decode.id and graph[tiled.id]["class_type"] == "VAEDecodeTiled"
    assert graph[b.find("SaveImage").id]["inputs"]["images"] == tiled.out(0)
