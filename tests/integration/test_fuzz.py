"""Property-based fuzzing of what clients send: random graph JSON and request fields get only
INVALID_ARGUMENT-class answers (or are accepted), never an internal error, and the server
stays healthy. Accepted jobs are cancelled at once so the fuzz stays cheap."""

from __future__ import annotations

import json

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.graph_builder import node_of

from plinth.clients.v1 import graph_service_pb2 as gs
from plinth.clients.v1 import graph_service_pb2_grpc as gs_grpc
from plinth.nodes.core.registry import NODES

ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
CLASS_TYPES = sorted(NODES) + ["NoSuchNode", "", "ksampler"]
INPUT_NAMES = sorted({i.name for cls in NODES.values() for i in cls.schema.inputs}) + ["", "x" * 300]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
node_ids = st.one_of(st.sampled_from(["1", "2", "3", "4", "5"]), st.text(max_size=8))
links = st.lists(st.one_of(node_ids, st.integers(-3, 9), scalars), min_size=0, max_size=3)
values = st.recursive(
    st.one_of(scalars, links),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
nodes = st.fixed_dictionaries(
    {
        "class_type": st.sampled_from(CLASS_TYPES),
        "inputs": st.dictionaries(st.sampled_from(INPUT_NAMES), values, max_size=6),
    }
)
graphs = st.one_of(
    st.dictionaries(node_ids, st.one_of(nodes, values), max_size=6),
    values,
)
requests = st.builds(
    lambda graph, raw, priority, inputs, omit: gs.SubmitRequest(
        graph_json=raw if raw is not None else json.dumps(graph, allow_nan=True),
        priority=priority,
        inputs=[gs.InputImage(name=n, data=d) for n, d in inputs],
        omit_image_bytes=omit,
    ),
    graphs,
    st.one_of(st.none(), st.text(max_size=60)),
    st.integers(-(2**31), 2**31 - 1),
    st.lists(st.tuples(st.text(max_size=10), st.binary(max_size=40)), max_size=3),
    st.booleans(),
)


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.address)
    yield gs_grpc.GraphServiceStub(channel)
    channel.close()


@settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=requests)
def test_random_requests_get_only_invalid_argument_class_errors(stub, client, request):
    try:
        job_id = stub.Submit(request, timeout=30).job_id
    except grpc.RpcError as exc:
        assert exc.code() in ALLOWED, (exc.code(), exc.details())
        return
    client.cancel(job_id)


def test_server_is_healthy_after_the_fuzz(client, txt2img):
    assert client.health() == "SERVING"
    node_of(txt2img, "KSampler").inputs["seed"] = 4242
    assert client.run(txt2img).status == "completed"
