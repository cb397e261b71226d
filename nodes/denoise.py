"""The denoising loop shared by the sampler nodes: classifier-free guidance over a diffusers
scheduler, with a progress and cancellation check at every model call."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from plinth.nodes.samplers import make_scheduler, takes_generator


@dataclass
class SamplingPlan:
    """What to sample: names as ComfyUI gives them, plus seed and guidance."""

    sampler_name: str
    scheduler: str
    steps: int
    cfg: float
    denoise: float
    seed: int


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Noise drawn on the CPU from the seed, as ComfyUI draws it, so a seed means the same
    image on every device."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def match_lengths(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat prompt embeddings [1, 77*k, D] to a common length so both sides batch together."""
    la, lb = a.shape[1], b.shape[1]
    if la == lb:
        return a, b
    common = math.lcm(la, lb)
    return a.repeat(1, common // la, 1), b.repeat(1, common // lb, 1)


def sample(
    unet: Any,
    scheduler_config: dict[str, Any],
    plan: SamplingPlan,
    latents: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    on_step: Callable[[int, int], None],
) -> torch.Tensor:
    """Sample from `latents` (already scaled into the UNet's space) and return the result.

    With denoise < 1 the schedule is computed for steps/denoise steps and only its last `steps`
    run, starting from the given latents with the matching amount of noise (ComfyUI's meaning).
    """
    device, dtype = latents.device, next(unet.parameters()).dtype
    scheduler = make_scheduler(plan.sampler_name, plan.scheduler, scheduler_config)
    total = plan.steps if plan.denoise >= 1.0 else max(plan.steps, int(plan.steps / max(plan.denoise, 1e-4)))
    scheduler.set_timesteps(total, device=device)
    start = (total - plan.steps) * scheduler.order
    timesteps = scheduler.timesteps[start:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)

    noise = initial_noise(tuple(latents.shape), plan.seed).to(device)
    if plan.denoise >= 1.0 and not latents.any():
        x = noise * scheduler.init_noise_sigma
    else:
        x = scheduler.add_noise(latents.float(), noise, timesteps[:1])
    step_generator = torch.Generator("cpu").manual_seed(plan.seed + 1 if plan.seed < 2**64 - 1 else 0)
    step_kwargs = {"generator": step_generator} if takes_generator(scheduler) else {}

    batch = latents.shape[0]
    guided = plan.cfg != 1.0
    if guided:
        negative, positive = match_lengths(negative, positive)
        context = torch.cat([negative.expand(batch, -1, -1), positive.expand(batch, -1, -1)]).to(device, dtype)
    else:
        context = positive.expand(batch, -1, -1).to(device, dtype)

    with torch.inference_mode():
        for i, t in enumerate(timesteps):
            model_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
            pred = unet(model_in.to(dtype), t, encoder_hidden_states=context).sample.float()
            if guided:
                uncond, cond = pred.chunk(2)
                pred = uncond + plan.cfg * (cond - uncond)
            x = scheduler.step(pred, t, x, **step_kwargs).prev_sample
            on_step(i + 1, len(timesteps))
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"sampling with {plan.sampler_name}/{plan.scheduler} produced non-finite values")
    return x
