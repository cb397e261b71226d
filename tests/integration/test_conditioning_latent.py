"""Conditioning, latent and inpainting nodes: behaviour, through the real server."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from support.files import png
from support.graph_builder import GraphBuilder, linked, node_of
from support.live_server import node_output

from plinth.nodes.models.checkpoint import load_checkpoint
from plinth.nodes.models.tiny_sd import ensure_tiny_sd
from plinth.nodes.prompt import encode, parse_emphasis, weighted_tokens

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(models_dir):
    return load_checkpoint(ensure_tiny_sd(models_dir), models_dir, CPU, torch.float32)


def product_photo(h=64, w=64, alpha=False) -> np.ndarray:
    """A red box on a light backdrop; with alpha, the backdrop's left half transparent."""
    rgb = np.full((h, w, 3), 230, np.uint8)
    rgb[16:48, 20:44] = (200, 30, 30)
    if not alpha:
        return rgb
    a = np.full((h, w, 1), 255, np.uint8)
    a[:, : w // 2] = 0
    return np.concatenate([rgb, a], axis=2)


# prompts


def test_emphasis_is_read_as_comfyui_reads_it():
    assert parse_emphasis("a (red:1.3) shoe") == [("a ", 1.0), ("red", 1.3), (" shoe", 1.0)]
    assert parse_emphasis("((glossy))")[0][1] == pytest.approx(1.21)
    assert parse_emphasis("[matte] box") == [("[matte] box", 1.0)]  # brackets carry no weight
    assert parse_emphasis(r"\(tm\) (x:bad)") == [("(tm) ", 1.0), ("x:bad", pytest.approx(1.1))]


def test_weights_scale_embeddings_from_the_empty_prompt(tiny):
    tok, enc = tiny.tokenizer, tiny.text_encoder
    plain = encode(tok, enc, "red sneaker", -1, CPU)
    assert torch.equal(encode(tok, enc, "(red:1.0) sneaker", -1, CPU), plain)
    heavy = encode(tok, enc, "(red:1.5) sneaker", -1, CPU)
    empty = encode(tok, enc, "", -1, CPU)
    # token 1 is "red": moved 1.5x as far from the empty prompt's embedding, the rest untouched
    assert torch.allclose(heavy[0, 1], empty[0, 1] + 1.5 * (plain[0, 1] - empty[0, 1]), atol=1e-5)
    assert torch.allclose(heavy[0, 2], plain[0, 2], atol=1e-6)


def test_long_prompts_are_encoded_window_by_window(tiny):
    text = " ".join(["sneaker"] * 100)
    windows = weighted_tokens(tiny.tokenizer, text)
    assert [len(w) for w in windows] == [75, 25]
    embeds = encode(tiny.tokenizer, tiny.text_encoder, text, -1, CPU)
    assert embeds.shape[1] == 154


def test_clip_skip_and_conditioning_nodes_run(client, txt2img):
    b = GraphBuilder(txt2img)
    sampler, checkpoint = b.find("KSampler"), b.find("CheckpointLoaderSimple")
    positive, negative = linked(sampler.graph, sampler, "positive"), linked(sampler.graph, sampler, "negative")
    sampler.inputs.update(seed=21, steps=2)
    b.find("EmptyLatentImage").inputs["batch_size"] = 1
    base = client.run(b.build()).images[0]
    positive.inputs["clip"] = b.add("CLIPSetLastLayer", clip=checkpoint.out(1), stop_at_clip_layer=-2).out(0)
    skipped = client.run(b.build()).images[0]
    assert not np.array_equal(np.asarray(base), np.asarray(skipped))
    sampler.inputs["negative"] = b.add("ConditioningZeroOut", conditioning=negative.out(0)).out(0)
    result = client.run(b.build())
    assert result.status == "completed"
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(skipped))


