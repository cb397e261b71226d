"""Loading Stable Diffusion 1.x checkpoints into torch objects, fully offline.

Two layouts load: a diffusers folder (model_index.json, unet/, vae/, text_encoder/, ...) and a
single .safetensors file in the original SD1.x key layout. The single file's architecture comes
from the weightless SD1.5 config shipped in configs/sd15, so no config is fetched from anywhere.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plinth.nodes.context import NodeInputError
from plinth.nodes.models.tokenizer import load_tokenizer, write_tokenizer_files

SD15_CONFIG = Path(__file__).resolve().parent / "configs" / "sd15"
SD1_UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
SD1_TEXT_PREFIX = "cond_stage_model.transformer."


@dataclass
class StableDiffusion:
    """The parts of an SD1.x checkpoint the nodes use, on one device and dtype."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell along one side (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size()
                   for m in (self.unet, self.vae, self.text_encoder) for p in m.parameters())


def tokenizer_dir(models_dir: Path) -> Path:
    """Where the offline CLIP tokenizer is written once per models directory."""
    return write_tokenizer_files(models_dir / ".plinth" / "clip-tokenizer")


def load_checkpoint(path: Path, models_dir: Path, device: torch.device, dtype: torch.dtype) -> StableDiffusion:
    """Load a diffusers folder or an original-layout .safetensors file."""
    if path.is_dir():
        model = _load_folder(path, models_dir)
    elif path.suffix == ".safetensors":
        model = _load_single_file(path, models_dir)
    else:
        raise NodeInputError(f"{path.name}: only diffusers folders and .safetensors files load")
    for module in (model.unet, model.vae, model.text_encoder):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model


def _load_folder(path: Path, models_dir: Path) -> StableDiffusion:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    if not (path / "unet").is_dir() or not (path / "vae").is_dir() or not (path / "text_encoder").is_dir():
        raise NodeInputError(f"{path.name}: a diffusers folder needs unet/, vae/ and text_encoder/")
    tok = path / "tokenizer"
    return StableDiffusion(
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True),
        tokenizer=load_tokenizer(tok if tok.is_dir() else tokenizer_dir(models_dir)),
        scheduler_config=_scheduler_config(path / "scheduler" / "scheduler_config.json"),
    )


def _load_single_file(path: Path, models_dir: Path) -> StableDiffusion:
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    if SD1_UNET_KEY not in keys or not any(k.startswith(SD1_TEXT_PREFIX) for k in keys):
        raise NodeInputError(f"{path.name}: not an SD1.x checkpoint in the original key layout "
                             f"(no {SD1_UNET_KEY} or {SD1_TEXT_PREFIX}* keys)")
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(_sd15_config_dir(models_dir)), local_files_only=True,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return StableDiffusion(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                           _scheduler_config(SD15_CONFIG / "scheduler" / "scheduler_config.json"))


def _sd15_config_dir(models_dir: Path) -> Path:
    """The shipped SD1.5 configs plus the offline tokenizer, as one diffusers config folder."""
    target = models_dir / ".plinth" / "sd15-config"
    if not (target / "tokenizer" / "vocab.json").exists():
        shutil.copytree(SD15_CONFIG, target, dirs_exist_ok=True)
        shutil.copytree(tokenizer_dir(models_dir), target / "tokenizer", dirs_exist_ok=True)
    return target


def _scheduler_config(path: Path) -> dict[str, Any]:
    if path.exists():
        return dict(json.loads(path.read_text()))
    return dict(json.loads((SD15_CONFIG / "scheduler" / "scheduler_config.json").read_text()))
