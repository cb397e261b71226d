"""`tiny-sdxl` and `tiny-sdxl-refiner`: SDXL's architecture with deterministic random weights.

Like tiny-sd, they let a machine without a GPU or network run SDXL graphs end to end in well
under a second and exercise the code paths a real SDXL checkpoint takes: two text models
(CLIP-L and a projecting CLIP-G over the real 49,408-token vocabulary, the second tokenizer
padding with "!"), their embeddings joined along the channels, the pooled text and the six size
numbers (the refiner: CLIP-G alone and five numbers ending in the aesthetic score) embedded
beside the time step, linear attention projections, a transformer depth above one, and SDXL's
latent scale. Widths are scaled down; the layout is SDXL's. Images are structured noise.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from plinth.nodes.models.checkpoint import SD15_CONFIG, tokenizer_dir
from plinth.nodes.models.sdxl import BASE_NUMBERS, REFINER_NUMBERS, SIZE_EMBED_DIM, VAE_SCALE
from plinth.nodes.models.tiny_sd import VAE as TINY_SD_VAE

BASE, REFINER = "tiny-sdxl", "tiny-sdxl-refiner"
SEEDS = {BASE: 20261206, REFINER: 20261207}
POOLED = 32  # CLIP-G's projection width

TEXT_L: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=1,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
    projection_dim=64,
)
TEXT_G: dict[str, Any] = {**TEXT_L, "hidden_size": 64, "hidden_act": "gelu", "projection_dim": POOLED}


def unet_config(refiner: bool) -> dict[str, Any]:
    """SDXL's UNet layout at small widths: a plain first level, an attention level two
    transformer blocks deep, linear projections, the size embedding beside the time step."""
    numbers = REFINER_NUMBERS if refiner else BASE_NUMBERS
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(1, 1),  # diffusers' name for the head count: 64-channel heads
        use_linear_projection=True,
        cross_attention_dim=TEXT_G["hidden_size"] + (0 if refiner else TEXT_L["hidden_size"]),
        addition_embed_type="text_time",
        addition_time_embed_dim=SIZE_EMBED_DIM,
        projection_class_embeddings_input_dim=POOLED + numbers * SIZE_EMBED_DIM,
        norm_num_groups=32,
    )


def _model_index(refiner: bool) -> dict[str, Any]:
    import diffusers

    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": [None, None] if refiner else ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": [None, None] if refiner else ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "force_zeros_for_empty_prompt": not refiner,
    }
    if refiner:
        index["requires_aesthetics_score"] = True
    return index


def _write_tokenizer(source: Path, target: Path, pad: str | None = None) -> None:
    shutil.copytree(source, target)
    if pad is None:
        return
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        data = json.loads((target / name).read_text())
        data["pad_token"] = pad
        (target / name).write_text(json.dumps(data))


def ensure_tiny_sdxl(models_dir: Path, name: str = BASE) -> Path:
    """Make tiny-sdxl (or tiny-sdxl-refiner) under models_dir/checkpoints in diffusers format
    unless it exists."""
    if name not in SEEDS:
        raise ValueError(f"{name!r} is not one of {', '.join(SEEDS)}")
    refiner = name == REFINER
    return write_sdxl_folder(
        models_dir,
        name,
        unet_config(refiner),
        None if refiner else TEXT_L,
        TEXT_G,
        {**TINY_SD_VAE, "scaling_factor": VAE_SCALE},
        SEEDS[name],
    )


def write_sdxl_folder(
    models_dir: Path,
    name: str,
    unet: dict[str, Any],
    text_l: dict[str, Any] | None,
    text_g: dict[str, Any],
    vae: dict[str, Any],
    seed: int,
) -> Path:
    """An SDXL diffusers folder of these configs with seeded random weights, made once under
    models_dir/checkpoints/name (a refiner when text_l is None); the benchmarks make reduced
    SDXL-layout models with it."""
    target = models_dir / "checkpoints" / name
    if (target / "model_index.json").exists():
        return target
    # From the defining modules: for `from diffusers import ...` mypy reads diffusers' dummy
    # placeholder classes (no torch Module, no save_pretrained).
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    refiner = text_l is None
    staging = target.with_name(f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = tokenizer_dir(models_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        UNet2DConditionModel(**unet).save_pretrained(staging / "unet")
        AutoencoderKL(**vae).save_pretrained(staging / "vae")
        if text_l is not None:
            CLIPTextModel(CLIPTextConfig(**text_l)).save_pretrained(staging / "text_encoder")
            _write_tokenizer(tokenizer, staging / "tokenizer")
        CLIPTextModelWithProjection(CLIPTextConfig(**text_g)).save_pretrained(staging / "text_encoder_2")
    _write_tokenizer(tokenizer, staging / "tokenizer_2", pad="!")
    shutil.copytree(SD15_CONFIG / "scheduler", staging / "scheduler")
    (staging / "model_index.json").write_text(json.dumps(_model_index(refiner), indent=2))
    try:
        os.replace(staging, target)
    except OSError:  # another process made it first
        shutil.rmtree(staging, ignore_errors=True)
    return target
