"""Engine units: graph parsing, the output cache's bounds, cache keys, pruning."""

from __future__ import annotations

import pytest
import torch
from support.graph_builder import GraphBuilder, linked, node_of

from plinth.nodes.core.registry import NODES
from plinth.server.engine.cache import OutputCache
from plinth.server.engine.graph import GraphValidationError, LinkRef, parse_graph
from plinth.server.engine.validate import validate


class Env:
    def choices(self, source):
        return ["tiny-sd"] if source == "checkpoints" else ["a.png"]

    def fingerprint(self, source, name):
        return f"{source}:{name}"


def test_links_and_literals_are_told_apart():
    graph = parse_graph('{"1": {"class_type": "X", "inputs": {"a": ["2", 0], "b": [1, 2, 3], "c": "t"}}}')
    inputs = graph.nodes["1"].inputs
    assert inputs["a"] == LinkRef("2", 0)
    assert inputs["b"] == [1, 2, 3] and inputs["c"] == "t"


def test_only_nodes_that_feed_outputs_run(txt2img):
    b = GraphBuilder(txt2img)
    unused = b.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    sampler = b.find("KSampler")
    order = [b.find("CheckpointLoaderSimple"), linked(txt2img, sampler, "positive"), sampler]
    order += [b.find("VAEDecode"), b.find("SaveImage")]
    plan = validate(parse_graph(b.build()), NODES, Env())
    ids = [n.id for n in plan.nodes]
    assert unused.id not in ids
    assert [ids.index(node.id) for node in order] == sorted(ids.index(node.id) for node in order)


def test_keys_depend_on_inputs_and_ancestry_not_ids(txt2img):
    sampler = node_of(txt2img, "KSampler")
    keys = {n.id: n.key for n in validate(parse_graph(txt2img), NODES, Env()).nodes}
    sampler.inputs["seed"] += 1
    changed = {n.id: n.key for n in validate(parse_graph(txt2img), NODES, Env()).nodes}
    rerun = {sampler.id, node_of(txt2img, "VAEDecode").id, node_of(txt2img, "SaveImage").id}
    assert {i for i in keys if keys[i] != changed[i]} == rerun
    positive, negative = linked(txt2img, sampler, "positive"), linked(txt2img, sampler, "negative")
    assert keys[positive.id] != keys[negative.id]  # different prompts


def test_defaults_fill_missing_widgets_and_ints_coerce(txt2img):
    node = node_of(txt2img, "KSampler")
    del node.inputs["denoise"]
    node.inputs["steps"] = 2.0
    plan = validate(parse_graph(txt2img), NODES, Env())
    sampler = next(n for n in plan.nodes if n.id == node.id)
    assert sampler.literals["denoise"] == 1.0
    assert sampler.literals["steps"] == 2 and isinstance(sampler.literals["steps"], int)


@pytest.mark.parametrize("value", [2.5, True, None, float("nan"), [1]])
def test_bad_ints_are_refused(txt2img, value):
    node_of(txt2img, "KSampler").inputs["steps"] = value
    with pytest.raises(GraphValidationError) as info:
        validate(parse_graph(txt2img), NODES, Env())
    assert info.value.errors[0].input == "steps"


def test_cache_is_bounded_in_bytes_and_least_recently_used_goes_first():
    cache = OutputCache(max_bytes=3 * 4096 + 500)
    for key in "abc":
        cache.put(key, (torch.zeros(1024),))  # 4 KiB each
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", (torch.zeros(1024),))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("d") is not None
    cache.put("huge", (torch.zeros(10**6),))
    assert cache.get("huge") is None  # larger than the whole cache: not kept
    assert cache.bytes_used <= cache.max_bytes


def test_limits_name_every_input_past_them(txt2img):
    from plinth.server.config import Limits
    from plinth.server.engine.validate import LimitExceeded

    limits = Limits(max_pixels=64 * 64, max_steps=10, max_batch=2, max_nodes=20)
    validate(parse_graph(txt2img), NODES, Env(), limits)  # the demo graph fits
    latent, sampler = node_of(txt2img, "EmptyLatentImage"), node_of(txt2img, "KSampler")
    latent.inputs.update(width=128, height=64, batch_size=3)
    sampler.inputs["steps"] = 11
    with pytest.raises(LimitExceeded) as info:
        validate(parse_graph(txt2img), NODES, Env(), limits)
    assert {(e.node_id, e.input, e.code) for e in info.value.errors} == {
        (latent.id, "width", "limit_exceeded"),
        (latent.id, "batch_size", "limit_exceeded"),
        (sampler.id, "steps", "limit_exceeded"),
    }
    with pytest.raises(LimitExceeded, match="7 nodes; the limit is 6"):
        validate(parse_graph(txt2img), NODES, Env(), Limits(max_nodes=6))


def test_running_out_of_memory_fails_the_job_with_where_and_what_to_change(server, client, txt2img, monkeypatch):
    from plinth.clients import JobFailed
    from plinth.nodes.latent import VAEDecode

    def exhausted(self, ctx, samples, vae):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(VAEDecode, "run", exhausted)
    freed = []
    monkeypatch.setattr(server.components.models, "free_memory", lambda: freed.append(True) or 0)
    node_of(txt2img, "KSampler").inputs["seed"] = 8_675_309  # nothing cached downstream of the sampler
    with pytest.raises(JobFailed) as failed:
        client.run(txt2img)
    message = str(failed.value)
    assert "out of memory on cpu in VAEDecode" in message and "Tried to allocate 2.00 GiB" in message
    assert "VAEDecodeTiled" in message
    assert freed == [True]  # the server gave the memory back before the next job
    monkeypatch.undo()
    assert client.run(txt2img).images  # and the server goes on
