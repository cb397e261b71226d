"""SDXL checkpoints (base, refiner, Turbo): recognised by key names, sized by tensor shapes.

An original-layout SDXL file (Stability AI's "sgm" layout, as ComfyUI reads it) holds the UNet
under `model.diffusion_model.`, the VAE under `first_stage_model.` and its text models under
`conditioner.embedders.N.`: the base has CLIP-L (transformers layout, `.0.transformer.`) and
CLIP-G (open_clip layout, `.1.model.`); the refiner CLIP-G alone (`.0.model.`). Which of the two
a file is follows from those prefixes, as in ComfyUI's model detection.

Every width and depth is read off the weights: levels, channels, resnets per level, transformer
depth per level and in the middle block, context width, the extra-embedding width, the text
models' widths, depths and projection. Two things cannot be read from shapes and are SDXL's
own constants, as ComfyUI's SDXL model has them: 64-channel attention heads and the 256-wide
sinusoidal embedding of each size number (or aesthetic score). So the released files and
scaled-down test models of the same layout load through this one path.

The UNet and VAE keys are converted with diffusers' own functions (they handle any depth);
CLIP-G's open_clip keys with Plinth's own mapping below: diffusers' converter splits the fused
attention projection by the projection's width, which is right for the released model only
where width and projection agree, and it expects transformers' key names of one version.
Every part is loaded strictly (a missing or unexpected weight is an error naming it).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

import torch

from plinth.nodes.core.context import NodeInputError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = "conditioner.embedders.0.transformer."
CLIP_G_BASE = "conditioner.embedders.1.model."
CLIP_G_REFINER = "conditioner.embedders.0.model."
HEAD_DIM = 64  # SDXL's attention heads (UNet and text models) are 64 channels wide
SIZE_EMBED_DIM = 256  # each size number / aesthetic score is embedded with 256 sinusoids
BASE_NUMBERS = 6  # height, width, crop top, crop left, target height, target width
REFINER_NUMBERS = 5  # height, width, crop top, crop left, aesthetic score
VAE_SCALE = 0.13025  # SDXL's latent scaling factor (its VAE was retrained: not SD1's 0.18215)
# Keys of real files that hold no weight of the text model: open_clip's logit scale, and the
# position ids buffer some tools save beside CLIP-G.
IGNORED_G = ("logit_scale",)
IGNORED_G_SUFFIX = "position_ids"
# Marker keys some SDXL fine-tunes carry to say how they predict (ComfyUI reads the same).
V_PRED, ZTSNR = "v_pred", "ztsnr"
EDM_MARKERS = ("edm_mean", "edm_std", "edm_vpred.sigma_max")

Shapes = Mapping[str, tuple[int, ...]]


def detect(keys: Any) -> str | None:
    """ "sdxl", "sdxl_refiner" or None (not an SDXL file), from the key names alone."""
    keys = list(keys)
    if any(k.startswith(CLIP_G_BASE) for k in keys):
        return "sdxl"
    if any(k.startswith(CLIP_G_REFINER) for k in keys):
        return "sdxl_refiner"
    return None


def time_numbers(family: str) -> int:
    """How many numbers the family's UNet embeds beside the pooled text (see BASE_NUMBERS)."""
    return REFINER_NUMBERS if family == "sdxl_refiner" else BASE_NUMBERS


def prediction(keys: Any, name: str) -> dict[str, Any]:
    """scheduler_config entries for the marker keys a file carries: `v_pred` (v-prediction) and
    `ztsnr` (zero terminal SNR), as ComfyUI reads them; the EDM-parameterised fine-tunes
    (Playground 2.5's edm_mean/edm_std, CosXL's edm_vpred) are refused by name."""
    keys = set(keys)
    edm = sorted(keys.intersection(EDM_MARKERS))
    if edm:
        raise NodeInputError(
            f"{name}: an EDM-parameterised SDXL model ({', '.join(edm)}: Playground 2.5 or CosXL); "
            "those do not load yet"
        )
    config: dict[str, Any] = {}
    if V_PRED in keys:
        config["prediction_type"] = "v_prediction"
    if ZTSNR in keys:
        config["rescale_betas_zero_snr"] = True
    return config


