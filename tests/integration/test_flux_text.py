"""FLUX.1's text side through the server: DualCLIPLoader type flux on ComfyUI's text-encoder files (clip_l and
t5xxl, in either order, from models/text_encoders or the older models/clip), CLIPTextEncodeFlux, CLIPTextEncode
and FluxGuidance, feeding a small FLUX.1-dev transformer that makes an image. The conditioning the job made must be
diffusers' FluxPipeline.encode_prompt of the same prompt on the same weights, and types Plinth does not build are
refused at validation, naming the type.

Runs once the nodes (plinth.nodes.flux) are registered and the text_encoders model folder exists; skipped before.
"""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch
from support.flux_files import bfl_vae_state, build_random_flux, small_flux_config, small_flux_vae, write_flux_file
from support.graph_builder import GraphBuilder
from support.live_server import node_output
from support.text_encoder_files import (
    CLIP_L_NAME,
    T5_FP16_NAME,
    T5_SCALED_NAME,
    build_random_clip_l,
    small_flux_t5,
    write_clip_l_file,
    write_flux_text_encoders,
)

from plinth.clients import PlinthError
from plinth.nodes.core.registry import NODES

pytestmark = pytest.mark.skipif(
    "DualCLIPLoader" not in NODES, reason="FLUX.1's text nodes (plinth.nodes.flux) are not registered yet"
)

FLUX_NAME = "flux1-text-test.safetensors"
VAE_NAME = "flux-text-test-ae.safetensors"
LEGACY_CLIP_L = "clip_l_legacy_folder.safetensors"
PROMPT = "a red sneaker on a plinth"
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def text_models(models_dir):
    """CLIP-L (64 wide) and T5 (32 wide) written as ComfyUI's files; a second CLIP-L in the legacy models/clip."""
    clip_l, t5 = build_random_clip_l(seed=11), small_flux_t5(seed=12)
    write_flux_text_encoders(models_dir / "text_encoders", clip_l, t5)
    write_clip_l_file(clip_l, models_dir / "clip", LEGACY_CLIP_L)
    return clip_l, t5


@pytest.fixture(scope="module")
def flux_files(models_dir, text_models):
    """A FLUX.1-dev transformer reading this T5's 32-wide states and this CLIP-L's 64-wide pooled text, and the
    16-channel VAE."""
    config = {**small_flux_config("dev"), "pooled_projection_dim": 64, "joint_attention_dim": 32}
    (models_dir / "diffusion_models").mkdir(exist_ok=True)
    write_flux_file(models_dir / "diffusion_models" / FLUX_NAME, build_random_flux(config, seed=13))
    (models_dir / "vae").mkdir(exist_ok=True)
    safetensors.torch.save_file(bfl_vae_state(small_flux_vae()), str(models_dir / "vae" / VAE_NAME))


