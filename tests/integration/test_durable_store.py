"""The job store: finished jobs, their events and images survive a SIGKILL and restart, unfinished
ones come back failed with the reason; a graceful stop lets the running job finish within its
grace period, cancels it after, and records everything."""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.graph_builder import node_of

from plinth.clients import Client, PlinthError

STOPPED_RUNNING = "server stopped while the job was running"
STOPPED_QUEUED = "server stopped while the job was queued"


def kinds(events):
    return [e.WhichOneof("kind") for e in events]


def graph(txt2img, seed, steps=2):
    g = copy.deepcopy(txt2img)
    node_of(g, "KSampler").inputs.update(seed=seed, steps=steps)
    node_of(g, "EmptyLatentImage").inputs["batch_size"] = 1
    return g


def wait_for_progress(client, job_id):
    """Return once the job's sampler has taken its first step."""
    next(e for e in client.watch(job_id) if e.WhichOneof("kind") == "progress")


def wait_until_stored(data_dir: Path, job_id: str, kind: str) -> None:
    """Wait for the server's writer thread to commit a `kind` event of the job (events other
    than a job's end are written behind the worker, a few milliseconds late)."""
    deadline = time.monotonic() + 30
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / 'jobs.sqlite3'}?mode=ro", uri=True)) as db:
        while not db.execute("SELECT 1 FROM events WHERE job_id = ? AND kind = ?", (job_id, kind)).fetchone():
            assert time.monotonic() < deadline, f"no {kind} event stored for job {job_id}"
            time.sleep(0.01)


class Served:
    """`plinth serve` in a child process on 127.0.0.1, port 0; stderr is drained so logging
    never blocks it."""

    def __init__(self, models_dir: Path, data_dir: Path) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", PLINTH_LIMITS_MAX_STEPS="1000")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "plinth.server.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--models",
                str(models_dir),
                "--data",
                str(data_dir),
                "--device",
                "cpu",
            ],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self.address = ""
        ready = threading.Event()

        def drain() -> None:
            for line in self.proc.stderr:
                self.lines.append(line)
                if line.startswith("plinth serving on "):
                    self.address = line.split()[-1]
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        ready.wait(120)
        assert self.address, "".join(self.lines)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)


@pytest.mark.slow
def test_finished_jobs_survive_sigkill_and_unfinished_ones_fail(models_dir, tmp_path, txt2img):
    data = tmp_path / "data"
    server = Served(models_dir, data)
    try:
        with Client(server.address, timeout=120) as client:
            done = client.run(graph(txt2img, 4242), results_only=False)
            running = client.submit(graph(txt2img, 4343, steps=400))
            queued = client.submit(graph(txt2img, 4444))
            wait_for_progress(client, running)
            wait_until_stored(data, running, "Progress")
            wait_until_stored(data, queued, "Queued")
            server.kill()
    finally:
        if server.proc.poll() is None:
            server.kill()

    server = Served(models_dir, data)
    try:
        assert any("marked failed" in line for line in server.lines)
        with Client(server.address, timeout=120) as client:
            job = client.get_job(done.job_id)
            assert job.status == 3  # JOB_STATUS_COMPLETED
            assert [(o.id, o.node_id) for o in job.outputs] == [(r.id, r.node_id) for r in done.image_refs]
            assert {k: v.class_type for k, v in job.nodes.items()} == {k: v.class_type for k, v in done.nodes.items()}
            # the same events, times and image bytes as the live stream, read back from the store
            assert list(client.watch(done.job_id)) == done.events
            assert [client.get_image(r.id) for r in done.image_refs] == [r.png for r in done.image_refs]

            killed = client.get_job(running)
            assert killed.status == 4 and killed.error == STOPPED_RUNNING  # JOB_STATUS_FAILED
            replay = list(client.watch(running))
            assert kinds(replay)[:2] == ["queued", "started"] and "progress" in kinds(replay)
            assert kinds(replay)[-1] == "failed" and replay[-1].failed.message == STOPPED_RUNNING
            assert [e.seq for e in replay] == list(range(len(replay)))

            never_ran = client.get_job(queued)
            assert never_ran.status == 4 and never_ran.error == STOPPED_QUEUED
            assert kinds(client.watch(queued)) == ["queued", "failed"]

            first = client.list_jobs(page_size=2)
            assert [j.job_id for j in first.jobs] == [queued, running] and first.next_page_token
            rest = client.list_jobs(page_size=2, page_token=first.next_page_token)
            assert [j.job_id for j in rest.jobs] == [done.job_id] and not rest.next_page_token
            assert not client.list_jobs(statuses=["queued", "running"]).jobs
            assert {j.job_id for j in client.list_jobs(statuses=["failed"]).jobs} == {running, queued}

            again = client.run(graph(txt2img, 4545))  # the restarted server keeps serving
            assert client.list_jobs(page_size=1).jobs[0].job_id == again.job_id
    finally:
        server.kill()


