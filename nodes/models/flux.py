"""FLUX.1 transformers from Black Forest Labs' single-file layout, sized by tensor shapes.

Files such as flux1-dev, flux1-schnell, flux1-krea-dev, flux1-fill-dev and flux1-kontext-dev
hold the transformer in BFL's key layout (`img_in`, `time_in`, `vector_in`, `guidance_in`,
`txt_in`, `double_blocks.N.*`, `single_blocks.N.*`, `final_layer.*`); ComfyUI's all-in-one
checkpoints hold the same keys under `model.diffusion_model.` beside their text models and VAE,
which are left to their own loaders here. A file is recognised by its key names, as in ComfyUI's
model detection, and every size is read off the weights: the width (img_in's outputs), the input
channels (64, or 384 for Fill), the output channels, both block counts, the text and pooled-text
widths, whether a guidance embedder is present, and the head width, from the q/k RMSNorm scale,
which holds one value per head channel. diffusers' own converter is not used: it fixes the width
at 3072 and so loads only the released size.

Two things are FLUX's constants: the MLP ratio 4 (diffusers' FluxTransformer2DModel has no other,
so a file with another is refused by name) and the split of a head's channels among the three
rotary axes (id, row, column). ComfyUI fixes the axes at (16, 56, 56) of 128; here a head of any
width is split in the same proportions, 1/8, 7/16 and 7/16, which gives (16, 56, 56) at 128 and
(4, 14, 14) at 32. Each part must be even (rotary embeddings pair channels), so heads are a
multiple of 32 channels.

The mapping to diffusers' names has one quirk beyond the renames and the split of fused q/k/v
projections (and, in single blocks, of the MLP input fused beside them): BFL's final modulation
yields (shift, scale), diffusers' norm_out (scale, shift), so its halves are swapped.

fp8 files (float8_e4m3fn / float8_e5m2 tensors, and ComfyUI's "scaled fp8" ones, whose weights
carry a per-tensor `scale_weight`) are dequantised on load: see `dequantize_fp8`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from plinth.nodes.core.context import NodeInputError
from plinth.nodes.models.strict_load import assign_strict

if TYPE_CHECKING:
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

BFL_PREFIX = "model.diffusion_model."
MLP_RATIO = 4  # the only ratio diffusers' FluxTransformer2DModel builds
FILL_CHANNELS = 384  # Fill's img_in: 64 packed latent + 64 packed masked-image + 256 packed mask values
CONTROL_CHANNELS = 128  # Canny/Depth's img_in: 64 packed latent + 64 packed control-image values
_MARKER = "double_blocks.0.img_attn.qkv.weight"
_HEAD_NORM = "double_blocks.0.img_attn.norm.query_norm.scale"
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# ComfyUI's scaled-fp8 files: a marker tensor (its dtype names the fp8 format) under the model's
# prefix, and beside each scaled `<layer>.weight` its `<layer>.scale_weight`; `scale_input`
# serves fp8 matrix multiplication only.
SCALED_FP8_MARKER = "scaled_fp8"
SCALE_WEIGHT = ".scale_weight"
SCALE_INPUT = ".scale_input"

Shapes = Mapping[str, tuple[int, ...]]

# BFL module -> diffusers module(s), for the linear layers (weight and bias) of the model itself
# and of each double and single block. A module with several targets is fused in BFL's layout and
# is split along its outputs: q, k and v each as wide as the model, the rest (single blocks' MLP
# input) taking what remains.
_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # halves swapped: see _swap_halves
}
_GUIDANCE = {
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
}
_SWAPPED = "final_layer.adaLN_modulation.1"
_DOUBLE = {
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
_SINGLE = {
    "modulation.lin": ("norm.linear",),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
}
# The q/k RMSNorms (one scale per head channel, no bias).
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE_NORMS = {
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
_BLOCKS = {
    "double_blocks": ("transformer_blocks", _DOUBLE, _DOUBLE_NORMS),
    "single_blocks": ("single_transformer_blocks", _SINGLE, _SINGLE_NORMS),
}
_BLOCK_KEY = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")


def _prefix_of(keys: Iterable[str]) -> str | None:
    keys = set(keys)
    if _MARKER in keys:
        return ""
    if BFL_PREFIX + _MARKER in keys:
        return BFL_PREFIX
    return None


def detect_flux(keys: Iterable[str]) -> bool:
    """Whether the keys are a FLUX.1 transformer's in BFL's layout, bare or under BFL_PREFIX."""
    return _prefix_of(keys) is not None


def flux_prefix(keys: Iterable[str]) -> str:
    """Where a FLUX.1 file keeps its transformer's keys: "" (bare) or BFL_PREFIX."""
    prefix = _prefix_of(keys)
    if prefix is None:
        raise NodeInputError(f"not a FLUX.1 transformer: weight {_MARKER} is missing")
    return prefix


