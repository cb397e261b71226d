"""Every kind of bad graph comes back as INVALID_ARGUMENT naming node and input, all errors at
once, and the server keeps serving."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from support.graph_builder import GraphBuilder, node_of

from plinth.clients import PlinthError
from plinth.clients.v1 import graph_service_pb2 as gs


def _mutations():
    def unknown_class(g):
        g[node_of(g, "SaveImage").id]["class_type"] = "SaveImageToTheMoon"

    def missing_required(g):
        del node_of(g, "KSampler").inputs["model"]

    def link_to_missing_node(g):
        node_of(g, "KSampler").inputs["model"] = ["404", 0]

    def link_to_missing_output(g):
        node_of(g, "KSampler").inputs["model"] = node_of(g, "CheckpointLoaderSimple").out(7)

    def link_type_mismatch(g):
        node_of(g, "KSampler").inputs["model"] = node_of(g, "CheckpointLoaderSimple").out(1)  # CLIP into MODEL

    def wrong_value_type(g):
        node_of(g, "KSampler").inputs["steps"] = "many"

    def out_of_range(g):
        node_of(g, "KSampler").inputs["cfg"] = 1000.0

    def below_range(g):
        node_of(g, "EmptyLatentImage").inputs["width"] = 8

    def not_in_choices(g):
        node_of(g, "KSampler").inputs["sampler_name"] = "euler_magic"

    def unknown_model(g):
        node_of(g, "CheckpointLoaderSimple").inputs["ckpt_name"] = "no-such-model.safetensors"

    def literal_for_link(g):
        node_of(g, "VAEDecode").inputs["vae"] = "my-vae"

    def unknown_input(g):
        node_of(g, "EmptyLatentImage").inputs["depth"] = 3

    # each error names the node of this class_type (found before the mutation) and this input
    return [
        (unknown_class, "SaveImage", "", "unknown_class_type"),
        (missing_required, "KSampler", "model", "required_input_missing"),
        (link_to_missing_node, "KSampler", "model", "bad_link"),
        (link_to_missing_output, "KSampler", "model", "bad_link"),
        (link_type_mismatch, "KSampler", "model", "link_type_mismatch"),
        (wrong_value_type, "KSampler", "steps", "invalid_input_type"),
        (out_of_range, "KSampler", "cfg", "value_bigger_than_max"),
        (below_range, "EmptyLatentImage", "width", "value_smaller_than_min"),
        (not_in_choices, "KSampler", "sampler_name", "value_not_in_list"),
        (unknown_model, "CheckpointLoaderSimple", "ckpt_name", "value_not_in_list"),
        (literal_for_link, "VAEDecode", "vae", "invalid_input_type"),
        (unknown_input, "EmptyLatentImage", "depth", "unknown_input"),
    ]


@pytest.mark.parametrize("mutate,class_type,input_name,code", _mutations(), ids=lambda v: getattr(v, "__name__", None))
def test_each_error_names_node_and_input(client, txt2img, mutate, class_type, input_name, code):
    node = node_of(txt2img, class_type).id
    mutate(txt2img)
    with pytest.raises(PlinthError) as info:
        client.run(txt2img)
    assert info.value.code == "INVALID_ARGUMENT"
    assert [(e.node_id, e.input, e.code) for e in info.value.errors] == [(node, input_name, code)]
    assert info.value.errors[0].message
    assert client.health() == "SERVING"


def test_all_errors_come_back_at_once(client, txt2img):
    sampler, latent, decode = (node_of(txt2img, c) for c in ("KSampler", "EmptyLatentImage", "VAEDecode"))
    sampler.inputs["steps"] = 0
    sampler.inputs["scheduler"] = "weekly"
    latent.inputs["height"] = 99999
    decode.inputs["samples"] = ["77", 0]
    with pytest.raises(PlinthError) as info:
        client.submit(txt2img)
    found = {(e.node_id, e.input, e.code) for e in info.value.errors}
    assert found == {
        (sampler.id, "steps", "value_smaller_than_min"),
        (sampler.id, "scheduler", "value_not_in_list"),
        (latent.id, "height", "value_bigger_than_max"),
        (decode.id, "samples", "bad_link"),
    }


def test_cycle_is_reported_on_its_nodes(client, txt2img):
    # a decode reads sampler one, and samplers one and two feed each other: a cycle of links
    b = GraphBuilder(txt2img)
    sampler, checkpoint = b.find("KSampler"), b.find("CheckpointLoaderSimple")
    decode = b.add("VAEDecode", samples=None, vae=checkpoint.out(2))
    one = b.add("KSampler", **sampler.inputs)
    two = b.add("KSampler", **{**sampler.inputs, "latent_image": one.out(0)})
    decode.inputs["samples"] = one.out(0)
    one.inputs["latent_image"] = two.out(0)
    with pytest.raises(PlinthError) as info:
        client.submit(b.build())
    assert {(e.node_id, e.code) for e in info.value.errors} == {
        (one.id, "dependency_cycle"),
        (two.id, "dependency_cycle"),
    }


def test_no_output_node(client, txt2img):
    del txt2img[node_of(txt2img, "SaveImage").id]
    with pytest.raises(PlinthError) as info:
        client.submit(txt2img)
    assert [e.code for e in info.value.errors] == ["prompt_no_outputs"]


@pytest.mark.parametrize("text", ["", "{not json", "[1, 2]", '{"1": 5}', '{"1": {"inputs": {}}}'])
def test_malformed_graphs(client, text):
    with pytest.raises(PlinthError) as info:
        client.submit(text)
    assert info.value.code == "INVALID_ARGUMENT"
    assert info.value.errors


def test_details_carry_a_standard_bad_request(server, txt2img):
    import json

    sampler = node_of(txt2img, "KSampler")
    sampler.inputs["steps"] = -1
    channel = grpc.insecure_channel(server.address)
    from plinth.clients.v1 import graph_service_pb2_grpc as gs_grpc

    with pytest.raises(grpc.RpcError) as info:
        gs_grpc.GraphServiceStub(channel).Submit(gs.SubmitRequest(graph_json=json.dumps(txt2img)))
    status = rpc_status.from_call(info.value)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    bad = [d for d in status.details if d.Is(error_details_pb2.BadRequest.DESCRIPTOR)]
    unpacked = error_details_pb2.BadRequest()
    bad[0].Unpack(unpacked)
    assert unpacked.field_violations[0].field == f"nodes.{sampler.id}.inputs.steps"
    channel.close()


def test_server_keeps_serving_after_errors(client, txt2img):
    for _ in range(3):
        with pytest.raises(PlinthError):
            client.submit({"1": {"class_type": "Nope", "inputs": {}}})
    node_of(txt2img, "KSampler").inputs["seed"] = 777
    assert client.run(txt2img).status == "completed"


def test_unknown_job_is_not_found(client):
    with pytest.raises(PlinthError) as info:
        client.get_job("does-not-exist")
    assert info.value.code == "NOT_FOUND"
