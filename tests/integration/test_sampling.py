"""Sampling on the tiny model through the server: every sampler and every scheduler runs, the
custom-sampling nodes give KSampler's pixels for KSampler's settings, denoise below 1 keeps part of
a given latent, and a schedule too long to run is a validation error."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
from support.graph_builder import GraphBuilder, node_of

from plinth.nodes.models.checkpoint import SD15_CONFIG
from plinth.nodes.sampling.samplers import SAMPLERS
from plinth.nodes.sampling.schedulers import SCHEDULERS

BASE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
}


def run(jobs, graph):
    job = jobs.submit(graph)
    list(job.watch())
    assert job.status.value == "completed", job.error
    return job


def images(job):
    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(i.png)), dtype=np.float32) / 255 for i in job.outputs]


def small(txt2img, **ksampler):
    graph = copy.deepcopy(txt2img)
    node_of(graph, "EmptyLatentImage").inputs["batch_size"] = 1
    node_of(graph, "KSampler").inputs.update(ksampler)
    return graph


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs(server, txt2img, sampler):
    out = images(
        run(server.components.jobs, small(txt2img, sampler_name=sampler, scheduler="karras", steps=3, seed=31))
    )
    assert len(out) == 1 and np.isfinite(out[0]).all()


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_scheduler_runs(server, txt2img, scheduler):
    out = images(
        run(server.components.jobs, small(txt2img, sampler_name="euler", scheduler=scheduler, steps=3, seed=32))
    )
    assert len(out) == 1 and np.isfinite(out[0]).all()


def test_samplers_differ(server, txt2img):
    outs = {}
    for sampler in ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_sde", "uni_pc"):
        outs[sampler] = images(run(server.components.jobs, small(txt2img, sampler_name=sampler, steps=4, seed=5)))[0]
    values = list(outs.values())
    assert all(np.abs(a - b).mean() > 1e-4 for i, a in enumerate(values) for b in values[i + 1 :])


def custom_twin(graph, guider: str):
    """The graph with its KSampler replaced by SamplerCustomAdvanced + the guider +
    KSamplerSelect + BasicScheduler + RandomNoise of the same settings."""
    b = GraphBuilder(graph)
    k = b.find("KSampler")
    i = dict(k.inputs)
    if guider == "BasicGuider":
        g = b.add("BasicGuider", model=i["model"], conditioning=i["positive"])
    else:
        g = b.add("CFGGuider", model=i["model"], positive=i["positive"], negative=i["negative"], cfg=i["cfg"])
    select = b.add("KSamplerSelect", sampler_name=i["sampler_name"])
    sigmas = b.add("BasicScheduler", model=i["model"], scheduler=i["scheduler"], steps=i["steps"], denoise=i["denoise"])
    noise = b.add("RandomNoise", noise_seed=i["seed"])
    b.replace(
        k,
        "SamplerCustomAdvanced",
        noise=noise.out(0),
        guider=g.out(0),
        sampler=select.out(0),
        sigmas=sigmas.out(0),
        latent_image=i["latent_image"],
    )
    return b.build()


@pytest.mark.parametrize(
    "guider,cfg,sampler,scheduler",
    [
        ("CFGGuider", 6.5, "dpmpp_2m_sde", "karras"),
        ("CFGGuider", 7.0, "euler_ancestral", "normal"),
        ("BasicGuider", 1.0, "euler", "simple"),
    ],
)
def test_sampler_custom_advanced_gives_ksamplers_pixels(server, txt2img, guider, cfg, sampler, scheduler):
    settings = dict(sampler_name=sampler, scheduler=scheduler, steps=4, seed=44, cfg=cfg, denoise=1.0)
    plain = images(run(server.components.jobs, small(txt2img, **settings)))[0]
    custom = images(run(server.components.jobs, custom_twin(small(txt2img, **settings), guider)))[0]
    assert np.array_equal(plain, custom)


def test_a_schedule_too_long_to_run_is_a_validation_error(client, txt2img):
    from plinth.clients import PlinthError

    graph = small(txt2img, steps=9000, denoise=0.5)
    sampler = node_of(graph, "KSampler")
    with pytest.raises(PlinthError) as info:
        client.submit(graph)
    assert [(e.node_id, e.input, e.code) for e in info.value.errors] == [(sampler.id, "denoise", "value_not_in_range")]


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
