"""KSampler: every offered sampler and scheduler really maps to a diffusers scheduler and runs;
denoise below 1 keeps part of a given latent."""

from __future__ import annotations

import numpy as np
import pytest
from support.graph_builder import GraphBuilder, node_of

from plinth.nodes.diffusers_schedulers import NO_SIGMA_SCHEDULES, SAMPLERS, SCHEDULERS, SIGMA_SCHEDULES, make_scheduler
from plinth.nodes.models.checkpoint import SD15_CONFIG

BASE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
}
COMBOS = [(s, k) for s in SAMPLERS for k in SCHEDULERS if not (k in SIGMA_SCHEDULES and s in NO_SIGMA_SCHEDULES)]


def run(jobs, graph):
    job = jobs.submit(graph)
    list(job.watch())
    assert job.status.value == "completed", job.error
    return job


def images(job):
    import io

    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(i.png)), dtype=np.float32) / 255 for i in job.outputs]


@pytest.mark.parametrize("sampler,scheduler", COMBOS)
def test_every_pair_runs_on_its_diffusers_scheduler(server, txt2img, sampler, scheduler):
    made = make_scheduler(sampler, scheduler, BASE)
    assert type(made).__name__ == SAMPLERS[sampler][0]
    for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        assert bool(made.config.get(flag)) == (SCHEDULERS[scheduler].get(flag, False)), flag
    node_of(txt2img, "KSampler").inputs.update(sampler_name=sampler, scheduler=scheduler, steps=3, seed=31)
    node_of(txt2img, "EmptyLatentImage").inputs["batch_size"] = 1
    job = run(server.components.jobs, txt2img)
    assert np.isfinite(images(job)[0]).all()


def test_samplers_differ(server, txt2img):
    node_of(txt2img, "EmptyLatentImage").inputs["batch_size"] = 1
    outs = {}
    for sampler in ("euler", "euler_ancestral", "dpmpp_2m", "uni_pc"):
        node_of(txt2img, "KSampler").inputs.update(sampler_name=sampler, scheduler="normal", steps=4, seed=5)
        outs[sampler] = images(run(server.components.jobs, txt2img))[0]
    values = list(outs.values())
    assert all(not np.array_equal(a, b) for i, a in enumerate(values) for b in values[i + 1 :])


def test_sigma_schedule_with_a_timestep_sampler_is_a_validation_error(client, txt2img):
    from plinth.clients import PlinthError

    sampler = node_of(txt2img, "KSampler")
    sampler.inputs.update(sampler_name="ddpm", scheduler="karras")
    with pytest.raises(PlinthError) as info:
        client.submit(txt2img)
    assert [(e.node_id, e.input, e.code) for e in info.value.errors] == [
        (sampler.id, "scheduler", "invalid_combination")
    ]


def hires_graph(txt2img, denoise, seed=77):
    """KSampler -> KSampler(denoise) -> decode, and the first pass decoded alongside."""
    b = GraphBuilder(txt2img)
    b.find("EmptyLatentImage").inputs["batch_size"] = 1
    first = b.find("KSampler")
    first.inputs.update(seed=seed, steps=4)
    second = b.add("KSampler", **{**first.inputs, "seed": seed + 1, "denoise": denoise, "latent_image": first.out(0)})
    decode = b.add("VAEDecode", samples=second.out(0), vae=b.find("CheckpointLoaderSimple").out(2))
    b.add("SaveImage", images=decode.out(0), filename_prefix="second")
    return b.build()


def test_denoise_below_one_keeps_part_of_the_given_latent(server, txt2img):
    import copy

    distance = {}
    for denoise in (0.0, 0.2, 0.95):
        job = run(server.components.jobs, hires_graph(copy.deepcopy(txt2img), denoise))
        first, second = images(job)
        distance[denoise] = float(np.abs(first - second).mean())
    assert distance[0.0] == 0.0  # denoise 0 returns the latent unchanged
    assert 0 < distance[0.2] < distance[0.95]


def test_shipped_scheduler_config_is_sd15s():
    import json

    config = json.loads((SD15_CONFIG / "scheduler" / "scheduler_config.json").read_text())
    assert {k: config[k] for k in BASE} == BASE