def _need(shapes: Shapes, key: str, what: str = "SDXL") -> tuple[int, ...]:
    if key not in shapes:
        raise NodeInputError(f"not an {what} checkpoint: weight {key} is missing")
    return shapes[key]


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    """The distinct integers the capture group of `pattern` takes over the keys, sorted."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def infer_unet_config(shapes: Shapes, prefix: str = UNET) -> dict[str, Any]:
    """A diffusers UNet2DConditionModel config for original-layout SDXL UNet weights."""
    p = re.escape(prefix)
    conv_in = _need(shapes, f"{prefix}input_blocks.0.0.weight")
    levels: list[list[int]] = [[]]  # transformer depth of each resnet, per level
    channels: list[int] = []
    for i in _indices(shapes, p + r"input_blocks\.(\d+)\.")[1:]:
        if f"{prefix}input_blocks.{i}.0.op.weight" in shapes:  # a downsampler closes a level
            levels.append([])
            continue
        if len(channels) < len(levels):
            channels.append(_need(shapes, f"{prefix}input_blocks.{i}.0.out_layers.3.weight")[0])
        levels[-1].append(len(_indices(shapes, p + rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")))
    if len(channels) != len(levels) or any(not level for level in levels):
        raise NodeInputError("not an SDXL checkpoint: the UNet's input blocks do not form levels of resnets")
    resnets = {len(level) for level in levels}
    if len(resnets) != 1:
        raise NodeInputError(f"SDXL UNet: levels hold different numbers of resnets ({[len(v) for v in levels]})")
    depths = []
    for n, level in enumerate(levels):
        if len(set(level)) != 1:
            raise NodeInputError(f"SDXL UNet level {n}: transformer depths {level} differ between its resnets")
        depths.append(level[0])
    mid_depth = len(_indices(shapes, p + r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    if depths[-1] and depths[-1] != mid_depth:
        raise NodeInputError(
            f"SDXL UNet: the last level's transformer depth {depths[-1]} differs from the middle block's {mid_depth}"
        )
    depths_for_config = [*depths[:-1], depths[-1] or mid_depth]  # diffusers' mid block takes the last entry
    attention = sorted(
        k
        for k in shapes
        if k.startswith(f"{prefix}input_blocks.") and k.endswith("transformer_blocks.0.attn2.to_k.weight")
    )
    if not attention:
        raise NodeInputError("not an SDXL checkpoint: the UNet has no cross-attention")
    proj_in = _need(shapes, attention[0].split("transformer_blocks.")[0] + "proj_in.weight")
    adm_out, adm_in = _need(shapes, f"{prefix}label_emb.0.0.weight")
    time_embed = _need(shapes, f"{prefix}time_embed.0.weight")[0]
    if adm_out != time_embed:
        raise NodeInputError(f"SDXL UNet: the size embedding is {adm_out} wide, the time embedding {time_embed}")
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths]
    return {
        "sample_size": 128,
        "in_channels": conv_in[1],
        "out_channels": _need(shapes, f"{prefix}out.2.weight")[0],
        "layers_per_block": resnets.pop(),
        "block_out_channels": channels,
        "down_block_types": down,
        "up_block_types": [b.replace("Down", "Up") for b in reversed(down)],
        "transformer_layers_per_block": depths_for_config,
        # diffusers reads attention_head_dim as the number of heads (its naming, kept for SDXL)
        "attention_head_dim": [max(1, c // HEAD_DIM) for c in channels],
        "cross_attention_dim": shapes[attention[0]][1],
        "use_linear_projection": len(proj_in) == 2,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": SIZE_EMBED_DIM,
        "projection_class_embeddings_input_dim": adm_in,
        "time_embedding_dim": None if time_embed == 4 * channels[0] else time_embed,
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "center_input_sample": False,
        "upcast_attention": False,
        "act_fn": "silu",
    }


def clip_l_config(shapes: Shapes, prefix: str) -> dict[str, Any]:
    """A CLIPTextConfig's arguments for CLIP-L weights in transformers' layout under `prefix`."""
    inner = prefix + ("text_model." if f"{prefix}text_model.embeddings.token_embedding.weight" in shapes else "")
    vocab, hidden = _need(shapes, f"{inner}embeddings.token_embedding.weight")
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _need(shapes, f"{inner}encoder.layers.0.mlp.fc1.weight")[0],
        "num_hidden_layers": len(_indices(shapes, re.escape(inner) + r"encoder\.layers\.(\d+)\.")),
        "num_attention_heads": max(1, hidden // HEAD_DIM),
        "max_position_embeddings": _need(shapes, f"{inner}embeddings.position_embedding.weight")[0],
        "hidden_act": "quick_gelu",
        "projection_dim": hidden,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }


def clip_g_config(shapes: Shapes, prefix: str) -> dict[str, Any]:
    """A CLIPTextConfig's arguments for CLIP-G weights in open_clip's layout under `prefix`."""
    vocab, width = _need(shapes, f"{prefix}token_embedding.weight")
    if f"{prefix}text_projection.weight" in shapes:  # a Linear's weight: [projection, width]
        projection = shapes[f"{prefix}text_projection.weight"][::-1]
    else:
        projection = _need(shapes, f"{prefix}text_projection")
    return {
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": _need(shapes, f"{prefix}transformer.resblocks.0.mlp.c_fc.weight")[0],
        "num_hidden_layers": len(_indices(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")),
        "num_attention_heads": max(1, width // HEAD_DIM),
        "max_position_embeddings": _need(shapes, f"{prefix}positional_embedding")[0],
        "hidden_act": "gelu",
        "projection_dim": projection[1],
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }


_G_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def convert_clip_g(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """open_clip text-tower keys under `prefix` -> CLIPTextModelWithProjection keys (the fused
    attention projection split in three by the model's width)."""
    out: dict[str, torch.Tensor] = {}
    layer = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.(.+)$")
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name in IGNORED_G or name.endswith(IGNORED_G_SUFFIX):
            continue
        if name == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
        elif name == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif name.startswith("ln_final."):
            out["text_model.final_layer_norm." + name.split(".", 1)[1]] = value
        elif name == "text_projection":
            out["text_projection.weight"] = value.T.contiguous()
        elif name == "text_projection.weight":  # stored as a Linear's weight by some tools
            out[name] = value
        elif m := layer.match(key):
            index, rest = m.groups()
            base = f"text_model.encoder.layers.{index}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                    out[f"{base}self_attn.{part}.{kind}"] = chunk.contiguous()
                continue
            module, leaf = rest.rsplit(".", 1)
            out[base + _G_LAYER.get(module, module) + "." + leaf] = value
        else:
            out[name] = value  # left for the strict load to name
    return out


def _text_state(state: Mapping[str, torch.Tensor], prefix: str, wanted: set[str]) -> dict[str, torch.Tensor]:
    """CLIP-L weights under `prefix` keyed as the CLIPTextModel of this transformers version has
    them (with or without the `text_model.` level); position_ids buffers dropped."""
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            name = key[len(prefix) :]
            if name not in wanted and name.startswith("text_model."):
                name = name[len("text_model.") :]
            if not name.endswith("position_ids"):
                out[name] = value
    return out


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], name: str, what: str) -> None:
    missing, unexpected = module.load_state_dict(dict(state), strict=False)
    if missing or unexpected:
        raise NodeInputError(
            f"{name}: the {what} weights do not match the SDXL layout "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )


