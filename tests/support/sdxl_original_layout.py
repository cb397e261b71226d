"""Write diffusers SDXL base / refiner models as original (Stability AI "sgm") single-file checkpoints.

ComfyUI graphs name checkpoints such as ``sd_xl_base_1.0.safetensors`` and ``sd_xl_refiner_1.0.safetensors``: one
file holding the UNet under ``model.diffusion_model.``, the VAE under ``first_stage_model.`` and the text encoders
under ``conditioner.embedders.N.``. The base has CLIP-L (transformers layout) as embedder 0 and OpenCLIP ViT-bigG
(open_clip layout) as embedder 1; the refiner has only the OpenCLIP one, as embedder 0. Tests cannot download such
files, so this module builds small random models with diffusers/transformers and writes them in that layout (the
inverse of what diffusers' single-file loader converts). It is the SDXL counterpart of ``sd_original_layout``,
whose UNet and VAE block mappings it reuses: SDXL keeps SD1's block naming and only adds the ``label_emb`` (micro
-conditioning) embedding, deeper transformer stacks and linear proj_in/proj_out, all of which the mapping handles.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from support.sd_original_layout import (
    UNET_PREFIX,
    VAE_PREFIX,
    _PrefixMap,
    _rename,
    _unet_prefixes,
    _vae_prefixes,
    small_sd15_configs,
)

CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
REFINER_CLIP_G_PREFIX = "conditioner.embedders.0.model."

# SDXL's micro-conditioning: every size/crop/score number becomes a 256-wide sinusoidal embedding. A fixed constant
# of the architecture (loaders derive the number of conditioning values from label_emb's input width with it).
TIME_EMBED_DIM = 256

# The real UNet configs of stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 (keys that differ from
# diffusers' defaults, plus the ones the layout depends on). attention_head_dim is, by diffusers' naming quirk, the
# number of heads per level: SDXL uses 64-dimensional heads throughout.
_SDXL_BASE_UNET: dict = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": 1280 + 6 * TIME_EMBED_DIM,  # pooled CLIP-G + 6 size/crop values
    "cross_attention_dim": 768 + 1280,  # CLIP-L and CLIP-G hidden states, concatenated
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
_SDXL_REFINER_UNET: dict = {
    **_SDXL_BASE_UNET,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [384, 768, 1536, 1536],
    "transformer_layers_per_block": 4,
    "attention_head_dim": [6, 12, 24, 24],
    "projection_class_embeddings_input_dim": 1280 + 5 * TIME_EMBED_DIM,  # pooled CLIP-G + size, crop, aesthetic score
    "cross_attention_dim": 1280,  # CLIP-G hidden states only
}
# text_encoder_2 of stabilityai/stable-diffusion-xl-base-1.0 (OpenCLIP ViT-bigG/14 as a transformers model).
_SDXL_CLIP_G: dict = {
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 1280,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# diffusers' add_embedding is ldm's label_emb: Sequential(Sequential(Linear, SiLU, Linear)).
_SDXL_UNET_EXTRA: _PrefixMap = [
    ("add_embedding.linear_1.", "label_emb.0.0.", {}),
    ("add_embedding.linear_2.", "label_emb.0.2.", {}),
]

# One transformers CLIP encoder layer (keys after ``encoder.layers.{i}.``) -> open_clip resblock names; q/k/v are
# handled apart (open_clip fuses them into in_proj).
_OPEN_CLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "self_attn.out_proj.": "attn.out_proj.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def _heads(channels: int) -> int:
    """SDXL's head count for a width: 64-dimensional heads, at least one (the loader infers heads the same way)."""
    return max(1, channels // 64)


def small_sdxl_configs(refiner: bool = False) -> dict:
    """SDXL base (or refiner) configs shrunk to a few million parameters, with exactly the real key layout.

    Only widths and depths shrink: levels, block types, attention placement, linear projections, the 256-wide
    micro-conditioning embedding and the 77-token / 49408-token text setup stay. Transformer stacks keep being
    several blocks deep where the real ones are (base [1, 2, 3] instead of [1, 2, 10]; refiner 2 instead of 4) so
    that a loader must count ``transformer_blocks.K`` rather than assume one. Heads stay 64-dimensional,
    ``cross_attention_dim`` is the concatenated text width and ``projection_class_embeddings_input_dim`` is CLIP-G's
    pooled width plus 6 (base) or 5 (refiner) micro-conditioning embeddings, as the loader infers them.
    Returns {"unet", "vae", "text_encoder" (CLIP-L; None for the refiner), "text_encoder_2" (CLIP-G)}.
    """
    sd15 = small_sd15_configs()
    clip_l = sd15["text_encoder"]  # hidden 64, 1 head, 256 intermediate, 3 layers, quick_gelu, projection 64
    clip_g = dict(_SDXL_CLIP_G)
    clip_g.update(hidden_size=128, intermediate_size=512, num_hidden_layers=3, projection_dim=64)
    clip_g["num_attention_heads"] = _heads(clip_g["hidden_size"])
    vae = dict(sd15["vae"], scaling_factor=0.13025)

    unet = copy.deepcopy(_SDXL_REFINER_UNET if refiner else _SDXL_BASE_UNET)
    if refiner:
        channels = [32, 64, 128, 128]
        unet.update(transformer_layers_per_block=[2, 2, 2, 2], cross_attention_dim=clip_g["hidden_size"])
        unet["projection_class_embeddings_input_dim"] = clip_g["projection_dim"] + 5 * TIME_EMBED_DIM
    else:
        channels = [32, 64, 128]
        unet.update(transformer_layers_per_block=[1, 2, 3])
        unet["cross_attention_dim"] = clip_l["hidden_size"] + clip_g["hidden_size"]
        unet["projection_class_embeddings_input_dim"] = clip_g["projection_dim"] + 6 * TIME_EMBED_DIM
    unet.update(sample_size=8, block_out_channels=channels, attention_head_dim=[_heads(c) for c in channels])
    return {"unet": unet, "vae": vae, "text_encoder": None if refiner else clip_l, "text_encoder_2": clip_g}


def build_random_sdxl(configs: dict, seed: int = 0) -> dict[str, torch.nn.Module | None]:
    """Build {"unet", "vae", "text_encoder", "text_encoder_2"} with deterministic random weights, in eval mode.

    ``text_encoder`` (CLIP-L) is None when ``configs["text_encoder"]`` is (the refiner). Every parameter gets seeded
    noise, as in ``build_random_sd``: norms, biases and zero-initialised layers would otherwise be equal across
    layers and a mapping that swaps them (or q/k/v inside in_proj) would go unnoticed. The global RNG is untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        clip_l = configs.get("text_encoder")
        text_encoder = CLIPTextModel(CLIPTextConfig(**clip_l)) if clip_l is not None else None
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
        models = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
        with torch.no_grad():
            for model in models.values():
                if model is None:
                    continue
                for param in model.parameters():
                    param.add_(torch.randn_like(param) * 0.05)
                model.eval()
    return models


def sdxl_unet_prefixes(config: dict) -> _PrefixMap:
    """The diffusers -> ldm UNet prefix map for SDXL: SD1's block mapping plus the label_emb embedding."""
    return _unet_prefixes(config) + _SDXL_UNET_EXTRA


def open_clip_state_dict(text_encoder_2: CLIPTextModelWithProjection) -> dict[str, torch.Tensor]:
    """Return a transformers CLIPTextModelWithProjection's weights in open_clip's layout (no prefix).

    The inverse of diffusers' ``convert_open_clip_checkpoint``: q/k/v are concatenated into ``in_proj_weight`` /
    ``in_proj_bias`` (in that order), ``text_projection`` is stored transposed ([width, projection]) because open_clip
    multiplies ``x @ text_projection``, and ``positional_embedding`` is a bare parameter. ``logit_scale`` (open_clip's
    CLIP-loss temperature, log(100) once trained) is written as real files carry it; loaders must ignore it.
    """
    # transformers 5.x: CLIPTextModelWithProjection keys start with `text_model.` (it wraps a CLIPTextModel) while
    # CLIPTextModel's own keys no longer do; strip it so either layout works.
    state = {key.removeprefix("text_model."): tensor for key, tensor in text_encoder_2.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for layer in range(text_encoder_2.config.num_hidden_layers):
        source, target = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{source}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            out[f"{target}attn.in_proj_{kind}"] = torch.cat(qkv)
        for old, new in _OPEN_CLIP_LAYER.items():
            for kind in ("weight", "bias"):
                out[f"{target}{new}{kind}"] = state.pop(f"{source}{old}{kind}")
    for old, new in _OPEN_CLIP_TOP.items():
        out[new] = state.pop(old)
    out["text_projection"] = state.pop("text_projection.weight").T.contiguous()
    if state:
        raise KeyError(f"no open_clip mapping for CLIP-G keys {sorted(state)}")
    out["logit_scale"] = torch.tensor(math.log(100.0))
    return out


def to_sdxl_original_state_dict(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel | None,
    text_encoder_2: CLIPTextModelWithProjection,
    position_ids: bool = True,
) -> dict[str, torch.Tensor]:
    """Return all models' weights under the original SDXL checkpoint keys; a refiner file when text_encoder is None.

    VAE mid-block attention q/k/v/proj_out are 1x1 convs in the original model, so their Linear weights become
    [C, C, 1, 1]. ``position_ids`` adds CLIP-L's ``embeddings.position_ids`` (int64 [1, 77]) as sd_xl_base_1.0 carries
    it although transformers no longer saves that buffer; the open_clip encoder never has one.
    """
    out: dict[str, torch.Tensor] = {}
    unet_prefixes = sdxl_unet_prefixes(unet.config)
    for key, tensor in unet.state_dict().items():
        out[UNET_PREFIX + _rename(key, unet_prefixes)] = tensor
    vae_prefixes = _vae_prefixes(vae.config)
    for key, tensor in vae.state_dict().items():
        out[VAE_PREFIX + _rename(key, vae_prefixes)] = tensor[:, :, None, None] if tensor.ndim == 2 else tensor
    if text_encoder is not None:
        # transformers 5.x CLIPTextModel keys have no `text_model.` level; older versions still have it.
        for key, tensor in text_encoder.state_dict().items():
            out[CLIP_L_PREFIX + key.removeprefix("text_model.")] = tensor
        if position_ids:
            positions = text_encoder.config.max_position_embeddings
            out[CLIP_L_PREFIX + "embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    clip_g_prefix = CLIP_G_PREFIX if text_encoder is not None else REFINER_CLIP_G_PREFIX
    for key, tensor in open_clip_state_dict(text_encoder_2).items():
        out[clip_g_prefix + key] = tensor
    return out


def write_sdxl_checkpoint(
    path: str | Path,
    models: dict,
    dtype: torch.dtype | None = None,
    position_ids: bool = True,
) -> None:
    """Save ``build_random_sdxl``'s models as one original-layout .safetensors file (a refiner file when
    ``models["text_encoder"]`` is None).

    ``dtype`` casts floating-point tensors (e.g. torch.float16, as the released SDXL files are stored); position_ids
    stay int64. ``position_ids=False`` writes a file without CLIP-L's position_ids, like newer tools save.
    """
    state = to_sdxl_original_state_dict(
        models["unet"],
        models["vae"],
        models.get("text_encoder"),
        models["text_encoder_2"],
        position_ids=position_ids,
    )
    tensors = {
        key: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).detach().contiguous()
        for key, t in state.items()
    }
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
