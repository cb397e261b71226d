"""SDXL (base, refiner, Turbo) through the server: the embedded tiny-sdxl models, the size and
aesthetic-score conditioning reaching the UNet, Turbo in one step, and clear errors where a
conditioning meets a model it was not made for.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.graph_builder import GraphBuilder
from support.live_server import executed, node_output
from support.sd_original_layout import _rename

from plinth.clients import JobFailed

BASE, REFINER = "tiny-sdxl", "tiny-sdxl-refiner"


def txt2img(
    ckpt: str = BASE,
    positive: tuple[str, dict] | None = None,
    negative: tuple[str, dict] | None = None,
    seed: int = 5,
    size: int = 64,
) -> tuple[GraphBuilder, dict]:
    """A 2-step euler txt2img; the prompts are CLIPTextEncode unless given as (class_type, inputs)."""
    graph = GraphBuilder()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=ckpt)
    clip = checkpoint.out(1)
    kind, inputs = positive or ("CLIPTextEncode", {"text": "a glass perfume bottle on marble"})
    pos = graph.add(kind, **inputs)
    kind, inputs = negative or ("CLIPTextEncode", {"text": "blurry"})
    neg = graph.add(kind, **inputs)
    for node in (pos, neg):
        node.inputs["clip"] = clip
    latent = graph.add("EmptyLatentImage", width=size, height=size, batch_size=1)
    sampler = graph.add(
        "KSampler",
        model=checkpoint.out(0),
        positive=pos.out(),
        negative=neg.out(),
        latent_image=latent.out(),
        seed=seed,
        steps=2,
        cfg=5.0,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
    )
    decode = graph.add("VAEDecode", samples=sampler.out(), vae=checkpoint.out(2))
    graph.add("SaveImage", images=decode.out(), filename_prefix="sdxl")
    return graph, {"positive": pos, "negative": neg, "sampler": sampler, "latent": latent}


def sdxl_prompt(text: str, **sizes: int) -> tuple[str, dict]:
    inputs = dict(width=64, height=64, crop_w=0, crop_h=0, target_width=64, target_height=64, text_g=text, text_l=text)
    return "CLIPTextEncodeSDXL", {**inputs, **sizes}


def refiner_prompt(text: str, ascore: float, size: int = 64) -> tuple[str, dict]:
    return "CLIPTextEncodeSDXLRefiner", dict(ascore=ascore, width=size, height=size, text=text)


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def test_tiny_sdxl_makes_an_image(client):
    graph, _ = txt2img()
    result = client.run(graph.build())
    assert result.images[0].size == (64, 64)
    assert pixels(result).std() > 1  # not a flat colour


def test_clip_text_encode_on_sdxl_is_clip_text_encode_sdxl_at_the_image_size(client):
    """CLIPTextEncode leaves the size numbers to the sampler, which takes the image's size and no
    crop: the same pixels as CLIPTextEncodeSDXL saying so, with one prompt for both models."""
    plain, _ = txt2img(seed=7)
    explicit, _ = txt2img(
        positive=sdxl_prompt("a glass perfume bottle on marble"), negative=sdxl_prompt("blurry"), seed=7
    )
    assert np.array_equal(pixels(client.run(plain.build())), pixels(client.run(explicit.build())))


@pytest.mark.parametrize(
    "change", [dict(width=1024), dict(crop_h=32), dict(target_height=128), dict(text_l="a red sneaker")]
)
def test_each_size_number_and_the_clip_l_prompt_reach_the_unet(client, change):
    base, _ = txt2img(positive=sdxl_prompt("a glass perfume bottle on marble"), seed=8)
    changed, _ = txt2img(positive=sdxl_prompt("a glass perfume bottle on marble", **change), seed=8)
    assert not np.array_equal(pixels(client.run(base.build())), pixels(client.run(changed.build())))


def test_the_refiner_embeds_the_aesthetic_score(client):
    """The score changes the image; where a prompt sets none the sampler takes 6 for the
    positive and 2.5 for the negative, as ComfyUI does."""
    text = "a glass perfume bottle on marble"
    plain, _ = txt2img(REFINER, seed=9)
    scored, _ = txt2img(REFINER, positive=refiner_prompt(text, 6.0), negative=refiner_prompt("blurry", 2.5), seed=9)
    other, _ = txt2img(REFINER, positive=refiner_prompt(text, 9.0), negative=refiner_prompt("blurry", 2.5), seed=9)
    first = pixels(client.run(plain.build()))
    assert np.array_equal(first, pixels(client.run(scored.build())))
    assert not np.array_equal(first, pixels(client.run(other.build())))


def test_conditioning_holds_the_joined_text_and_the_pooled_clip_g(server, client):
    graph, nodes = txt2img(positive=sdxl_prompt("a bottle", width=1024, crop_w=16))
    result = client.run(graph.build())
    (entry,) = node_output(server, result, nodes["positive"].id)[0]
    assert entry.embeds.shape == (1, 77, 128)  # CLIP-L's 64 channels, then CLIP-G's 64
    assert entry.options["pooled_output"].shape == (1, 32)
    assert (entry.options["width"], entry.options["crop_w"]) == (1024, 16)


def test_seed_change_reruns_only_the_sampler_and_what_follows(client):
    graph, nodes = txt2img(seed=10)
    client.run(graph.build())
    nodes["sampler"].inputs["seed"] = 11
    assert executed(client.run(graph.build())) == {"KSampler", "VAEDecode", "SaveImage"}


def test_turbo_in_one_step_with_sd_turbo_scheduler(client):
    """SDXL Turbo's recipe as ComfyUI's template has it: SamplerCustom, SDTurboScheduler 1 step,
    euler_ancestral, cfg 1."""
    graph = GraphBuilder()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=BASE)
    pos = graph.add("CLIPTextEncode", text="a sneaker", clip=checkpoint.out(1))
    neg = graph.add("CLIPTextEncode", text="", clip=checkpoint.out(1))
    sigmas = graph.add("SDTurboScheduler", model=checkpoint.out(0), steps=1, denoise=1.0)
    select = graph.add("KSamplerSelect", sampler_name="euler_ancestral")
    latent = graph.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    sampler = graph.add(
        "SamplerCustom",
        model=checkpoint.out(0),
        add_noise=True,
        noise_seed=3,
        cfg=1.0,
        positive=pos.out(),
        negative=neg.out(),
        sampler=select.out(),
        sigmas=sigmas.out(),
        latent_image=latent.out(),
    )
    decode = graph.add("VAEDecode", samples=sampler.out(0), vae=checkpoint.out(2))
    graph.add("SaveImage", images=decode.out(), filename_prefix="turbo")
    result = client.run(graph.build())
    assert result.images[0].size == (64, 64)
    assert pixels(result).std() > 1


def test_sd1_conditioning_on_an_sdxl_model_is_refused_by_name(client):
    graph, nodes = txt2img()
    sd1 = graph.add("CheckpointLoaderSimple", ckpt_name="tiny-sd")
    nodes["positive"].inputs["clip"] = sd1.out(1)
    with pytest.raises(JobFailed, match="attends to 128-wide text"):
        client.run(graph.build())


def test_the_sdxl_prompt_node_refuses_an_sd1_clip(client):
    graph, nodes = txt2img(positive=sdxl_prompt("a bottle"))
    sd1 = graph.add("CheckpointLoaderSimple", ckpt_name="tiny-sd")
    nodes["positive"].inputs["clip"] = sd1.out(1)
    with pytest.raises(JobFailed, match="CLIPTextEncodeSDXL needs an SDXL checkpoint's CLIP"):
        client.run(graph.build())


def test_zero_out_zeroes_the_pooled_text_too(server, client):
    graph, nodes = txt2img()
    zero = graph.add("ConditioningZeroOut", conditioning=nodes["negative"].out())
    nodes["sampler"].inputs["negative"] = zero.out()
    result = client.run(graph.build())
    (entry,) = node_output(server, result, zero.id)[0]
    assert not entry.embeds.any() and not entry.options["pooled_output"].any()
    assert entry.options["pooled_output"].shape == (1, 32)


def test_clip_skip_picks_the_layer_on_both_text_models(client):
    graph, nodes = txt2img(seed=12)
    first = pixels(client.run(graph.build()))
    checkpoint = graph.find("CheckpointLoaderSimple")
    skip = graph.add("CLIPSetLastLayer", clip=checkpoint.out(1), stop_at_clip_layer=-1)
    for role in ("positive", "negative"):
        nodes[role].inputs["clip"] = skip.out()
    assert not np.array_equal(first, pixels(client.run(graph.build())))
    skip.inputs["stop_at_clip_layer"] = -2  # SDXL's own choice
    assert np.array_equal(first, pixels(client.run(graph.build())))


def test_an_sd1_controlnet_on_an_sdxl_model_is_refused_by_name(client, models_dir):
    from support import controlnet_files

    names = controlnet_files.write_all_layouts(controlnet_files.tiny_controlnet(), models_dir / "controlnet")
    graph, nodes = txt2img()
    checkpoint = graph.find("CheckpointLoaderSimple")
    hint = graph.add("VAEDecode", samples=nodes["latent"].out(), vae=checkpoint.out(2))  # any image will do
    loader = graph.add("ControlNetLoader", control_net_name=names["original"])
    apply = graph.add(
        "ControlNetApplyAdvanced",
        positive=nodes["positive"].out(),
        negative=nodes["negative"].out(),
        control_net=loader.out(),
        image=hint.out(),
        strength=1.0,
        start_percent=0.0,
        end_percent=1.0,
    )
    nodes["sampler"].inputs["positive"] = apply.out(0)
    nodes["sampler"].inputs["negative"] = apply.out(1)
    with pytest.raises(JobFailed, match="was made for another base model: it attends to 64-wide text"):
        client.run(graph.build())


def sdxl_lora(models_dir, sgm_names: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya LoRA for tiny-sdxl on the UNet's attention and feed-forward layers and both text
    models' q/v projections (lora_te1_ CLIP-L, lora_te2_ CLIP-G); UNet layers named as kohya's
    SDXL scripts write them (the original model's input_blocks/middle_block/output_blocks) or by
    diffusers' module paths."""
    from support.sdxl_original_layout import sdxl_unet_prefixes

    from plinth.nodes.models.checkpoint import load_checkpoint
    from plinth.nodes.models.embedded import ensure_embedded

    model = load_checkpoint(ensure_embedded(models_dir, BASE), models_dir, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(seed)
    prefixes = sdxl_unet_prefixes(dict(model.unet.config))
    out: dict[str, torch.Tensor] = {}
    targets = {
        "unet": (model.unet, ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in")),
        "te1": (model.text_encoder, ("q_proj", "v_proj")),
        "te2": (model.text_encoder_2, ("q_proj", "v_proj")),
    }
    for part, (module, ends) in targets.items():
        for path, sub in module.named_modules():
            if not isinstance(sub, torch.nn.Linear) or not path.endswith(ends):
                continue
            name = path
            if part == "unet" and sgm_names:
                name = _rename(path + ".weight", prefixes).removesuffix(".weight")
            key = f"lora_{part}_{name.replace('.', '_')}"
            out[f"{key}.lora_down.weight"] = torch.randn(4, sub.in_features, generator=gen) * 0.5
            out[f"{key}.lora_up.weight"] = torch.randn(sub.out_features, 4, generator=gen) * 0.5
            out[f"{key}.alpha"] = torch.tensor(4.0)
    return out


def lora_graph(name: str, strength_model: float = 1.0, strength_clip: float = 1.0) -> GraphBuilder:
    graph, nodes = txt2img(seed=13)
    checkpoint = graph.find("CheckpointLoaderSimple")
    lora = graph.add(
        "LoraLoader",
        model=checkpoint.out(0),
        clip=checkpoint.out(1),
        lora_name=name,
        strength_model=strength_model,
        strength_clip=strength_clip,
    )
    nodes["sampler"].inputs["model"] = lora.out(0)
    for role in ("positive", "negative"):
        nodes[role].inputs["clip"] = lora.out(1)
    return graph


def test_kohya_sdxl_loras_load_by_original_or_diffusers_layer_names(client, models_dir):
    """kohya's SDXL LoRAs name UNet layers as the original model does (input_blocks_4_1_...):
    the same weights under diffusers' names give the same pixels, so every name resolved to the
    layer it means; the text models' layers (te1, te2) and the UNet's each change the image."""
    from support import files

    files.write(sdxl_lora(models_dir, sgm_names=True), models_dir / "loras", "sdxl-sgm.safetensors")
    files.write(sdxl_lora(models_dir, sgm_names=False), models_dir / "loras", "sdxl-diffusers.safetensors")
    plain, _ = txt2img(seed=13)
    base = pixels(client.run(plain.build()))
    sgm = pixels(client.run(lora_graph("sdxl-sgm.safetensors").build()))
    assert np.array_equal(sgm, pixels(client.run(lora_graph("sdxl-diffusers.safetensors").build())))
    assert not np.array_equal(sgm, base)
    unet_only = pixels(client.run(lora_graph("sdxl-sgm.safetensors", strength_clip=0.0).build()))
    clip_only = pixels(client.run(lora_graph("sdxl-sgm.safetensors", strength_model=0.0).build()))
    assert not np.array_equal(unet_only, base) and not np.array_equal(clip_only, base)
    assert np.array_equal(pixels(client.run(lora_graph("sdxl-sgm.safetensors", 0.0, 0.0).build())), base)


def test_an_sd1_lora_on_an_sdxl_model_names_the_layers_that_do_not_fit(client, models_dir):
    from support import files, lora_files

    files.write(lora_files.kohya(lora_files.random_lora()), models_dir / "loras", "sd1-style.safetensors")
    with pytest.raises(JobFailed, match="sd1-style.safetensors: .*(match no module|needs)"):
        client.run(lora_graph("sd1-style.safetensors").build())
