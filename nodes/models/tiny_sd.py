"""`tiny-sd`, the embedded default model: an SD1.x architecture with deterministic random weights.

It exists so that a fresh machine without a GPU and without network access can run every graph
end to end in well under a second: the same UNet, VAE and CLIP text model classes as SD1.5,
scaled down (UNet channels 32/64, a VAE with four blocks so latents are 1/8 of the image, a
2-layer CLIP text model over the real 49,408-token vocabulary). Its images are structured noise;
its job is to exercise every code path a real checkpoint takes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from plinth.nodes.models.checkpoint import SD15_CONFIG, tokenizer_dir

NAME = "tiny-sd"
SEED = 20261128

UNET: dict[str, Any] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=32,
)
VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=32,
    block_out_channels=(32, 32, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=64,
    scaling_factor=0.18215,
)
TEXT: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    projection_dim=64,
)


def ensure_tiny_sd(models_dir: Path) -> Path:
    """Make tiny-sd under models_dir/checkpoints/tiny-sd in diffusers format unless it exists."""
    target = models_dir / "checkpoints" / NAME
    if (target / "model_index.json").exists():
        return target
    # From the defining modules: for `from diffusers import ...` mypy reads diffusers' dummy
    # placeholder classes (no torch Module, no save_pretrained).
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    staging = target.with_name(f".{NAME}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    torch.manual_seed(SEED)
    UNet2DConditionModel(**UNET).save_pretrained(staging / "unet")
    AutoencoderKL(**VAE).save_pretrained(staging / "vae")
    CLIPTextModel(CLIPTextConfig(**TEXT)).save_pretrained(staging / "text_encoder")
    shutil.copytree(tokenizer_dir(models_dir), staging / "tokenizer")
    shutil.copytree(SD15_CONFIG / "scheduler", staging / "scheduler")
    index = json.loads((SD15_CONFIG / "model_index.json").read_text())
    (staging / "model_index.json").write_text(json.dumps(index, indent=2))
    try:
        os.replace(staging, target)
    except OSError:  # another process made it first
        shutil.rmtree(staging, ignore_errors=True)
    return target
