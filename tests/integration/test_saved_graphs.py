"""Every saved graph in graphs/ runs unchanged on the embedded model, with the model files it
names made here (random weights, real layouts), and does what graphs/README.md says."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from support import files
from support.graph_builder import linked, node_of, nodes_of
from support.live_server import node_output
from support.paths import GRAPHS
from support.saved_graphs import INPUTS, product_photo, reference_photo, write_graph_models

from plinth.nodes.resize import resize_image

SAVED = sorted(p.name for p in GRAPHS.glob("*.json"))


@pytest.fixture(scope="module")
def graph_models(models_dir):
    write_graph_models(models_dir)


def load(name: str) -> dict:
    return json.loads((GRAPHS / name).read_text())


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("name", SAVED)
def test_every_saved_graph_runs_and_is_described(client, graph_models, name):
    graph = load(name)
    wanted = {n["inputs"]["image"] for n in graph.values() if n["class_type"] == "LoadImage"}
    result = client.run(graph, inputs={k: v for k, v in INPUTS.items() if k in wanted})
    assert result.status == "completed" and result.images
    assert f"## {name}" in (GRAPHS / "README.md").read_text()


def outputs_by_prefix(result) -> dict[str, list[Image.Image]]:
    found: dict[str, list[Image.Image]] = {}
    for ref, image in zip((r for r in result.image_refs if r.png), result.images, strict=False):
        found.setdefault(ref.filename.rsplit("_", 1)[0], []).append(image)
    return found


@pytest.mark.parametrize("name, prefix", [("background_replace.json", ""), ("sdxl_background_replace.json", "sdxl_")])
def test_background_replacement_keeps_the_product_pixels_and_changes_the_backdrop(
    server, client, graph_models, name, prefix
):
    graph = load(name)
    result = client.run(graph, inputs={"product.png": INPUTS["product.png"]})
    out = outputs_by_prefix(result)
    composite = pixels(out[prefix + "background"][0])
    original = product_photo().astype(np.int16)
    cutout = node_of(graph, "PlainBackgroundCutout").id
    product = node_output(server, result.job_id, cutout)[0][0].numpy()  # the cutout mask, 1 = product
    assert (product == 1).sum() > 400  # the product's core (its soft edge is below 1)
    assert np.array_equal(composite[product == 1], original[product == 1])
    # where the mask is above 0.99 the sampled backdrop weighs under 1%: at most 2.55 levels, rounded
    assert np.abs(composite[product > 0.99] - original[product > 0.99]).max() <= 3
    backdrop = product == 0
    assert np.abs(composite[backdrop] - original[backdrop]).mean() > 5
    assert out[prefix + "background_2x"][0].size == (128, 128)


def test_outpaint_keeps_the_original_region_and_fills_the_new_area(client, graph_models):
    result = client.run(load("outpaint_ad_formats.json"), inputs={"product.png": INPUTS["product.png"]})
    out = outputs_by_prefix(result)
    original = product_photo().astype(np.int16)
    for prefix, size, (x, y) in (("ad_4x5", (64, 80), (0, 8)), ("ad_16x9", (112, 64), (24, 0))):
        image = out[prefix][0]
        assert image.size == size
        canvas = pixels(image)
        assert np.array_equal(canvas[y : y + 64, x : x + 64], original)
        new_area = np.ones(canvas.shape[:2], bool)
        new_area[y : y + 64, x : x + 64] = False
        assert np.abs(canvas[new_area] - 128).mean() > 3  # sampled, not left as the grey padding


# A photo whose sides are not multiples of 8: the graphs' ImageScale (set for 64x64, which is
# 70x70 rounded down to a multiple of 8) gives every node the same 64x64 pixels.


def odd_sized_photo() -> np.ndarray:
    """A 70x70 packshot whose product has texture, so a paste one pixel off cannot match."""
    photo = product_photo(70)
    ys, xs = np.mgrid[14:50, 20:44]
    photo[14:50, 20:44, 1] = 30 + (ys * 7 + xs * 3) % 40
    return photo


def scaled(photo: np.ndarray) -> torch.Tensor:
    """The photo as the graphs' ImageScale node makes it: [64,64,3] in 0..1."""
    return resize_image(torch.from_numpy(photo).float()[None] / 255, 64, 64, "lanczos", "center")[0]


