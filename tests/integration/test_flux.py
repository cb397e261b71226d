"""FLUX.1 through the server: ComfyUI's split files (UNETLoader + DualCLIPLoader + VAELoader) give
the pixels diffusers' FluxPipeline gives on the same weights, and the all-in-one checkpoint (as
Comfy-Org's flux1-dev-fp8) loads through CheckpointLoaderSimple and gives the same image.

The reference is the pipeline's own recipe: resolution-dependent shift mu (ModelSamplingFlux
at the image size), its sigmas linspace(1, 1/N, N) shifted (ComfyUI's "simple" schedule on
FLUX's 10000-step table lands on the same), Euler on the velocity, guidance embedded, no CFG.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import safetensors.torch
import torch
from support.flux_files import bfl_vae_state, build_random_flux, small_flux_config, small_flux_vae, to_bfl_state_dict
from support.graph_builder import GraphBuilder
from support.live_server import executed
from support.t5_files import to_comfy_state_dict
from support.text_encoder_files import (
    CLIP_L_NAME,
    T5_FP16_NAME,
    build_random_clip_l,
    clip_l_state_dict,
    small_flux_t5,
    write_flux_text_encoders,
)

from plinth.clients import JobFailed

FLUX_NAME, VAE_NAME, AIO_NAME = "flux1-dev-tiny.safetensors", "ae-tiny.safetensors", "flux1-dev-tiny-aio.safetensors"
PROMPT = "a glass perfume bottle on a marble counter"
SIZE, STEPS, SEED, GUIDANCE = 64, 4, 7, 3.5


@pytest.fixture(scope="module")
def flux_models(models_dir):
    """A small FLUX.1-dev (T5 32 wide, CLIP-L 64 wide), its text models and VAE, written as
    ComfyUI's split files and as one all-in-one checkpoint."""
    clip_l, t5 = build_random_clip_l(seed=31), small_flux_t5(seed=32)
    config = {**small_flux_config("dev"), "pooled_projection_dim": 64, "joint_attention_dim": 32}
    transformer, vae = build_random_flux(config, seed=33), small_flux_vae(seed=34)
    write_flux_text_encoders(models_dir / "text_encoders", clip_l, t5)
    for folder in ("diffusion_models", "vae", "checkpoints"):
        (models_dir / folder).mkdir(exist_ok=True)
    transformer_state = to_bfl_state_dict(transformer)
    safetensors.torch.save_file(transformer_state, str(models_dir / "diffusion_models" / FLUX_NAME))
    vae_state = bfl_vae_state(vae)
    safetensors.torch.save_file(vae_state, str(models_dir / "vae" / VAE_NAME))
    t5_state = {k: v.half() for k, v in to_comfy_state_dict(t5).items()}  # as t5xxl_fp16
    everything = {
        **{f"model.diffusion_model.{k}": v for k, v in transformer_state.items()},
        **{f"text_encoders.clip_l.transformer.{k}": v for k, v in clip_l_state_dict(clip_l).items()},
        **{f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5_state.items()},
        **{f"vae.{k}": v for k, v in vae_state.items()},
    }
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in everything.items()}, str(models_dir / "checkpoints" / AIO_NAME)
    )
    return {"clip_l": clip_l, "t5": t5, "transformer": transformer, "vae": vae}


def split_graph(seed: int = SEED) -> GraphBuilder:
    graph = GraphBuilder()
    unet = graph.add("UNETLoader", unet_name=FLUX_NAME, weight_dtype="default")
    clip = graph.add("DualCLIPLoader", clip_name1=CLIP_L_NAME, clip_name2=T5_FP16_NAME, type="flux")
    vae = graph.add("VAELoader", vae_name=VAE_NAME)
    return _sample(graph, unet.out(), clip.out(), vae.out(), seed)


def checkpoint_graph(seed: int = SEED) -> GraphBuilder:
    graph = GraphBuilder()
    ckpt = graph.add("CheckpointLoaderSimple", ckpt_name=AIO_NAME)
    return _sample(graph, ckpt.out(0), ckpt.out(1), ckpt.out(2), seed)


def _sample(graph: GraphBuilder, model, clip, vae, seed: int) -> GraphBuilder:
    positive = graph.add("CLIPTextEncode", text=PROMPT, clip=clip)
    guided = graph.add("FluxGuidance", conditioning=positive.out(), guidance=GUIDANCE)
    negative = graph.add("ConditioningZeroOut", conditioning=positive.out())
    shifted = graph.add("ModelSamplingFlux", model=model, max_shift=1.15, base_shift=0.5, width=SIZE, height=SIZE)
    latent = graph.add("EmptySD3LatentImage", width=SIZE, height=SIZE, batch_size=1)
    sampler = graph.add(
        "KSampler",
        model=shifted.out(),
        seed=seed,
        steps=STEPS,
        cfg=1.0,
        sampler_name="euler",
        scheduler="simple",
        positive=guided.out(),
        negative=negative.out(),
        latent_image=latent.out(),
        denoise=1.0,
    )
    decode = graph.add("VAEDecode", samples=sampler.out(), vae=vae)
    graph.add("SaveImage", images=decode.out(), filename_prefix="flux")
    return graph


