"""LoRA: parsing the kohya and diffusers layouts, the forward hooks, and LoraLoader /
LoraLoaderModelOnly through the real server."""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pytest
import torch
from support import files, lora_files
from support.graph_builder import GraphBuilder, linked
from support.live_server import output_cache
from support.lora_files import kohya, old_diffusers, peft, random_lora, tiny_modules
from torch import nn

from plinth.clients import JobFailed
from plinth.nodes.core.context import ModelHandle, NodeInputError
from plinth.nodes.models.lora import parse_lora, read_lora
from plinth.nodes.models.tiny_sd import TEXT, UNET
from plinth.nodes.patches.lora_hooks import LoraPatch
from plinth.nodes.patches.model_patch import Progress, patched

SEED = 7070  # a seed no other test file samples with, so its base images are this file's own


class FakeContext:
    """What LoraPatch uses of a NodeContext: models come straight from their handles."""

    def model(self, handle: ModelHandle):
        return handle.load()


def real_path(part: str, written: str) -> str:
    """The module path in the loaded model: transformers 5's CLIPTextModel has no text_model level."""
    return written.removeprefix(lora_files.TEXT_PREFIX) if part == "text_encoder" else written


# parsing


@pytest.mark.parametrize("layout", ["kohya", "peft", "old_diffusers"])
def test_every_layout_resolves_to_the_models_module_paths(layout):
    weights = random_lora(seed=1, rank=4, alpha=2.0)
    state, metadata = {
        "kohya": (kohya(weights), None),
        "peft": peft(weights),
        "old_diffusers": (old_diffusers(weights), None),
    }[layout]
    lora = parse_lora(state, metadata, "test.safetensors")
    assert lora.nbytes() == sum(
        4 * (layer.down.numel() + layer.up.numel()) for ls in weights.values() for layer in ls.values()
    )
    modules = tiny_modules()
    for part, layers in weights.items():
        resolved = lora.resolve(part, modules[part])
        assert set(resolved) == {real_path(part, p) for p in layers}
        for written, layer in layers.items():
            got = resolved[real_path(part, written)]
            assert torch.equal(got.down, layer.down) and torch.equal(got.up, layer.up)
            assert got.scale == pytest.approx(2.0 / 4)


def test_text_encoder_paths_resolve_with_or_without_text_model():
    weights = random_lora(seed=1, parts=("text_encoder",))
    bare = {"text_encoder": {real_path("text_encoder", p): layer for p, layer in weights["text_encoder"].items()}}
    encoder = tiny_modules()["text_encoder"]
    a = parse_lora(kohya(weights)).resolve("text_encoder", encoder)
    b = parse_lora(kohya(bare)).resolve("text_encoder", encoder)
    assert set(a) == set(b) and len(a) == 2 * len(lora_files.TEXT_TARGETS)


def test_alpha_from_peft_metadata_pattern_and_defaults():
    layer = {"down": torch.randn(4, 32), "up": torch.randn(32, 4)}
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    state = {
        f"unet.{path}.{proj}.lora_{ab}.weight": layer["down" if ab == "A" else "up"]
        for proj in ("to_q", "to_k")
        for ab in "AB"
    }
    config = {"unet.lora_alpha": 8, "unet.alpha_pattern": {"attn1.to_k": 2}}
    lora = parse_lora(state, {"lora_adapter_metadata": json.dumps(config)})
    scales = {p.rsplit(".", 1)[1]: layer.scale for p, layer in lora.layers["unet"].items()}
    assert scales == {"to_q": 8 / 4, "to_k": 2 / 4}
    assert parse_lora(state).layers["unet"][f"{path}.to_q"].scale == 1.0  # no alpha anywhere: alpha = rank


def _one_layer(name: str = "lora_unet_conv_in") -> dict[str, torch.Tensor]:
    return {f"{name}.lora_down.weight": torch.randn(2, 4, 3, 3), f"{name}.lora_up.weight": torch.randn(32, 2, 1, 1)}