def test_an_area_conditions_only_its_part_of_the_image(server, client, txt2img):
    """One euler step on a 128x64 image with a second prompt on the left half: the right half's
    latent is the plain run's (each latent cell's prediction comes from the prompts covering
    it), the left half's is not, and a full-frame area gives yet another result."""
    b = GraphBuilder(txt2img)
    sampler, checkpoint = b.find("KSampler"), b.find("CheckpointLoaderSimple")
    b.find("EmptyLatentImage").inputs.update(width=128, height=64, batch_size=1)
    sampler.inputs.update(seed=21, steps=1, sampler_name="euler")
    plain = client.run(b.build())
    second = b.add("CLIPTextEncode", text="marble plinth", clip=checkpoint.out(1))
    area = b.add("ConditioningSetArea", conditioning=second.out(0), width=64, height=64, x=0, y=0, strength=1.0)
    first = linked(sampler.graph, sampler, "positive").out(0)
    sampler.inputs["positive"] = b.add("ConditioningCombine", conditioning_1=first, conditioning_2=area.out(0)).out(0)
    half = client.run(b.build())
    area.inputs["width"] = 128
    full = client.run(b.build())
    plain, half, full = (node_output(server, r.job_id, sampler.id)[0].samples for r in (plain, half, full))
    assert plain.shape == (1, 4, 8, 16)
    # latent cells 8.. are pixels 64..; the tiny model's latents run to ~100, so float error ~1e-4
    assert torch.allclose(half[..., 8:], plain[..., 8:], rtol=1e-5, atol=1e-3)
    assert (half[..., :8] - plain[..., :8]).abs().max() > 1e-2
    assert (half[..., 8:] - full[..., 8:]).abs().max() > 1e-2


def test_clip_skip_deeper_than_the_model_fails_clearly(client, txt2img):
    from plinth.clients import JobFailed

    b = GraphBuilder(txt2img)
    sampler = b.find("KSampler")
    skip = b.add("CLIPSetLastLayer", clip=b.find("CheckpointLoaderSimple").out(1), stop_at_clip_layer=-5)
    linked(sampler.graph, sampler, "positive").inputs["clip"] = skip.out(0)
    with pytest.raises(JobFailed, match="2 layers"):
        client.run(b.build())


# latents


def img2img_graph(txt2img, denoise=0.6):
    b = GraphBuilder(txt2img)
    image = b.add("LoadImage", image="product.png")
    encode = b.add("VAEEncode", pixels=image.out(0), vae=b.find("CheckpointLoaderSimple").out(2))
    b.find("KSampler").inputs.update(latent_image=encode.out(0), denoise=denoise, steps=3, seed=5)
    graph = b.build()
    del graph[node_of(graph, "EmptyLatentImage").id]
    return graph


def test_noise_mask_keeps_the_unmasked_latent_exactly(server, client, txt2img):
    b = GraphBuilder(img2img_graph(txt2img, denoise=1.0))
    sampler, encode = b.find("KSampler"), b.find("VAEEncode")
    mask = b.add("LoadImage", image="mask.png")
    sampler.inputs["latent_image"] = b.add("SetLatentNoiseMask", samples=encode.out(0), mask=mask.out(1)).out(0)
    inputs = {"product.png": png(product_photo()), "mask.png": png(product_photo(alpha=True))}
    result = client.run(b.build(), inputs=inputs)
    before = node_output(server, result.job_id, encode.id)[0].samples
    after = node_output(server, result.job_id, sampler.id)[0].samples
    # mask = 1 - alpha: 1 (sample) on the left half, 0 (keep) on the right; latent cells are 8 px
    assert torch.equal(after[..., 5:], before[..., 5:])
    assert (after[..., :3] - before[..., :3]).abs().mean() > 0.1


def test_img2img_denoise_controls_how_much_changes(server, client, txt2img):
    distances = {}
    for denoise in (0.3, 0.9):
        g = img2img_graph(copy.deepcopy(txt2img), denoise)
        result = client.run(g, inputs={"product.png": png(product_photo())})
        before = node_output(server, result.job_id, node_of(g, "VAEEncode").id)[0].samples
        after = node_output(server, result.job_id, node_of(g, "KSampler").id)[0].samples
        distances[denoise] = float((after - before).abs().mean())
    assert 0 < distances[0.3] < distances[0.9]


def test_latent_resize_and_batch_nodes(server, client, txt2img):
    b = GraphBuilder(txt2img)
    b.find("EmptyLatentImage").inputs.update(width=64, height=48, batch_size=2)
    by = b.add("LatentUpscaleBy", samples=b.find("KSampler").out(0), upscale_method="bislerp", scale_by=1.5)
    to = b.add("LatentUpscale", samples=by.out(0), upscale_method="bilinear", width=0, height=96, crop="disabled")
    repeat = b.add("RepeatLatentBatch", samples=to.out(0), amount=3)
    pick = b.add("LatentFromBatch", samples=repeat.out(0), batch_index=1, length=4)
    b.find("VAEDecode").inputs["samples"] = pick.out(0)
    result = client.run(b.build())
    ids = (by.id, to.id, repeat.id, pick.id)
    assert [n.shape for n in (node_output(server, result.job_id, i)[0].samples for i in ids)] == [
        (2, 4, 9, 12),
        (2, 4, 12, 16),
        (6, 4, 12, 16),
        (4, 4, 12, 16),
    ]
    assert len(result.images) == 4 and result.images[0].size == (128, 96)


