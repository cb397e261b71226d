"""SD1.x single-file checkpoints (the original CompVis key layout), loaded without any hub.

The architecture is read off the weights: the shipped SD1.5 configs are the template and the
widths (UNet and VAE channels, input channels, cross-attention size, text-model size and depth)
come from tensor shapes. So a standard SD1.5 file, an SD1.x inpainting file (9 input channels)
and scaled-down test models with the same key layout all load through the same path. Keys are
converted with diffusers' own conversion functions and loaded strictly: a missing or unexpected
weight is an error, never a silently random layer.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import torch

from plinth.nodes.core.context import NodeInputError

SD15_CONFIG = Path(__file__).resolve().parent / "configs" / "sd15"
UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = "cond_stage_model.transformer."
HEAD_DIM = 64  # CLIP text models use 64-dimensional attention heads


def _template(part: str) -> dict[str, Any]:
    config = json.loads((SD15_CONFIG / part / "config.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}


def _shape_of(shapes: dict[str, tuple[int, ...]]):
    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise NodeInputError(f"not an SD1.x checkpoint: weight {key} is missing")
        return shapes[key]

    return shape


def infer_vae_config(shapes: dict[str, tuple[int, ...]], prefix: str = VAE) -> dict[str, Any]:
    """An AutoencoderKL config for original-layout VAE weights under `prefix`."""
    shape = _shape_of(shapes)
    vae = _template("vae")
    vae["block_out_channels"] = [
        shape(f"{prefix}encoder.down.{i}.block.0.conv1.weight")[0] for i in range(len(vae["block_out_channels"]))
    ]
    vae["latent_channels"] = shape(f"{prefix}decoder.conv_in.weight")[1]
    # FLUX.1's and SD3's VAEs have no 1x1 convs around the latent
    vae["use_quant_conv"] = f"{prefix}quant_conv.weight" in shapes
    vae["use_post_quant_conv"] = f"{prefix}post_quant_conv.weight" in shapes
    vae["layers_per_block"] = _count(shapes, re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\.")
    return vae


def _count(shapes: dict[str, tuple[int, ...]], pattern: str) -> int:
    """How many distinct indices the capture group of `pattern` takes over the keys."""
    return len({m.group(1) for k in shapes if (m := re.match(pattern, k))})


def infer_configs(shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, Any]]:
    """diffusers configs for the UNet, VAE and CLIP text model whose weights have these shapes."""
    shape = _shape_of(shapes)
    unet = _template("unet")
    levels = len(unet["block_out_channels"])
    per_level = unet["layers_per_block"] + 1  # resnets plus the downsampler
    unet["in_channels"] = shape(f"{UNET}input_blocks.0.0.weight")[1]
    unet["out_channels"] = shape(f"{UNET}out.2.weight")[0]
    unet["block_out_channels"] = [
        shape(f"{UNET}input_blocks.{1 + per_level * i}.0.out_layers.3.weight")[0] for i in range(levels)
    ]
    unet["cross_attention_dim"] = shape(f"{UNET}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")[1]

    text = _template("text_encoder")
    prefix = TEXT + ("text_model." if f"{TEXT}text_model.embeddings.token_embedding.weight" in shapes else "")
    vocab, hidden = shape(f"{prefix}embeddings.token_embedding.weight")
    text.update(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=_count(shapes, re.escape(prefix) + r"encoder\.layers\.(\d+)\."),
        intermediate_size=shape(f"{prefix}encoder.layers.0.mlp.fc1.weight")[0],
        num_attention_heads=max(1, hidden // HEAD_DIM),
        projection_dim=hidden,
        max_position_embeddings=shape(f"{prefix}embeddings.position_embedding.weight")[0],
    )
    return {"unet": unet, "vae": infer_vae_config(shapes), "text_encoder": text}


def load_vae_file(path: Path) -> Any:
    """An AutoencoderKL from a VAE-only .safetensors: the original layout (encoder.down.*, as
    vae-ft-mse files have; a first_stage_model. prefix is accepted) or diffusers' layout."""
    return vae_from_state(read_state(path), path)


def vae_from_state(state: dict[str, torch.Tensor], path: Path) -> Any:
    """An AutoencoderKL of VAE weights in either layout, unprefixed or under first_stage_model."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL  # see load_single_file

    if "encoder.down_blocks.0.resnets.0.conv1.weight" in state:  # diffusers layout
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        config = _template("vae")
        config["block_out_channels"] = [
            shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0]
            for i in range(len(config["block_out_channels"]))
        ]
        config["latent_channels"] = shapes["decoder.conv_in.weight"][1]
        config["use_quant_conv"] = "quant_conv.weight" in shapes
        config["use_post_quant_conv"] = "post_quant_conv.weight" in shapes
        config["layers_per_block"] = _count(shapes, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
        vae = AutoencoderKL(**config)
        _load_strict(vae, state, path, "VAE")
        return vae
    if not any(k.startswith(VAE) for k in state):
        state = {VAE + k: v for k, v in state.items()}
    config = infer_vae_config({k: tuple(v.shape) for k, v in state.items()})
    vae = AutoencoderKL(**config)
    _load_strict(vae, convert_ldm_vae_checkpoint(state, copy.deepcopy(config)), path, "VAE")
    return vae


def read_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise NodeInputError(f"{path.name}: not a readable .safetensors file ({exc})") from exc


def load_single_file(path: Path) -> tuple[Any, Any, Any]:
    """(unet, vae, text_encoder) from an original-layout SD1.x .safetensors file."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    # From the defining modules: for `from diffusers import ...` mypy reads diffusers' dummy
    # placeholder classes (no torch Module, no save_pretrained).
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    state = read_state(path)
    configs = infer_configs({k: tuple(v.shape) for k, v in state.items()})

    unet = UNet2DConditionModel(**configs["unet"])
    _load_strict(unet, convert_ldm_unet_checkpoint(state, copy.deepcopy(configs["unet"])), path, "UNet")
    vae = AutoencoderKL(**configs["vae"])
    _load_strict(vae, convert_ldm_vae_checkpoint(state, copy.deepcopy(configs["vae"])), path, "VAE")
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    wanted = set(text_encoder.state_dict())
    text_state = {}
    for key, value in state.items():
        if key.startswith(TEXT):
            name = key[len(TEXT) :]
            if name not in wanted and name.startswith("text_model."):
                name = name[len("text_model.") :]
            if not name.endswith("position_ids"):  # a buffer, not a weight, in current transformers
                text_state[name] = value
    _load_strict(text_encoder, text_state, path, "text encoder")
    return unet, vae, text_encoder


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise NodeInputError(
            f"{path.name}: the {what} weights do not match an SD1.x layout "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