@pytest.fixture(scope="module")
def tiny_vae(models_dir):
    from plinth.nodes.models.checkpoint import load_checkpoint
    from plinth.nodes.models.tiny_sd import ensure_tiny_sd

    return load_checkpoint(ensure_tiny_sd(models_dir), models_dir, torch.device("cpu"), torch.float32).vae


def encode(vae, image: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return vae.encode(image.movedim(-1, 0)[None] * 2 - 1).latent_dist.mean


def test_background_replacement_of_a_photo_not_a_multiple_of_8(server, client, graph_models, tiny_vae):
    photo = odd_sized_photo()
    graph = load("background_replace.json")
    result = client.run(graph, inputs={"product.png": files.png(photo)})
    out = outputs_by_prefix(result)
    assert out["background"][0].size == (64, 64) and out["background_2x"][0].size == (128, 128)
    expected = scaled(photo)
    cutout = node_of(graph, "PlainBackgroundCutout").id
    product = node_output(server, result.job_id, cutout)[0][0]  # the cutout mask, 1 = product
    assert product.shape == (64, 64) and (product == 1).sum() > 300
    composite = node_output(server, result.job_id, node_of(graph, "ImageCompositeMasked").id)[0][0]
    assert torch.equal(composite[product == 1], expected[product == 1])  # exact, and in place
    assert np.array_equal(
        np.asarray(out["background"][0])[product.numpy() == 1],
        (expected.numpy() * 255).clip(0, 255).astype(np.uint8)[product.numpy() == 1],
    )
    # the sampler's latent and noise mask come from the very same pixels
    conditioned = node_output(server, result.job_id, node_of(graph, "InpaintModelConditioning").id)[2]
    assert torch.equal(conditioned.noise_mask[0, 0], 1 - product)
    assert torch.allclose(conditioned.samples, encode(tiny_vae, expected), atol=1e-5)


@pytest.mark.parametrize("feathering", [0, 8])
def test_outpaint_of_a_photo_not_a_multiple_of_8(server, client, graph_models, feathering):
    photo = odd_sized_photo()
    graph = load("outpaint_ad_formats.json")
    for pad in nodes_of(graph, "ImagePadForOutpaint"):
        pad.inputs["feathering"] = feathering
    result = client.run(graph, inputs={"product.png": files.png(photo)})
    out = outputs_by_prefix(result)
    expected = scaled(photo)
    for prefix, size, (x, y) in (("ad_4x5", (64, 80), (0, 8)), ("ad_16x9", (112, 64), (24, 0))):
        (save,) = (n for n in nodes_of(graph, "SaveImage") if n.inputs["filename_prefix"] == prefix)
        composite = linked(graph, save, "images")  # the ImageCompositeMasked of this format
        node, pad = composite.id, linked(graph, composite, "source").id
        assert out[prefix][0].size == size
        canvas = node_output(server, result.job_id, node)[0][0]
        region = canvas[y : y + 64, x : x + 64]
        pad_mask = node_output(server, result.job_id, pad)[1][0][y : y + 64, x : x + 64]
        if feathering == 0:  # as saved: the whole original region exact, at its place
            assert (pad_mask == 0).all()
            assert torch.equal(region, expected)
        else:  # a band of `feathering` pixels inside the padded sides is blended, the rest exact
            inside = pad_mask == 0
            assert inside.sum() >= 48 * 64 and (~inside).any()
            assert torch.equal(region[inside], expected[inside])
            assert not torch.equal(region[~inside], expected[~inside])
        new_area = torch.ones(canvas.shape[:2], dtype=torch.bool)
        new_area[y : y + 64, x : x + 64] = False
        assert (canvas[new_area] - 0.5).abs().mean() > 3 / 255  # sampled, not the grey padding


def test_upscale_graph_gives_four_times_the_size(client, graph_models):
    result = client.run(load("upscale_4x.json"), inputs={"product.png": INPUTS["product.png"]})
    assert result.images[0].size == (256, 256)


def test_restyle_keeps_the_size_and_changes_the_look(server, client, graph_models):
    graph = load("restyle_keep_shape.json")
    result = client.run(graph, inputs={"product.png": INPUTS["product.png"]})
    out = outputs_by_prefix(result)
    restyled = pixels(out["restyled"][0])
    assert restyled.shape == (64, 64, 3)
    assert np.abs(restyled - product_photo()).mean() > 5
    edges = node_output(server, result.job_id, node_of(graph, "Canny").id)[0]
    assert edges.max() == 1 and edges.mean() < 0.5  # the product outline, on black


def test_style_graph_moves_the_tone_toward_the_reference(client, graph_models):
    result = client.run(load("style_from_reference.json"), inputs=INPUTS)
    out = outputs_by_prefix(result)
    styled, matched = pixels(out["styled"][0]), pixels(out["styled_tone_matched"][0])
    reference_mean = reference_photo().reshape(-1, 3).mean(0)
    assert (
        np.abs(matched.reshape(-1, 3).mean(0) - reference_mean).sum()
        < np.abs(styled.reshape(-1, 3).mean(0) - reference_mean).sum()
    )


def test_lora_graph_differs_from_plain_txt2img(client, graph_models, txt2img):
    lora = load("lora.json")
    plain = client.run(txt2img).images[0]
    with_lora = client.run(lora).images[0]
    assert not np.array_equal(pixels(plain), pixels(with_lora))


def test_variants_graph_gives_distinct_candidates(client):
    result = client.run(load("variants_ab.json"))
    assert len(result.images) == 4
    assert len({pixels(i).tobytes() for i in result.images}) == 4


def test_img2img_keeps_part_of_the_photo(server, client):
    """Measured on latents: tiny-sd's random VAE does not reconstruct pixels."""
    changes = {}
    for denoise in (0.55, 1.0):
        graph = load("img2img.json")
        sampler = node_of(graph, "KSampler")
        sampler.inputs["denoise"] = denoise
        result = client.run(graph, inputs={"product.png": INPUTS["product.png"]})
        encoded = node_output(server, result.job_id, node_of(graph, "VAEEncode").id)[0].samples
        sampled = node_output(server, result.job_id, sampler.id)[0].samples
        changes[denoise] = float((sampled - encoded).abs().mean())
    assert changes[0.55] < changes[1.0]


def test_sdxl_base_then_refiner_refines_the_base_latent(server, client):
    """The refiner takes the base's half-finished latent (leftover noise) and finishes it with
    its own prompts; its aesthetic score reaches its UNet."""
    graph = load("sdxl_base_refiner.json")
    result = client.run(graph)
    out = outputs_by_prefix(result)
    refined = pixels(out["sdxl_refined"][0])
    preview = next(image for ref, image in zip(result.image_refs, result.images, strict=True) if ref.kind == "preview")
    assert refined.shape == (64, 64, 3)
    assert not np.array_equal(refined, pixels(preview))  # the refiner changed the base's image
    refiner_positive = next(n for n in nodes_of(graph, "CLIPTextEncodeSDXLRefiner") if n.inputs["ascore"] == 6.0)
    refiner_positive.inputs["ascore"] = 9.0
    rescored = client.run(graph)
    # the refiner's prompt, sampler, decode and save; the base's sampler and decode stay cached
    # (the preview re-encodes its PNG only because the graph embedded in it changed)
    executed = [n.class_type for n in rescored.nodes.values() if n.status == "executed"]
    assert sorted(executed) == [
        "CLIPTextEncodeSDXLRefiner",
        "KSamplerAdvanced",
        "PreviewImage",
        "SaveImage",
        "VAEDecode",
    ]
    assert not np.array_equal(refined, pixels(outputs_by_prefix(rescored)["sdxl_refined"][0]))