def test_ksampler_advanced_in_two_halves_equals_one_run(server, client, txt2img):
    # single-step solvers: a multistep one restarts its history at the split (see the oracle
    # tests in test_sampling_oracle.py for every solver's chain)
    for sampler in ("euler", "heun"):
        b = GraphBuilder(txt2img)
        latent, plain = b.find("EmptyLatentImage"), b.find("KSampler")
        latent.inputs["batch_size"] = 1
        common = {k: plain.inputs[k] for k in ("model", "cfg", "positive", "negative")}
        common.update(noise_seed=9, steps=4, sampler_name=sampler, scheduler="normal")
        one_run = b.replace(
            plain,
            "KSamplerAdvanced",
            **common,
            add_noise="enable",
            latent_image=latent.out(0),
            start_at_step=0,
            end_at_step=10000,
            return_with_leftover_noise="disable",
        )
        first_half = b.add(
            "KSamplerAdvanced",
            **common,
            add_noise="enable",
            latent_image=latent.out(0),
            start_at_step=0,
            end_at_step=2,
            return_with_leftover_noise="enable",
        )
        second_half = b.add(
            "KSamplerAdvanced",
            **common,
            add_noise="disable",
            latent_image=first_half.out(0),
            start_at_step=2,
            end_at_step=10000,
            return_with_leftover_noise="disable",
        )
        decode = b.add("VAEDecode", samples=second_half.out(0), vae=b.find("CheckpointLoaderSimple").out(2))
        b.add("PreviewImage", images=decode.out(0))
        result = client.run(b.build())
        whole = node_output(server, result.job_id, one_run.id)[0].samples
        halves = node_output(server, result.job_id, second_half.id)[0].samples
        assert torch.allclose(whole, halves, atol=1e-4), sampler
        early = node_output(server, result.job_id, first_half.id)[0].samples
        assert not torch.allclose(early, whole, atol=1e-2)


def test_ksampler_advanced_full_range_equals_ksampler(server, client, txt2img):
    b = GraphBuilder(txt2img)
    b.find("EmptyLatentImage").inputs["batch_size"] = 1
    sampler = b.find("KSampler")
    k = sampler.inputs
    advanced = b.add(
        "KSamplerAdvanced",
        model=k["model"],
        add_noise="enable",
        noise_seed=k["seed"],
        steps=k["steps"],
        cfg=k["cfg"],
        sampler_name=k["sampler_name"],
        scheduler=k["scheduler"],
        positive=k["positive"],
        negative=k["negative"],
        latent_image=k["latent_image"],
        start_at_step=0,
        end_at_step=10000,
        return_with_leftover_noise="disable",
    )
    decode = b.add("VAEDecode", samples=advanced.out(0), vae=b.find("CheckpointLoaderSimple").out(2))
    b.add("PreviewImage", images=decode.out(0))
    result = client.run(b.build())
    assert torch.equal(
        node_output(server, result.job_id, sampler.id)[0].samples,
        node_output(server, result.job_id, advanced.id)[0].samples,
    )


# inpainting


@pytest.fixture(scope="module")
def inpaint_checkpoint(models_dir):
    """tiny-sd with a 9-channel UNet: an inpainting checkpoint's shape."""
    import shutil

    from diffusers import UNet2DConditionModel

    from plinth.nodes.models.tiny_sd import UNET

    target = models_dir / "checkpoints" / "tiny-sd-inpaint"
    if not target.exists():
        shutil.copytree(ensure_tiny_sd(models_dir), target)
        shutil.rmtree(target / "unet")
        torch.manual_seed(4)
        UNet2DConditionModel(**{**UNET, "in_channels": 9}).save_pretrained(target / "unet")
    return "tiny-sd-inpaint"


@pytest.mark.parametrize("checkpoint", ["tiny-sd", "inpaint"])
def test_inpaint_model_conditioning_keeps_the_unmasked_area(server, client, txt2img, inpaint_checkpoint, checkpoint):
    b = GraphBuilder(txt2img)
    sampler, loader = b.find("KSampler"), b.find("CheckpointLoaderSimple")
    loader.inputs["ckpt_name"] = inpaint_checkpoint if checkpoint == "inpaint" else "tiny-sd"
    photo = b.add("LoadImage", image="photo.png")
    conditioning = b.add(
        "InpaintModelConditioning",
        positive=linked(sampler.graph, sampler, "positive").out(0),
        negative=linked(sampler.graph, sampler, "negative").out(0),
        vae=loader.out(2),
        pixels=photo.out(0),
        mask=photo.out(1),
        noise_mask=True,
    )
    latent = conditioning.out(2)
    sampler.inputs.update(positive=conditioning.out(0), negative=conditioning.out(1), latent_image=latent, steps=2)
    g = b.build()
    del g[node_of(g, "EmptyLatentImage").id]
    result = client.run(g, inputs={"photo.png": png(product_photo(alpha=True))})
    before = node_output(server, result.job_id, conditioning.id)[2].samples
    after = node_output(server, result.job_id, sampler.id)[0].samples
    assert torch.equal(after[..., 5:], before[..., 5:])
    assert not torch.equal(after[..., :3], before[..., :3])