@pytest.mark.parametrize(
    "state, expected",
    [
        (
            {**_one_layer(), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)},
            ["1 keys are not LoRA weights", "model.diffusion_model.input_blocks.0.0.weight"],
        ),
        ({**_one_layer(), "lora_unet_conv_in.dora_scale": torch.ones(32)}, ["lora_unet_conv_in.dora_scale"]),
        (
            {"lora_te3_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 64)},
            ["lora_te3_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"],
        ),
        ({}, ["no LoRA weights"]),
        ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)}, ["lora_unet_conv_in has no up weight"]),
        (
            {
                "lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4),
                "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 3),
            },
            ["lora_unet_conv_in", "not a low-rank pair"],
        ),
        (
            {**_one_layer(), "unet.conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3)},
            ["unet.conv_in has its down weight twice"],
        ),
    ],
)
def test_parse_refuses_what_it_cannot_read(state, expected):
    with pytest.raises(NodeInputError) as info:
        parse_lora(state, None, "bad.safetensors")
    assert "bad.safetensors" in str(info.value)
    for text in expected:
        assert text in str(info.value)


def test_layers_matching_no_module_are_named():
    state = {
        **_one_layer(),
        **_one_layer("lora_unet_input_blocks_40_1_proj_in"),  # original naming, a block tiny-sd lacks
        **_one_layer("lora_unet_down_blocks_7_resnets_0_conv1"),
    }
    lora = parse_lora(state, None, "sdxl.safetensors")
    with pytest.raises(
        NodeInputError,
        match="2 layers match no module of this checkpoint's UNet: "
        "lora_unet_input_blocks_40_1_proj_in, lora_unet_down_blocks_7",
    ):
        lora.resolve("unet", tiny_modules()["unet"])


def test_shapes_that_do_not_fit_the_layer_are_refused():
    state = {
        "lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 1, 1),
        "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1),
    }
    with pytest.raises(
        NodeInputError, match=r"lora_unet_conv_in has down \(2, 4, 1, 1\).*conv_in needs \(2, 4, 3, 3\)"
    ):
        parse_lora(state).resolve("unet", tiny_modules()["unet"])
    norm = {
        "lora_unet_conv_norm_out.lora_down.weight": torch.zeros(2, 32),
        "lora_unet_conv_norm_out.lora_up.weight": torch.zeros(32, 2),
    }
    with pytest.raises(NodeInputError, match="a GroupNorm; LoRA applies to Linear and Conv2d"):
        parse_lora(norm).resolve("unet", tiny_modules()["unet"])


