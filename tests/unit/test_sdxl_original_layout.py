"""The SDXL original-layout writer (tests/support/sdxl_original_layout.py) against diffusers' own converters.

Plinth's SDXL checkpoint loader is tested with files from this writer, so the writer must be right on its own:
a file it writes, converted forward with diffusers' single-file converters (written against the real released
files), must give back every tensor of the models it was written from, bit for bit, with no key left over or
missing. The random, perturbed weights make a swapped mapping fail. A few literal key names of the real
sd_xl_base_1.0 / sd_xl_refiner_1.0 files are checked too, so that a writer and converter agreeing on a wrong name
cannot pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from support.sd_original_layout import UNET_PREFIX, VAE_PREFIX
from support.sdxl_original_layout import (
    CLIP_G_PREFIX,
    CLIP_L_PREFIX,
    REFINER_CLIP_G_PREFIX,
    TIME_EMBED_DIM,
    build_random_sdxl,
    small_sdxl_configs,
    write_sdxl_checkpoint,
)

Written = tuple[dict, dict[str, torch.Tensor]]


def _written(refiner: bool, tmp_path_factory: pytest.TempPathFactory) -> Written:
    models = build_random_sdxl(small_sdxl_configs(refiner=refiner), seed=3)
    path = tmp_path_factory.mktemp("sdxl") / "model.safetensors"
    write_sdxl_checkpoint(path, models)
    return models, safetensors.torch.load_file(str(path))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Written:
    """(models, tensors read back from the written file) for the base, built once per module."""
    return _written(False, tmp_path_factory)


@pytest.fixture(scope="module")
def refiner(tmp_path_factory: pytest.TempPathFactory) -> Written:
    """(models, tensors read back from the written file) for the refiner, built once per module."""
    return _written(True, tmp_path_factory)


@pytest.fixture(params=["base", "refiner"])
def written(request: pytest.FixtureRequest) -> Written:
    return request.getfixturevalue(request.param)


def _assert_same(converted: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(converted) == sorted(expected)
    for key, tensor in expected.items():
        assert converted[key].shape == tensor.shape, key
        assert torch.equal(converted[key], tensor), key


def test_unet_round_trips_through_diffusers(written: Written) -> None:
    models, state = written
    unet = models["unet"]
    _assert_same(convert_ldm_unet_checkpoint(state, dict(unet.config)), unet.state_dict())
    assert sum(key.startswith(UNET_PREFIX) for key in state) == len(unet.state_dict())


def test_vae_round_trips_through_diffusers(written: Written) -> None:
    models, state = written
    vae = models["vae"]
    _assert_same(convert_ldm_vae_checkpoint(state, dict(vae.config)), vae.state_dict())
    assert state[VAE_PREFIX + "decoder.mid.attn_1.q.weight"].ndim == 4  # a 1x1 conv in the original model


def test_clip_g_round_trips_through_diffusers(written: Written) -> None:
    models, state = written
    clip_g = models["text_encoder_2"]
    prefix = CLIP_G_PREFIX if models["text_encoder"] is not None else REFINER_CLIP_G_PREFIX
    # transformers 5.x: CLIPTextModelWithProjection still wraps a CLIPTextModel as `text_model`, so its keys are
    # `text_model.encoder...` plus `text_projection.weight`: exactly what convert_open_clip_checkpoint produces.
    converted = convert_open_clip_checkpoint(clip_g, state, prefix=prefix)
    _assert_same(converted, clip_g.state_dict())

    config = clip_g.config
    width, layers = config.hidden_size, config.num_hidden_layers
    assert state[prefix + "positional_embedding"].shape == (77, width)
    assert state[prefix + "text_projection"].shape == (width, config.projection_dim)
    assert state[prefix + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
    assert state[prefix + "logit_scale"].ndim == 0
    # open_clip fuses q/k/v (6 tensors -> 2 per layer) and adds logit_scale; nothing else is under the prefix.
    assert sum(key.startswith(prefix) for key in state) == len(clip_g.state_dict()) - 4 * layers + 1


def test_clip_l_round_trips_through_diffusers(written: Written) -> None:
    models, state = written
    clip_l = models["text_encoder"]
    if clip_l is None:
        assert not any(key.startswith("conditioner.embedders.1.") for key in state)
        assert not any(".transformer.text_model." in key for key in state)
        return
    # diffusers strips `conditioner.embedders.0.transformer.` and yields `text_model.`-prefixed keys, the layout of
    # transformers < 5.6. transformers 5.x flattened CLIPTextModel (its keys start at `embeddings.`), and diffusers'
    # create_diffusers_clip_model_from_ldm strips `text_model.` again when the model has no such attribute: do that.
    converted = convert_ldm_clip_checkpoint(state)
    if not hasattr(clip_l, "text_model"):
        converted = {key.removeprefix("text_model."): tensor for key, tensor in converted.items()}
    position_ids = converted.pop("embeddings.position_ids", None)
    if position_ids is None:
        position_ids = converted.pop("text_model.embeddings.position_ids")
    assert position_ids.dtype == torch.int64
    assert torch.equal(position_ids, torch.arange(77)[None])
    _assert_same(converted, clip_l.state_dict())


def test_every_key_belongs_to_one_model(written: Written) -> None:
    models, state = written
    prefixes = [UNET_PREFIX, VAE_PREFIX]
    prefixes += [CLIP_L_PREFIX, CLIP_G_PREFIX] if models["text_encoder"] is not None else [REFINER_CLIP_G_PREFIX]
    assert all(sum(key.startswith(p) for p in prefixes) == 1 for key in state)


def test_base_literal_keys(base: Written) -> None:
    models, state = base
    unet = dict(models["unet"].config)
    for key in (
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.2.self_attn.q_proj.weight",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "conditioner.embedders.1.model.transformer.resblocks.2.mlp.c_proj.bias",
        "conditioner.embedders.1.model.ln_final.weight",
        "conditioner.embedders.1.model.token_embedding.weight",
        "model.diffusion_model.label_emb.0.2.bias",
        "model.diffusion_model.input_blocks.4.1.proj_in.weight",
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.2.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.2.ff.net.2.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",  # upsampler after a cross-attention level
        "first_stage_model.decoder.up.3.block.2.conv2.weight",
    ):
        assert key in state, key
    assert state["model.diffusion_model.input_blocks.4.1.proj_in.weight"].ndim == 2  # linear projection
    label_emb = state["model.diffusion_model.label_emb.0.0.weight"]
    assert label_emb.shape[1] == unet["projection_class_embeddings_input_dim"] == 64 + 6 * TIME_EMBED_DIM
    to_k = state["model.diffusion_model.input_blocks.7.1.transformer_blocks.2.attn2.to_k.weight"]
    assert to_k.shape == (128, unet["cross_attention_dim"]) and unet["cross_attention_dim"] == 64 + 128
    assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.3.attn2.to_k.weight" not in state
    assert "model.diffusion_model.input_blocks.9.0.op.weight" not in state  # the last level has no downsampler


def test_refiner_literal_keys(refiner: Written) -> None:
    models, state = refiner
    unet = dict(models["unet"].config)
    for key in (
        "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight",
        "conditioner.embedders.0.model.text_projection",
        "conditioner.embedders.0.model.logit_scale",
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.9.0.op.weight",  # the third level downsamples into a fourth
        "model.diffusion_model.output_blocks.2.1.conv.weight",  # upsampler after a level without attention
        "model.diffusion_model.middle_block.1.transformer_blocks.1.attn1.to_q.weight",
    ):
        assert key in state, key
    assert not any(key.startswith("conditioner.embedders.1.") for key in state)
    assert not any(key.startswith("model.diffusion_model.input_blocks.1.1.") for key in state)  # DownBlock2D
    label_emb = state["model.diffusion_model.label_emb.0.0.weight"]
    assert label_emb.shape[1] == unet["projection_class_embeddings_input_dim"] == 64 + 5 * TIME_EMBED_DIM
    to_k = state["model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"]
    assert to_k.shape == (64, unet["cross_attention_dim"]) and unet["cross_attention_dim"] == 128


def test_configs_follow_sdxl_conventions() -> None:
    base, refiner = small_sdxl_configs(), small_sdxl_configs(refiner=True)
    assert base["unet"]["attention_head_dim"] == [1, 1, 2]
    assert refiner["unet"]["attention_head_dim"] == [1, 1, 2, 2]
    assert base["unet"]["addition_time_embed_dim"] == refiner["unet"]["addition_time_embed_dim"] == 256
    assert base["text_encoder"]["hidden_size"] // base["text_encoder"]["num_attention_heads"] == 64
    clip_g = base["text_encoder_2"]
    assert clip_g["hidden_size"] // clip_g["num_attention_heads"] == 64 and clip_g["hidden_act"] == "gelu"
    assert refiner["text_encoder"] is None
    assert base["vae"]["scaling_factor"] == 0.13025


def test_build_is_seeded_and_leaves_the_global_rng_alone(refiner: Written) -> None:
    before = torch.random.get_rng_state()
    again = build_random_sdxl(small_sdxl_configs(refiner=True), seed=3)  # the fixture's seed
    assert torch.equal(torch.random.get_rng_state(), before)
    first = refiner[0]
    assert first["text_encoder"] is None and again["text_encoder"] is None
    for name in ("unet", "vae", "text_encoder_2"):
        assert not first[name].training
        for (key, a), b in zip(first[name].state_dict().items(), again[name].state_dict().values(), strict=True):
            assert torch.equal(a, b), (name, key)


def test_dtype_casts_floats_only(base: Written, tmp_path: Path) -> None:
    path = tmp_path / "half.safetensors"
    write_sdxl_checkpoint(path, base[0], dtype=torch.float16)
    state = safetensors.torch.load_file(str(path))
    assert state[CLIP_L_PREFIX + "embeddings.position_ids"].dtype == torch.int64
    assert {t.dtype for key, t in state.items() if not key.endswith("position_ids")} == {torch.float16}
    assert state.keys() == base[1].keys()
