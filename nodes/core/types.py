"""The values that flow along links between nodes (ComfyUI's link types).

IMAGE is a float tensor [B,H,W,C] in 0..1 and MASK a float tensor [B,H,W], as in ComfyUI, so
graphs mean the same thing on both. MODEL, CLIP and VAE are small descriptions pointing at a
checkpoint held by the model manager; they never hold weights themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from plinth.nodes.core.context import ModelHandle, NodeContext
from plinth.nodes.models.checkpoint import StableDiffusion
from plinth.nodes.patches.model_patch import ModelPatch


@dataclass(frozen=True)
class CheckpointPart:
    """A MODEL, CLIP or VAE: one part of a loaded checkpoint, plus the patches (LoRA, ...)
    the graph applied to it. Applying a patch makes a new value; the weights stay shared."""

    checkpoint: ModelHandle
    patches: tuple[ModelPatch, ...] = ()

    def load(self, ctx: NodeContext) -> StableDiffusion:
        return ctx.model(self.checkpoint)

    def with_patch(self, patch: ModelPatch):
        return replace(self, patches=(*self.patches, patch))


@dataclass(frozen=True)
class DiffusionModel(CheckpointPart):
    """MODEL: the denoising UNet and its noise schedule. `sampling` overrides the schedule and
    parameterisation the checkpoint declares (ModelSamplingDiscrete, ...): a tuple naming a
    constructor of plinth.nodes.sampling.model_sampling and its arguments; () keeps the
    checkpoint's own."""

    sampling: tuple[Any, ...] = ()

    def with_sampling(self, sampling: tuple[Any, ...]) -> DiffusionModel:
        return replace(self, sampling=sampling)


@dataclass(frozen=True)
class TextEncoder(CheckpointPart):
    """CLIP: tokenizers and text models. stop_at_layer picks the layer prompts are read from
    (-1 the last); None is the family's own choice (SD1.x: the last, through the final layer
    norm; SDXL: the penultimate, as it is)."""

    stop_at_layer: int | None = None


@dataclass(frozen=True)
class Vae:
    """VAE: pixels to latents and back; the VAE of a checkpoint, or one loaded on its own."""

    source: ModelHandle

    def module(self, ctx: NodeContext) -> Any:
        """The AutoencoderKL."""
        loaded = ctx.model(self.source)
        return loaded.vae if isinstance(loaded, StableDiffusion) else loaded


@dataclass(frozen=True)
class ControlSpec:
    """One ControlNet applied to a conditioning entry: hint image, strength and the part of
    the schedule (0 = start, 1 = end) in which it acts."""

    controlnet: ModelHandle
    hint: torch.Tensor = field(compare=False)  # IMAGE [B,H,W,C] in 0..1
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0


@dataclass
class ConditioningEntry:
    """One encoded prompt: token embeddings [1, 77*k, D] plus options, as in ComfyUI:
    "area" (h, w, y, x) in latent cells and "strength" (ConditioningSetArea), "controls"
    (a tuple of ControlSpec), "concat_latent" (unscaled LATENT samples) and "concat_mask"
    ([B,1,H,W]) for inpainting models."""

    embeds: torch.Tensor
    options: dict[str, Any] = field(default_factory=dict)


# CONDITIONING is a list of entries, as in ComfyUI (combining conditioning concatenates lists).
Conditioning = list[ConditioningEntry]


@dataclass
class Latent:
    """LATENT: samples [B,C,H/8,W/8] in the VAE's own (unscaled) space, as ComfyUI keeps them,
    an optional noise mask [B,1,h,w] limiting where sampling may change them, and, for entries
    taken out of a batch, their places in it (so each keeps the noise it had there)."""

    samples: torch.Tensor
    noise_mask: torch.Tensor | None = None
    batch_index: tuple[int, ...] | None = None
