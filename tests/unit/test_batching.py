"""Cross-request batching (server/engine/batching.py): jobs side by side share UNet forwards,
and each job's images are those it gets alone.

Tolerance: a batched forward runs the same kernels over more rows; oneDNN and MKL may block a
GEMM or a convolution differently for another batch size, which changes float rounding (not
the maths). The images are compared as saved 8-bit PNGs and may differ by at most 1 level in a
pixel (a float difference of ~1e-6 can round across a level). On this machine six different
jobs batched together differ from their lone runs by 1 level in 6 of 73,728 values.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from support import files
from support.graph_builder import GraphBuilder, linked, node_of
from support.lora_files import kohya, random_lora

from plinth.server.components import build_components
from plinth.server.config import Config
from plinth.server.engine.batching import Lockstep
from plinth.server.jobs.job import JobStatus
from plinth.server.metrics import Metrics

TOLERANCE = 1  # 8-bit levels; see the module docstring


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    from plinth.nodes.models.tiny_sd import ensure_tiny_sd

    path = tmp_path_factory.mktemp("batch-models")
    ensure_tiny_sd(path)
    files.write(kohya(random_lora(seed=5, rank=4, alpha=4.0, gain=2.0)), path / "loras", "style.safetensors")
    return path


def variant(base: dict, seed: int, **changes) -> dict:
    b = GraphBuilder(base)
    sampler = b.find("KSampler")
    sampler.inputs["seed"] = seed
    for key, value in changes.items():
        if key == "prompt":
            linked(sampler.graph, sampler, "positive").inputs["text"] = value
        elif key == "lora":
            model = b.find("CheckpointLoaderSimple").out(0)
            lora = b.add("LoraLoaderModelOnly", model=model, lora_name="style.safetensors", strength_model=value)
            sampler.inputs["model"] = lora.out(0)
        else:
            sampler.inputs[key] = value
    return b.build()


def run_jobs(models: Path, data: Path, graphs: list[dict], batch_jobs: int):
    """Submit every graph before the worker starts, so they all run side by side; return the
    jobs' decoded images (in submission order) and the components' batching stats."""
    components = build_components(Config(models_dir=models, data_dir=data, device="cpu", batch_jobs=batch_jobs))
    try:
        jobs = [components.jobs.submit(graph) for graph in graphs]
        components.jobs.start()
        for job in jobs:
            for _ in job.watch():
                pass
        assert [j.status for j in jobs] == [JobStatus.COMPLETED] * len(jobs), [j.error for j in jobs]
        images = [[np.asarray(Image.open(io.BytesIO(ref.png))).astype(int) for ref in job.outputs] for job in jobs]
        if components.lockstep is None:
            return images, None
        exported = {
            s.name: s.value
            for family in text_string_to_metric_families(Metrics(components, subscribe=False).render().decode())
            for s in family.samples
        }
        stats = components.lockstep.stats
        assert exported["plinth_batched_forwards_total"] == stats.forwards
        assert exported["plinth_batched_calls_total"] == stats.calls
        return images, stats
    finally:
        components.jobs.stop()
        components.jobs.close()


def largest_difference(a: list[list[np.ndarray]], b: list[list[np.ndarray]]) -> int:
    assert [len(x) for x in a] == [len(x) for x in b]
    return max(int(np.abs(x - y).max()) for xs, ys in zip(a, b, strict=False) for x, y in zip(xs, ys, strict=False))


def test_jobs_side_by_side_share_forwards_and_keep_their_own_images(models, tmp_path, txt2img):
    node_of(txt2img, "EmptyLatentImage").inputs["batch_size"] = 1
    graphs = [
        variant(txt2img, 1),
        variant(txt2img, 2, cfg=3.5),
        variant(txt2img, 3, prompt="a red handbag on a wooden table"),
        variant(txt2img, 4, sampler_name="dpmpp_2m", scheduler="karras"),
        variant(txt2img, 5, denoise=0.6),
        variant(txt2img, 6, sampler_name="euler_ancestral", steps=3),
    ]
    alone, _ = run_jobs(models, tmp_path / "alone", graphs, batch_jobs=1)
    together, stats = run_jobs(models, tmp_path / "together", graphs, batch_jobs=8)
    # every sampler call of all six jobs was served, and most of them shared a forward
    steps = 2 * 5 + 3
    assert stats.calls == steps and stats.forwards < steps and stats.largest >= 5, stats
    assert largest_difference(alone, together) <= TOLERANCE
    # and the jobs differ from each other: nothing was mixed up between rows
    firsts = [imgs[0] for imgs in together]
    assert all(not np.array_equal(firsts[i], firsts[j]) for i in range(6) for j in range(i + 1, 6))


def test_a_patched_job_side_by_side_runs_alone_and_patches_no_one_else(models, tmp_path, txt2img):
    graphs = [variant(txt2img, 7), variant(txt2img, 8, lora=1.0), variant(txt2img, 9)]
    alone, _ = run_jobs(models, tmp_path / "alone", graphs, batch_jobs=1)
    together, stats = run_jobs(models, tmp_path / "together", graphs, batch_jobs=4)
    # the LoRA job's own calls never come to the batcher; the two plain jobs share theirs
    assert stats.calls == 2 * 2 and stats.largest == 2, stats
    assert largest_difference(alone, together) <= TOLERANCE
    assert all(np.array_equal(x, y) for x, y in zip(alone[1], together[1], strict=False))  # unbatched: bit-exact


def test_one_job_cancelled_mid_batch_leaves_the_others_to_finish(models, tmp_path, txt2img):
    components = build_components(Config(models_dir=models, data_dir=tmp_path, device="cpu", batch_jobs=4))
    try:
        long = variant(txt2img, 10, steps=40)
        jobs = [components.jobs.submit(long), components.jobs.submit(variant(txt2img, 11, steps=40))]

        def cancel_after_a_step(job, event):
            if job is jobs[0] and event.payload.__class__.__name__ == "Progress" and event.payload.step == 3:
                threading.Thread(target=components.jobs.cancel, args=(job.id,)).start()

        components.jobs.observers.append(cancel_after_a_step)
        components.jobs.start()
        for job in jobs:
            for _ in job.watch():
                pass
        assert [j.status for j in jobs] == [JobStatus.CANCELLED, JobStatus.COMPLETED]
        assert components.lockstep.stats.largest == 2
    finally:
        components.jobs.stop()
        components.jobs.close()


def test_a_failed_batched_forward_fails_each_of_its_jobs_and_the_server_goes_on():
    class Broken(torch.nn.Module):
        def forward(self, sample, timestep, encoder_hidden_states):
            raise RuntimeError("out of memory (simulated)")

    lockstep, errors = Lockstep(), []

    def member():
        with lockstep.member():
            try:
                lockstep.forward(Broken(), torch.zeros(1, 4, 2, 2), torch.tensor(1.0), torch.zeros(1, 3, 8))
            except RuntimeError as exc:
                errors.append(str(exc))

    threads = [threading.Thread(target=member) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == ["out of memory (simulated)"] * 3


def test_forward_outside_a_member_thread_is_refused():
    with pytest.raises(RuntimeError, match="not a running member"):
        Lockstep().forward(torch.nn.Identity(), torch.zeros(1), torch.tensor(1.0), torch.zeros(1))