@pytest.fixture(scope="module")
def reference(models_dir, text_models):
    """diffusers' FluxPipeline on the weights as the files hold them (T5 rounded to float16, as t5xxl_fp16)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer

    from plinth.nodes.models.checkpoint import tokenizer_dir
    from plinth.nodes.models.text_encoders import t5_tokenizer

    clip_l, t5 = text_models
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=clip_l,
        tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir(models_dir)), local_files_only=True),
        text_encoder_2=copy.deepcopy(t5).half().float(),
        tokenizer_2=t5_tokenizer(models_dir),
        transformer=None,
    )

    def encode(text: str) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            embeds, pooled, _ = pipe.encode_prompt(text, text, device=torch.device("cpu"), max_sequence_length=256)
        return embeds.float(), pooled.float()

    return encode


def flux_graph(
    clip_names: tuple[str, str] = (T5_FP16_NAME, CLIP_L_NAME), guidance: float = 3.5, flux_guidance: float = 2.0
):
    """DualCLIPLoader -> CLIPTextEncodeFlux -> FluxGuidance as positive, CLIPTextEncode as negative, one euler
    step of the small FLUX.1-dev at 32x32, decoded and saved."""
    graph = GraphBuilder()
    loader = graph.add("DualCLIPLoader", clip_name1=clip_names[0], clip_name2=clip_names[1], type="flux")
    positive = graph.add("CLIPTextEncodeFlux", clip=loader.out(), clip_l=PROMPT, t5xxl=PROMPT, guidance=guidance)
    guided = graph.add("FluxGuidance", conditioning=positive.out(), guidance=flux_guidance)
    negative = graph.add("CLIPTextEncode", text=NEGATIVE, clip=loader.out())
    unet = graph.add("UNETLoader", unet_name=FLUX_NAME, weight_dtype="default")
    latent = graph.add("EmptySD3LatentImage", width=32, height=32, batch_size=1)
    sampler = graph.add(
        "KSampler",
        model=unet.out(),
        seed=1,
        steps=1,
        cfg=1.0,
        sampler_name="euler",
        scheduler="simple",
        positive=guided.out(),
        negative=negative.out(),
        latent_image=latent.out(),
        denoise=1.0,
    )
    vae = graph.add("VAELoader", vae_name=VAE_NAME)
    decode = graph.add("VAEDecode", samples=sampler.out(), vae=vae.out())
    graph.add("SaveImage", images=decode.out(), filename_prefix="flux_text")
    return graph, {"positive": positive, "guided": guided, "negative": negative}


def test_flux_prompts_through_the_server_are_diffusers_flux_conditioning(server, client, flux_files, reference):
    graph, nodes = flux_graph()
    result = client.run(graph.build())
    assert [im.size for im in result.images] == [(32, 32)]

    (positive,) = node_output(server, result, nodes["positive"].id)[0]
    embeds, pooled = reference(PROMPT)
    assert positive.embeds.shape == (1, 256, 32)
    torch.testing.assert_close(positive.embeds, embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(positive.options["pooled_output"], pooled, atol=1e-5, rtol=0)
    assert positive.options["guidance"] == 3.5

    (guided,) = node_output(server, result, nodes["guided"].id)[0]
    assert guided.options["guidance"] == 2.0 and torch.equal(guided.embeds, positive.embeds)

    (negative,) = node_output(server, result, nodes["negative"].id)[0]
    embeds, pooled = reference(NEGATIVE)
    torch.testing.assert_close(negative.embeds, embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(negative.options["pooled_output"], pooled, atol=1e-5, rtol=0)
    assert "guidance" not in negative.options


def test_the_files_order_and_folder_do_not_change_the_conditioning(server, client, flux_files):
    """clip_l first or T5 first, CLIP-L from models/text_encoders or the older models/clip: one conditioning."""
    outputs = []
    for names in ((T5_FP16_NAME, CLIP_L_NAME), (CLIP_L_NAME, T5_FP16_NAME), (T5_FP16_NAME, LEGACY_CLIP_L)):
        graph, nodes = flux_graph(names)
        result = client.run(graph.build())
        outputs.append(node_output(server, result, nodes["positive"].id)[0][0])
    for other in outputs[1:]:
        assert torch.equal(other.embeds, outputs[0].embeds)
        assert torch.equal(other.options["pooled_output"], outputs[0].options["pooled_output"])


def test_a_scaled_fp8_t5_file_encodes_close_to_the_fp16_one(server, client, flux_files):
    results = []
    for names in ((T5_FP16_NAME, CLIP_L_NAME), (T5_SCALED_NAME, CLIP_L_NAME)):
        graph, nodes = flux_graph(names)
        result = client.run(graph.build())
        results.append(node_output(server, result, nodes["positive"].id)[0][0])
    fp16, fp8 = results
    assert torch.equal(fp8.options["pooled_output"], fp16.options["pooled_output"])  # the same CLIP-L file
    assert not torch.equal(fp8.embeds, fp16.embeds)
    assert (fp8.embeds - fp16.embeds).abs().mean() < 0.1 * fp16.embeds.abs().mean()


@pytest.mark.parametrize(
    "class_type,inputs,message",
    [
        (
            "DualCLIPLoader",
            dict(clip_name1=CLIP_L_NAME, clip_name2=T5_FP16_NAME, type="sdxl"),
            "DualCLIPLoader type sdxl: not supported yet",
        ),
        ("CLIPLoader", dict(clip_name=T5_FP16_NAME, type="sd3"), "CLIPLoader type sd3: not supported yet"),
    ],
)
def test_types_plinth_does_not_build_are_refused_at_validation(client, flux_files, class_type, inputs, message):
    graph, _ = flux_graph()
    loader = graph.replace(graph.find("DualCLIPLoader"), class_type, **inputs)
    with pytest.raises(PlinthError) as info:
        client.run(graph.build())
    assert info.value.code == "INVALID_ARGUMENT"
    assert [(e.node_id, e.input, e.code) for e in info.value.errors] == [
        (loader.id, "type", "custom_validation_failed")
    ]
    assert message in info.value.errors[0].message


def test_a_file_that_is_not_clip_l_or_t5_fails_the_loader_naming_it(client, text_models, flux_files):
    graph, _ = flux_graph((T5_FP16_NAME, T5_SCALED_NAME))
    with pytest.raises(PlinthError) as info:
        client.run(graph.build())
    assert "takes CLIP-L and T5" in str(info.value) and T5_SCALED_NAME in str(info.value)
