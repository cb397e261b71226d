"""One sampling run: noise, sigmas, a guider and a sampler applied to a LATENT.

KSampler, KSamplerAdvanced, SamplerCustom and SamplerCustomAdvanced all end here. The run:
scales the latent into the model's space, mixes in the seed's noise at the first sigma (at full
strength when the schedule starts at the model's sigma_max), keeps a noise mask's outside at the
current noise level before every model call and at the given latent in every x0 estimate
(inpainting with a plain model), checks for cancellation at every model call, reports progress
after every step, and hands back the latent (with its leftover noise when the schedule stops
above 0, in the x0 + sigma * noise form) and the last x0 estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from plinth.nodes.core.context import NodeContext
from plinth.nodes.core.types import DiffusionModel, Latent
from plinth.nodes.models.checkpoint import StableDiffusion
from plinth.nodes.patches.model_patch import patched
from plinth.nodes.resize import mask_planes
from plinth.nodes.sampling.base import Sampler, SamplerRun
from plinth.nodes.sampling.guidance import GuidedDenoiser, Guider
from plinth.nodes.sampling.model_sampling import ModelSampling, latent_format, resolve


def initial_noise(shape: tuple[int, ...], seed: int, batch_index: tuple[int, ...] | None = None) -> torch.Tensor:
    """Noise drawn on the CPU from the seed, one batch entry after the other, so a seed means
    the same image on every device, and an entry taken out of a batch (batch_index, as
    LatentFromBatch sets it) gets the very noise it had in the batch."""
    generator = torch.Generator("cpu").manual_seed(seed % 2**64)
    indices = batch_index if batch_index is not None else range(shape[0])
    draws = [torch.randn((1, *shape[1:]), generator=generator, dtype=torch.float32) for _ in range(max(indices) + 1)]
    return torch.cat([draws[i] for i in indices])


@dataclass(frozen=True)
class Noise:
    """NOISE: the seed's noise (RandomNoise) or none (DisableNoise: the latent is already noisy)."""

    seed: int = 0
    enabled: bool = True

    def generate(self, latent: Latent) -> torch.Tensor:
        shape = tuple(latent.samples.shape)
        return initial_noise(shape, self.seed, latent.batch_index) if self.enabled else torch.zeros(shape)


def model_sampling_of(ctx: NodeContext, model: DiffusionModel) -> ModelSampling:
    """The schedule and parameterisation `model` samples with (schedulers build on it)."""
    sd: StableDiffusion = model.load(ctx)
    return resolve(model.sampling, sd.scheduler_config)


@dataclass
class RunResult:
    latent: Latent  # the sampled latent
    denoised: Latent  # the last x0 estimate (SamplerCustomAdvanced's denoised_output)
    model_calls: int


class MaskedDenoiser:
    """A noise mask with a plain model: outside the mask the sample is held at the given latent
    (noised to the current sigma before each call, exact in each x0 estimate)."""

    def __init__(self, inner: GuidedDenoiser, mask: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor):
        self.inner, self.mask, self.latent, self.noise = inner, mask, latent, noise
        self.model_sampling = inner.model_sampling

    @property
    def last_uncond(self) -> torch.Tensor | None:
        return self.inner.last_uncond

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        keep = 1 - self.mask
        x = x * self.mask + self.model_sampling.noise_scaling(sigma, self.noise, self.latent) * keep
        return self.inner(x, sigma) * self.mask + self.latent * keep


def sample(
    ctx: NodeContext,
    guider: Guider,
    sampler: Sampler,
    sigmas: torch.Tensor,
    noise: Noise,
    latent: Latent,
) -> RunResult:
    """Run `sampler` over `sigmas` from `latent`; see the module docstring."""
    if len(sigmas) < 2:
        return RunResult(latent, latent, 0)
    sd: StableDiffusion = guider.model.load(ctx)
    ms = resolve(guider.model.sampling, sd.scheduler_config)
    device = ctx.device
    into, out_of = latent_format(guider.model.sampling, sd.latent_scale, getattr(sd, "latent_shift", 0.0))
    sigmas = sigmas.to(device, torch.float32)
    clean = into(latent.samples.to(device, torch.float32))
    drawn = noise.generate(latent).to(device)
    max_denoise = math.isclose(ms.sigma_max, float(sigmas[0]), rel_tol=1e-5) or float(sigmas[0]) > ms.sigma_max
    x = ms.noise_scaling(sigmas[0], drawn, clean, max_denoise)

    guided = GuidedDenoiser(ctx, sd, guider, ms, latent, into, keep_negative=sampler.needs_uncond)
    denoiser: GuidedDenoiser | MaskedDenoiser = guided
    mask = None
    if latent.noise_mask is not None:
        mask = mask_planes(latent.noise_mask.to(device), clean.shape[-2], clean.shape[-1], clean.shape[0]).clamp(0, 1)
        held = drawn
        if sampler.random_inpaint_noise:
            held = initial_noise(tuple(clean.shape), (noise.seed + 1) % 2**64).to(device)
        denoiser = MaskedDenoiser(guided, mask, clean, held)

    total = len(sigmas) - 1
    last: dict[str, torch.Tensor] = {}

    def on_step(i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        last["denoised"] = denoised
        ctx.progress(min(i + 1, total), total)

    run = SamplerRun(noise.seed, on_step)
    with torch.inference_mode(), patched(ctx, guider.model.patches, sd.unet):
        samples = sampler(denoiser, x, sigmas, run)
    samples = ms.inverse_noise_scaling(sigmas[-1], samples)
    if not torch.isfinite(samples).all():
        raise FloatingPointError(f"sampling with {sampler.name} produced non-finite values")
    result = out_of(samples).cpu()
    if mask is not None and float(sigmas[-1]) == 0:  # unscaled, so the kept cells are bit-exact
        keep = mask.cpu()
        result = result * keep + latent.samples.float() * (1 - keep)
    denoised = out_of(last.get("denoised", samples)).cpu()
    return RunResult(replace(latent, samples=result), replace(latent, samples=denoised), guided.calls)
