"""Jobs over gRPC: event order, late watchers, cancellation, GetJob/ListJobs, priorities."""

from __future__ import annotations

import asyncio
import threading

import pytest
from support.graph_builder import node_of

from plinth.clients import AsyncClient, JobFailed, PlinthError

ORDER = ["queued", "started", "node_started", "progress", "node_cached", "node_finished", "output"]
TERMINAL = {"completed", "failed", "cancelled"}


def kinds(events):
    return [e.WhichOneof("kind") for e in events]


def check_order(events):
    """queued, started, then per node: node_started, progress*, node_finished (or node_cached),
    output after an output node; exactly one terminal event, last."""
    k = kinds(events)
    assert k[:2] == ["queued", "started"]
    assert k[-1] in TERMINAL and sum(x in TERMINAL for x in k) == 1
    assert [e.seq for e in events] == list(range(len(events)))
    current = None
    for event, kind in zip(events[2:-1], k[2:-1], strict=False):
        if kind == "node_started":
            assert current is None
            current = event.node_started.node_id
        elif kind == "progress":
            assert event.progress.node_id == current
        elif kind == "node_finished":
            assert event.node_finished.node_id == current
            current = None
        elif kind in ("node_cached", "output"):
            assert current is None
        else:
            pytest.fail(f"unexpected {kind}")


def test_events_come_in_the_documented_order(client, txt2img):
    sampler, save = node_of(txt2img, "KSampler"), node_of(txt2img, "SaveImage")
    sampler.inputs.update(seed=8080, steps=3)
    result = client.run(txt2img, results_only=False)
    check_order(result.events)
    progress = [e.progress for e in result.events if e.WhichOneof("kind") == "progress"]
    assert [(p.node_id, p.step, p.total) for p in progress] == [
        (sampler.id, 1, 3),
        (sampler.id, 2, 3),
        (sampler.id, 3, 3),
    ]
    output = [e for e in result.events if e.WhichOneof("kind") == "output"]
    assert [(e.output.node_id, len(e.output.images)) for e in output] == [(save.id, 1), (save.id, 1)]  # one per image
    cached = client.run(txt2img, results_only=False)
    check_order(cached.events)
    assert set(kinds(cached.events)) == {"queued", "started", "node_cached", "output", "completed"}


def test_watch_from_the_first_event_after_the_job_ended(client, txt2img):
    node_of(txt2img, "KSampler").inputs["seed"] = 9090
    job_id = client.submit(txt2img)
    live = list(client.watch(job_id))
    late = list(client.watch(job_id))
    assert kinds(late) == kinds(live)
    assert kinds(late)[0] == "queued" and kinds(late)[-1] == "completed"


def test_get_and_list_jobs(client, txt2img):
    sampler = node_of(txt2img, "KSampler")
    sampler.inputs["seed"] = 1111
    result = client.run(txt2img)
    job = client.get_job(result.job_id)
    assert job.status == 3  # JOB_STATUS_COMPLETED
    assert {k: v.class_type for k, v in job.nodes.items()}[sampler.id] == "KSampler"
    assert len(job.outputs) == 2 and not job.outputs[0].png and job.outputs[0].width == 64
    completed = client.list_jobs(statuses=["completed"], page_size=1)
    assert len(completed.jobs) == 1 and completed.next_page_token
    assert client.list_jobs(statuses=["completed"], page_size=1, page_token=completed.next_page_token).jobs
    with pytest.raises(PlinthError) as info:
        client.list_jobs(page_token="garbage")
    assert info.value.code == "INVALID_ARGUMENT"


def long_graph(txt2img, seed, steps=400):
    node_of(txt2img, "KSampler").inputs.update(seed=seed, steps=steps)
    node_of(txt2img, "EmptyLatentImage").inputs["batch_size"] = 1
    return txt2img


