"""Prometheus metrics (plinth.server.metrics) fed from a real server's jobs and scraped over HTTP,
and structured JSON logs carrying the job id (plinth.server.logs)."""

from __future__ import annotations

import io
import json
import logging
import threading
import urllib.error
import urllib.request
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.graph_builder import linked, node_of
from support.live_server import output_cache
from test_jobs import truncated_png

from plinth.server import logs
from plinth.server.engine import events as ev
from plinth.server.metrics import Metrics


def replay(metrics: Metrics, server, job_id: str):
    """Feed a finished job's events into `metrics`, as the job manager's observer hook does live."""
    job = server.components.jobs.get(job_id)
    for event in job.events:
        metrics.observe(job, event)
    return job


def scrape(port: int, path: str = "/metrics") -> dict[tuple[str, tuple], float]:
    """GET the endpoint on 127.0.0.1; samples by (name, sorted label pairs)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def metrics_http(server):
    """A Metrics on the session server (events replayed by the test, not subscribed) and its
    HTTP endpoint on a free port."""
    metrics = Metrics(server.components, subscribe=False)
    port, stop = metrics.start_http(0, "127.0.0.1")
    yield metrics, port
    stop()


def test_metrics_endpoint_after_runs_reruns_and_cache_hits(server, client, txt2img, metrics_http):
    metrics, port = metrics_http
    sampler = node_of(txt2img, "KSampler")
    linked(txt2img, sampler, "positive").inputs["text"] += ", metrics test"  # nothing from other tests in the cache
    node_of(txt2img, "EmptyLatentImage").inputs["batch_size"] = 1
    sampler.inputs["seed"] = 5151
    first = client.run(txt2img)
    sampler.inputs["seed"] = 5152
    reseeded = client.run(txt2img)
    cached = client.run(txt2img)
    jobs = [replay(metrics, server, r.job_id) for r in (first, reseeded, cached)]

    hits_before, misses_before = output_cache(server).hits, output_cache(server).misses
    samples = scrape(port)
    hits_after, misses_after = output_cache(server).hits, output_cache(server).misses

    assert sample(samples, "plinth_jobs_total", status="completed") == 3
    assert sample(samples, "plinth_jobs_total", status="failed") == 0
    assert sample(samples, "plinth_jobs_total", status="cancelled") == 0
    assert sample(samples, "plinth_jobs_queued_total") == 3
    assert sample(samples, "plinth_job_duration_seconds_count", status="completed") == 3
    assert sample(samples, "plinth_job_run_seconds_count", status="completed") == 3
    assert sample(samples, "plinth_job_queue_wait_seconds_count") == 3
    total = sum(j.finished_at - j.created_at for j in jobs)
    assert sample(samples, "plinth_job_duration_seconds_sum", status="completed") == pytest.approx(total, abs=0.05)
    assert sample(samples, "plinth_job_duration_seconds_bucket", status="completed", le="+Inf") == 3

    # what the seed change re-ran, and the fully cached rerun
    for class_type in ("KSampler", "VAEDecode", "SaveImage"):
        assert sample(samples, "plinth_node_executions_total", class_type=class_type, outcome="executed") == 2
        assert sample(samples, "plinth_node_executions_total", class_type=class_type, outcome="cached") == 1
    # every node of every job, as the jobs themselves recorded them
    recorded = Counter((n.class_type, n.status) for j in jobs for n in j.nodes.values())
    exported = Counter(
        {
            (dict(labels)["class_type"], dict(labels)["outcome"]): value
            for (name, labels), value in samples.items()
            if name == "plinth_node_executions_total"
        }
    )
    assert exported == recorded
    executed = Counter(c for (c, status), n in recorded.items() if status == "executed" for _ in range(n))
    for class_type, count in executed.items():
        assert sample(samples, "plinth_node_duration_seconds_count", class_type=class_type) == count
    ksampler_seconds = sum(n.seconds for j in jobs for n in j.nodes.values() if n.class_type == "KSampler")
    assert sample(samples, "plinth_node_duration_seconds_sum", class_type="KSampler") == pytest.approx(ksampler_seconds)

    # state read from the components at scrape time
    assert hits_before <= sample(samples, "plinth_cache_hits_total") <= hits_after
    assert misses_before <= sample(samples, "plinth_cache_misses_total") <= misses_after
    assert sample(samples, "plinth_cache_bytes") == output_cache(server).bytes_used > 0
    assert sample(samples, "plinth_cache_entries") == len(output_cache(server))
    assert sample(samples, "plinth_model_memory_bytes") == server.components.models.bytes_used > 0
    assert sample(samples, "plinth_model_loads_total") == server.components.models.loads >= 1
    assert sample(samples, "plinth_queue_depth") == 0
    assert sample(samples, "plinth_jobs_running") == 0
    assert sample(samples, "process_resident_memory_bytes") > 10 << 20


def test_failed_job_counts_as_failed(server, client, tmp_path, metrics_http):
    metrics, port = metrics_http
    bad = tmp_path / "bad.png"
    bad.write_bytes(truncated_png())  # Submit accepts its header; LoadImage fails on its pixels
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    result = client.run(graph, inputs={"photo.png": bad}, check=False)
    assert result.status == "failed"
    job = server.components.jobs.get(result.job_id)
    started = next(i for i, e in enumerate(job.events) if isinstance(e.payload, ev.Started)) + 1
    for event in job.events[:started]:
        metrics.observe(job, event)
    assert sample(scrape(port), "plinth_jobs_running") == 1  # between Started and the end
    for event in job.events[started:]:
        metrics.observe(job, event)

    samples = scrape(port)
    assert sample(samples, "plinth_jobs_running") == 0
    assert sample(samples, "plinth_jobs_total", status="failed") == 1
    assert sample(samples, "plinth_jobs_total", status="completed") == 0
    assert sample(samples, "plinth_job_duration_seconds_count", status="failed") == 1
    assert sample(samples, "plinth_node_executions_total", class_type="LoadImage", outcome="failed") == 1


def test_endpoint_serves_only_metrics_and_stops(server):
    a, b = Metrics(server.components, subscribe=False), Metrics(subscribe=False)  # own registries: no clash
    port, stop = a.start_http(0, "127.0.0.1")
    try:
        assert port > 0
        assert ("plinth_queue_depth", ()) in scrape(port)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
        assert info.value.code == 404
    finally:
        stop()
    stop()  # a second stop is harmless
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    assert b"plinth_jobs_total" in b.render() and b"plinth_queue_depth" not in b.render()


def test_observe_never_raises():
    metrics = Metrics(subscribe=False)
    metrics.observe(None, object())  # not an Event: logged, ignored
    assert b'plinth_jobs_total{status="completed"} 0.0' in metrics.render()


def test_live_hook_when_the_service_has_observers(server, client, txt2img):
    """Once the lead's hook is in (the job manager's observers, called from Job.emit), attaching is enough."""
    if not isinstance(getattr(server.components.jobs, "observers", None), list):
        pytest.skip("the job manager has no observers hook yet")
    metrics = Metrics(server.components)
    try:
        node_of(txt2img, "KSampler").inputs["seed"] = 5153
        node_of(txt2img, "EmptyLatentImage").inputs["batch_size"] = 1
        client.run(txt2img)
        assert b'plinth_jobs_total{status="completed"} 1.0' in metrics.render()
    finally:
        metrics.detach()
    assert metrics.observe not in server.components.jobs.observers


# logs


def record(message: str = "hello", exc_info=None) -> logging.LogRecord:
    rec = logging.getLogger("plinth.test").makeRecord("plinth.test", logging.INFO, __file__, 1, message, (), exc_info)
    logs.JobIdFilter().filter(rec)
    return rec


def test_json_log_lines_carry_the_job_id():
    formatter = logs.JsonFormatter()
    with logs.job_context("abc"):
        inside = json.loads(formatter.format(record("working on it")))
    outside = json.loads(formatter.format(record()))
    assert inside["job_id"] == "abc" and inside["message"] == "working on it"
    assert inside["level"] == "INFO" and inside["logger"] == "plinth.test" and inside["time"].endswith("Z")
    assert "job_id" not in outside
    assert logs.current_job_id() is None


def test_json_log_includes_exception_text():
    try:
        raise ValueError("boom at step 3")
    except ValueError:
        import sys

        line = logs.JsonFormatter().format(record("failed", exc_info=sys.exc_info()))
    assert "\n" not in line
    out = json.loads(line)
    assert "ValueError: boom at step 3" in out["exception"] and "Traceback" in out["exception"]


def test_configure_logs_job_ids_per_thread():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.level
    handler = logs.configure(json=True, level="INFO", stream=stream)
    try:
        assert logs.configure(json=True, level=logging.INFO, stream=stream) is not handler
        assert sum(getattr(h, "_plinth_logs", False) for h in root.handlers) == 1  # replaced, not added
        log = logging.getLogger("plinth.test.worker")

        def worker(job_id: str) -> None:
            with logs.job_context(job_id):
                log.info("running")
            log.info("idle")

        threads = [threading.Thread(target=worker, args=(f"job{i}",)) for i in range(3)]
        with logs.job_context("outer"):  # another thread's context does not leak into the workers
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            log.info("main", extra={"step": 2})
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        for h in [h for h in root.handlers if getattr(h, "_plinth_logs", False)]:
            root.removeHandler(h)
        root.setLevel(saved)
    running = sorted(line["job_id"] for line in lines if line["message"] == "running")
    assert running == ["job0", "job1", "job2"]
    assert all("job_id" not in line for line in lines if line["message"] == "idle")
    main = next(line for line in lines if line["message"] == "main")
    assert main["job_id"] == "outer" and main["step"] == 2


def test_text_format_tags_the_job():
    formatter = logs.TextFormatter()
    with logs.job_context("abc"):
        assert "[job abc] hello" in formatter.format(record())
    assert "[job" not in formatter.format(record())
