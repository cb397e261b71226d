"""The values that flow along links between nodes (ComfyUI's link types).

IMAGE is a float tensor [B,H,W,C] in 0..1 and MASK a float tensor [B,H,W], as in ComfyUI, so
graphs mean the same thing on both. MODEL, CLIP and VAE are small descriptions pointing at a
checkpoint held by the model manager; they never hold weights themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from plinth.nodes.context import ModelHandle, NodeContext
from plinth.nodes.models.checkpoint import StableDiffusion


@dataclass(frozen=True)
class CheckpointPart:
    """A MODEL, CLIP or VAE: one part of a loaded checkpoint."""

    checkpoint: ModelHandle

    def load(self, ctx: NodeContext) -> StableDiffusion:
        return ctx.model(self.checkpoint)


@dataclass(frozen=True)
class DiffusionModel(CheckpointPart):
    """MODEL: the denoising UNet and its noise schedule."""


@dataclass(frozen=True)
class TextEncoder(CheckpointPart):
    """CLIP: tokenizer and text model; stop_at_layer -1 is the last layer."""

    stop_at_layer: int = -1


@dataclass(frozen=True)
class Vae(CheckpointPart):
    """VAE: pixels to latents and back."""


@dataclass
class ConditioningEntry:
    """One encoded prompt: token embeddings [1, 77*k, D] plus options such as an area."""

    embeds: torch.Tensor
    options: dict[str, Any] = field(default_factory=dict)


# CONDITIONING is a list of entries, as in ComfyUI (combining conditioning concatenates lists).
Conditioning = list[ConditioningEntry]


@dataclass
class Latent:
    """LATENT: samples [B,C,H/8,W/8] in the VAE's own (unscaled) space, as ComfyUI keeps them,
    and an optional noise mask [B,1,h,w] limiting where sampling may change them."""

    samples: torch.Tensor
    noise_mask: torch.Tensor | None = None
