"""Sampler nodes: KSampler and KSamplerAdvanced, on the shared denoising loop.

Named after the nodes it declares: the sampler/scheduler names they offer come from
diffusers_schedulers.py and the loop they run is denoise.py's Denoiser; this module only turns
the nodes' inputs into a SamplingPlan.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from plinth.nodes.core.context import NodeContext
from plinth.nodes.core.schema import Choice, Float, Int, Link, Node, Output
from plinth.nodes.core.types import Conditioning, DiffusionModel, Latent
from plinth.nodes.denoise import Denoiser, SamplingPlan
from plinth.nodes.diffusers_schedulers import SAMPLERS, SCHEDULERS, check_combination


def _check_pair(inputs: dict[str, Any]) -> list[tuple[str, str, str]]:
    steps, denoise = inputs.get("steps", 1), inputs.get("denoise", 1.0)
    length = steps if denoise >= 1.0 or denoise <= 0 else int(steps / denoise)
    reason = check_combination(inputs.get("sampler_name", ""), inputs.get("scheduler", ""), length)
    return [("scheduler", "invalid_combination", reason)] if reason else []


def _sample(
    ctx: NodeContext,
    model: DiffusionModel,
    plan: SamplingPlan,
    latent: Latent,
    positive: Conditioning,
    negative: Conditioning,
) -> tuple[Latent]:
    samples = Denoiser(ctx, model.load(ctx), model, plan).run(latent, positive, negative, ctx.progress)
    return (replace(latent, samples=samples),)


class KSampler(Node):
    """Denoise a latent with a diffusion model, guided by positive and negative conditioning.

    denoise below 1 keeps part of the given latent (img2img): the schedule is computed for
    steps/denoise steps and only its last `steps` run.
    """

    CATEGORY = "sampling"
    OUTPUTS = (Output("LATENT"),)

    model = Link("MODEL")
    seed = Int(default=0, min=0, max=2**64 - 1, control_after_generate=True)
    steps = Int(default=20, min=1, max=10000, limit="steps")
    cfg = Float(default=8.0, min=0.0, max=100.0, step=0.1, round=0.01)
    sampler_name = Choice(options=tuple(SAMPLERS), default="euler")
    scheduler = Choice(options=tuple(SCHEDULERS), default="normal")
    positive = Link("CONDITIONING")
    negative = Link("CONDITIONING")
    latent_image = Link("LATENT")
    denoise = Float(default=1.0, min=0.0, max=1.0, step=0.01)

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> list[tuple[str, str, str]]:
        return _check_pair(inputs)

    def run(
        self,
        ctx: NodeContext,
        model: DiffusionModel,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        positive: Conditioning,
        negative: Conditioning,
        latent_image: Latent,
        denoise: float,
    ) -> tuple[Latent]:
        if denoise <= 0:
            return (latent_image,)
        plan = SamplingPlan(sampler_name, scheduler, steps, cfg, seed, denoise=denoise)
        return _sample(ctx, model, plan, latent_image, positive, negative)


class KSamplerAdvanced(Node):
    """KSampler over a step range of a longer schedule: add noise or not, and return the
    latent with its leftover noise for another sampler to finish (base and refiner, hires)."""

    CATEGORY = "sampling"
    OUTPUTS = (Output("LATENT"),)

    model = Link("MODEL")
    add_noise = Choice(options=("enable", "disable"), default="enable")
    noise_seed = Int(default=0, min=0, max=2**64 - 1, control_after_generate=True)
    steps = Int(default=20, min=1, max=10000, limit="steps")
    cfg = Float(default=8.0, min=0.0, max=100.0, step=0.1, round=0.01)
    sampler_name = Choice(options=tuple(SAMPLERS), default="euler")
    scheduler = Choice(options=tuple(SCHEDULERS), default="normal")
    positive = Link("CONDITIONING")
    negative = Link("CONDITIONING")
    latent_image = Link("LATENT")
    start_at_step = Int(default=0, min=0, max=10000)
    end_at_step = Int(default=10000, min=0, max=10000)
    return_with_leftover_noise = Choice(options=("disable", "enable"), default="disable")

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> list[tuple[str, str, str]]:
        return _check_pair(inputs)

    def run(
        self,
        ctx: NodeContext,
        model: DiffusionModel,
        add_noise: str,
        noise_seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        positive: Conditioning,
        negative: Conditioning,
        latent_image: Latent,
        start_at_step: int,
        end_at_step: int,
        return_with_leftover_noise: str,
    ) -> tuple[Latent]:
        plan = SamplingPlan(
            sampler_name,
            scheduler,
            steps,
            cfg,
            noise_seed,
            start_step=start_at_step,
            end_step=end_at_step,
            add_noise=add_noise == "enable",
            leftover_noise=return_with_leftover_noise == "enable",
        )
        return _sample(ctx, model, plan, latent_image, positive, negative)