def load_sdxl(state: Mapping[str, torch.Tensor], name: str) -> dict[str, Any]:
    """The parts of an original-layout SDXL file: {"family", "unet", "vae", "text_encoder"
    (CLIP-L, None for the refiner), "text_encoder_2" (CLIP-G)}."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    # From the defining modules: for `from diffusers import ...` mypy reads diffusers' dummy
    # placeholder classes.
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from plinth.nodes.models.single_file import infer_vae_config

    family = detect(state)
    if family is None:
        raise NodeInputError(f"{name}: not an SDXL checkpoint (no conditioner.embedders text models)")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    g_prefix = CLIP_G_BASE if family == "sdxl" else CLIP_G_REFINER

    config = infer_unet_config(shapes)
    g_config = clip_g_config(shapes, g_prefix)
    pooled = g_config["projection_dim"]
    expected = pooled + time_numbers(family) * SIZE_EMBED_DIM
    if config["projection_class_embeddings_input_dim"] != expected:
        raise NodeInputError(
            f"{name}: the UNet embeds {config['projection_class_embeddings_input_dim']} numbers beside the text, "
            f"where an {family} model with a {pooled}-wide pooled text embeds {expected}"
        )
    unet = UNet2DConditionModel(**config)
    load_strict(unet, convert_ldm_unet_checkpoint(state, copy.deepcopy(dict(unet.config))), name, "UNet")

    vae_config = infer_vae_config(shapes)
    vae_config["scaling_factor"] = VAE_SCALE
    vae = AutoencoderKL(**vae_config)
    load_strict(vae, convert_ldm_vae_checkpoint(state, copy.deepcopy(vae_config)), name, "VAE")

    clip_l = None
    if family == "sdxl":
        clip_l = CLIPTextModel(CLIPTextConfig(**clip_l_config(shapes, CLIP_L)))
        load_strict(clip_l, _text_state(state, CLIP_L, set(clip_l.state_dict())), name, "CLIP-L text model")
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**g_config))
    load_strict(clip_g, convert_clip_g(state, g_prefix), name, "CLIP-G text model")

    context = sum(m.config.hidden_size for m in (clip_l, clip_g) if m is not None)
    if config["cross_attention_dim"] != context:
        raise NodeInputError(
            f"{name}: the UNet attends to {config['cross_attention_dim']}-wide text, its text models give {context}"
        )
    return {"family": family, "unet": unet, "vae": vae, "text_encoder": clip_l, "text_encoder_2": clip_g}
