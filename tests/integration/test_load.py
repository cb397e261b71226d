"""A bounded load test on loopback: 50 concurrent clients, each running its own graph; every
job completes or is refused explicitly, none is lost or run twice."""

from __future__ import annotations

import copy
import threading

from support.graph_builder import node_of

from plinth.clients import Client, PlinthError

CLIENTS = 50


def test_fifty_concurrent_clients(server, txt2img):
    sampler = node_of(txt2img, "KSampler")
    sampler.inputs["steps"] = 1
    node_of(txt2img, "EmptyLatentImage").inputs["batch_size"] = 1
    outcomes: dict[int, object] = {}
    start = threading.Barrier(CLIENTS)

    def one(index: int) -> None:
        graph = copy.deepcopy(txt2img)
        graph[sampler.id]["inputs"]["seed"] = 50_000 + index
        with Client(server.address, timeout=120) as client:
            start.wait()
            try:
                outcomes[index] = client.run(graph, results_only=False)
            except PlinthError as exc:
                outcomes[index] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(outcomes) == CLIENTS  # nobody left hanging
    done = [o for o in outcomes.values() if not isinstance(o, PlinthError)]
    refused = [o for o in outcomes.values() if isinstance(o, PlinthError)]
    assert all(e.code == "RESOURCE_EXHAUSTED" for e in refused)
    assert all(r.status == "completed" and len(r.images) == 1 for r in done)
    job_ids = [r.job_id for r in done]
    assert len(set(job_ids)) == len(job_ids) == CLIENTS - len(refused)
    for result in done:  # each ran once: one start, one terminal event, the sampler once
        kinds = [e.WhichOneof("kind") for e in result.events]
        assert kinds.count("started") == 1 and kinds.count("completed") == 1
        assert result.nodes[sampler.id].status == "executed"
    assert len(server.components.jobs.queue) == 0
