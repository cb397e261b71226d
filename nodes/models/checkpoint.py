"""Loading Stable Diffusion 1.x checkpoints into torch objects, fully offline.

Two layouts load: a diffusers folder (model_index.json, unet/, vae/, text_encoder/, ...) and a
single .safetensors file in the original SD1.x key layout. The single file's architecture is read
off its weights (single_file.py), so no config is fetched from anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plinth.nodes.context import NodeInputError
from plinth.nodes.models.single_file import SD15_CONFIG, load_single_file, load_vae_file
from plinth.nodes.models.tokenizer import load_tokenizer, write_tokenizer_files



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
        module.to(device).eval().requires_grad_(False)
        if module.dtype != dtype:
            module.to(dtype)
    return model


def load_vae(path: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """A standalone AutoencoderKL: a diffusers folder or a .safetensors file."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path, local_files_only=True) if path.is_dir() else load_vae_file(path)
    vae.to(device).eval().requires_grad_(False)
    return vae if vae.dtype == dtype else vae.to(dtype)


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
    unet, vae, text_encoder = load_single_file(path)
    return StableDiffusion(unet, vae, text_encoder, load_tokenizer(tokenizer_dir(models_dir)),
                           _scheduler_config(SD15_CONFIG / "scheduler" / "scheduler_config.json"))


def _scheduler_config(path: Path) -> dict[str, Any]:
    if path.exists():
        return dict(json.loads(path.read_text()))
    return dict(json.loads((SD15_CONFIG / "scheduler" / "scheduler_config.json").read_text()))