def test_vae_encode_for_inpaint_greys_the_mask_and_grows_it(server, client, txt2img, tiny):
    b = GraphBuilder(txt2img)
    photo = b.add("LoadImage", image="photo.png")
    vae = b.find("CheckpointLoaderSimple").out(2)
    encode = b.add("VAEEncodeForInpaint", pixels=photo.out(0), vae=vae, mask=photo.out(1), grow_mask_by=6)
    b.find("KSampler").inputs.update(latent_image=encode.out(0), steps=2)
    g = b.build()
    del g[node_of(g, "EmptyLatentImage").id]
    result = client.run(g, inputs={"photo.png": png(product_photo(alpha=True))})
    latent = node_output(server, result.job_id, encode.id)[0]
    mask = latent.noise_mask[0, 0]
    assert mask.shape == (64, 64)
    assert mask[:, :32].min() == 1 and mask[:, 36:].max() == 0 and mask[:, 32:35].min() == 1  # grown by 3 px
    # the VAE was given the photo with the (ungrown) mask, the transparent left half, mid grey
    photo = torch.from_numpy(product_photo()).float() / 255
    greyed = photo.clone()
    greyed[:, :32] = 0.5

    def encoded(image: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return tiny.vae.encode(image.movedim(-1, 0)[None] * 2 - 1).latent_dist.mean

    assert torch.allclose(latent.samples, encoded(greyed), atol=1e-4)
    assert (latent.samples - encoded(photo)).abs().max() > 1e-2


def test_vae_loader_loads_both_layouts(server, client, txt2img, models_dir, tiny):
    from safetensors.torch import save_file
    from support.sd_original_layout import _rename, _vae_prefixes

    state = tiny.vae.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(models_dir / "vae" / "tiny-diffusers.safetensors"))
    prefixes = _vae_prefixes(tiny.vae.config)
    original = {
        _rename(k, prefixes): (v[:, :, None, None] if v.ndim == 2 else v).contiguous() for k, v in state.items()
    }
    save_file(original, str(models_dir / "vae" / "tiny-original.safetensors"))
    images = {}
    for name in ("checkpoint", "tiny-diffusers.safetensors", "tiny-original.safetensors"):
        b = GraphBuilder(txt2img)
        b.find("KSampler").inputs["seed"] = 61
        if name != "checkpoint":
            b.find("VAEDecode").inputs["vae"] = b.add("VAELoader", vae_name=name).out(0)
        images[name] = [np.asarray(i) for i in client.run(b.build()).images]
    assert all(
        np.array_equal(a, b) for a, b in zip(images["checkpoint"], images["tiny-diffusers.safetensors"], strict=False)
    )
    assert all(
        np.array_equal(a, b) for a, b in zip(images["checkpoint"], images["tiny-original.safetensors"], strict=False)
    )


def test_a_latent_taken_from_a_batch_keeps_its_noise(server, client, txt2img):
    b = GraphBuilder(txt2img)
    latent, sampler = b.find("EmptyLatentImage"), b.find("KSampler")
    latent.inputs["batch_size"] = 4
    sampler.inputs.update(seed=77, steps=2)
    third = b.add("LatentFromBatch", samples=latent.out(0), batch_index=2, length=1)
    alone = b.add("KSampler", **{**sampler.inputs, "latent_image": third.out(0)})
    decode = b.add("VAEDecode", samples=alone.out(0), vae=b.find("CheckpointLoaderSimple").out(2))
    b.add("PreviewImage", images=decode.out(0))
    result = client.run(b.build())
    batch = node_output(server, result.job_id, sampler.id)[0].samples
    picked = node_output(server, result.job_id, alone.id)[0].samples
    assert torch.allclose(picked[0], batch[2], atol=1e-3)  # variant 3 of 4, re-run on its own
    assert not torch.allclose(picked[0], batch[0], atol=1e-1)