def _need(shapes: Shapes, key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise NodeInputError(f"not a FLUX.1 transformer: weight {key} is missing")
    return tuple(shapes[key])


def _count(shapes: Shapes, blocks: str) -> int:
    """How many blocks the keys number (the highest index + 1: a gap shows as missing weights)."""
    rx = re.compile(rf"^{blocks}\.(\d+)\.")
    return max((int(m.group(1)) + 1 for k in shapes if (m := rx.match(k))), default=0)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """A head's channels per rotary axis (id, row, column): FLUX's (16, 56, 56) at 128, scaled."""
    if head_dim % 32:
        raise NodeInputError(
            f"FLUX.1 transformer: {head_dim}-channel heads do not split into even rotary axes "
            "(1/8, 7/16, 7/16 of a head, as (16, 56, 56) of FLUX's 128)"
        )
    return head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16


def infer_flux_config(shapes: Shapes) -> dict[str, Any]:
    """A diffusers FluxTransformer2DModel config for BFL-layout weights (bare or under BFL_PREFIX)."""
    prefix = flux_prefix(shapes)
    shapes = {k[len(prefix) :]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}
    hidden, in_channels = _need(shapes, "img_in.weight")
    head_dim = _need(shapes, _HEAD_NORM)[0]
    if hidden % head_dim:
        raise NodeInputError(f"FLUX.1 transformer: width {hidden} is not a whole number of {head_dim}-channel heads")
    for key, fused in (("double_blocks.0.img_mlp.0.weight", 0), ("single_blocks.0.linear1.weight", 3 * hidden)):
        mlp = shapes[key][0] - fused if key in shapes else MLP_RATIO * hidden  # absent: named by the strict load
        if mlp != MLP_RATIO * hidden:
            raise NodeInputError(
                f"FLUX.1 transformer: {key} gives an MLP {mlp} wide for width {hidden}, an mlp ratio of "
                f"{mlp / hidden:g}; diffusers' FluxTransformer2DModel has mlp ratio {MLP_RATIO} only"
            )
    return {
        "patch_size": 1,  # FLUX packs 2x2 latent patches into img_in's inputs itself
        "in_channels": in_channels,
        "out_channels": _need(shapes, "final_layer.linear.weight")[0],
        "num_layers": _count(shapes, "double_blocks"),
        "num_single_layers": _count(shapes, "single_blocks"),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": _need(shapes, "txt_in.weight")[1],
        "pooled_projection_dim": _need(shapes, "vector_in.in_layer.weight")[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
        "axes_dims_rope": rope_axes(head_dim),
    }


def flux_variant(config: Mapping[str, Any]) -> str:
    """Which FLUX.1 model a config is: "fill" (384 input channels), "control" (128: Canny and
    Depth), else "dev" (a guidance embedder) or "schnell" (none). Kontext and Krea have dev's
    layout and read as "dev": the weights cannot tell them apart."""
    if config["in_channels"] == FILL_CHANNELS:
        return "fill"
    if config["in_channels"] == CONTROL_CHANNELS:
        return "control"
    return "dev" if config["guidance_embeds"] else "schnell"


def expected_flux_keys(config: Mapping[str, Any]) -> set[str]:
    """The unprefixed BFL keys a FLUX.1 file of this config holds."""
    modules = list(_TOP) + (list(_GUIDANCE) if config["guidance_embeds"] else [])
    norms: list[str] = []
    for blocks, count in (("double_blocks", config["num_layers"]), ("single_blocks", config["num_single_layers"])):
        _, linears, block_norms = _BLOCKS[blocks]
        for i in range(count):
            modules += [f"{blocks}.{i}.{m}" for m in linears]
            norms += [f"{blocks}.{i}.{n}" for n in block_norms]
    return {f"{m}.{leaf}" for m in modules for leaf in ("weight", "bias")} | set(norms)


def _split(value: torch.Tensor, targets: tuple[str, ...], hidden: int, key: str) -> list[torch.Tensor]:
    """A fused projection's outputs cut into q, k, v (each `hidden` wide) and what follows."""
    rest = value.shape[0] - 3 * hidden
    sizes = [hidden] * 3 + ([rest] if len(targets) == 4 else [])
    if min(sizes) <= 0 or sum(sizes) != value.shape[0]:
        raise NodeInputError(
            f"FLUX.1 transformer: {key} has {value.shape[0]} outputs, which do not split as {len(targets)} "
            f"projections of a {hidden}-wide model"
        )
    return list(torch.split(value, sizes, dim=0))


def _swap_halves(value: torch.Tensor) -> torch.Tensor:
    """BFL's final modulation is (shift, scale); diffusers' AdaLayerNormContinuous reads (scale, shift)."""
    shift, scale = value.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def convert_flux(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """BFL-layout FLUX.1 weights under `prefix` -> FluxTransformer2DModel keys. Keys outside
    `prefix` are skipped; unknown keys under it pass unchanged, for the strict load to name."""
    if prefix + "img_in.weight" not in state:
        raise NodeInputError(f"not a FLUX.1 transformer: weight {prefix}img_in.weight is missing")
    hidden = state[prefix + "img_in.weight"].shape[0]  # q, k and v are each as wide as the model
    top = {**_TOP, **_GUIDANCE}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        module, _, leaf = name.rpartition(".")
        if module in top:
            out[f"{top[module]}.{leaf}"] = _swap_halves(value) if module == _SWAPPED else value
            continue
        m = _BLOCK_KEY.match(name)
        if m is None:
            out[name] = value
            continue
        blocks, index, rest = m.groups()
        target, linears, norms = _BLOCKS[blocks]
        base = f"{target}.{index}."
        block_module, _, leaf = rest.rpartition(".")
        if rest in norms:
            out[base + norms[rest]] = value
        elif block_module in linears and len(linears[block_module]) == 1:
            out[f"{base}{linears[block_module][0]}.{leaf}"] = value
        elif block_module in linears:
            parts = linears[block_module]
            for part, chunk in zip(parts, _split(value, parts, hidden, key), strict=True):
                out[f"{base}{part}.{leaf}"] = chunk
        else:
            out[name] = value
    return out


def dequantize_fp8(state: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The weights with every fp8 tensor (float8_e4m3fn / float8_e5m2) cast to `dtype`, and those of
    ComfyUI's scaled-fp8 files multiplied by their `<layer>.scale_weight` (computed in float32);
    the `scaled_fp8` marker and the scale_weight / scale_input keys are dropped. Other tensors
    are returned as they are. Text models' fp8 files share the format."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == SCALED_FP8_MARKER or key.endswith("." + SCALED_FP8_MARKER) or key.endswith(SCALE_INPUT):
            continue
        if key.endswith(SCALE_WEIGHT) and key[: -len(SCALE_WEIGHT)] + ".weight" in state:
            continue
        scale = state.get(key[: -len(".weight")] + SCALE_WEIGHT) if key.endswith(".weight") else None
        if scale is not None:
            value = (value.to(torch.float32) * scale.to(torch.float32)).to(dtype)
        elif value.dtype in _FP8:
            value = value.to(dtype)
        out[key] = value
    return out


def load_flux_transformer(state: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype) -> FluxTransformer2DModel:
    """A FluxTransformer2DModel in `dtype`, for eval, from a FLUX.1 file's weights in BFL's layout
    (bare, or under BFL_PREFIX beside other parts, which are ignored), fp8 ones dequantised.
    Loading is strict: a missing or unexpected BFL key, or a misshapen weight, is a NodeInputError
    naming the file `name` and the key. `flux_variant(model.config)` says which model it is."""
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

    prefix = _prefix_of(state)
    if prefix is None:
        raise NodeInputError(f"{name}: not a FLUX.1 transformer (no {_MARKER} weight, bare or under {BFL_PREFIX})")
    weights = dequantize_fp8({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, dtype)
    try:
        config = infer_flux_config({k: tuple(v.shape) for k, v in weights.items()})
    except NodeInputError as exc:
        raise NodeInputError(f"{name}: {exc}") from None
    expected = expected_flux_keys(config)
    missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
    if missing or unexpected:
        raise NodeInputError(
            f"{name}: the weights do not match FLUX.1's layout (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    try:
        converted = convert_flux(weights, "")
    except NodeInputError as exc:
        raise NodeInputError(f"{name}: {exc}") from None
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    # Cast tensor by tensor (rather than the model after): no second copy of the whole model.
    assign_strict(model, {k: v.to(dtype) for k, v in converted.items()}, name, "FLUX.1's layout")
    return model.eval().requires_grad_(False)


# 2x2 latent cells per transformer token (FLUX's latent space itself: checkpoint.FluxModel)
PATCH = 2
DEFAULT_GUIDANCE = 3.5  # ComfyUI's FLUX guidance where no FluxGuidance sets one
DEV_SHIFT = 1.15  # ComfyUI's ModelSamplingFlux default for guidance-distilled FLUX.1 (dev, Krea, Fill, Kontext)


def flux_scheduler_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The model sampling a FLUX.1 transformer runs with unless a node sets another: dev-style
    (guidance embedder) on FLUX's exponential shift 1.15, schnell as a plain flow, shift 1 and
    time = sigma, as ComfyUI's supported_models has them."""
    if config.get("guidance_embeds"):
        return {"flow": "flux", "shift": DEV_SHIFT}
    return {"flow": "discrete_flow", "shift": 1.0, "multiplier": 1.0}


def load_flux_file(path: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """A FluxModel from a FLUX.1 transformer file (BFL's layout, bare or in an all-in-one
    checkpoint under model.diffusion_model.)."""
    from safetensors import safe_open

    from plinth.nodes.models.checkpoint import FluxModel

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            prefix = flux_prefix(keys)
            state = {k: f.get_tensor(k) for k in keys if k.startswith(prefix)}
    except NodeInputError:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise NodeInputError(f"{path.name}: not a readable .safetensors file ({exc})") from exc
    transformer: Any = load_flux_transformer(state, path.name, dtype)
    transformer.to(device)
    return FluxModel(transformer, None, None, None, flux_scheduler_config(dict(transformer.config)), family="flux")