@pytest.fixture(scope="module")
def reference(models_dir, flux_models) -> np.ndarray:
    """FluxPipeline's image (0..255 floats) for PROMPT on the same weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer

    from plinth.nodes.models.checkpoint import tokenizer_dir
    from plinth.nodes.models.text_encoders import t5_tokenizer

    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=flux_models["vae"],
        text_encoder=flux_models["clip_l"],
        tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir(models_dir)), local_files_only=True),
        text_encoder_2=copy.deepcopy(flux_models["t5"]).half().float(),  # the file holds it in float16
        tokenizer_2=t5_tokenizer(models_dir),
        transformer=flux_models["transformer"],
    )
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        image = pipe(
            PROMPT,
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(SEED),
            max_sequence_length=256,
            output_type="pt",
        ).images[0]
    return image.permute(1, 2, 0).clamp(0, 1).numpy() * 255


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.float64)


def test_split_files_give_the_flux_pipelines_image(client, flux_models, reference):
    image = pixels(client.run(split_graph().build()))
    assert image.shape == (SIZE, SIZE, 3)
    assert np.abs(image - reference).max() <= 2  # rounding to 8 bits, float order


def test_the_all_in_one_checkpoint_gives_the_same_image(client, flux_models, reference):
    image = pixels(client.run(checkpoint_graph().build()))
    assert np.abs(image - reference).max() <= 2


def test_a_seed_change_reruns_only_the_sampler_and_what_follows(client, flux_models):
    client.run(split_graph(seed=40).build())
    assert executed(client.run(split_graph(seed=41).build())) == {"KSampler", "VAEDecode", "SaveImage"}


def test_schnell_runs_without_guidance_on_a_plain_flow(client, models_dir, flux_models):
    """A transformer without a guidance embedder is schnell: flow shift 1, time = sigma."""
    config = {**small_flux_config("schnell"), "pooled_projection_dim": 64, "joint_attention_dim": 32}
    state = to_bfl_state_dict(build_random_flux(config, seed=35))
    safetensors.torch.save_file(state, str(models_dir / "diffusion_models" / "flux1-schnell-tiny.safetensors"))
    graph = split_graph()
    graph.find("UNETLoader").inputs["unet_name"] = "flux1-schnell-tiny.safetensors"
    result = client.run(graph.build())
    assert result.images[0].size == (SIZE, SIZE)


def test_sd1_conditioning_on_flux_is_refused_by_name(client, flux_models):
    graph = split_graph()
    sd1 = graph.add("CheckpointLoaderSimple", ckpt_name="tiny-sd")
    graph.find("CLIPTextEncode").inputs["clip"] = sd1.out(1)
    with pytest.raises(JobFailed, match="this FLUX model reads 32-wide T5 text"):
        client.run(graph.build())


def test_tiny_flux_runs_a_flux_graph_from_the_checkpoint_loader(client):
    """The embedded FLUX.1 model, a diffusers folder made on first use, through the nodes
    ComfyUI's FLUX templates use (CLIPTextEncodeFlux with its guidance, EmptySD3LatentImage)."""
    graph = GraphBuilder()
    ckpt = graph.add("CheckpointLoaderSimple", ckpt_name="tiny-flux")
    positive = graph.add(
        "CLIPTextEncodeFlux", clip=ckpt.out(1), clip_l="a red handbag", t5xxl="a red handbag on marble", guidance=3.5
    )
    negative = graph.add("ConditioningZeroOut", conditioning=positive.out())
    latent = graph.add("EmptySD3LatentImage", width=64, height=64, batch_size=1)
    sampler = graph.add(
        "KSampler",
        model=ckpt.out(0),
        seed=3,
        steps=2,
        cfg=1.0,
        sampler_name="euler",
        scheduler="simple",
        positive=positive.out(),
        negative=negative.out(),
        latent_image=latent.out(),
        denoise=1.0,
    )
    decode = graph.add("VAEDecode", samples=sampler.out(), vae=ckpt.out(2))
    graph.add("SaveImage", images=decode.out(), filename_prefix="tiny_flux")
    result = client.run(graph.build())
    assert result.images[0].size == (64, 64) and pixels(result).std() > 1
