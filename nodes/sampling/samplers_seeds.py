"""SEEDS: Stochastic Explicit Exponential Derivative-free Solvers (Gonzalez et al. 2023,
arXiv:2305.14267), VP data prediction, 2 and 3 stages, as ComfyUI's seeds_2 and seeds_3.

A step from lambda to lambda + h evaluates the model at stages part of the way (fractions r of
h), each stage an exponential-integrator step from the step's start towards the first estimate
corrected by the latest stage's, with noise that is one Brownian path over the step: each
segment's noise is the previous one decayed plus fresh Gaussian noise. Flow-aware like the
other half-log-SNR solvers.
"""

from __future__ import annotations

import torch

from plinth.nodes.sampling.base import (
    Denoise,
    NoiseSampler,
    Sampler,
    SamplerRun,
    half_log_snr,
    sigma_of_half_log_snr,
    signal_scale,
)
from plinth.nodes.sampling.snr import offset_first_sigma


def h_phi_2(z: torch.Tensor) -> torch.Tensor:
    """z phi_2(z) = (e^z - 1 - z) / z, the weight of a linear term in an exponential integrator."""
    return (torch.expm1(z) - z) / z


def sample_seeds_2(
    model: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    run: SamplerRun,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    solver_type: str = "phi_1",
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """SEEDS-2: one evaluation at the fraction r; solver_type "phi_1" mixes the two estimates
    1 - 1/(2r) : 1/(2r) under the first-order weight, "phi_2" weighs their difference by phi_2."""
    if solver_type not in ("phi_1", "phi_2"):
        raise ValueError(f"solver_type must be 'phi_1' or 'phi_2', not {solver_type!r}")
    fractions = (r, 1.0)
    return seeds(model, x, sigmas, run, eta, s_noise, fractions, solver_type == "phi_1", noise_sampler)


def sample_seeds_3(
    model: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    run: SamplerRun,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r_1: float = 1 / 3,
    r_2: float = 2 / 3,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """SEEDS-3: evaluations at the fractions r_1 and r_2, each stage correcting with the last."""
    return seeds(model, x, sigmas, run, eta, s_noise, (r_1, r_2, 1.0), False, noise_sampler)


def seeds(
    model: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    run: SamplerRun,
    eta: float,
    s_noise: float,
    fractions: tuple[float, ...],
    phi_1_last: bool,
    noise_sampler: NoiseSampler | None,
) -> torch.Tensor:
    model_sampling = model.model_sampling
    flow = model_sampling.flow
    noise = noise_sampler or run.gaussian(x)
    sigmas = offset_first_sigma(sigmas, model_sampling)
    inject = eta > 0 and s_noise > 0
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if float(sigma_next) == 0:
            x = denoised
        else:
            lam = half_log_snr(sigma, flow)
            h = half_log_snr(sigma_next, flow) - lam
            h_eta = h * (eta + 1)
            latest, fraction_before, sigma_before = denoised, 0.0, sigma
            path = torch.zeros_like(x)  # the Brownian path's noise at the last stage, normalised
            for stage, fraction in enumerate(fractions):
                last = stage == len(fractions) - 1
                sigma_to = sigma_next if last else sigma_of_half_log_snr(lam + fraction * h, flow)
                h_phi_1 = torch.expm1(-fraction * h_eta)
                if stage == 0:
                    weight = torch.zeros_like(h_phi_1)
                elif last and phi_1_last:
                    weight = h_phi_1 / (2 * fractions[stage - 1])
                else:
                    weight = fraction / fractions[stage - 1] * h_phi_2(-fraction * h_eta)
                decay = torch.exp(-fraction * h * eta)
                estimate = h_phi_1 * denoised + weight * (latest - denoised)
                x_stage = sigma_to / sigma * decay * x - signal_scale(sigma_to, flow) * estimate
                if inject:
                    segment = (fraction_before - fraction) * h * eta
                    fresh = noise(sigma_before, sigma_to)
                    path = path * torch.exp(segment) + torch.sqrt(-torch.expm1(2 * segment)) * fresh
                    x_stage = x_stage + path * sigma_to * s_noise
                if last:
                    x = x_stage
                else:
                    latest = model(x_stage, sigma_to)
                    fraction_before, sigma_before = fraction, sigma_to
        run.step(i, x, denoised)
    return x


SEEDS = (("eta", 1.0), ("s_noise", 1.0))
SAMPLERS: dict[str, Sampler] = {
    "seeds_2": Sampler("seeds_2", sample_seeds_2, (*SEEDS, ("r", 0.5), ("solver_type", "phi_1"))),
    "seeds_3": Sampler("seeds_3", sample_seeds_3, (*SEEDS, ("r_1", 1 / 3), ("r_2", 2 / 3))),
}
