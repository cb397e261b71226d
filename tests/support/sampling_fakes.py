"""Fakes for the sampler tests: SD1.5's discrete model sampling or a flow one, a denoiser whose
guided and unguided x0 estimates are given functions of (x, sigma), a run that records its steps
and scripts (or seeds) its noise, a noise sampler scripted from its arguments, Karras and flow
schedules, and the reference denoisers the step-by-step tests follow."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from plinth.nodes.sampling.base import NoiseSampler, Sampler, SamplerRun

Estimate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _sd15_log_sigmas() -> torch.Tensor:
    """log sigma of SD1.5's 1000 timesteps (scaled-linear betas 0.00085..0.012)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log()


_SD15_LOG_SIGMAS = _sd15_log_sigmas()


class FakeModelSampling:
    """ModelSamplingLike with ComfyUI's timestep/sigma conventions (which percent_to_sigma relies
    on) and noise scaling. Epsilon: SD1.5's 1000 discrete sigmas, timestep = nearest index,
    x = x0 + sigma noise. Flow: discrete flow without shift, timestep = 1000 sigma,
    x = (1 - sigma) x0 + sigma noise."""

    def __init__(self, flow: bool = False) -> None:
        self.flow = flow
        self.log_sigmas = _SD15_LOG_SIGMAS
        if flow:
            self.sigma_min, self.sigma_max = 0.001, 1.0
        else:
            self.sigma_min, self.sigma_max = float(self.log_sigmas[0].exp()), float(self.log_sigmas[-1].exp())

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.flow:
            return sigma * 1000
        return (sigma.double().log() - self.log_sigmas[:, None]).abs().argmin(0).view(sigma.shape)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        if self.flow:
            return timestep / 1000
        t = timestep.double().clamp(0, 999)
        w = t.frac()
        return ((1 - w) * self.log_sigmas[t.floor().long()] + w * self.log_sigmas[t.ceil().long()]).exp()

    def noise_scaling(
        self, sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor, max_denoise: bool = False
    ) -> torch.Tensor:
        if self.flow:
            return sigma * noise + (1 - sigma) * latent
        return latent + noise * (math.sqrt(1 + float(sigma) ** 2) if max_denoise else sigma)


class FakeDenoise:
    """D(x, sigma) = guided(x, sigma), and last_uncond = unguided(x, sigma) as a CFG guider's
    post-cfg capture leaves it (None without an unguided estimate). sigma reaches the estimates
    as the 0-d tensor the sampler passed. Counts its calls."""

    def __init__(self, guided: Estimate, unguided: Estimate | None = None, flow: bool = False) -> None:
        self.guided, self.unguided = guided, unguided
        self.model_sampling = FakeModelSampling(flow)
        self.last_uncond: torch.Tensor | None = None
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        assert sigma.ndim == 0, "samplers pass sigma as a 0-d tensor"
        self.calls += 1
        self.last_uncond = None if self.unguided is None else self.unguided(x, sigma)
        return self.guided(x, sigma)


def oracle(clean: torch.Tensor, flow: bool = False) -> FakeDenoise:
    """A denoiser that knows the answer: every estimate, guided or not, is `clean`."""
    return FakeDenoise(lambda x, s: clean.to(x.dtype).expand_as(x), lambda x, s: clean.to(x.dtype).expand_as(x), flow)


def linear_denoiser(shape: tuple[int, ...], flow: bool = False) -> FakeDenoise:
    """Estimates that depend on x and sigma, so every coefficient of a step shows in its result:
    guided 0.7 x + C1 / (1 + sigma), unguided 0.4 x + cos(sigma) C2."""
    generator = torch.Generator().manual_seed(7)
    c1 = torch.randn(shape, generator=generator, dtype=torch.float64)
    c2 = torch.randn(shape, generator=generator, dtype=torch.float64)
    return FakeDenoise(lambda x, s: 0.7 * x + c1 / (1 + s), lambda x, s: 0.4 * x + torch.cos(s) * c2, flow)


class ScriptedRun(SamplerRun):
    """A run that records each run.step call as (i, x, denoised) and counts its Gaussian draws.
    Its noise is `noises` in order (drawing more fails), or with noises=None the run's own
    seeded noise."""

    def __init__(self, noises: Sequence[torch.Tensor] | None = (), seed: int = 0) -> None:
        super().__init__(seed=seed, on_step=self._record)
        self.noises = None if noises is None else list(noises)
        self.draws = 0
        self.steps: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def _record(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        self.steps.append((i, x.clone(), denoised.clone()))

    def gaussian(self, x: torch.Tensor) -> NoiseSampler:
        seeded, noises = super().gaussian(x), self.noises

        def draw(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
            self.draws += 1
            return seeded(sigma, sigma_next) if noises is None else noises[self.draws - 1]

        return draw


def run_sampler(
    sampler: Sampler, model: FakeDenoise, x: torch.Tensor, sigmas: torch.Tensor, seed: int = 0
) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """(result, [(i, x, denoised) of each run.step call]) of a run with seeded noise."""
    run = ScriptedRun(None, seed)
    return sampler(model, x, sigmas, run), run.steps


class ScriptedNoise:
    """noise(sigma, sigma_next): a fixed pattern of the call's arguments and its number, so a
    reference that asks for noise over other intervals or in another order sees other noise.
    Passed to the samplers that take it as their noise_sampler option."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape, self.draws = shape, 0
        self.ramp = torch.arange(math.prod(shape), dtype=torch.float64).view(shape)

    def __call__(self, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float) -> torch.Tensor:
        self.draws += 1
        return torch.sin(self.ramp * (0.37 * self.draws) + 5 * float(sigma) + 3 * float(sigma_next))


# --- Schedules ---


def karras(
    n: int = 10, sigma_min: float = 0.0292, sigma_max: float = 14.6, rho: float = 7.0, dtype=torch.float32
) -> torch.Tensor:
    """Karras et al.'s schedule of n sigmas (computed in float64), then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


def flow_schedule(n: int = 10, start: float = 1.0) -> torch.Tensor:
    """n evenly spaced steps from `start` to 0."""
    return torch.linspace(start, 0, n + 1)


# --- The multistep and UniPC references' denoiser and start sample ---
# The estimates depend on both x and sigma (D = a x + c / (1 + sigma), and an unguided U of
# another shape), so a wrong weight, a stale history entry or a step taken from the wrong point
# changes the first steps. They are float64, so that a 1e-5 check tests the formulas rather than
# rounding; the references call them with float sigmas, FakeDenoise with 0-d tensors.

_GEN = torch.Generator().manual_seed(7)
C_GUIDED = torch.randn(1, 2, 3, 3, generator=_GEN, dtype=torch.float64)
C_UNGUIDED = torch.randn(1, 2, 3, 3, generator=_GEN, dtype=torch.float64)
X0 = 14.6 * torch.randn(1, 2, 3, 3, generator=_GEN, dtype=torch.float64)
"""The reference runs' start sample, at sigma 14.6."""


def guided(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    return 0.2 * x + C_GUIDED / (1 + float(sigma))


def unguided(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    return -0.1 * x + C_UNGUIDED * math.sqrt(1 + float(sigma))


def phis(z: float) -> tuple[float, float, float]:
    """phi_1, phi_2, phi_3 of the exponential integrators at z, from their closed forms."""
    e = math.exp(z)
    return (e - 1) / z, (e - 1 - z) / z**2, (e - 1 - z - z * z / 2) / z**3