def test_cancel_during_sampling_stops_within_one_step(server, client, txt2img):
    job_id = client.submit(long_graph(txt2img, 1212))
    events = client.watch(job_id)
    for event in events:
        if event.WhichOneof("kind") == "progress":
            break
    client.cancel(job_id)
    job = server.components.jobs.get(job_id)
    steps_at_cancel = max(e.payload.step for e in list(job.events) if type(e.payload).__name__ == "Progress")
    rest = list(events)
    assert kinds(rest)[-1] == "cancelled"
    final_steps = max(e.payload.step for e in job.events if type(e.payload).__name__ == "Progress")
    assert final_steps - steps_at_cancel <= 1
    assert final_steps < 400
    assert client.get_job(job_id).status == 5  # JOB_STATUS_CANCELLED


def test_cancel_a_queued_job_and_priorities(server, client, txt2img):
    blocker = client.submit(long_graph(txt2img, 1313))
    low = client.submit(long_graph(txt2img, 1314, steps=2), priority=0)
    high = client.submit(long_graph(txt2img, 1315, steps=2), priority=5)
    doomed = client.submit(long_graph(txt2img, 1316, steps=2))
    assert client.cancel(doomed).status == 5
    client.cancel(blocker)
    assert kinds(client.watch(doomed)) == ["queued", "cancelled"]
    assert kinds(client.watch(low))[-1] == "completed"
    assert kinds(client.watch(high))[-1] == "completed"
    assert 0 < client.get_job(high).started_at <= client.get_job(low).started_at


LOAD_AND_PREVIEW = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
    "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
}


