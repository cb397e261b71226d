"""Every kind of bad graph comes back as INVALID_ARGUMENT naming node and input, all errors at
once, and the server keeps serving."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from plinth.clients import PlinthError
from plinth.clients.v1 import graph_service_pb2 as gs


def _mutations():
    def unknown_class(g):
        g["9"]["class_type"] = "SaveImageToTheMoon"

    def missing_required(g):
        del g["3"]["inputs"]["model"]

    def link_to_missing_node(g):
        g["3"]["inputs"]["model"] = ["404", 0]

    def link_to_missing_output(g):
        g["3"]["inputs"]["model"] = ["4", 7]

    def link_type_mismatch(g):
        g["3"]["inputs"]["model"] = ["4", 1]  # CLIP into MODEL

    def wrong_value_type(g):
        g["3"]["inputs"]["steps"] = "many"

    def out_of_range(g):
        g["3"]["inputs"]["cfg"] = 1000.0

    def below_range(g):
        g["5"]["inputs"]["width"] = 8

    def not_in_choices(g):
        g["3"]["inputs"]["sampler_name"] = "euler_magic"

    def unknown_model(g):
        g["4"]["inputs"]["ckpt_name"] = "no-such-model.safetensors"

    def literal_for_link(g):
        g["8"]["inputs"]["vae"] = "my-vae"

    def unknown_input(g):
        g["5"]["inputs"]["depth"] = 3

    return [
        (unknown_class, "9", "", "unknown_class_type"),
        (missing_required, "3", "model", "required_input_missing"),
        (link_to_missing_node, "3", "model", "bad_link"),
        (link_to_missing_output, "3", "model", "bad_link"),
        (link_type_mismatch, "3", "model", "link_type_mismatch"),
        (wrong_value_type, "3", "steps", "invalid_input_type"),
        (out_of_range, "3", "cfg", "value_bigger_than_max"),
        (below_range, "5", "width", "value_smaller_than_min"),
        (not_in_choices, "3", "sampler_name", "value_not_in_list"),
        (unknown_model, "4", "ckpt_name", "value_not_in_list"),
        (literal_for_link, "8", "vae", "invalid_input_type"),
        (unknown_input, "5", "depth", "unknown_input"),
    ]


@pytest.mark.parametrize("mutate,node,input_name,code", _mutations(), ids=lambda v: getattr(v, "__name__", None))
def test_each_error_names_node_and_input(client, txt2img, mutate, node, input_name, code):
    mutate(txt2img)
    with pytest.raises(PlinthError) as info:
        client.run(txt2img)
    assert info.value.code == "INVALID_ARGUMENT"
    assert [(e.node_id, e.input, e.code) for e in info.value.errors] == [(node, input_name, code)]
    assert info.value.errors[0].message
    assert client.health() == "SERVING"


def test_all_errors_come_back_at_once(client, txt2img):
    txt2img["3"]["inputs"]["steps"] = 0
    txt2img["3"]["inputs"]["scheduler"] = "weekly"
    txt2img["5"]["inputs"]["height"] = 99999
    txt2img["8"]["inputs"]["samples"] = ["77", 0]
    with pytest.raises(PlinthError) as info:
        client.submit(txt2img)
    found = {(e.node_id, e.input, e.code) for e in info.value.errors}
    assert found == {
        ("3", "steps", "value_smaller_than_min"),
        ("3", "scheduler", "value_not_in_list"),
        ("5", "height", "value_bigger_than_max"),
        ("8", "samples", "bad_link"),
    }


def test_cycle_is_reported_on_its_nodes(client, txt2img):
    # 14 reads 15, and 15 and 16 feed each other: a cycle of links
    txt2img["14"] = {"class_type": "VAEDecode", "inputs": {"samples": ["15", 0], "vae": ["4", 2]}}
    txt2img["15"] = {"class_type": "KSampler", "inputs": {**txt2img["3"]["inputs"], "latent_image": ["16", 0]}}
    txt2img["16"] = {"class_type": "KSampler", "inputs": {**txt2img["3"]["inputs"], "latent_image": ["15", 0]}}
    with pytest.raises(PlinthError) as info:
        client.submit(txt2img)
    assert {(e.node_id, e.code) for e in info.value.errors} == {("15", "dependency_cycle"), ("16", "dependency_cycle")}


def test_no_output_node(client, txt2img):
    del txt2img["9"]
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

    txt2img["3"]["inputs"]["steps"] = -1
    channel = grpc.insecure_channel(server.address)
    from plinth.clients.v1 import graph_service_pb2_grpc as gs_grpc

    with pytest.raises(grpc.RpcError) as info:
        gs_grpc.GraphServiceStub(channel).Submit(gs.SubmitRequest(graph_json=json.dumps(txt2img)))
    status = rpc_status.from_call(info.value)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    bad = [d for d in status.details if d.Is(error_details_pb2.BadRequest.DESCRIPTOR)]
    unpacked = error_details_pb2.BadRequest()
    bad[0].Unpack(unpacked)
    assert unpacked.field_violations[0].field == "nodes.3.inputs.steps"
    channel.close()


def test_server_keeps_serving_after_errors(client, txt2img):
    for _ in range(3):
        with pytest.raises(PlinthError):
            client.submit({"1": {"class_type": "Nope", "inputs": {}}})
    txt2img["3"]["inputs"]["seed"] = 777
    assert client.run(txt2img).status == "completed"


def test_unknown_job_is_not_found(client):
    with pytest.raises(PlinthError) as info:
        client.get_job("does-not-exist")
    assert info.value.code == "NOT_FOUND"
