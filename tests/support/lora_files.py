"""Write small random-weight LoRA files for tiny-sd in the key layouts real files use.

Users download LoRAs trained with kohya-ss (``lora_unet_*`` / ``lora_te_*`` with lora_down, lora_up
and alpha) or saved by diffusers (``unet.*`` / ``text_encoder.*`` with PEFT's lora_A / lora_B, or the
older ``lora.down`` / ``to_q_lora`` / ``lora_linear_layer`` spellings). Tests cannot download them,
so this module makes one set of low-rank weights for real tiny-sd layers (attention projections,
feed-forward, 1x1 and 3x3 convs, CLIP attention and MLP) and writes the same weights in each
layout. Text-encoder paths carry ``text_model.`` as every real file does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn

from plinth.nodes.models.tiny_sd import TEXT, UNET

# Module-path endings that get a LoRA layer, per part.
UNET_TARGETS = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.2",
    "proj_in",
    "resnets.0.conv1",
    "conv_in",
)
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
TEXT_PREFIX = "text_model."  # transformers 4's CLIPTextModel level that LoRA files name
_PROJECTIONS = {
    "to_q": "to_q",
    "to_k": "to_k",
    "to_v": "to_v",
    "to_out.0": "to_out",
    "q_proj": "to_q",
    "k_proj": "to_k",
    "v_proj": "to_v",
    "out_proj": "to_out",
}


@dataclass(frozen=True)
class Layer:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float


Weights = dict[str, dict[str, Layer]]  # part ("unet"/"text_encoder") -> module path as files write it


def tiny_modules() -> dict[str, nn.Module]:
    """tiny-sd's UNet and CLIP text model, shapes only (meta tensors)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return {"unet": UNet2DConditionModel(**UNET), "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT))}


def random_lora(
    seed: int = 0,
    rank: int = 4,
    alpha: float = 2.0,
    gain: float = 1.0,
    parts: tuple[str, ...] = ("unet", "text_encoder"),
    modules: dict[str, nn.Module] | None = None,
) -> Weights:
    """Random low-rank layers for every Linear/Conv2d whose path ends in a target, in tiny-sd's
    UNet and text model or in `modules` (same keys, e.g. an SD1.5-layout model's, on meta)."""
    gen = torch.Generator().manual_seed(seed)
    weights: Weights = {}
    targets = {"unet": UNET_TARGETS, "text_encoder": TEXT_TARGETS}
    for part, module in (tiny_modules() if modules is None else modules).items():
        if part not in parts:
            continue
        prefix = TEXT_PREFIX if part == "text_encoder" else ""
        for path, sub in module.named_modules():
            if not path.endswith(targets[part]):
                continue
            if isinstance(sub, nn.Conv2d):
                down = torch.randn(rank, sub.in_channels, *sub.kernel_size, generator=gen) / (
                    sub.weight[0].numel() ** 0.5
                )
                up = torch.randn(sub.out_channels, rank, 1, 1, generator=gen) * (gain / rank**0.5)
            else:
                down = torch.randn(rank, sub.in_features, generator=gen) / (sub.in_features**0.5)
                up = torch.randn(sub.out_features, rank, generator=gen) * (gain / rank**0.5)
            weights.setdefault(part, {})[prefix + path] = Layer(down, up, alpha)
    return weights


def kohya(weights: Weights) -> dict[str, torch.Tensor]:
    """kohya-ss: lora_unet_/lora_te_ + the path with "_" for ".", then lora_down/lora_up/alpha."""
    state: dict[str, torch.Tensor] = {}
    for part, layers in weights.items():
        head = "lora_unet_" if part == "unet" else "lora_te_"
        for path, layer in layers.items():
            name = head + path.replace(".", "_")
            state[f"{name}.lora_down.weight"] = layer.down
            state[f"{name}.lora_up.weight"] = layer.up
            state[f"{name}.alpha"] = torch.tensor(layer.alpha)
    return state


def peft(weights: Weights) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers' current (PEFT) layout: <part>.<path>.lora_A/lora_B.weight, with lora_alpha and r
    in the file's lora_adapter_metadata, as diffusers' save_lora_weights writes them. Needs one
    alpha and rank per part."""
    state: dict[str, torch.Tensor] = {}
    config: dict[str, object] = {}
    for part, layers in weights.items():
        (alpha,), (rank,) = (
            {layer.alpha for layer in layers.values()},
            {layer.down.shape[0] for layer in layers.values()},
        )
        config.update({f"{part}.lora_alpha": alpha, f"{part}.r": rank})
        for path, layer in layers.items():
            state[f"{part}.{path}.lora_A.weight"] = layer.down
            state[f"{part}.{path}.lora_B.weight"] = layer.up
    return state, {"lora_adapter_metadata": json.dumps(config)}


def old_diffusers(weights: Weights) -> dict[str, torch.Tensor]:
    """diffusers' pre-PEFT layouts: attention projections as <attn>.processor.to_q_lora.down/up,
    text-encoder MLPs as lora_linear_layer.down/up, other layers as lora.down/up; alphas as
    <part>.<path>.alpha."""
    state: dict[str, torch.Tensor] = {}
    for part, layers in weights.items():
        for path, layer in layers.items():
            parent, _, leaf = path.rpartition(".")
            if path.endswith("to_out.0"):
                parent, leaf = path[: -len(".to_out.0")], "to_out.0"
            if leaf in _PROJECTIONS:
                processor = ".processor" if part == "unet" else ""
                stem = f"{part}.{parent}{processor}.{_PROJECTIONS[leaf]}_lora"
            elif part == "text_encoder":
                stem = f"{part}.{path}.lora_linear_layer"
            else:
                stem = f"{part}.{path}.lora"
            state[f"{stem}.down.weight"] = layer.down
            state[f"{stem}.up.weight"] = layer.up
            state[f"{part}.{path}.alpha"] = torch.tensor(layer.alpha)
    return state
