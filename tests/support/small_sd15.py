"""A small SD1.5-layout checkpoint for tests of the parts that follow SD1.5's block layout
(GLIGEN's 16 transformer blocks, a T2I-Adapter's 4 levels, UNet-only files), and a txt2img graph
over it.

The checkpoint has SD1.5's keys and blocks at a few million parameters (sd_original_layout's
small_sd15_configs), written once per models directory as an original-layout single file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from support.graph_builder import GraphBuilder
from support.sd_original_layout import build_random_sd, small_sd15_configs, write_original_checkpoint

NAME = "sd15-layout-seed5.safetensors"  # a name no other test module writes
SEED = 5


def small_sd15(models_dir: Path) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """The models, written to models/checkpoints/NAME unless a run already wrote them there."""
    unet, vae, text = build_random_sd(small_sd15_configs(), seed=SEED)
    path = models_dir / "checkpoints" / NAME
    if not path.exists():
        write_original_checkpoint(path, unet, vae, text)
    return unet, vae, text


def txt2img(
    positive: str = "a red sneaker on a plinth", seed: int = 11, ckpt: str = NAME
) -> tuple[GraphBuilder, dict[str, Any]]:
    """A 64x64, 2-step euler txt2img over the checkpoint, and its nodes by role ("checkpoint",
    "positive", "negative", "sampler") for a test to rewire."""
    graph = GraphBuilder()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=ckpt)
    pos = graph.add("CLIPTextEncode", text=positive, clip=checkpoint.out(1))
    neg = graph.add("CLIPTextEncode", text="blurry, watermark", clip=checkpoint.out(1))
    latent = graph.add("EmptyLatentImage", width=64, height=64, batch_size=2)
    sampler = graph.add(
        "KSampler",
        seed=seed,
        steps=2,
        cfg=7.0,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
        model=checkpoint.out(0),
        positive=pos.out(0),
        negative=neg.out(0),
        latent_image=latent.out(0),
    )
    decoded = graph.add("VAEDecode", samples=sampler.out(0), vae=checkpoint.out(2))
    graph.add("SaveImage", filename_prefix="small-sd15", images=decoded.out(0))
    return graph, {"checkpoint": checkpoint, "positive": pos, "negative": neg, "sampler": sampler}