@pytest.fixture
def local_server(models_dir, tmp_path):
    """An in-process server on its own data directory, for tests that stop it."""
    from plinth.server.app import PlinthServer
    from plinth.server.config import Config, Limits

    config = Config(
        models_dir=models_dir, data_dir=tmp_path / "data", device="cpu", port=0, limits=Limits(max_steps=1000)
    )
    server = PlinthServer(config).start()
    yield server
    server.stop(grace=0)
    server.components.jobs.close()


def test_stop_lets_the_running_job_finish_and_cancels_the_queue(local_server, txt2img, monkeypatch):
    from plinth.server.jobs import manager as manager_module

    with Client(local_server.address, timeout=120) as client:
        first = client.run(graph(txt2img, 5151), results_only=False)
        monkeypatch.setattr(manager_module, "MAX_FINISHED_JOBS", 0)  # the next submit evicts `first`
        short = client.submit(graph(txt2img, 5252, steps=30))
        behind = client.submit(graph(txt2img, 5353))
        wait_for_progress(client, short)
        stopped_at = time.time()
        local_server.components.jobs.stop(grace=60)

        finished = client.get_job(short)
        assert finished.status == 3 and len(finished.outputs) == 1
        assert finished.finished_at > stopped_at  # it was still running when stop() began
        assert client.get_job(behind).error == STOPPED_QUEUED
        assert kinds(client.watch(behind)) == ["queued", "cancelled"]
        with pytest.raises(PlinthError) as info:
            client.submit(graph(txt2img, 5454))
        assert info.value.code == "UNAVAILABLE"

        # evicted from memory, still served whole from the store
        assert local_server.components.jobs.get(first.job_id).plan is None
        assert list(client.watch(first.job_id)) == first.events


def test_stop_cancels_the_running_job_after_the_grace_period(local_server, txt2img):
    from plinth.server.jobs.store import JobStore

    with Client(local_server.address, timeout=120) as client:
        job_id = client.submit(graph(txt2img, 6161, steps=400))
        wait_for_progress(client, job_id)
        start = time.monotonic()
        local_server.components.jobs.stop(grace=0.5)
        assert time.monotonic() - start >= 0.5
        job = client.get_job(job_id)
        assert job.status == 5 and job.error == STOPPED_RUNNING  # JOB_STATUS_CANCELLED
        events = list(client.watch(job_id))
        assert kinds(events)[-1] == "cancelled" and events[-1].cancelled.reason == STOPPED_RUNNING
        assert max(e.progress.step for e in events if e.WhichOneof("kind") == "progress") < 400

    local_server.stop(grace=0)
    local_server.components.jobs.close()
    store = JobStore(local_server.components.assets.data_dir / "jobs.sqlite3")
    try:
        assert store.recover() == []  # nothing was left queued or running
        stored = store.load(job_id)
        assert stored.status.value == "cancelled" and stored.error == STOPPED_RUNNING
        assert [(e.seq, type(e.payload).__name__) for e in stored.events][-1] == (len(events) - 1, "Cancelled")
    finally:
        store.close()
