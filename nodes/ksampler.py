"""Sampler nodes: KSampler and KSamplerAdvanced, on the sampling core (nodes/sampling/).

Each turns its inputs into what SamplerCustomAdvanced takes (a CFG guider, a sampler, sigmas
and noise), with ComfyUI's rules for partial schedules: denoise < 1 runs the last `steps` of a
schedule of steps / denoise steps; KSamplerAdvanced runs steps start_at_step..end_at_step of a
`steps`-step schedule and, unless asked to keep the leftover noise, ends at sigma 0.
"""

from __future__ import annotations

from typing import Any

from plinth.nodes.core.context import NodeContext
from plinth.nodes.core.schema import Choice, Float, Int, Link, Node, Output
from plinth.nodes.core.types import Conditioning, DiffusionModel, Latent
from plinth.nodes.sampling.guidance import Guider
from plinth.nodes.sampling.run import Noise, model_sampling_of, sample
from plinth.nodes.sampling.samplers import SAMPLERS
from plinth.nodes.sampling.schedulers import SCHEDULERS, calculate_sigmas, denoise_sigmas, schedule_length

# Longest schedule (steps / denoise) a request may lay out: each sigma costs a model call.
MAX_SCHEDULE = 10000


def check_schedule(steps: int, denoise: float) -> list[tuple[str, str, str]]:
    length = schedule_length(steps, denoise)
    if length > MAX_SCHEDULE:
        reason = f"a schedule of {length} steps (steps / denoise) is longer than the {MAX_SCHEDULE} allowed"
        return [("denoise", "value_not_in_range", reason)]
    return []


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
    scheduler = Choice(options=tuple(SCHEDULERS), default="simple")
    positive = Link("CONDITIONING")
    negative = Link("CONDITIONING")
    latent_image = Link("LATENT")
    denoise = Float(default=1.0, min=0.0, max=1.0, step=0.01)

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> list[tuple[str, str, str]]:
        return check_schedule(inputs.get("steps", 1), inputs.get("denoise", 1.0))

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
        sampler = SAMPLERS[sampler_name]
        ms = model_sampling_of(ctx, model)
        sigmas = denoise_sigmas(ms, scheduler, steps, denoise, sampler.discard_penultimate_sigma)
        guider = Guider(model, positive, negative, cfg)
        return (sample(ctx, guider, sampler, sigmas, Noise(seed), latent_image).latent,)


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
    scheduler = Choice(options=tuple(SCHEDULERS), default="simple")
    positive = Link("CONDITIONING")
    negative = Link("CONDITIONING")
    latent_image = Link("LATENT")
    start_at_step = Int(default=0, min=0, max=10000)
    end_at_step = Int(default=10000, min=0, max=10000)
    return_with_leftover_noise = Choice(options=("disable", "enable"), default="disable")

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
        sampler = SAMPLERS[sampler_name]
        sigmas = calculate_sigmas(model_sampling_of(ctx, model), scheduler, steps, sampler.discard_penultimate_sigma)
        if end_at_step < len(sigmas) - 1:
            sigmas = sigmas[: end_at_step + 1].clone()
            if return_with_leftover_noise != "enable":
                sigmas[-1] = 0
        if start_at_step >= len(sigmas) - 1:
            return (latent_image,)
        sigmas = sigmas[start_at_step:]
        guider = Guider(model, positive, negative, cfg)
        noise = Noise(noise_seed, enabled=add_noise == "enable")
        return (sample(ctx, guider, sampler, sigmas, noise, latent_image).latent,)
