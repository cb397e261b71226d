"""Write diffusers FLUX.1 transformers as Black Forest Labs' single-file checkpoints (flux1-dev.safetensors etc.).

BFL's files name the transformer's parts after BFL's own modules: img_in, txt_in, time_in / vector_in / guidance_in
(each an in_layer and out_layer), double_blocks.N (img_/txt_ mod.lin, attn.qkv fused, attn.norm.query_norm /
key_norm .scale, attn.proj, mlp.0 / mlp.2), single_blocks.N (linear1 = q, k, v and the MLP input fused; linear2;
norm.query_norm / key_norm .scale; modulation.lin) and final_layer (linear; adaLN_modulation.1 giving shift then
scale, where diffusers' norm_out gives scale then shift). ComfyUI's all-in-one checkpoints put the same keys under
``model.diffusion_model.``. Tests cannot download such files, so this module builds small random transformers and
writes them in that layout. The mapping is written here from the diffusers modules themselves, one BFL name at a
time, not by inverting Plinth's converter, so that a mistake in one cannot cancel out in the other.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from diffusers import AutoencoderKL
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from torch import nn

from support.sd_original_layout import _rename, _vae_prefixes

COMFY_PREFIX = "model.diffusion_model."
SCALED_FP8_MARKER = "scaled_fp8"


def small_flux_config(variant: str = "dev") -> dict:
    """A FluxTransformer2DModel config of FLUX.1's layout at test size, for "dev", "schnell" or "fill".

    Heads are 32 channels: FLUX splits a head among its three rotary axes as 1/8, 7/16, 7/16 ((16, 56, 56) of 128)
    and each part must be even, which 16-channel heads ((2, 7, 7)) are not. Fill's img_in takes 384 values (the
    packed latent, masked image and mask) and gives 64; dev and fill embed the guidance, schnell does not.
    """
    if variant not in ("dev", "schnell", "fill"):
        raise ValueError(f"unknown FLUX.1 variant {variant!r}")
    return {
        "patch_size": 1,
        "in_channels": 384 if variant == "fill" else 64,
        "out_channels": 64,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 32,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 24,
        "guidance_embeds": variant != "schnell",
        "axes_dims_rope": (4, 14, 14),
    }


def build_random_flux(config: dict, seed: int) -> FluxTransformer2DModel:
    """A FluxTransformer2DModel of `config` in eval mode, every parameter given seeded noise.

    The noise makes norms, biases and zero-initialised layers differ, so a mapping that swaps two of them (q and k,
    or the final modulation's halves) changes the weights and the output. The global RNG is untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(**config)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def _linear(state: dict[str, torch.Tensor], name: str, *layers: nn.Module) -> None:
    """BFL's linear `name`: one diffusers linear, or several fused along the outputs."""
    state[f"{name}.weight"] = torch.cat([layer.weight for layer in layers])
    state[f"{name}.bias"] = torch.cat([layer.bias for layer in layers])


def to_bfl_state_dict(model: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    """The transformer's weights under BFL's key names (no prefix), as fresh contiguous tensors."""
    state: dict[str, torch.Tensor] = {}
    embed = model.time_text_embed
    with torch.no_grad():
        _linear(state, "img_in", model.x_embedder)
        _linear(state, "txt_in", model.context_embedder)
        _linear(state, "time_in.in_layer", embed.timestep_embedder.linear_1)
        _linear(state, "time_in.out_layer", embed.timestep_embedder.linear_2)
        _linear(state, "vector_in.in_layer", embed.text_embedder.linear_1)
        _linear(state, "vector_in.out_layer", embed.text_embedder.linear_2)
        if model.config.guidance_embeds:
            _linear(state, "guidance_in.in_layer", embed.guidance_embedder.linear_1)
            _linear(state, "guidance_in.out_layer", embed.guidance_embedder.linear_2)
        for i, block in enumerate(model.transformer_blocks):
            p, attn = f"double_blocks.{i}.", block.attn
            _linear(state, p + "img_mod.lin", block.norm1.linear)
            _linear(state, p + "txt_mod.lin", block.norm1_context.linear)
            _linear(state, p + "img_attn.qkv", attn.to_q, attn.to_k, attn.to_v)
            _linear(state, p + "txt_attn.qkv", attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            state[p + "img_attn.norm.query_norm.scale"] = attn.norm_q.weight
            state[p + "img_attn.norm.key_norm.scale"] = attn.norm_k.weight
            state[p + "txt_attn.norm.query_norm.scale"] = attn.norm_added_q.weight
            state[p + "txt_attn.norm.key_norm.scale"] = attn.norm_added_k.weight
            _linear(state, p + "img_attn.proj", attn.to_out[0])
            _linear(state, p + "txt_attn.proj", attn.to_add_out)
            _linear(state, p + "img_mlp.0", block.ff.net[0].proj)
            _linear(state, p + "img_mlp.2", block.ff.net[2])
            _linear(state, p + "txt_mlp.0", block.ff_context.net[0].proj)
            _linear(state, p + "txt_mlp.2", block.ff_context.net[2])
        for i, block in enumerate(model.single_transformer_blocks):
            p, attn = f"single_blocks.{i}.", block.attn
            _linear(state, p + "linear1", attn.to_q, attn.to_k, attn.to_v, block.proj_mlp)
            _linear(state, p + "linear2", block.proj_out)
            state[p + "norm.query_norm.scale"] = attn.norm_q.weight
            state[p + "norm.key_norm.scale"] = attn.norm_k.weight
            _linear(state, p + "modulation.lin", block.norm.linear)
        _linear(state, "final_layer.linear", model.proj_out)
        for leaf in ("weight", "bias"):  # diffusers: (scale, shift); BFL: (shift, scale)
            scale, shift = getattr(model.norm_out.linear, leaf).chunk(2)
            state[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift, scale])
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def scaled_fp8_state(state: dict[str, torch.Tensor], fp8: torch.dtype) -> dict[str, torch.Tensor]:
    """ComfyUI's "scaled fp8" form of BFL weights: each linear weight divided by a per-tensor scale (its largest
    magnitude over the format's largest value) and stored in `fp8` beside `<layer>.scale_weight` (the scale, a
    scalar) and `<layer>.scale_input` (1: for fp8 matrix multiplication, not for loading), with the `scaled_fp8`
    marker; biases and norm scales keep their dtype."""
    out: dict[str, torch.Tensor] = {SCALED_FP8_MARKER: torch.empty(0, dtype=fp8)}
    for key, value in state.items():
        if key.endswith(".weight") and value.ndim == 2:
            layer = key.removesuffix(".weight")
            scale = (value.abs().amax().float() / torch.finfo(fp8).max).reshape(())
            out[key] = (value.float() / scale).to(fp8)
            out[f"{layer}.scale_weight"] = scale
            out[f"{layer}.scale_input"] = torch.ones(())
        else:
            out[key] = value
    return out


def write_flux_file(
    path: Path,
    model: FluxTransformer2DModel,
    prefix: str = "",
    dtype: torch.dtype | None = None,
    scaled_fp8: bool = False,
) -> dict[str, torch.Tensor]:
    """Write the model as a BFL-layout .safetensors file, its keys under `prefix` (COMFY_PREFIX for ComfyUI's
    all-in-one layout); every tensor in `dtype` if given, or with `scaled_fp8` in ComfyUI's scaled fp8 form with
    `dtype` (default float8_e4m3fn) as the format. Returns what was written."""
    state = to_bfl_state_dict(model)
    if scaled_fp8:
        state = scaled_fp8_state(state, dtype or torch.float8_e4m3fn)
    elif dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    state = {prefix + k: v for k, v in state.items()}
    safetensors.torch.save_file(state, str(path))
    return state


def small_flux_vae(seed: int = 3) -> AutoencoderKL:
    """FLUX.1's VAE layout at small widths: 16 latent channels, no quant convs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=16,
            block_out_channels=(32, 64, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            norm_num_groups=32,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=0.3611,
            shift_factor=0.1159,
        )
        with torch.no_grad():
            for param in vae.parameters():
                param.add_(torch.randn_like(param) * 0.05)
    return vae.eval()


def bfl_vae_state(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """The VAE's weights as ae.safetensors holds them: original keys, no prefix (attention
    projections as 1x1 convs)."""
    prefixes = _vae_prefixes(vae.config)
    return {
        _rename(k, prefixes): (v[:, :, None, None] if v.ndim == 2 else v).contiguous()
        for k, v in vae.state_dict().items()
    }
