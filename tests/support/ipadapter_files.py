"""Write small random-weight CLIP vision encoders and IP-Adapters in the layouts real files use.

Real files (CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors, ip-adapter_sd15.safetensors,
ip-adapter-plus_sd15.safetensors) cannot be downloaded in tests, so this module writes tensors of
the same names and shape pattern, scaled down to the embedded tiny-sd model. The IP-Adapter
tensors are written by name from the original (tencent-ailab) layout, not from diffusers' modules,
so the loader's key conversion and layer numbering are what the tests exercise.
"""

from __future__ import annotations

from typing import Any

import torch

# tiny-sd's cross-attention layers as the original IP-Adapter numbers them: the position of each
# attn2 among all the UNet's attention processors (down_blocks.0 → 1, up_blocks.1.attentions.0
# and .1 → 3 and 5, mid_block → 7), with the layer's width (block channels 32, 32, 32, 64).
TINY_SD_LAYERS = {1: 32, 3: 32, 5: 32, 7: 64}
TINY_SD_CROSS = 64  # tiny-sd's cross_attention_dim: the width of text and image tokens


def clip_vision_config(
    hidden: int = 64, layers: int = 2, image_size: int = 32, patch: int = 8, projection: int = 32
) -> Any:
    """A small CLIPVisionConfig shaped as LAION's ViT-H: gelu, 64-wide attention heads."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        image_size=image_size,
        patch_size=patch,
        projection_dim=projection,
        hidden_act="gelu",
    )


def clip_vision(seed: int = 0, prefixed: bool = True, **config: int) -> dict[str, torch.Tensor]:
    """A CLIPVisionModelWithProjection's weights; `prefixed=False` drops "vision_model." as some
    exported files do."""
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    state = CLIPVisionModelWithProjection(clip_vision_config(**config)).state_dict()
    if not prefixed:
        state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    return {k: v.contiguous() for k, v in state.items()}


def _randn(gen: torch.Generator, *shape: int, scale: float) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def _layers(gen: torch.Generator, layers: dict[int, int], cross: int) -> dict[str, torch.Tensor]:
    state = {}
    for index, width in layers.items():
        state[f"ip_adapter.{index}.to_k_ip.weight"] = _randn(gen, width, cross, scale=cross**-0.5)
        state[f"ip_adapter.{index}.to_v_ip.weight"] = _randn(gen, width, cross, scale=3 * cross**-0.5)
    return state


def plain(
    seed: int = 0,
    embed_dim: int = 32,
    tokens: int = 4,
    cross: int = TINY_SD_CROSS,
    layers: dict[int, int] = TINY_SD_LAYERS,
) -> dict[str, torch.Tensor]:
    """An ip-adapter_sd15-style file: image_proj.proj (embeds → tokens × cross) and norm."""
    gen = torch.Generator().manual_seed(seed)
    state = {
        "image_proj.proj.weight": _randn(gen, tokens * cross, embed_dim, scale=embed_dim**-0.5),
        "image_proj.proj.bias": _randn(gen, tokens * cross, scale=0.1),
        "image_proj.norm.weight": 1 + _randn(gen, cross, scale=0.1),
        "image_proj.norm.bias": _randn(gen, cross, scale=0.1),
    }
    return {**state, **_layers(gen, layers, cross)}


def plus(
    seed: int = 0,
    embed_dim: int = 64,
    hidden: int = 64,
    depth: int = 2,
    queries: int = 4,
    cross: int = TINY_SD_CROSS,
    layers: dict[int, int] = TINY_SD_LAYERS,
) -> dict[str, torch.Tensor]:
    """An ip-adapter-plus_sd15-style file: the Resampler (latents, proj_in, layers.N.0 perceiver
    attention with norm1/norm2/to_q/to_kv/to_out, layers.N.1 feed-forward, proj_out, norm_out)."""
    gen = torch.Generator().manual_seed(seed)
    inner, ff = hidden, 4 * hidden  # one 64-wide head, feed-forward ratio 4
    state = {
        "image_proj.latents": _randn(gen, 1, queries, hidden, scale=hidden**-0.5),
        "image_proj.proj_in.weight": _randn(gen, hidden, embed_dim, scale=embed_dim**-0.5),
        "image_proj.proj_in.bias": _randn(gen, hidden, scale=0.1),
        "image_proj.proj_out.weight": _randn(gen, cross, hidden, scale=hidden**-0.5),
        "image_proj.proj_out.bias": _randn(gen, cross, scale=0.1),
        "image_proj.norm_out.weight": 1 + _randn(gen, cross, scale=0.1),
        "image_proj.norm_out.bias": _randn(gen, cross, scale=0.1),
    }
    for n in range(depth):
        p = f"image_proj.layers.{n}"
        for norm in (f"{p}.0.norm1", f"{p}.0.norm2", f"{p}.1.0"):
            state[f"{norm}.weight"] = 1 + _randn(gen, hidden, scale=0.1)
            state[f"{norm}.bias"] = _randn(gen, hidden, scale=0.1)
        state[f"{p}.0.to_q.weight"] = _randn(gen, inner, hidden, scale=hidden**-0.5)
        state[f"{p}.0.to_kv.weight"] = _randn(gen, 2 * inner, hidden, scale=hidden**-0.5)
        state[f"{p}.0.to_out.weight"] = _randn(gen, hidden, inner, scale=inner**-0.5)
        state[f"{p}.1.1.weight"] = _randn(gen, ff, hidden, scale=hidden**-0.5)
        state[f"{p}.1.3.weight"] = _randn(gen, hidden, ff, scale=ff**-0.5)
    return {**state, **_layers(gen, layers, cross)}


def nested(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The same weights as the nested dict that .bin IP-Adapter files hold."""
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        out[part][rest] = value
    return out