def test_read_lora_refuses_a_file_that_is_not_safetensors(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(NodeInputError, match="junk.safetensors: not a readable .safetensors file"):
        read_lora(tmp_path / "junk.safetensors")


# hooks


def _real_models() -> dict[str, nn.Module]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return {"unet": UNet2DConditionModel(**UNET).eval(), "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT)).eval()}


def _forward(part: str, module: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        if part == "unet":
            return module(
                torch.randn(2, 4, 8, 8, generator=gen), 500, encoder_hidden_states=torch.randn(2, 77, 64, generator=gen)
            ).sample
        return module(torch.randint(0, 49408, (2, 77), generator=gen)).last_hidden_state


def _merged(module: nn.Module, part: str, weights: lora_files.Weights, strength: float) -> None:
    """Add strength * alpha/rank * up @ down into the weights of a copy: what a hook must equal."""
    for written, layer in weights[part].items():
        target = module.get_submodule(real_path(part, written))
        delta = layer.up.flatten(1) @ layer.down.flatten(1) * (strength * layer.alpha / layer.down.shape[0])
        target.weight.data += delta.reshape(target.weight.shape)


@pytest.mark.parametrize("part", ["unet", "text_encoder"])
def test_hooks_equal_merged_weights_stack_and_leave_no_trace(part):
    module = _real_models()[part]
    before = {k: v.clone() for k, v in module.state_dict().items()}
    base = _forward(part, module)
    one, two = random_lora(seed=1, rank=4, alpha=2.0), random_lora(seed=2, rank=2, alpha=1.0)
    lora_one, lora_two = parse_lora(kohya(one)), parse_lora(*peft(two))
    patch_one = LoraPatch(ModelHandle("loras/one", lambda: lora_one), 0.8, part)
    patch_two = LoraPatch(ModelHandle("loras/two", lambda: lora_two), -1.5, part)
    ctx = FakeContext()

    with patched(ctx, [patch_one], module):
        alone = _forward(part, module)
    with patched(ctx, [patch_one, patch_two], module):
        stacked = _forward(part, module)
    after = _forward(part, module)

    reference = copy.deepcopy(module)
    _merged(reference, part, one, 0.8)
    torch.testing.assert_close(alone, _forward(part, reference), rtol=1e-4, atol=1e-4)
    _merged(reference, part, two, -1.5)
    torch.testing.assert_close(stacked, _forward(part, reference), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(alone, base, atol=1e-3) and not torch.allclose(stacked, alone, atol=1e-3)
    assert torch.equal(after, base)
    assert all(not m._forward_hooks for m in module.modules())
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_hooks_come_off_when_the_block_raises():
    module = _real_models()["text_encoder"]
    weights = random_lora(seed=1, parts=("text_encoder",))
    lora = parse_lora(kohya(weights))
    patch = LoraPatch(ModelHandle("loras/one", lambda: lora), 1.0, "text_encoder")
    with pytest.raises(RuntimeError, match="boom"), patched(FakeContext(), [patch], module):
        assert any(m._forward_hooks for m in module.modules())
        raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in module.modules())


def test_call_kwargs_are_empty():
    patch = LoraPatch(ModelHandle("loras/x", lambda: None), 1.0, "unet")
    assert patch.call_kwargs(FakeContext(), [True, False], Progress(1.0, lambda percent: 14.6 * (1 - percent))) == {}


# through the server


@pytest.fixture(scope="module")
def loras(models_dir):
    folder = models_dir / "loras"
    weights = random_lora(seed=11, rank=4, alpha=4.0, gain=2.0)
    files.write(kohya(weights), folder, "style_kohya.safetensors")
    state, metadata = peft(weights)
    files.write(state, folder, "style_peft.safetensors", metadata)
    files.write(old_diffusers(weights), folder, "style_old.safetensors")
    files.write(kohya(random_lora(seed=12, rank=2, alpha=2.0, gain=2.0)), folder, "detail.safetensors")
    foreign = {**kohya(weights), "model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3)}
    files.write(foreign, folder, "foreign.safetensors")
    return folder


def with_loras(graph: dict, *loras: tuple[str, float, float]) -> dict:
    """Chain LoraLoader nodes (name, strength_model, strength_clip) between the checkpoint and
    its users (the sampler and both prompts)."""
    b = GraphBuilder(graph)
    checkpoint, sampler = b.find("CheckpointLoaderSimple"), b.find("KSampler")
    model, clip = checkpoint.out(0), checkpoint.out(1)
    for name, strength_model, strength_clip in loras:
        lora = b.add(
            "LoraLoader",
            model=model,
            clip=clip,
            lora_name=name,
            strength_model=strength_model,
            strength_clip=strength_clip,
        )
        model, clip = lora.out(0), lora.out(1)
    sampler.inputs["model"] = model
    for prompt in ("positive", "negative"):
        linked(sampler.graph, sampler, prompt).inputs["clip"] = clip
    sampler.inputs["seed"] = SEED
    return b.build()


def pixels(client, graph: dict) -> list[np.ndarray]:
    return [np.asarray(image) for image in client.run(graph).images]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=False))


def unet_checksum(server) -> str:
    sd = next(m.model for m in server.components.models.loaded() if m.key.startswith("checkpoints/tiny-sd@"))
    digest = hashlib.sha256()
    for name, tensor in sd.unet.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_loras_are_listed_as_choices(client, loras):
    node = next(n for n in client.list_nodes() if n.class_type == "LoraLoader")
    choices = next(i for i in node.inputs if i.name == "lora_name").choices
    assert {"style_kohya.safetensors", "style_peft.safetensors", "detail.safetensors"} <= set(choices)


def test_strength_zero_is_the_base_image_and_strength_one_is_not(client, loras, txt2img):
    base = pixels(client, with_loras(copy.deepcopy(txt2img)))
    assert same(pixels(client, with_loras(copy.deepcopy(txt2img), ("style_kohya.safetensors", 0.0, 0.0))), base)
    assert not same(pixels(client, with_loras(copy.deepcopy(txt2img), ("style_kohya.safetensors", 1.0, 1.0))), base)


def test_clip_strength_alone_changes_the_image(client, loras, txt2img):
    base = pixels(client, with_loras(copy.deepcopy(txt2img)))
    assert not same(pixels(client, with_loras(copy.deepcopy(txt2img), ("style_kohya.safetensors", 0.0, 1.0))), base)


def test_model_strength_alone_changes_the_image(client, loras, txt2img):
    base = pixels(client, with_loras(copy.deepcopy(txt2img)))
    assert not same(pixels(client, with_loras(copy.deepcopy(txt2img), ("style_kohya.safetensors", 1.0, 0.0))), base)


def test_kohya_and_diffusers_layouts_of_the_same_weights_give_the_same_image(client, loras, txt2img):
    images = [
        pixels(client, with_loras(copy.deepcopy(txt2img), (name, 1.0, 1.0)))
        for name in ("style_kohya.safetensors", "style_peft.safetensors", "style_old.safetensors")
    ]
    assert same(images[0], images[1]) and same(images[0], images[2])


def test_stacked_loras_differ_from_either_alone(client, loras, txt2img):
    style = pixels(client, with_loras(copy.deepcopy(txt2img), ("style_kohya.safetensors", 1.0, 1.0)))
    detail = pixels(client, with_loras(copy.deepcopy(txt2img), ("detail.safetensors", 1.0, 1.0)))
    both = pixels(
        client,
        with_loras(copy.deepcopy(txt2img), ("style_kohya.safetensors", 1.0, 1.0), ("detail.safetensors", 1.0, 1.0)),
    )
    assert not same(both, style) and not same(both, detail) and not same(style, detail)


def test_a_plain_run_after_a_lora_run_is_the_base_image(server, client, loras, txt2img):
    base = pixels(client, with_loras(copy.deepcopy(txt2img)))
    checksum = unet_checksum(server)
    pixels(
        client,
        with_loras(copy.deepcopy(txt2img), ("style_kohya.safetensors", 1.0, 1.0), ("detail.safetensors", -2.0, 0.5)),
    )
    output_cache(server).clear()  # make the plain graph run again instead of coming from the cache
    again = client.run(with_loras(copy.deepcopy(txt2img)))
    assert {"KSampler", "CLIPTextEncode"} <= {n.class_type for n in again.nodes.values() if n.status == "executed"}
    assert same([np.asarray(i) for i in again.images], base)
    assert unet_checksum(server) == checksum


def test_model_only_lora_changes_the_image_and_keeps_prompts_cached(client, loras, txt2img):
    b = GraphBuilder(with_loras(copy.deepcopy(txt2img)))
    base = pixels(client, b.build())
    sampler = b.find("KSampler")
    lora = b.add(
        "LoraLoaderModelOnly",
        model=b.find("CheckpointLoaderSimple").out(0),
        lora_name="style_kohya.safetensors",
        strength_model=1.0,
    )
    sampler.inputs["model"] = lora.out(0)
    graph = b.build()
    result = client.run(graph)
    status = {nid: n.status for nid, n in result.nodes.items()}
    positive, negative = linked(graph, sampler, "positive"), linked(graph, sampler, "negative")
    assert status[positive.id] == status[negative.id] == "cached"
    assert status[lora.id] == status[sampler.id] == "executed"
    assert not same([np.asarray(i) for i in result.images], base)


def test_a_file_with_foreign_keys_fails_the_job_and_the_server_keeps_serving(client, loras, txt2img):
    with pytest.raises(JobFailed) as info:
        client.run(with_loras(copy.deepcopy(txt2img), ("foreign.safetensors", 1.0, 1.0)))
    message = info.value.result.error
    assert "foreign.safetensors" in message and "model.diffusion_model.out.2.weight" in message
    assert "LoraLoader" in message
    assert client.run(with_loras(copy.deepcopy(txt2img))).status == "completed"
