"""IP-Adapter through the real server: a reference image steers tiny-sd, weight 0 and an unused
schedule window change nothing, the shared UNet is left as it was, and wrong files fail clearly.

The CLIP vision encoder and the adapters are small random-weight files in the real layouts
(tests/support/ipadapter_files.py); their images mean nothing, but every code path is the one a
real ip-adapter_sd15 with ViT-H takes.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from support import files, ipadapter_files
from support.graph_builder import GraphBuilder, node_of
from support.live_server import executed, output_cache

from plinth.clients import JobFailed, PlinthError
from plinth.nodes.core.context import NodeInputError
from plinth.nodes.models.clip_vision import clip_vision_config, encode_image, load_clip_vision
from plinth.nodes.models.ipadapter import load_ipadapter

CPU = torch.device("cpu")
CLIP = "tiny-clip-vision.safetensors"
PLAIN = "tiny-ip-adapter_sd15.safetensors"
PLUS = "tiny-ip-adapter-plus_sd15.safetensors"


@pytest.fixture(scope="module")
def ip_dir(models_dir):
    clip, ip = models_dir / "clip_vision", models_dir / "ipadapter"
    files.write(ipadapter_files.clip_vision(), clip, CLIP)
    files.write(ipadapter_files.clip_vision(prefixed=False), clip, "bare-clip-vision.safetensors")
    files.write(ipadapter_files.clip_vision(projection=48), clip, "clip-vision-proj48.safetensors")
    files.write({"weight": torch.zeros(4, 4)}, clip, "not-clip.safetensors")
    files.write(ipadapter_files.plain(), ip, PLAIN)
    files.write(ipadapter_files.plus(), ip, PLUS)
    files.write(ipadapter_files.plain(cross=96), ip, "sdxl-like.safetensors")  # wider text tokens
    files.write(ipadapter_files.plain(layers={1: 32, 3: 32}), ip, "too-few-layers.safetensors")
    files.write(
        {
            "image_proj.proj.0.weight": torch.zeros(4, 4),
            "image_proj.proj.2.weight": torch.zeros(4, 4),
            "image_proj.norm.weight": torch.zeros(4),
            "ip_adapter.1.to_k_ip.weight": torch.zeros(4, 4),
        },
        ip,
        "faceid-like.safetensors",
    )
    (ip / "damaged.safetensors").write_bytes(b"not a safetensors file")
    return models_dir


def png(seed: int, size: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def with_ipadapter(graph: dict, adapter: str = PLAIN, clip: str | None = CLIP, **inputs) -> dict:
    """The txt2img graph with KSampler's model passed through IPAdapterAdvanced, the reference
    image coming in as ref.png."""
    b = GraphBuilder(graph)
    image = b.add("LoadImage", image="ref.png")
    loader = b.add("IPAdapterModelLoader", ipadapter_file=adapter)
    model = b.find("CheckpointLoaderSimple").out(0)
    apply = b.add("IPAdapterAdvanced", model=model, ipadapter=loader.out(0), image=image.out(0), **inputs)
    if clip is not None:
        apply.inputs["clip_vision"] = b.add("CLIPVisionLoader", clip_name=clip).out(0)
    b.find("KSampler").inputs["model"] = apply.out(0)
    return b.build()


def pixels(client, graph: dict, ref: int = 1, **images: bytes) -> np.ndarray:
    result = client.run(graph, inputs={"ref.png": png(ref), **images})
    return np.stack([np.asarray(image) for image in result.images])


def test_weight_zero_gives_exactly_the_image_without_ip_adapter(client, ip_dir, txt2img):
    base = pixels(client, txt2img)
    assert np.array_equal(pixels(client, with_ipadapter(txt2img, weight=0.0)), base)


def test_reference_image_steers_the_image(client, ip_dir, txt2img):
    base = pixels(client, txt2img)
    first = pixels(client, with_ipadapter(txt2img, weight=1.0), ref=1)
    second = pixels(client, with_ipadapter(txt2img, weight=1.0), ref=2)
    assert not np.array_equal(first, base)
    assert not np.array_equal(first, second)
    assert np.abs(first.astype(int) - base).mean() > 1  # a real change, not rounding
    # the same encoder saved without the "vision_model." prefix loads as the same model
    bare = with_ipadapter(txt2img, clip="bare-clip-vision.safetensors", weight=1.0)
    assert np.array_equal(pixels(client, bare, ref=1), first)


def test_several_reference_images_concatenate_their_tokens(client, ip_dir, txt2img):
    frames = [Image.open(io.BytesIO(png(seed))) for seed in (1, 2)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])  # one IMAGE batch of 2
    both = pixels(client, with_ipadapter(txt2img, weight=1.0), **{"ref.png": buffer.getvalue()})
    assert not np.array_equal(both, pixels(client, with_ipadapter(txt2img, weight=1.0), ref=1))
    assert not np.array_equal(both, pixels(client, with_ipadapter(txt2img, weight=1.0), ref=2))


def test_ip_adapter_run_leaves_the_shared_unet_as_it_was(client, server, ip_dir, txt2img):
    from diffusers.models.attention_processor import AttnProcessor2_0

    node_of(txt2img, "KSampler").inputs["seed"] = 4242
    base = pixels(client, txt2img)
    pixels(client, with_ipadapter(txt2img, weight=1.0))
    output_cache(server).clear()  # so the plain graph below really samples again
    result = client.run(txt2img)
    assert "KSampler" in executed(result)
    assert np.array_equal(np.stack([np.asarray(i) for i in result.images]), base)
    unet = next(m.model for m in server.components.models.loaded() if m.key.startswith("checkpoints/tiny-sd@")).unet
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}
    assert unet.encoder_hid_proj is None and "encoder_hid_proj" not in unet._modules
    assert unet.config.encoder_hid_dim_type is None


def test_schedule_window_bounds_where_the_adapter_acts(client, ip_dir, txt2img):
    node_of(txt2img, "KSampler").inputs["steps"] = 3
    base = pixels(client, txt2img)
    full = pixels(client, with_ipadapter(txt2img, weight=1.0))
    # 3 euler steps (timesteps 999, 499.5, 0) sit at 0.001, 0.5005 and 1.0 of the schedule
    assert np.array_equal(pixels(client, with_ipadapter(txt2img, weight=1.0, start_at=0.6, end_at=0.9)), base)
    early = pixels(client, with_ipadapter(txt2img, weight=1.0, start_at=0.0, end_at=0.2))
    assert not np.array_equal(early, base) and not np.array_equal(early, full)


def test_image_negative_replaces_the_blank_unconditional_image(client, ip_dir, txt2img):
    blank = pixels(client, with_ipadapter(txt2img, weight=1.0))
    b = GraphBuilder(with_ipadapter(txt2img, weight=1.0))
    b.find("IPAdapterAdvanced").inputs["image_negative"] = b.add("LoadImage", image="neg.png").out(0)
    graph = b.build()
    assert not np.array_equal(pixels(client, graph, **{"neg.png": png(7)}), blank)


def test_plus_adapter_reads_hidden_states(client, ip_dir, txt2img):
    base = pixels(client, txt2img)
    assert np.array_equal(pixels(client, with_ipadapter(txt2img, PLUS, weight=0.0)), base)
    assert not np.array_equal(pixels(client, with_ipadapter(txt2img, PLUS, weight=1.0)), base)


def test_exported_graph_inputs_with_other_behaviour_are_refused(client, ip_dir, txt2img):
    for inputs, refusal in (
        (dict(weight_type="style transfer"), ("weight_type", "value_not_in_list")),
        (dict(start_at=0.8, end_at=0.2), ("end_at", "custom_validation_failed")),
    ):
        graph = with_ipadapter(txt2img, **inputs)
        with pytest.raises(PlinthError) as refused:
            client.run(graph, inputs={"ref.png": png(1)})
        apply = node_of(graph, "IPAdapterAdvanced").id
        assert refusal in {(e.input, e.code) for e in refused.value.errors if e.node_id == apply}
    # cubiq's defaults are what Plinth does, so a graph exported with them runs
    graph = with_ipadapter(txt2img, weight=0.5, weight_type="linear", combine_embeds="concat", embeds_scaling="V only")
    assert pixels(client, graph).shape == (2, 64, 64, 3)


@pytest.mark.parametrize(
    "change, class_type, message",
    [
        (dict(clip=None), "IPAdapterAdvanced", "clip_vision input linked to a CLIPVisionLoader"),
        (dict(clip="not-clip.safetensors"), "CLIPVisionLoader", "not a CLIP vision model"),
        (
            dict(clip="clip-vision-proj48.safetensors"),
            "IPAdapterAdvanced",
            "reads CLIP vision image embeddings 32 wide",
        ),
        (dict(adapter="damaged.safetensors"), "IPAdapterModelLoader", "not a readable .safetensors file"),
        (dict(adapter="faceid-like.safetensors"), "IPAdapterModelLoader", "unsupported IP-Adapter variant"),
        (dict(adapter="sdxl-like.safetensors"), "IPAdapterAdvanced", "made for another base model"),
        (dict(adapter="too-few-layers.safetensors"), "IPAdapterAdvanced", "made for another base model"),
    ],
)
def test_wrong_files_fail_clearly_and_the_server_keeps_serving(client, ip_dir, txt2img, change, class_type, message):
    graph = with_ipadapter(txt2img, weight=1.0, **change)
    with pytest.raises(JobFailed) as failed:
        client.run(graph, inputs={"ref.png": png(1)})
    assert message in failed.value.result.error
    assert f"in node {node_of(graph, class_type).id} " in failed.value.result.error
    assert len(client.run(txt2img).images) == 2


def test_one_ip_adapter_per_model(client, ip_dir, txt2img):
    b = GraphBuilder(with_ipadapter(txt2img, weight=1.0))
    first = b.find("IPAdapterAdvanced")
    shared = {name: first.inputs[name] for name in ("ipadapter", "image", "clip_vision")}
    second = b.add("IPAdapterAdvanced", model=first.out(0), **shared)
    b.find("KSampler").inputs["model"] = second.out(0)
    graph = b.build()
    with pytest.raises(JobFailed) as failed:
        client.run(graph, inputs={"ref.png": png(1)})
    assert "one IP-Adapter per model" in failed.value.result.error


# in-process: the file layouts load as the models they were written from


def test_clip_vision_file_loads_as_the_model_it_was_saved_from(tmp_path):
    from transformers import CLIPVisionModelWithProjection

    original = CLIPVisionModelWithProjection(ipadapter_files.clip_vision_config())
    original.load_state_dict(ipadapter_files.clip_vision(seed=3))
    bare = load_clip_vision(
        files.write(ipadapter_files.clip_vision(seed=3, prefixed=False), tmp_path, "b.safetensors"), CPU, torch.float32
    )
    image = torch.rand(1, 40, 64, 3)
    encoded = encode_image(bare, image, crop=True)
    pixel_values = (
        F.interpolate(image.movedim(-1, 1), size=(32, 51), mode="bicubic", antialias=True).clamp(0, 1)[:, :, :, 9:41]
        - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    ) / torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    expected = original(pixel_values=pixel_values, output_hidden_states=True)
    assert torch.allclose(encoded.image_embeds, expected.image_embeds, atol=1e-5)
    assert torch.allclose(encoded.penultimate_hidden_states, expected.hidden_states[-2], atol=1e-5)
    assert encode_image(bare, image, crop=False).image_embeds.shape == (1, 32)


def test_clip_vision_folder_loads_and_needs_the_projection(tmp_path):
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    config = ipadapter_files.clip_vision_config()
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "with-projection")
    CLIPVisionModel(config).save_pretrained(tmp_path / "without")
    assert load_clip_vision(tmp_path / "with-projection", CPU, torch.float32).config.projection_dim == 32
    with pytest.raises(NodeInputError, match="visual_projection.weight"):
        load_clip_vision(tmp_path / "without", CPU, torch.float32)


@pytest.mark.parametrize("hidden, layers, act", [(1280, 32, "gelu"), (1024, 24, "quick_gelu")])
def test_clip_vision_architecture_is_read_off_the_shapes(hidden, layers, act):
    shapes = {
        "vision_model.embeddings.patch_embedding.weight": (hidden, 3, 14, 14),
        "vision_model.embeddings.position_embedding.weight": (257, hidden),
        "vision_model.encoder.layers.0.mlp.fc1.weight": (4 * hidden, hidden),
        "visual_projection.weight": (1024 if hidden == 1280 else 768, hidden),
        **{f"vision_model.encoder.layers.{n}.layer_norm1.weight": (hidden,) for n in range(layers)},
    }
    config = clip_vision_config(shapes, "x.safetensors")
    assert (
        config.image_size,
        config.patch_size,
        config.num_attention_heads,
        config.num_hidden_layers,
        config.hidden_act,
    ) == (224, 14, hidden // 64, layers, act)


def _reference_resampler(state: dict[str, torch.Tensor], x: torch.Tensor, heads: int = 1) -> torch.Tensor:
    """The plus adapter's Resampler written from its description: latent queries attend to the
    image tokens and themselves (keys and values from one to_kv), then a feed-forward, each with
    a residual; original key names."""
    w = {k.removeprefix("image_proj."): v for k, v in state.items() if k.startswith("image_proj.")}
    ln = lambda t, p: F.layer_norm(t, t.shape[-1:], w[f"{p}.weight"], w[f"{p}.bias"])  # noqa: E731
    x = F.linear(x, w["proj_in.weight"], w["proj_in.bias"])
    latents = w["latents"].repeat(len(x), 1, 1)
    for n in range(len({k.split(".")[1] for k in w if k.startswith("layers.")})):
        p = f"layers.{n}"
        xs, ls = ln(x, f"{p}.0.norm1"), ln(latents, f"{p}.0.norm2")
        q = F.linear(ls, w[f"{p}.0.to_q.weight"])
        k, v = F.linear(torch.cat([xs, ls], dim=1), w[f"{p}.0.to_kv.weight"]).chunk(2, dim=-1)
        split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
        attn = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(q.shape[-1] // heads), dim=-1)
        latents = F.linear((attn @ split(v)).transpose(1, 2).flatten(2), w[f"{p}.0.to_out.weight"]) + latents
        ff = F.linear(F.gelu(F.linear(ln(latents, f"{p}.1.0"), w[f"{p}.1.1.weight"])), w[f"{p}.1.3.weight"])
        latents = ff + latents
    return ln(F.linear(latents, w["proj_out.weight"], w["proj_out.bias"]), "norm_out")


@pytest.mark.parametrize("layout", ["flattened", "nested"])
def test_adapter_layouts_convert_to_the_same_projection(tmp_path, layout):
    path = tmp_path / "adapter.safetensors"
    for kind, state, features in (
        ("plain", ipadapter_files.plain(seed=5), torch.randn(3, 32)),
        ("plus", ipadapter_files.plus(seed=5), torch.randn(3, 17, 64)),
    ):
        adapter = load_ipadapter(
            path, CPU, torch.float32, state=ipadapter_files.nested(state) if layout == "nested" else state
        )
        assert adapter.kind == kind and sorted(adapter.layers) == [1, 3, 5, 7]
        assert torch.equal(adapter.layers[7][1], state["ip_adapter.7.to_v_ip.weight"])
        with torch.no_grad():
            tokens = adapter.image_proj(features)
        if kind == "plain":
            expected = F.layer_norm(
                F.linear(features, state["image_proj.proj.weight"], state["image_proj.proj.bias"]).reshape(3, 4, 64),
                (64,),
                state["image_proj.norm.weight"],
                state["image_proj.norm.bias"],
            )
        else:
            expected = _reference_resampler(state, features)
        assert torch.allclose(tokens, expected, atol=1e-5)


def test_unreadable_adapter_state_is_a_clear_error(tmp_path):
    with pytest.raises(NodeInputError, match="not an IP-Adapter file"):
        load_ipadapter(tmp_path / "x.safetensors", CPU, torch.float32, state={"weight": torch.zeros(2)})
