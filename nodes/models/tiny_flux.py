"""`tiny-flux`: FLUX.1-dev's architecture with deterministic random weights, made on first use.

Like tiny-sd and tiny-sdxl, it lets a machine without a GPU or network run FLUX graphs end to
end in well under a second and exercises the code paths a real FLUX.1 checkpoint takes: the
flow-matching transformer with double and single blocks, 2x2 latent patches with rotary
positions and the guidance embedder; CLIP-L for the pooled text and a T5 encoder (over the real
T5 v1.1 vocabulary) for the token states; FLUX's 16-channel VAE with its shifted latent scale.
Widths are scaled down; the layout is FLUX's. Written as a diffusers folder, which
CheckpointLoaderSimple loads as it loads ComfyUI's all-in-one FLUX files. Images are structured
noise.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from plinth.nodes.models.checkpoint import tokenizer_dir
from plinth.nodes.models.t5 import write_t5_tokenizer_files
from plinth.nodes.models.tiny_sd import TEXT as TINY_CLIP

NAME = "tiny-flux"
SEED = 20261208
T5_WIDTH, CLIP_WIDTH = 32, 64

TRANSFORMER: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=32,  # FLUX's heads are 128 wide; rotary axes keep its 1/8, 7/16, 7/16 split
    num_attention_heads=2,
    joint_attention_dim=T5_WIDTH,
    pooled_projection_dim=CLIP_WIDTH,
    guidance_embeds=True,
    axes_dims_rope=(4, 14, 14),
)
T5: dict[str, Any] = dict(
    vocab_size=32128,
    d_model=T5_WIDTH,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new",
    is_gated_act=True,
    tie_word_embeddings=False,
)
VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(32, 32, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=32,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)


def ensure_tiny_flux(models_dir: Path) -> Path:
    """Make tiny-flux under models_dir/checkpoints in diffusers format unless it exists."""
    target = models_dir / "checkpoints" / NAME
    if (target / "model_index.json").exists():
        return target
    # From the defining modules: for `from diffusers import ...` mypy reads diffusers' dummy
    # placeholder classes (no torch Module, no save_pretrained).
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    staging = target.with_name(f".{NAME}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        transformer = FluxTransformer2DModel(**TRANSFORMER)
        clip_l = CLIPTextModel(CLIPTextConfig(**{**TINY_CLIP, "hidden_size": CLIP_WIDTH}))
        t5 = T5EncoderModel(T5Config(**T5))
        vae = AutoencoderKL(**VAE)
    write_flux_folder(models_dir, staging, transformer, clip_l, t5, vae)
    try:
        os.replace(staging, target)
    except OSError:  # another process made it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_flux_folder(models_dir: Path, folder: Path, transformer: Any, clip_l: Any, t5: Any, vae: Any) -> None:
    """A FLUX.1 diffusers folder of these modules (FluxPipeline's layout, the offline CLIP and T5
    tokenizers, FlowMatchEuler with FLUX's resolution shift); tiny-flux and the benchmarks'
    reduced FLUX are written with it."""
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    transformer.save_pretrained(folder / "transformer")
    clip_l.save_pretrained(folder / "text_encoder")
    t5.save_pretrained(folder / "text_encoder_2")
    vae.save_pretrained(folder / "vae")
    shutil.copytree(tokenizer_dir(models_dir), folder / "tokenizer")
    write_t5_tokenizer_files(folder / "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    ).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "FluxPipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
