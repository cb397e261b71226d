"""The pieces FLUX.1 and SD3 share with the rest of the server, before their transformers run:
the 16-channel FLUX VAE (Black Forest Labs' ae.safetensors layout) through VAELoader,
EmptySD3LatentImage's 16-channel latents, and ModelSamplingSD3 / ModelSamplingFlux putting a
MODEL on a flow schedule, checked against ComfyUI's formulas.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import safetensors.torch
import torch
from support.flux_files import bfl_vae_state, small_flux_vae
from support.graph_builder import GraphBuilder
from support.live_server import node_output

from plinth.nodes.models.single_file import load_vae_file

FLUX_VAE = "ae.safetensors"


@pytest.fixture(scope="module")
def flux_vae(models_dir):
    vae = small_flux_vae()
    state = bfl_vae_state(vae)
    assert not any("quant_conv" in k for k in state)  # as in BFL's file
    (models_dir / "vae").mkdir(exist_ok=True)
    safetensors.torch.save_file(state, str(models_dir / "vae" / FLUX_VAE))
    return vae


def test_the_flux_vae_file_loads_as_the_model_it_was_written_from(models_dir, flux_vae):
    loaded = load_vae_file(models_dir / "vae" / FLUX_VAE)
    assert loaded.config.latent_channels == 16
    assert not loaded.config.use_quant_conv and not loaded.config.use_post_quant_conv
    mine, theirs = loaded.state_dict(), flux_vae.state_dict()
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], v) for k, v in theirs.items())


def test_empty_sd3_latent_image_decodes_through_the_flux_vae(server, client, flux_vae):
    graph = GraphBuilder()
    latent = graph.add("EmptySD3LatentImage", width=48, height=32, batch_size=2)
    vae = graph.add("VAELoader", vae_name=FLUX_VAE)
    decode = graph.add("VAEDecode", samples=latent.out(), vae=vae.out())
    graph.add("SaveImage", images=decode.out(), filename_prefix="flux_vae")
    result = client.run(graph.build())
    samples = node_output(server, result, latent.id)[0].samples
    assert samples.shape == (2, 16, 4, 6) and not samples.any()
    with torch.inference_mode():
        want = (flux_vae.decode(torch.zeros(1, 16, 4, 6)).sample[0].permute(1, 2, 0) + 1) / 2
    want = np.clip(np.round(want.clamp(0, 1).numpy() * 255), 0, 255)
    assert [im.size for im in result.images] == [(48, 32), (48, 32)]
    assert np.abs(np.asarray(result.images[0], dtype=np.float64) - want).max() <= 1


def test_the_flux_vae_round_trips_an_image(server, client, flux_vae):
    """VAEEncode then VAEDecode with the 16-channel VAE: latents of 16 channels at 1/8 size."""
    graph = GraphBuilder()
    latent = graph.add("EmptySD3LatentImage", width=32, height=32, batch_size=1)
    vae = graph.add("VAELoader", vae_name=FLUX_VAE)
    image = graph.add("VAEDecode", samples=latent.out(), vae=vae.out())
    encode = graph.add("VAEEncode", pixels=image.out(), vae=vae.out())
    again = graph.add("VAEDecode", samples=encode.out(), vae=vae.out())
    graph.add("SaveImage", images=again.out(), filename_prefix="flux_vae_round")
    result = client.run(graph.build())
    assert node_output(server, result, encode.id)[0].samples.shape == (1, 16, 4, 4)
    assert result.images[0].size == (32, 32)


def flux_time_shift(mu: float, t: float) -> float:
    """ComfyUI's flux_time_shift(mu, 1.0, t)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def sigmas_of(client, server, sampling_node: tuple[str, dict], scheduler: str, steps: int) -> list[float]:
    graph = GraphBuilder()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name="tiny-sd")
    kind, inputs = sampling_node
    patched = graph.add(kind, model=checkpoint.out(0), **inputs)
    sigmas = graph.add("BasicScheduler", model=patched.out(), scheduler=scheduler, steps=steps, denoise=1.0)
    # a graph needs an output node: sample 1 step with them so the sigmas node runs
    pos = graph.add("CLIPTextEncode", text="x", clip=checkpoint.out(1))
    latent = graph.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    select = graph.add("KSamplerSelect", sampler_name="euler")
    sample = graph.add(
        "SamplerCustom",
        model=patched.out(),
        add_noise=True,
        noise_seed=1,
        cfg=1.0,
        positive=pos.out(),
        negative=pos.out(),
        sampler=select.out(),
        sigmas=sigmas.out(),
        latent_image=latent.out(),
    )
    decode = graph.add("VAEDecode", samples=sample.out(0), vae=checkpoint.out(2))
    graph.add("PreviewImage", images=decode.out())
    result = client.run(graph.build())
    return node_output(server, result, sigmas.id)[0].tolist()


def test_model_sampling_sd3_is_discrete_flow_with_its_shift(server, client):
    """ModelSamplingSD3: sigma(t) = shift t / (1 + (shift - 1) t) over 1000 steps, times x1000;
    the simple schedule walks that table from its top, ending at 0."""
    shift = 3.0
    got = sigmas_of(client, server, ("ModelSamplingSD3", {"shift": shift}), "simple", 4)
    table = [shift * (i / 1000) / (1 + (shift - 1) * (i / 1000)) for i in range(1, 1001)]
    want = [table[-(1 + int(x * 1000 / 4))] for x in range(4)] + [0.0]
    assert got == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("width, height", [(1024, 1024), (512, 768)])
def test_model_sampling_flux_shifts_by_resolution(server, client, width, height):
    """ModelSamplingFlux: mu interpolates linearly in the latent's 2x2 patch count between
    base_shift at 256 and max_shift at 4096 patches; sigma(t) = e^mu / (e^mu + 1/t - 1)."""
    max_shift, base_shift = 1.15, 0.5
    inputs = dict(max_shift=max_shift, base_shift=base_shift, width=width, height=height)
    got = sigmas_of(client, server, ("ModelSamplingFlux", inputs), "simple", 4)
    slope = (max_shift - base_shift) / (4096 - 256)
    mu = width * height / (8 * 8 * 2 * 2) * slope + (base_shift - slope * 256)
    table = [flux_time_shift(mu, i / 10000) for i in range(1, 10001)]
    want = [table[-(1 + int(x * 10000 / 4))] for x in range(4)] + [0.0]
    assert got == pytest.approx(want, abs=1e-6)
    assert got[0] == pytest.approx(1.0, abs=1e-9)  # pure noise at t = 1, whatever the shift
