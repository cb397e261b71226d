"""Sampler nodes."""

from __future__ import annotations

from typing import Any

import torch

from plinth.nodes.context import NodeContext, NodeInputError
from plinth.nodes.denoise import SamplingPlan, sample
from plinth.nodes.samplers import SAMPLERS, SCHEDULERS, check_combination
from plinth.nodes.schema import Choice, Float, Int, Link, Node, Output
from plinth.nodes.types import Conditioning, DiffusionModel, Latent


def single_embedding(cond: Conditioning, which: str) -> torch.Tensor:
    if len(cond) != 1:
        raise NodeInputError(f"{which}: expected one conditioning entry, got {len(cond)}")
    return cond[0].embeds


class KSampler(Node):
    """Denoise a latent with a diffusion model, guided by positive and negative conditioning.

    denoise below 1 keeps part of the given latent (img2img): the schedule is computed for
    steps/denoise steps and only its last `steps` run.
    """

    CATEGORY = "sampling"
    OUTPUTS = (Output("LATENT"),)

    model = Link("MODEL")
    seed = Int(default=0, min=0, max=2**64 - 1, control_after_generate=True)
    steps = Int(default=20, min=1, max=10000)
    cfg = Float(default=8.0, min=0.0, max=100.0, step=0.1, round=0.01)
    sampler_name = Choice(options=tuple(SAMPLERS), default="euler")
    scheduler = Choice(options=tuple(SCHEDULERS), default="normal")
    positive = Link("CONDITIONING")
    negative = Link("CONDITIONING")
    latent_image = Link("LATENT")
    denoise = Float(default=1.0, min=0.0, max=1.0, step=0.01)

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> list[tuple[str, str, str]]:
        reason = check_combination(inputs.get("sampler_name", ""), inputs.get("scheduler", ""))
        return [("scheduler", "invalid_combination", reason)] if reason else []

    def run(self, ctx: NodeContext, model: DiffusionModel, seed: int, steps: int, cfg: float,
            sampler_name: str, scheduler: str, positive: Conditioning, negative: Conditioning,
            latent_image: Latent, denoise: float) -> tuple[Latent]:
        if denoise <= 0:
            return (latent_image,)
        sd = model.load(ctx)
        plan = SamplingPlan(sampler_name, scheduler, steps, cfg, denoise, seed)
        latents = latent_image.samples.to(ctx.device, torch.float32) * sd.latent_scale
        if latents.shape[1] != sd.unet.config.in_channels:
            raise NodeInputError(f"latent_image has {latents.shape[1]} channels; the model takes "
                                 f"{sd.unet.config.in_channels}")
        out = sample(sd.unet, sd.scheduler_config, plan, latents, single_embedding(positive, "positive"),
                     single_embedding(negative, "negative"), ctx.progress)
        return (Latent((out / sd.latent_scale).cpu()),)