def truncated_png() -> bytes:
    """A PNG whose header reads (so Submit accepts it) but whose pixels stop half way."""
    import numpy as np
    from support.files import png

    data = png(np.full((64, 64, 3), 7, np.uint8))
    return data[: len(data) // 2]


def test_run_raises_job_failed_with_the_result(client):
    with pytest.raises(JobFailed) as info:
        client.run(LOAD_AND_PREVIEW, inputs={"photo.png": truncated_png()})
    assert info.value.result.status == "failed"
    assert "photo.png" in info.value.result.error and "node 1 (LoadImage)" in info.value.result.error


@pytest.mark.parametrize(
    "data,code", [(b"not an image at all", "invalid_image"), (b"GIF89a" + bytes(100), "invalid_image")]
)
def test_uploads_that_are_not_png_jpeg_or_webp_are_refused(client, data, code):
    with pytest.raises(PlinthError) as info:
        client.submit(LOAD_AND_PREVIEW, inputs={"photo.png": data})
    assert info.value.code == "INVALID_ARGUMENT"
    assert [(e.input, e.code) for e in info.value.errors] == [("inputs.photo.png", code)]


def test_limits_and_a_full_queue_are_resource_exhausted(server, client, txt2img):
    import io

    from PIL import Image

    from plinth.server.config import Limits

    huge = io.BytesIO()
    Image.new("L", (8000, 8000)).save(huge, format="PNG")  # small file, 64 MP once decoded
    with pytest.raises(PlinthError) as info:
        client.submit(LOAD_AND_PREVIEW, inputs={"photo.png": huge.getvalue()})
    assert info.value.code == "RESOURCE_EXHAUSTED" and "decompression bomb" in info.value.errors[0].message
    node_of(txt2img, "EmptyLatentImage").inputs.update(width=4096, height=4096)
    with pytest.raises(PlinthError) as info:
        client.submit(txt2img)
    assert info.value.code == "RESOURCE_EXHAUSTED" and info.value.errors[0].input == "width"
    node_of(txt2img, "EmptyLatentImage").inputs.update(width=64, height=64)
    limits = server.components.jobs.limits
    server.components.jobs.limits = Limits(max_queue=0, max_steps=1000)
    try:
        with pytest.raises(PlinthError) as info:
            client.submit(long_graph(txt2img, 1919, steps=1))
        assert info.value.code == "RESOURCE_EXHAUSTED" and "queue is full" in info.value.message
    finally:
        server.components.jobs.limits = limits


def test_async_client_runs_a_graph(server, txt2img):
    node_of(txt2img, "KSampler").inputs["seed"] = 1414

    async def go():
        async with AsyncClient(server.address) as aclient:
            result = await aclient.run(txt2img)
            nodes = await aclient.list_nodes()
            return result, nodes

    result, nodes = asyncio.run(go())
    assert result.status == "completed" and len(result.images) == 2
    assert "KSampler" in {n.class_type for n in nodes}


def test_concurrent_clients_all_complete(server, txt2img):
    from plinth.clients import Client

    results, errors = [], []

    def worker(seed):
        graph = long_graph(dict((k, dict(v, inputs=dict(v["inputs"]))) for k, v in txt2img.items()), seed, steps=2)
        try:
            with Client(server.address, timeout=120) as c:
                results.append(c.run(graph).status)
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(2000 + i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and results == ["completed"] * 6


def test_health_says_serving(client, server):
    assert client.health() == "SERVING"
    assert client.health("plinth.v1.GraphService") == "SERVING"


def test_preview_images_are_streamed_but_not_kept_as_outputs(server, client, txt2img):
    node_of(txt2img, "KSampler").inputs["seed"] = 1515
    decode, save = node_of(txt2img, "VAEDecode"), node_of(txt2img, "SaveImage")
    txt2img[save.id] = {"class_type": "PreviewImage", "inputs": {"images": decode.out(0)}}
    result = client.run(txt2img)
    assert [r.kind for r in result.image_refs] == ["preview", "preview"]
    assert len(result.images) == 2
    assert not client.get_job(result.job_id).outputs
    assert all(server.components.assets.read_image(r.id) is None for r in result.image_refs)


def test_reflection_lists_the_services(server):
    import grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"plinth.v1.GraphService", "plinth.v1.NodeService", "grpc.health.v1.Health"} <= services


def test_queued_is_always_the_first_event(server, txt2img):
    jobs = [server.components.jobs.submit(long_graph(txt2img, 3000 + i, steps=1)) for i in range(8)]
    server.components.jobs.cancel(jobs[3].id)
    for job in jobs:
        events = list(job.watch())
        assert type(events[0].payload).__name__ == "Queued"
        assert [e.seq for e in events] == list(range(len(events)))


def test_outputs_without_bytes_are_fetched_by_id(client, txt2img):
    from plinth.clients import PlinthError

    node_of(txt2img, "KSampler").inputs["seed"] = 1616
    full = client.run(txt2img)
    slim = client.run(txt2img, omit_image_bytes=True)
    assert slim.images == [] and [r.png for r in slim.image_refs] == [b"", b""]
    assert [client.get_image(r.id) for r in slim.image_refs] == [r.png for r in full.image_refs]
    with pytest.raises(PlinthError) as info:
        client.get_image("0" * 64)
    assert info.value.code == "NOT_FOUND"


def test_abandoned_run_cancels_its_job(server, txt2img):
    import json

    import grpc

    from plinth.clients.v1 import graph_service_pb2 as gs
    from plinth.clients.v1 import graph_service_pb2_grpc as gs_grpc

    channel = grpc.insecure_channel(server.address)
    stream = gs_grpc.GraphServiceStub(channel).Run(gs.SubmitRequest(graph_json=json.dumps(long_graph(txt2img, 1717))))
    job_id = next(e.job_id for e in stream if e.WhichOneof("kind") == "progress")
    stream.cancel()
    job = server.components.jobs.get(job_id)
    assert type(list(job.watch())[-1].payload).__name__ == "Cancelled"
    channel.close()


def test_many_errors_still_come_back_as_invalid_argument(client, txt2img):
    for i in range(300):
        txt2img[str(100 + i)] = {"class_type": "KSampler", "inputs": {"steps": -1, "sampler_name": "nope"}}
    with pytest.raises(PlinthError) as info:
        client.submit(txt2img)
    assert info.value.code == "INVALID_ARGUMENT"
    assert 10 < len(info.value.errors) < 1800
    assert info.value.errors[-1].code == "too_many_errors"


@pytest.mark.parametrize("node_id", ["\u00b2", "x" * 5000, "1" * 5000])
def test_odd_node_ids_are_handled(client, txt2img, node_id):
    txt2img[node_id] = txt2img.pop(node_of(txt2img, "SaveImage").id)
    node_of(txt2img, "KSampler").inputs["seed"] = 1818
    assert client.run(txt2img).status == "completed"


def test_a_job_past_its_deadline_is_cancelled_queued_or_running(server, client, txt2img):
    import time

    running = server.components.jobs.submit(long_graph(copy_graph(txt2img), 2121), deadline_seconds=0.5)
    queued_id = client.submit(long_graph(copy_graph(txt2img), 2122, steps=2), deadline_seconds=0.2)
    queued = server.components.jobs.get(queued_id)
    for job in (running, queued):
        events = list(job.watch())
        assert type(events[-1].payload).__name__ == "Cancelled"
        assert "deadline exceeded" in events[-1].payload.reason
    assert time.time() - running.created_at < 30
    assert not any(type(e.payload).__name__ == "Started" for e in queued.events)
    assert queued.finished_at < running.finished_at  # ended while still queued, not when reached


def test_run_takes_the_calls_own_grpc_deadline(server, txt2img):
    from plinth.clients import Client

    with Client(server.address, timeout=1.0) as short:
        with pytest.raises(PlinthError) as info:
            short.run(long_graph(txt2img, 2323))
    assert info.value.code == "DEADLINE_EXCEEDED"
    job = server.components.jobs.list(limit=1)[0][0]
    events = list(server.components.jobs.get(job.id).watch())
    assert type(events[-1].payload).__name__ == "Cancelled"


def copy_graph(graph):
    import copy

    return copy.deepcopy(graph)


def test_an_output_too_big_for_one_message_comes_without_its_bytes(models_dir, tmp_path, txt2img):
    from plinth.clients import Client
    from plinth.server.app import PlinthServer
    from plinth.server.config import Config, Limits

    config = Config(
        models_dir=models_dir, data_dir=tmp_path, device="cpu", port=0, limits=Limits(max_message_bytes=150_000)
    )
    node_of(txt2img, "EmptyLatentImage").inputs.update(width=256, height=256, batch_size=2)
    with PlinthServer(config) as small, Client(small.address, timeout=120) as client:
        result = client.run(txt2img)  # each ~150 KB PNG alone would not fit
        assert result.status == "completed" and [r.png for r in result.image_refs] == [b"", b""]
        assert all(len(client.download(r.id)) > 100_000 for r in result.image_refs)


def test_run_without_a_listener_streams_only_the_results_and_still_says_how_each_node_ran(client, txt2img):
    sampler, save = node_of(txt2img, "KSampler"), node_of(txt2img, "SaveImage")
    sampler.inputs["seed"] = 6060
    full = client.run(txt2img, results_only=False)
    sampler.inputs["seed"] = 6061
    lean = client.run(txt2img)  # no on_event: results_only
    assert kinds(lean.events) == ["output", "completed"]  # both images in one Output event
    assert [r.node_id for r in lean.events[0].output.images] == [save.id, save.id]
    assert {k: (v.class_type, v.status) for k, v in lean.nodes.items()} == {
        k: (v.class_type, v.status) for k, v in full.nodes.items()
    }
    assert lean.nodes[sampler.id].status == "executed" and lean.nodes[sampler.id].seconds > 0
    assert len(lean.images) == 2
    # a listener gets every event, and the terminal one carries the same summary
    seen = []
    client.run(txt2img, on_event=seen.append)
    assert kinds(seen)[:2] == ["queued", "started"] and set(seen[-1].nodes) == set(full.nodes)
    assert all(v.status == "cached" for v in seen[-1].nodes.values())


def test_packed_outputs_split_where_the_bytes_would_not_fit_a_message():
    from plinth.nodes.core.context import ImageRef
    from plinth.server.api.convert import packed_outputs
    from plinth.server.engine import events as ev

    def out(seq, node, *sizes):
        images = [ImageRef(f"{node}-{seq}-{i}", "x.png", 1, 1, b"p" * n) for i, n in enumerate(sizes)]
        return ev.Event("job", seq, float(seq), ev.Output(node, images))

    events = [out(3, "9", 40), out(4, "9", 50), out(5, "9", 30), out(6, "12", 10), out(7, "9", 200)]
    packed = list(packed_outputs(events, True, None, max_inline=100))
    assert [(m.seq, m.output.node_id, [len(r.png) for r in m.output.images]) for m in packed] == [
        (3, "9", [40, 50]),
        (5, "9", [30]),
        (6, "12", [10]),
        (7, "9", [0]),
    ]  # too big: fetched by id
