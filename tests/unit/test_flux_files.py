"""FLUX.1 transformers from Black Forest Labs' single-file layout (plinth.nodes.models.flux).

Small random transformers are written in BFL's layout by tests/support/flux_files.py (its own mapping, written from
the diffusers modules) and loaded back through Plinth's converter: every weight must come back bit for bit, the
config read from the shapes must be the one the model was built with, and the forward must agree. fp8 and
ComfyUI's scaled-fp8 files load dequantised; a file with a weight missing, or an MLP of another width, fails
naming it. The released FLUX.1-dev size is checked on the meta device (shapes only, no memory).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from support.flux_files import (
    COMFY_PREFIX,
    build_random_flux,
    small_flux_config,
    to_bfl_state_dict,
    write_flux_file,
)

from plinth.nodes.core.context import NodeInputError
from plinth.nodes.models.flux import (
    BFL_PREFIX,
    dequantize_fp8,
    detect_flux,
    flux_variant,
    infer_flux_config,
    load_flux_transformer,
)

VARIANTS = ("dev", "schnell", "fill")


@pytest.fixture(scope="module")
def models() -> dict[str, FluxTransformer2DModel]:
    """One small random transformer per variant, built once per module."""
    return {v: build_random_flux(small_flux_config(v), seed=i) for i, v in enumerate(VARIANTS)}


def _write(tmp_path: Path, model: FluxTransformer2DModel, **kwargs) -> dict[str, torch.Tensor]:
    path = tmp_path / "flux1.safetensors"
    write_flux_file(path, model, **kwargs)
    return safetensors.torch.load_file(str(path))


def _forward(model: FluxTransformer2DModel) -> torch.Tensor:
    config = model.config
    gen = torch.Generator().manual_seed(5)
    rows, cols, text = 3, 4, 8
    img_ids = torch.zeros(rows * cols, 3)
    img_ids[:, 1] = torch.arange(rows).repeat_interleave(cols).float()
    img_ids[:, 2] = torch.arange(cols).repeat(rows).float()
    inputs = {
        "hidden_states": torch.randn(1, rows * cols, config.in_channels, generator=gen),
        "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=gen),
        "timestep": torch.tensor([0.7]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text, 3),
        "guidance": torch.tensor([3.5]) if config.guidance_embeds else None,
    }
    with torch.no_grad():
        return model(**inputs).sample


def _assert_same_weights(loaded: FluxTransformer2DModel, source: FluxTransformer2DModel) -> None:
    got, want = loaded.state_dict(), source.state_dict()
    assert got.keys() == want.keys()
    different = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not different, f"weights differ after the round trip: {different[:5]}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfl_file_loads_back_exactly(variant: str, models: dict, tmp_path: Path) -> None:
    source = models[variant]
    state = _write(tmp_path, source)
    assert detect_flux(state) and not any(k.startswith(BFL_PREFIX) for k in state)
    assert ("guidance_in.in_layer.weight" in state) == (variant != "schnell")

    config = infer_flux_config({k: tuple(v.shape) for k, v in state.items()})
    assert config == small_flux_config(variant)
    loaded = load_flux_transformer(state, f"flux1-{variant}.safetensors", torch.float32)
    assert flux_variant(loaded.config) == variant
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    _assert_same_weights(loaded, source)
    torch.testing.assert_close(_forward(loaded), _forward(source), rtol=0, atol=1e-5)


def test_comfyui_all_in_one_layout_loads_the_transformer(models: dict, tmp_path: Path) -> None:
    state = _write(tmp_path, models["dev"], prefix=COMFY_PREFIX)
    assert all(k.startswith(BFL_PREFIX) for k in state) and detect_flux(state)
    # The checkpoint's other parts sit beside the transformer and are not this loader's.
    state["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
    state["vae.decoder.conv_in.weight"] = torch.ones(4, 4, 3, 3)
    assert infer_flux_config({k: tuple(v.shape) for k, v in state.items()}) == small_flux_config("dev")
    _assert_same_weights(load_flux_transformer(state, "flux1-dev-fp8.safetensors", torch.float32), models["dev"])


def test_detect_flux_reads_key_names() -> None:
    assert detect_flux(["double_blocks.0.img_attn.qkv.weight", "img_in.weight"])
    assert detect_flux([BFL_PREFIX + "double_blocks.0.img_attn.qkv.weight"])
    assert not detect_flux([BFL_PREFIX + "input_blocks.0.0.weight", "conditioner.embedders.1.model.ln_final.weight"])
    assert not detect_flux(["transformer_blocks.0.attn.to_q.weight"])  # diffusers' own layout


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
def test_fp8_file_loads_dequantised(fp8: torch.dtype, models: dict, tmp_path: Path) -> None:
    source = models["dev"]
    state = _write(tmp_path, source, dtype=fp8)
    assert all(v.dtype == fp8 for v in state.values())
    loaded = load_flux_transformer(state, "flux1-dev-fp8.safetensors", torch.float32)
    rounded = copy.deepcopy(source)
    with torch.no_grad():
        for param in rounded.parameters():
            param.copy_(param.to(fp8).float())
    _assert_same_weights(loaded, rounded)


def test_scaled_fp8_file_dequantises_within_fp8_rounding(models: dict, tmp_path: Path) -> None:
    source = models["dev"]
    state = _write(tmp_path, source, prefix=COMFY_PREFIX, scaled_fp8=True)
    marker_and_scales = [k for k in state if k.endswith(("scaled_fp8", ".scale_weight", ".scale_input"))]
    assert BFL_PREFIX + "scaled_fp8" in marker_and_scales and len(marker_and_scales) > 1

    plain = dequantize_fp8(state)
    assert plain.keys() == state.keys() - set(marker_and_scales)
    assert all(v.dtype == torch.float32 for v in plain.values())

    loaded = to_bfl_state_dict(load_flux_transformer(state, "flux1-dev-fp8-scaled.safetensors", torch.float32))
    want = to_bfl_state_dict(source)
    assert loaded.keys() == want.keys()
    for key, value in want.items():
        scale_key = f"{BFL_PREFIX}{key.removesuffix('.weight')}.scale_weight"
        if scale_key not in state:  # biases and norm scales are stored unscaled, in full precision
            assert torch.equal(loaded[key], value), key
            continue
        scale = state[scale_key]
        assert state[BFL_PREFIX + key].dtype == torch.float8_e4m3fn
        torch.testing.assert_close(loaded[key], state[BFL_PREFIX + key].float() * scale, rtol=0, atol=0)
        # within e4m3fn's rounding: half a step of its 3-bit mantissa, or of its smallest subnormal (2^-9)
        bound = value.abs() / 16 + scale * 2**-10
        assert bool(((loaded[key] - value).abs() <= bound * 1.0001).all()), key


def test_missing_weight_is_named(models: dict, tmp_path: Path) -> None:
    state = _write(tmp_path, models["schnell"])
    del state["single_blocks.1.linear2.weight"]
    with pytest.raises(NodeInputError, match=r"flux1-schnell\.safetensors.*single_blocks\.1\.linear2\.weight"):
        load_flux_transformer(state, "flux1-schnell.safetensors", torch.float32)


def test_misshapen_weight_is_named(models: dict, tmp_path: Path) -> None:
    state = _write(tmp_path, models["dev"])
    state["double_blocks.1.img_attn.proj.weight"] = state["double_blocks.1.img_attn.proj.weight"][:, :32]
    with pytest.raises(NodeInputError, match=r"wrong shape.*transformer_blocks\.1\.attn\.to_out\.0\.weight"):
        load_flux_transformer(state, "flux1-dev.safetensors", torch.float32)


def test_other_mlp_ratio_is_refused_by_name(models: dict, tmp_path: Path) -> None:
    state = _write(tmp_path, models["dev"])
    hidden = state["img_in.weight"].shape[0]
    for key in list(state):  # cut every MLP to 3x the width (single blocks: the MLP part of linear1)
        if ".img_mlp.0." in key or ".txt_mlp.0." in key:
            state[key] = state[key][: 3 * hidden]
        elif ".img_mlp.2.weight" in key or ".txt_mlp.2.weight" in key:
            state[key] = state[key][:, : 3 * hidden]
        elif key.endswith("linear1.weight") or key.endswith("linear1.bias"):
            state[key] = state[key][: 6 * hidden]
        elif key.endswith("linear2.weight"):
            state[key] = state[key][:, : 4 * hidden]
    with pytest.raises(NodeInputError, match=r"flux1-dev\.safetensors.*img_mlp\.0\.weight.*mlp ratio of 3\b"):
        load_flux_transformer(state, "flux1-dev.safetensors", torch.float32)


def test_heads_that_do_not_split_into_rotary_axes_are_refused(models: dict, tmp_path: Path) -> None:
    shapes = {k: tuple(v.shape) for k, v in to_bfl_state_dict(models["dev"]).items()}
    shapes["double_blocks.0.img_attn.norm.query_norm.scale"] = (16,)
    with pytest.raises(NodeInputError, match="rotary"):
        infer_flux_config(shapes)


def test_released_flux_dev_size_loads_on_meta() -> None:
    """FLUX.1-dev's real widths (3072 wide, 19 + 38 blocks, T5-XXL's 4096, CLIP-L's 768), shapes only."""
    with torch.device("meta"):
        released = FluxTransformer2DModel(guidance_embeds=True)
        state = {BFL_PREFIX + k: v for k, v in to_bfl_state_dict(released).items()}
    config = infer_flux_config({k: tuple(v.shape) for k, v in state.items()})
    assert config == {
        "patch_size": 1,
        "in_channels": 64,
        "out_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56),
    }
    loaded = load_flux_transformer(state, "flux1-dev.safetensors", torch.bfloat16)
    assert flux_variant(loaded.config) == "dev"
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
