"""The contract between samplers and the rest of the sampling core.

A sampler is a function `fn(model, x, sigmas, run, **options) -> x`:

- `model` is a `Denoise`: `model(x, sigma)` returns the model's (guided) estimate of the clean
  sample x0 for a noisy `x` at noise level `sigma` (a 0-d float tensor). It carries its
  `model_sampling` (the parameterisation: epsilon, v, flow, ...) and, after each call,
  `last_uncond`: the unguided (negative) estimate of that call, which the CFG++ samplers use.
- `x` is the noisy sample at `sigmas[0]` in the sigma-space form ComfyUI uses (x0 + sigma * noise
  for epsilon models; (1 - sigma) * x0 + sigma * noise for flow models). `sigmas` run from high
  to low and usually end at 0.
- `run` is a `SamplerRun`: the seed, the noise samplers made from it, and `run.step(i, x,
  denoised)`, which the sampler calls once after each of its len(sigmas) - 1 steps.
- `options` are the sampler's own parameters (eta, s_noise, ...) with ComfyUI's defaults.

Every random draw comes from the seed through `run`, so a seed gives the same result on every
device; no sampler may call torch's global generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""noise(sigma, sigma_next) -> a standard-normal tensor of the sample's shape for that step."""


class ModelSamplingLike(Protocol):
    """What samplers may ask of a model's parameterisation (model_sampling.py has the classes)."""

    @property
    def sigma_min(self) -> float: ...

    @property
    def sigma_max(self) -> float: ...

    @property
    def flow(self) -> bool:
        """Flow matching: x = (1 - sigma) x0 + sigma noise, sigma in 0..1."""

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor: ...

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor: ...

    def noise_scaling(
        self, sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor, max_denoise: bool = False
    ) -> torch.Tensor: ...


class Denoise(Protocol):
    @property
    def model_sampling(self) -> ModelSamplingLike: ...

    @property
    def last_uncond(self) -> torch.Tensor | None: ...

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


@dataclass
class SamplerRun:
    """One sampling run's seed, noise and per-step callback."""

    seed: int
    on_step: Callable[[int, torch.Tensor, torch.Tensor], None] = field(default=lambda i, x, d: None)

    def step(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        """Report that step i (0-based) is done: x is the new sample, denoised the x0 estimate
        the step used."""
        self.on_step(i, x, denoised)

    def gaussian(self, x: torch.Tensor) -> NoiseSampler:
        """Independent normal noise per step, drawn on the CPU from the seed (ancestral samplers)."""
        generator = torch.Generator("cpu").manual_seed(self.seed % 2**64)

        def draw(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
            return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)

        return draw

    def brownian(self, x: torch.Tensor, sigmas: torch.Tensor) -> NoiseSampler:
        """Noise as increments of one Brownian motion over the run's sigma range, seeded (SDE
        samplers): steps that split an interval see consistent noise. Draws are made on the CPU."""
        from plinth.nodes.sampling.noise import BrownianTreeNoise

        positive = sigmas[sigmas > 0]
        return BrownianTreeNoise(x, float(positive.min()), float(sigmas.max()), self.seed)


@dataclass(frozen=True)
class Sampler:
    """SAMPLER: a sampling function and its options, as KSamplerSelect returns it."""

    name: str
    fn: Callable[..., torch.Tensor] = field(compare=False)
    options: tuple[tuple[str, Any], ...] = ()
    # With a noise mask, hold the area outside it at fresh noise (seed + 1) rather than at the
    # run's own noise: ComfyUI's "ddim" does so.
    random_inpaint_noise: bool = False
    # The guider computes the negative even at cfg 1: the CFG++ samplers step along it.
    needs_uncond: bool = False
    # KSampler lays out steps + 1 sigmas and drops the second-to-last, as ComfyUI does for
    # samplers whose last step before sigma 0 would otherwise be wasted (DPM-2, UniPC).
    discard_penultimate_sigma: bool = False

    def __call__(self, model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun) -> torch.Tensor:
        return self.fn(model, x, sigmas, run, **dict(self.options))


# Helpers many samplers share (k-diffusion's names).


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The ODE's derivative dx/dsigma given the x0 estimate."""
    return (x - denoised) / sigma


def ancestral_step(
    sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up) of an ancestral step of a variance-exploding (epsilon) model: step
    deterministically to sigma_down, then add sigma_up of fresh noise."""
    if not eta or float(sigma_to) == 0:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def flow_ancestral_step(
    sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma_down, alpha_ratio, renoise) of an ancestral step of a flow model, where the signal
    shrinks as noise is added: x_next = alpha_ratio * x_down + renoise * noise."""
    if not eta or float(sigma_to) == 0:
        return sigma_to, torch.ones_like(sigma_to), torch.zeros_like(sigma_to)
    downstep_ratio = 1 + (sigma_to / sigma_from - 1) * eta
    sigma_down = sigma_to * downstep_ratio
    alpha_ip1, alpha_down = 1 - sigma_to, 1 - sigma_down
    renoise = (sigma_to**2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2).clamp(min=0) ** 0.5
    return sigma_down, alpha_ip1 / alpha_down, renoise


def half_log_snr(sigma: torch.Tensor, flow: bool) -> torch.Tensor:
    """lambda = -log(sigma) for epsilon models, log((1 - sigma) / sigma) for flow models: the
    time variable of the DPM-Solver family."""
    if flow:
        return torch.log((1 - sigma) / sigma)
    return -torch.log(sigma)


def sigma_of_half_log_snr(lam: torch.Tensor, flow: bool) -> torch.Tensor:
    return torch.sigmoid(-lam) if flow else torch.exp(-lam)


def signal_scale(sigma: torch.Tensor, flow: bool) -> torch.Tensor:
    """alpha: how much of x0 is in x at sigma (1 for epsilon models, 1 - sigma for flow)."""
    return 1 - sigma if flow else torch.ones_like(sigma)


def phi(j: int, neg_h: torch.Tensor) -> torch.Tensor:
    """The exponential integrators' phi_j(-h) = integral_0^1 exp(-h (1 - t)) t^(j-1) / (j-1)! dt,
    with its small-h limit (1 / j!) where the closed form loses precision."""
    if abs(float(neg_h)) < 1e-4:
        return torch.full_like(neg_h, 1 / math.factorial(j))
    remainder = sum(neg_h**k / math.factorial(k) for k in range(j))
    return (torch.exp(neg_h) - remainder) / neg_h**j
